"""Export: ONNX graph vs the reference runtime (FP, CSKV, quantized linears), determinism, the ORT
model's IO-bound caches, the CLI (export, validate, generate --backend ort) and its errors."""
import json

import numpy as np
import pytest
import torch

from shrinkrt.errors import ShrinkError
from shrinkrt.export import artifact, llama
from shrinkrt.export.validate import compare
from shrinkrt.runtime.cskv import CSKVAttention, CSKVConfig
from shrinkrt.runtime.loader import load
from shrinkrt.runtime.ort_model import OrtModel
from tests.conftest import tiny_hf_model
from tests.test_export_ops import quant_layer
from tests.test_model import ours_from

pytest.importorskip("onnxruntime")


def compress(model, key_mode=None, bits=16, quant_bits=None, seed=0, groups=(64, 64, 64)):
    """Random CSKV factors on every layer and/or quantized q/o/down projections (odd ranks), their group
    sizes `groups` (q, o, down)."""
    gen = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        if quant_bits:
            for name, group in zip(("q_proj", "o_proj"), groups):
                lin = getattr(a, name)
                q = quant_layer(lin.out_features, lin.in_features, quant_bits, group, 5, seed=seed + i)
                setattr(a, name, q)
            d = layer.mlp.down_proj
            layer.mlp.down_proj = quant_layer(d.out_features, d.in_features, quant_bits, groups[2], 0,
                                              seed=seed + 50 + i)
        if key_mode:
            kv = a.n_kv_heads * a.head_dim
            in_k = kv if key_mode == "post-rope" else model.args.dim
            layer.self_attn = CSKVAttention(a, CSKVConfig(key_mode, 5, bits), torch.randn(in_k, 7, generator=gen) * 0.3,
                                            torch.randn(7, kv, generator=gen) * 0.3,
                                            torch.randn(model.args.dim, 9, generator=gen) * 0.3,
                                            torch.randn(9, kv, generator=gen) * 0.3, model.rope_cos, model.rope_sin)
    return model


class Loaded:  # the fields of LoadedModel that export reads
    def __init__(self, model, model_dir, name="tiny"):
        self.model, self.model_dir, self.name = model, model_dir, name


@pytest.mark.parametrize("variant", ["fp", "fp-bias-tied", "quant4", "quant3", "quant3-groups", "cskv-pre-16",
                                     "cskv-post-8", "cskv-pre-4+quant2", "ort-cpu:quant2", "ort-cpu:quant3",
                                     "ort-cpu:quant8", "ort-cpu:quant4-groups",
                                     "ort-cpu:cskv-post-4+quant4", "ort-cpu-int8act:quant4",
                                     "ort-cpu-int8act:cskv-post-4+quant4"])
def test_onnx_runtime_matches_reference(variant, tmp_path):
    target = "ort-cpu" if variant.startswith("ort-cpu") else "generic"
    int8_act = variant.startswith("ort-cpu-int8act:")
    variant = variant.split(":")[-1]
    over = {"attention_bias": True, "tie_word_embeddings": True} if variant == "fp-bias-tied" else {}
    model = ours_from(tiny_hf_model("llama", **over))
    if variant.startswith("quant"):  # "-groups": a group size per layer, as the allocation chooses them
        compress(model, quant_bits=int(variant[5]), groups=(32, 128, 64) if variant.endswith("-groups") else (64,) * 3)
    elif variant.startswith("cskv"):
        _, mode, bits = variant.split("+")[0].split("-")
        qb = variant.split("+quant")[1] if "+quant" in variant else None
        compress(model, f"{mode}-rope", int(bits), quant_bits=int(qb) if qb else None)
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target=target, ort_accuracy=4 if int8_act else 0)
    if target == "ort-cpu":
        meta = json.loads((tmp_path / "exp" / "export.json").read_text())
        assert meta["ort_cpu"]["layers_in_wider_container"] == (3 * 2 if variant == "quant3" else 0)
        if variant.endswith("-groups"):  # each MatMulNBits takes its layer's group size as block_size
            import onnx

            blocks = {a.i for n in onnx.load(tmp_path / "exp" / "model.onnx", load_external_data=False).graph.node
                      if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
            assert {32, 64, 128} <= blocks, blocks
        if variant.startswith("cskv-post"):  # level 4: all four factors fp16; level 0: all fp32
            import onnx

            types = {i.name.rsplit(".", 1)[-1]: i.data_type
                     for i in onnx.load(tmp_path / "exp" / "model.onnx", load_external_data=False).graph.initializer
                     if i.name.startswith("layers.0.self_attn.") and i.name.endswith(("_up", "_down"))}
            f = onnx.TensorProto.FLOAT16 if int8_act else onnx.TensorProto.FLOAT
            assert types == {"k_up": f, "v_up": f, "k_down": f, "v_down": f}, types
    ort_model = OrtModel(tmp_path / "exp")
    prompt = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    # fp32 both sides: only summation order differs (a feature code may flip at an exact tie);
    # int8 activations inside MatMulNBits (accuracy level 4) cost ~1e-2 on this tiny random model
    tol = 5e-2 if int8_act else 1e-3
    assert compare(model, ort_model, prompt, steps=12, tol=tol) < tol


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_embedding_reads_the_quantized_heads_codes(bits, tmp_path):
    """With a quantized head and tied embeddings the table is stored once: the embedding gathers the
    head's MatMulNBits codes (GatherBlockQuantized), row for row the head's dequantized weight."""
    import onnx
    import onnxruntime as ort

    model = compress(ours_from(tiny_hf_model("llama", tie_word_embeddings=True)), quant_bits=4)
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="ort-cpu", lm_head_bits=bits)
    m = onnx.load(str(tmp_path / "exp" / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    assert "embed_tokens.weight" not in inits
    gather = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    # its own copy of the head's codes (a shared initializer stays resident after the head's prepack)
    assert len(gather) == 1 and gather[0].input[0] == "embed_tokens.from_head_B"
    np.testing.assert_array_equal(inits["embed_tokens.from_head_B"], inits["lm_head.nbits_B"])
    # the embedding's output against the head's codes dequantized by hand
    emb = next(n.output[0] for n in m.graph.node if n.name.startswith("embed/") and n.op_type in ("Reshape", "Slice"))
    m.graph.output.append(onnx.helper.make_tensor_value_info(emb, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.dtype(
        {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8", "tensor(int64)": "int64"}[i.type]))
        for i in sess.get_inputs()}
    ids = np.array([[0, 5, 96, 3]], np.int64)
    feeds["input_ids"] = ids
    got = sess.run([emb], feeds)[0]
    B, zp = inits["lm_head.nbits_B"], inits["lm_head.nbits_zero_points"]
    N, blocks = B.shape[:2]
    codes = np.stack([B & 15, B >> 4], -1).reshape(N, blocks, -1) if bits == 4 else B
    zp = (np.stack([zp & 15, zp >> 4], -1).reshape(N, -1) if bits == 4 else zp.reshape(N, -1))[:, :blocks]
    w = (codes.astype(np.float32) - zp[:, :, None]) * inits["lm_head.nbits_scales"].reshape(N, blocks, 1)
    K = model.embed_tokens.weight.shape[1]
    np.testing.assert_array_equal(got[0], w.reshape(N, -1)[ids[0], :K])
    assert np.abs(got[0] - model.embed_tokens.weight[ids[0]].detach().numpy()).max() < (0.02 if bits == 8 else 0.3)
    ort_model = OrtModel(tmp_path / "exp")  # the whole model still tracks the reference
    prompt = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    assert compare(model, ort_model, prompt, steps=8, tol=1.0) < (0.02 if bits == 8 else 0.2)  # measured 0.004 / 0.065


def test_ort_model_runs_without_torch(tmp_path):
    """OrtModel.run takes and returns numpy and never imports torch or transformers (a CPU deployment's
    process, and the one whose peak RSS the latency benchmark reports); same logits as forward."""
    import subprocess
    import sys

    model = compress(ours_from(tiny_hf_model("llama")), "post-rope", 4, quant_bits=4)
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="ort-cpu")
    script = f"""
import sys, numpy as np
from pathlib import Path
from shrinkrt.runtime.ort_model import OrtModel
m = OrtModel(Path({str(tmp_path / "exp")!r}))
m.setup_caches(1, 16)
a = m.run(np.array([[5, 6, 7]]), 0)
b = m.run(np.array([[8]]), 3)
np.save({str(tmp_path / "b.npy")!r}, b)
print(type(a).__name__, a.shape, "torch" in sys.modules, "transformers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["ndarray", "(1,", "1,", str(model.args.vocab_size) + ")", "False", "False"]
    om = OrtModel(tmp_path / "exp")
    om.setup_caches(1, 16)
    om.forward(torch.tensor([[5, 6, 7]]), 0)
    np.testing.assert_array_equal(om.forward(torch.tensor([[8]]), 3).numpy(), np.load(tmp_path / "b.npy"))


def test_export_is_deterministic_and_atomic(tmp_path):
    model = compress(ours_from(tiny_hf_model("llama")), "pre-rope", 4, quant_bits=3)
    a = artifact.export(Loaded(model, tmp_path), tmp_path / "a")
    b = artifact.export(Loaded(model, tmp_path), tmp_path / "b")
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert (a / "export.json").read_text() == (b / "export.json").read_text()
    with pytest.raises(ShrinkError, match="unknown export target"):
        artifact.export(Loaded(model, tmp_path), tmp_path / "a", target="tpu")
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()  # the old export is intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_graph_is_readable_and_plugin_ready(tmp_path):
    model = compress(ours_from(tiny_hf_model("llama")), "post-rope", 8, quant_bits=4)
    m = llama.build(model)
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names) and all(names)
    custom = [n for n in m.graph.node if n.domain == "shrinkrt"]
    assert {n.op_type for n in custom} == {"QuantMatMul", "BiBranchAttention"}
    for n in custom:
        attrs = {a.name: a for a in n.attribute}
        assert attrs["plugin_namespace"].s == b"shrinkrt" and attrs["plugin_version"].s == b"1"
        assert all(-2**31 <= a.i < 2**31 for a in attrs.values() if a.type == a.INT)
    packed = {i.name: i.data_type for i in m.graph.initializer if i.name.endswith((".codes", ".zeros"))}
    assert packed and set(packed.values()) == {6}  # INT32, never UINT8
    assert {(f.name, f.overload) for f in m.functions} == {(n.op_type, n.overload) for n in custom}


def test_ort_caches_are_bound_in_place_and_count_stored_bytes(tmp_path):
    model = compress(ours_from(tiny_hf_model("llama")), "pre-rope", 4)
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp")
    om = OrtModel(tmp_path / "exp")
    om.setup_caches(1, 40)
    model.setup_caches(1, 40)
    ptrs = {k: v.data_ptr() for k, v in om.bound.items()}
    bufs = {k: v.ctypes.data for k, v in om.buffers.items()}
    assert ptrs == bufs  # the OrtValues are views of the buffers, not copies
    toks = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        om(toks[:, :17], 0)
        model(toks[:, :17], 0)
        for p in range(17, 30):
            om(toks[:, p:p + 1], p)
            model(toks[:, p:p + 1], p)
    assert {k: v.data_ptr() for k, v in om.bound.items()} == ptrs  # nothing reallocated
    assert om.cache_length() == 30 and om.cache_nbytes() == model.cache_nbytes()
    with pytest.raises(ValueError, match="gap"):
        om(toks[:, :1], 5)


def test_cli_export_validate_generate(tiny_dir, tmp_path, capsys):
    from shrinkrt.cli import main

    ck = tmp_path / "ck"
    assert main(["calibrate", "--model", str(tiny_dir), "--kv-ratio", "0.5", "--window", "4", "--kv-bits", "8",
                 "--weight-budget", "4bpw", "--calib-tokens", "256", "--kv-fit-steps", "5", "--out", str(ck),
                 "--quiet"]) == 0
    exp = tmp_path / "exp"
    assert main(["export", "--model", str(tiny_dir), "--checkpoint", str(ck), "--out", str(exp)]) == 0
    report = json.loads((exp / "validation.json").read_text())
    assert report["greedy_tokens_identical"] and len(report["prompts"]) == 3
    assert all(p["max_abs_logit_diff"] < report["tolerance"] for p in report["prompts"])
    meta = json.loads((exp / "export.json").read_text())
    assert meta["custom_ops"] == ["shrinkrt::BiBranchAttention", "shrinkrt::QuantMatMul"]
    capsys.readouterr()
    args = ["w5 w6 w7", "--raw", "--max-new-tokens", "6"]
    assert main(["generate", *args, "--model", str(tiny_dir), "--checkpoint", str(ck)]) == 0
    torch_text = capsys.readouterr().out
    assert main(["generate", *args, "--backend", "ort", "--model", str(exp)]) == 0
    assert capsys.readouterr().out == torch_text
    # bad input: one clear line each
    assert main(["validate", str(exp), "--model", str(tiny_dir)]) == 2
    assert "give the same --checkpoint" in capsys.readouterr().err
    assert main(["generate", "hi", "--backend", "ort", "--model", str(tiny_dir)]) == 2
    assert "not a ShrinkRT export" in capsys.readouterr().err
    assert main(["generate", "hi", "--backend", "ort", "--model", str(exp), "--checkpoint", str(ck)]) == 2
    assert "drop --checkpoint" in capsys.readouterr().err
    # a validation failure leaves no export behind
    import shrinkrt.export.validate as v

    def fail(*args, **kw):
        raise ShrinkError("validate: logits of prefill differ by 3 (threshold 0.02)")

    v_real = v.validate
    v.validate = fail
    try:
        assert main(["export", "--model", str(tiny_dir), "--out", str(tmp_path / "exp2")]) == 2
    finally:
        v.validate = v_real
    assert "logits of prefill differ" in capsys.readouterr().err and not (tmp_path / "exp2").exists()
    assert main(["generate", "hi", "--backend", "ort", "--model", str(exp), "--device", "cuda"]) == 2
    assert "needs onnxruntime-gpu" in capsys.readouterr().err


def test_identical_constants_are_one_node(tmp_path):
    """ops.Body.const: one Constant per distinct (dtype, shape, value) in the graph and in each body;
    scalars stay scalars (Range takes 0-d inputs only)."""
    import onnx
    from onnx import numpy_helper

    model = compress(ours_from(tiny_hf_model("llama")), "post-rope", 4, quant_bits=4)
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp")
    m = onnx.load(tmp_path / "exp" / "model.onnx", load_external_data=False)
    for where, nodes in [("graph", m.graph.node)] + [(f.name, f.node) for f in m.functions]:
        seen = {}
        for n in nodes:
            if n.op_type == "Constant":
                a = numpy_helper.to_array(n.attribute[0].t)
                key = (a.dtype.str, a.shape, a.tobytes())
                assert key not in seen, f"{where}: {n.name} repeats {seen.get(key)}"
                seen[key] = n.name
    assert sum(n.op_type == "Constant" for n in m.graph.node) <= 10  # was 29 per this model before the dedupe


def test_ort_cpu_packs_the_linears_whose_formats_match(tmp_path):
    """The allocation picks a format per linear; ort-cpu packs those of one input that share container
    bits and group size (here k and v, not q; gate and up differ) into one MatMulNBits, the rest alone,
    and the logits stay the reference's."""
    import onnx

    model = ours_from(tiny_hf_model("llama"))
    for i, layer in enumerate(model.layers):
        a, mlp = layer.self_attn, layer.mlp
        for mod, name, bits, group in ((a, "q_proj", 4, 64), (a, "k_proj", 4, 32), (a, "v_proj", 4, 32),
                                       (mlp, "gate_proj", 4, 32), (mlp, "up_proj", 8, 32)):
            lin = getattr(mod, name)
            setattr(mod, name, quant_layer(lin.out_features, lin.in_features, bits, group, 0, seed=7 * i + bits))
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="ort-cpu")
    names = [n.name for n in onnx.load(tmp_path / "exp" / "model.onnx", load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    for i in range(len(model.layers)):
        mine = {n.split("/")[0].split(".")[-1] for n in names if n.startswith(f"layers.{i}.")}
        assert {"q_proj", "k_v_proj", "gate_proj", "up_proj"} <= mine and not {"k_proj", "v_proj", "qkv_proj"} & mine, mine
    prompt = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    assert compare(model, OrtModel(tmp_path / "exp"), prompt, steps=12, tol=1e-3) < 1e-3


def test_min_layer_codes_hold_the_min_on_a_17x_finer_grid():
    """4-bit codes with fp16 mins in the 8-bit container: w = (Q - Z) * S reproduces q * s + m with the
    min off by at most s / 34 in the usual block (min in [-15s, 0]), s / (2k) with a coarser k for a
    positive or far min, and a flat block (s = 0) to within fp32 rounding."""
    from shrinkrt.export.ort_cpu import min_layer_codes

    gen = np.random.default_rng(0)
    N, G, gs = 64, 6, 32
    q = gen.integers(0, 16, (N, G * gs))
    s = gen.uniform(0.001, 0.05, (N, G))
    m = -s * gen.uniform(0, 15, (N, G))  # the usual block
    m[0, 0], m[1, 1], m[2, 2], m[3, 3] = 3.0 * s[0, 0], -40.0 * s[1, 1], 0.9 * s[2, 2], 0.0
    s[4, 4], m[4, 4], q[4, 4 * gs:5 * gs] = 0.0, -0.25, 0  # all 32 weights equal
    Q, S, Z, err = min_layer_codes(q, s, m, gs)
    assert Q.dtype == np.uint8 and Z.dtype == np.uint8 and S.dtype == np.float32
    w = (Q.astype(np.float64) - np.repeat(Z, gs, axis=1)) * np.repeat(S, gs, axis=1)
    ref = q * np.repeat(s, gs, axis=1) + np.repeat(m, gs, axis=1)
    off = np.abs(w - ref).reshape(N, G, gs).max(axis=2)
    usual = np.ones((N, G), bool)
    usual[[0, 1, 2, 4], [0, 1, 2, 4]] = False
    assert (off[usual] <= s[usual] / 34 * (1 + 1e-6)).all()
    assert off[0, 0] <= s[0, 0] / (2 * 14) and off[1, 1] <= s[1, 1] / (2 * 6) and off[2, 2] <= s[2, 2] / 30
    assert off[4, 4] < 1e-7 and err <= s.max() / 12


def model_with_min_layers():
    """The tiny model with per layer q_proj at 4-bit fp16 mins, gate_proj at 4-bit 8-bit-param mins and
    up_proj at 8 bits with zero points (all group 32)."""
    model = ours_from(tiny_hf_model("llama"))
    for i, layer in enumerate(model.layers):
        a, mlp = layer.self_attn, layer.mlp
        for mod, name, bits, mins, pb in ((a, "q_proj", 4, True, 16), (mlp, "gate_proj", 4, True, 8),
                                          (mlp, "up_proj", 8, False, 16)):
            lin = getattr(mod, name)
            setattr(mod, name, quant_layer(lin.out_features, lin.in_features, bits, 32, 0, seed=5 * i + bits, mins=mins,
                                           param_bits=pb))
    return model


def test_generic_export_reads_8bit_param_codes(tmp_path):
    """The generic artifact holds the 8-bit param layers' uint8 / int8 codes and fp16 row steps (not fp16
    scales and mins) and ONNX Runtime, running the QuantMatMul bodies, follows the reference's logits."""
    import onnx

    model = model_with_min_layers()
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="generic")
    inits = {i.name: i.data_type for i in onnx.load(tmp_path / "exp" / "model.onnx", load_external_data=False).graph.initializer}
    gate = "layers.0.mlp.gate_proj"
    assert inits[f"{gate}.scale_codes"] == onnx.TensorProto.UINT8 and inits[f"{gate}.min_codes"] == onnx.TensorProto.INT8
    assert f"{gate}.scales" not in inits and inits["layers.0.self_attn.q_proj.scales"] == onnx.TensorProto.FLOAT16
    prompt = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    assert compare(model, OrtModel(tmp_path / "exp"), prompt, steps=12, tol=1e-3) < 1e-3


def test_ort_cpu_min_layers_share_the_8bit_container(tmp_path):
    """Linears with mins (fp16 or 8-bit params) lower to 8-bit MatMulNBits with uint8 zero points (no float
    zero points: ONNX Runtime's slow path), packed beside an 8-bit layer of the same input; logits within
    the min's regridding of the reference's."""
    import onnx

    model = model_with_min_layers()
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="ort-cpu")
    graph = onnx.load(tmp_path / "exp" / "model.onnx", load_external_data=False).graph
    nbits = {n.name.split("/")[0].split(".")[-1]: n for n in graph.node
             if n.op_type == "MatMulNBits" and n.name.startswith("layers.0.")}
    assert {"q_proj", "gate_up_proj"} <= set(nbits), set(nbits)
    for n in (nbits["q_proj"], nbits["gate_up_proj"]):
        assert {a.name: a.i for a in n.attribute}["bits"] == 8
    zp = {i.name: i.data_type for i in graph.initializer}
    assert zp["layers.0.self_attn.q_proj.nbits_zero_points"] == onnx.TensorProto.UINT8
    prompt = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    assert compare(model, OrtModel(tmp_path / "exp"), prompt, steps=12, tol=1e-2) < 1e-2
