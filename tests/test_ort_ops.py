"""The CPU custom-op library (plugins/onnxruntime) against the ops' reference bodies and the PyTorch
runtime: call by call (prefill, decode at the window's edge, a chunk crossing it, a long store that
splits the feature rows), stored bytes identical; and a whole model, library vs bodies."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from shrinkrt.runtime import ort_ops
from tests.test_export_ops import bi_branch_model

ort = pytest.importorskip("onnxruntime")

LIB = ort_ops.resolve("auto")
if LIB is None and ort_ops.UNAVAILABLE.is_file():  # the setup said why (no headers on this machine)
    pytest.skip(f"CPU ops library not built: {ort_ops.why_missing()}", allow_module_level=True)

# (model type, HF overrides, window, ranks): SmolLM2's attention shape, and a second one with biases
SHAPES = {
    "smollm2": ("llama", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3), 8, (48, 40)),
    "qwen-gqa2-d32": ("qwen2", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32), 5, (5, 37)),
    # the main job's rank range (up to G*D) and a window wider than the kernel's 64-row tile
    "smollm2-w80-wide": ("llama", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3), 80, (144, 176)),
}


def test_library_is_built():
    assert LIB is not None and LIB.is_file(), ort_ops.why_missing()
    import ctypes

    f = ctypes.CDLL(str(LIB)).shrinkrt_ort_ops
    f.restype = ctypes.c_char_p
    isa = f().decode().split("(")[1].rstrip(")")
    assert isa in ("avx512vnni", "avx512", "avx2", "x86-64")
    if os.environ.get("SHRINKRT_ORT_ISA"):  # the copy asked for (test_every_isa_copy runs each)
        assert isa == os.environ["SHRINKRT_ORT_ISA"]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "x86-64"])
def test_every_isa_copy(isa):
    """The narrower kernel copies (this CPU runs the widest one by default) pass the same call-by-call
    checks: each ISA's tile GEMMs, int4 unpack, fp16 conversion and transposes are separate code."""
    import subprocess
    import sys

    if isa == "avx2" and not _cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    if isa == "avx512" and not all(_cpu_has(f) for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq")):
        pytest.skip("this CPU has no AVX-512 (F, VL, BW, DQ)")
    sel = ("test_library_is_built or (test_library_matches_body_and_runtime and (smollm2-w80-wide or "
           "(qwen and not BiBranchSelfAttention))) or test_long_store or test_w4a8 or test_int8_queries_library")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", sel],
                       env={**os.environ, "SHRINKRT_ORT_ISA": isa}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-500:]


def _cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except OSError:
        return False


def sessions():
    lib = ort.SessionOptions()
    ort_ops.register(lib, LIB)
    return {"body": ort.SessionOptions(), "library": lib}


def layer_for(shape: str, key_mode: str, bits: int, capacity: int, seed: int = 0):
    from shrinkrt.runtime.cskv import CSKVAttention, CSKVConfig
    from tests.conftest import tiny_hf_model
    from tests.test_model import ours_from

    mt, over, W, (rk, rv) = SHAPES[shape]
    model = ours_from(tiny_hf_model(mt, num_hidden_layers=1, max_position_embeddings=capacity, **over))
    a = model.layers[0].self_attn
    gen = torch.Generator().manual_seed(seed)
    cfg = CSKVConfig(key_mode, W, bits)
    kv, dim = a.n_kv_heads * a.head_dim, a.q_proj.weight.shape[1]
    layer = CSKVAttention(a, cfg, torch.randn(kv if key_mode == "post-rope" else dim, rk, generator=gen) / kv ** 0.5,
                          torch.randn(rk, kv, generator=gen) * 0.3, torch.randn(dim, rv, generator=gen) / dim ** 0.5,
                          torch.randn(rv, kv, generator=gen) * 0.3, model.rope_cos, model.rope_sin)
    return model, a, cfg, layer


def run_calls(shape, key_mode, bits, chunks, capacity, self_form=False, factors=None, downs=None, profile=None,
              query_bits=None):
    """Feeds the same layer inputs to the op (body and library sessions) and to CSKVAttention; returns
    the largest |y diff| of each implementation vs the runtime, and the stores each one built.
    self_form: the BiBranchSelfAttention node (q/k before RoPE, x and the down projections); factors /
    downs: "float16" feeds its k_up, v_up / k_down, v_down as fp16 (downs: factors' unless given);
    profile: a path prefix for the library session's ONNX Runtime profile; query_bits: the self form's
    attribute (None: absent)."""
    from tests.conftest import bibranch_call_inputs

    model, a, cfg, layer = layer_for(shape, key_mode, bits, capacity)
    layer.setup_cache(1, capacity, torch.float32, "cpu")
    proto = bi_branch_model(layer, cfg, hidden=a.q_proj.weight.shape[1] if self_form else None,
                            factor_dtype=factors, down_dtype=downs, query_bits=query_bits).SerializeToString()
    opts = sessions()
    if profile:
        opts["library"].enable_profiling = True
        opts["library"].profile_file_prefix = profile
    sess = {k: ort.InferenceSession(proto, o, providers=["CPUExecutionProvider"]) for k, o in opts.items()}
    H, G, D, W = layer.n_heads, layer.n_kv_heads, layer.head_dim, cfg.window
    cache = layer.cache

    def empty_state():
        st = {"win_k": np.zeros((1, G, W, D), np.float16), "win_v": np.zeros((1, G, W, D), np.float16)}
        for kv in "kv":
            fs = getattr(cache, f"feat_{kv}")
            st[f"feat_{kv}"] = np.zeros(tuple(fs.codes.shape), np.int8 if bits < 16 else np.float16)
            if bits < 16:
                st[f"feat_{kv}_scales"] = np.zeros(tuple(fs.scales.shape), np.float16)
        return st

    state = {k: empty_state() for k in sess}
    worst = {k: 0.0 for k in sess}
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(1, sum(chunks), a.q_proj.weight.shape[1], generator=gen)
    bias = lambda m: (m.bias if m.bias is not None else torch.zeros(m.out_features)).detach().numpy()
    start = 0
    for T in chunks:
        x = x_all[:, start:start + T]
        inputs, ref = bibranch_call_inputs(model, a, layer, x, start)
        ref = ref.numpy()
        if self_form:
            with torch.no_grad():
                inputs = {"q": a.q_proj(x), "k": a.k_proj(x), "v": inputs["v"], "x": x, "k_down": layer.k_down,
                          "v_down": layer.v_down}
        fixed = {**{n: t.numpy() for n, t in inputs.items()},
                 "k_up": layer.k_up.numpy(), "v_up": layer.v_up.numpy(), "k_bias": bias(a.k_proj),
                 "v_bias": bias(a.v_proj), "rope_cos": model.rope_cos.numpy(), "rope_sin": model.rope_sin.numpy(),
                 "past_length": np.array([start], np.int64)}
        if factors:
            fixed |= {n: fixed[n].astype(factors) for n in ("k_up", "v_up")}
            fixed |= {n: fixed[n].astype(downs or factors) for n in ("k_down", "v_down")}
        ys = {}
        for name, s in sess.items():
            st = state[name]
            got = dict(zip([o.name for o in s.get_outputs()], s.run(None, {**fixed, **st})))
            with torch.no_grad():
                y = ys[name] = a.o_proj(torch.from_numpy(got["y"])).numpy()
            worst[name] = max(worst[name], float(np.abs(y - ref).max() / max(1.0, np.abs(ref).max())))
            st["win_k"], st["win_v"] = got["win_k_out"], got["win_v_out"]
            for key in [n for n in st if n.startswith("feat_")]:  # the caller writes the new rows
                st[key][:, start:start + T] = got[key + "_new"]
        gap = float(np.abs(ys["library"] - ys["body"]).max() / max(1.0, np.abs(ys["body"]).max()))
        worst["library_vs_body"] = max(worst.get("library_vs_body", 0.0), gap)
        start += T
    if profile:
        state["profile"] = sess["library"].end_profiling()
    return worst, state, cache, start


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("op", ["BiBranchAttention", "BiBranchSelfAttention"])
def test_library_matches_body_and_runtime(op, shape, key_mode, bits):
    W = SHAPES[shape][2]
    # prefill; decode up to the window's edge (W, W+1); a chunk crossing it; more decode
    chunks = [W - 2, 1, 1, 1, W + 3, 1, 17, 1]
    worst, state, cache, n = run_calls(shape, key_mode, bits, chunks, capacity=max(64, sum(chunks) + 1),
                                       self_form=op == "BiBranchSelfAttention")
    if op == "BiBranchSelfAttention":  # a feature code one step off the runtime's moves y by ~1e-3
        assert worst["body"] < (1e-3 if bits == 16 else 1e-2) and worst["library"] < (1e-3 if bits == 16 else 1e-2), worst
        assert_stores_close(state, cache, n, bits)
        return
    assert worst["body"] < 1e-4 and worst["library"] < 1e-4, worst
    for kv in "kv":  # the library's store is the body's and the runtime's, byte for byte
        fs = getattr(cache, f"feat_{kv}")
        lib, body = state["library"][f"feat_{kv}"], state["body"][f"feat_{kv}"]
        assert np.array_equal(lib, body)
        assert np.array_equal(lib[:, :n].view(np.uint8 if bits == 4 else lib.dtype), fs.codes[:, :n].numpy())
        if bits < 16:
            assert np.array_equal(state["library"][f"feat_{kv}_scales"], state["body"][f"feat_{kv}_scales"])
    for w in ("win_k", "win_v"):
        assert np.array_equal(state["library"][w], state["body"][w])


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("downs", ["float32", "float16"])
def test_self_form_with_fp16_factors(downs, key_mode, bits, tmp_path):
    """The self form with fp16 k_up, v_up in an fp32 graph (the ort-cpu export's post-RoPE form), and
    with k_down, v_down fp16 too. The library runs its own kernel for it (ONNX Runtime's profile names
    the node's op, not the body's nodes) and matches the body (which casts the factors)."""
    import json

    W = SHAPES["smollm2"][2]
    chunks = [W - 2, 1, 1, 1, W + 3, 1, 17, 1]
    worst, state, cache, n = run_calls("smollm2", key_mode, bits, chunks, capacity=max(64, sum(chunks) + 1),
                                       self_form=True, factors="float16", downs=downs, profile=str(tmp_path / "ort"))
    ops_run = {e["args"]["op_name"] for e in json.load(open(state.pop("profile")))
               if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    assert "BiBranchSelfAttention" in ops_run and "MatMul" not in ops_run, ops_run
    assert worst["library_vs_body"] < 1e-4, worst  # the same fp16 values, converted exactly by both
    # vs the runtime's fp32 factors: fp16 up projections act after the features' quantization and move
    # y by their own rounding; fp16 down projections flip int4 codes (this random pre-RoPE layer: ~4e-2),
    # which is why the export keeps them fp32
    if downs == "float32":
        assert worst["body"] < 1e-3 and worst["library"] < 1e-3, worst
        assert_stores_close(state, cache, n, bits)
    else:
        tol = 1e-3 if bits == 16 else (1e-2 if key_mode == "post-rope" else 6e-2)
        assert worst["body"] < tol and worst["library"] < tol, worst


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_int8_queries_library_matches_body(shape, bits):
    """query_bits = 8 (the ort-cpu export's post-RoPE default): decode steps and short chunks (<= 16
    tokens) dot the feature keys with int8 folded queries, longer calls with fp32 ones. The library (one
    byte product per rank for int4 keys, the fp32 tiles for this call's rows and other widths) matches
    the body call by call; the rounding is visible (y moves from the fp32 queries' by more than the
    library-vs-body gap) but small; the stores are the fp32 form's byte for byte (queries are not stored)."""
    W = SHAPES[shape][2]
    chunks = [W - 2, 1, 1, 1, W + 3, 1, 17, 1, 16, 1]  # 17: fp32 queries; 16 and below: int8
    cap = max(64, sum(chunks) + 1)
    worst, state, cache, n = run_calls(shape, "post-rope", bits, chunks, cap, self_form=True, query_bits=8)
    # the self form computes its features and folds its queries in its own summation order, so a value
    # within fp32 rounding of a code boundary may land on the next code (one step; measured <= 1.1e-4)
    assert worst["library_vs_body"] < 5e-4, worst
    fp32, state32, _, _ = run_calls(shape, "post-rope", bits, chunks, cap, self_form=True, query_bits=0)
    assert fp32["library_vs_body"] < 5e-4, fp32
    assert worst["body"] > 10 * worst["library_vs_body"] and worst["body"] > fp32["body"], (worst, fp32)
    assert worst["body"] < 3e-2 and worst["library"] < 3e-2, worst  # vs the runtime's fp32 queries
    for key in state["library"]:
        assert np.array_equal(state["library"][key], state32["library"][key]), key


def test_int8_queries_are_rounded_per_group_of_ranks():
    """The body's rounding (export/ops.py) is the contract's: per FEATURE_GROUP ranks (the last group
    partial), codes round(x * 127 / amax) (ties to even) times amax / 127; an all-zero group stays 0."""
    import onnx
    from onnx import TensorProto, helper

    from shrinkrt.export import ops
    from shrinkrt.runtime.op_contract import FEATURE_GROUP, QUERY_CODE_MAX

    r = 2 * FEATURE_GROUP + 8
    b = ops.Body("")
    out = ops._round_queries(b, "x", r)
    b.nodes.append(helper.make_node("Identity", [out], ["y"]))
    graph = helper.make_graph(b.nodes, "round", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, r])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, r])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ops.OPSET)])
    model.ir_version = 10
    x = np.random.default_rng(0).standard_normal((1, 2, 3, r)).astype(np.float32)
    x[0, 1, 2, :FEATURE_GROUP] = 0
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for g0 in range(0, r, FEATURE_GROUP):
        v = x[..., g0:g0 + FEATURE_GROUP]
        amax = np.abs(v).max(-1, keepdims=True)
        inv = np.where(amax > 0, np.float32(QUERY_CODE_MAX) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        want = np.round(v * inv) * (amax / np.float32(QUERY_CODE_MAX))
        np.testing.assert_array_equal(y[..., g0:g0 + FEATURE_GROUP], want.astype(np.float32))
        assert np.all(np.abs(y[..., g0:g0 + FEATURE_GROUP] - v) <= amax / (2 * QUERY_CODE_MAX) * 1.0001)
    assert np.all(y[0, 1, 2, :FEATURE_GROUP] == 0)


def test_bad_query_bits_are_one_line():
    """The library refuses a query_bits it does not implement, and int8 queries with pre-RoPE keys
    (there is no folded query to round), in one line at session creation."""
    import onnx

    model, a, cfg, layer = layer_for("smollm2", "post-rope", 4, 64)
    for key_mode, value, msg in (("post-rope", 5, "query_bits must be 0 or 8"),
                                 ("pre-rope", 8, "query_bits 8 needs key_mode 1")):
        proto = bi_branch_model(layer, cfg, hidden=a.q_proj.weight.shape[1], query_bits=0)
        node = proto.graph.node[0]
        for at in node.attribute:
            if at.name == "query_bits":
                at.i = value
            if at.name == "key_mode":
                at.i = ops_key_mode(key_mode)
        with pytest.raises(Exception, match=f"shrinkrt::BiBranchSelfAttention: {msg}"):
            ort.InferenceSession(proto.SerializeToString(), sessions()["library"], providers=["CPUExecutionProvider"])


def ops_key_mode(name: str) -> int:
    from shrinkrt.export import ops

    return ops.KEY_MODE[name]


def assert_stores_close(state, cache, n, bits):
    """The self-attention form computes RoPE and the features itself (its own summation order), so a
    stored value may land one rounding step away from the runtime's: every ring and feature value
    within one step (an fp16 ulp, or one code at 8/4 bits) of the runtime's, and almost all equal."""
    def unpack(codes):  # int4 bytes -> signed nibbles, low nibble = even feature
        u = codes.astype(np.int16)
        return np.stack([((u & 15) ^ 8) - 8, u >> 4], -1).reshape(*codes.shape[:-1], -1)

    for name, st in state.items():
        for kv in "kv":
            fs = getattr(cache, f"feat_{kv}")
            got, want = st[f"feat_{kv}"][:, :n], fs.codes[:, :n].numpy()
            if bits == 16:
                np.testing.assert_allclose(got.astype(np.float32), want.view(np.float16).astype(np.float32),
                                           rtol=2e-3, atol=2e-3, err_msg=f"{name} feat_{kv}")
                continue
            g, w = (unpack(got.view(np.uint8)), unpack(want.view(np.uint8))) if bits == 4 else (got, want.view(np.int8))
            diff = np.abs(g.astype(np.int32) - w.astype(np.int32))
            assert diff.max() <= 1 and diff.mean() < 0.01, (name, kv, diff.max(), diff.mean())
            np.testing.assert_allclose(st[f"feat_{kv}_scales"][:, :n].astype(np.float32),
                                       fs.scales[:, :n].numpy().astype(np.float32), rtol=2e-3)
        for w in ("win_k", "win_v"):
            np.testing.assert_allclose(st[w].astype(np.float32), getattr(cache, w).numpy().astype(np.float32),
                                       rtol=2e-3, atol=2e-3, err_msg=f"{name} {w}")


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
def test_long_store_splits_the_feature_rows(key_mode):
    """A 700-token prefill (44 query blocks, unsplit) then decode over 690+ feature rows (split in
    two and merged): the same numbers as the runtime."""
    worst, state, cache, n = run_calls("smollm2", key_mode, 4, [700, 1, 1, 1], capacity=1024)
    assert worst["library"] < 1e-4 and worst["body"] < 1e-4, worst
    assert np.array_equal(state["library"]["feat_k"], state["body"]["feat_k"])


@pytest.mark.parametrize("shape", ["smollm2", "qwen-gqa2-d32"])
@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("bits", [16, 4])
def test_long_chunks_attend_over_rebuilt_rows(shape, key_mode, bits):
    """Calls of >= 4 query blocks rebuild the feature rows' keys and values once and attend over them
    densely: a 300-token prefill (unsplit), a 100-token chunk over ~400 rows (7 blocks, the rows split
    in two on a tile boundary and merged), decode between them in feature space; the runtime's numbers."""
    worst, state, cache, n = run_calls(shape, key_mode, bits, [300, 1, 100, 1], capacity=512)
    assert worst["library"] < 1e-4 and worst["body"] < 1e-4, worst
    for kv in "kv":
        assert np.array_equal(state["library"][f"feat_{kv}"], state["body"][f"feat_{kv}"])


def test_model_with_library_matches_bodies(tmp_path):
    """The whole exported model: greedy tokens identical, logits within 1e-4, and far fewer nodes run."""
    from shrinkrt.export import artifact
    from shrinkrt.runtime.ort_model import OrtModel
    from tests.conftest import tiny_hf_model
    from tests.test_export import Loaded, compress
    from tests.test_model import ours_from

    model = compress(ours_from(tiny_hf_model("llama")), "post-rope", 4, quant_bits=4)
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="ort-cpu")
    runs = {}
    for setting in ("off", str(LIB)):
        m = OrtModel(tmp_path / "exp", threads=2, ops_library=setting)
        assert (m.ops_library is None) == (setting == "off")
        m.setup_caches(1, 64)
        prompt = torch.randint(3, 97, (1, 19), generator=torch.Generator().manual_seed(3))
        logits, toks = [m.forward(prompt, 0)], []
        for i in range(12):
            toks.append(int(logits[-1][0, -1].argmax()))
            logits.append(m.forward(torch.tensor([[toks[-1]]]), 19 + i))
        runs[setting] = (toks, torch.cat(logits, 1))
    (t0, l0), (t1, l1) = runs.values()
    assert t0 == t1
    assert (l0 - l1).abs().max() < 1e-4 * max(1.0, l0.abs().max())


def test_outputs_written_in_place_match_copied_outputs(tmp_path):
    """OrtModel binds this call's rows to the cache buffer's own slice, the ring to a second buffer
    that swaps in and the logits to one buffer; where it cannot (strided slices) ONNX Runtime allocates
    and the rows are copied in. Both give identical logits and byte-identical caches over a prefill
    and 40 decode steps (past the window several times)."""
    from shrinkrt.export import artifact
    from shrinkrt.runtime.ort_model import OrtModel
    from tests.conftest import tiny_hf_model
    from tests.test_export import Loaded, compress
    from tests.test_model import ours_from

    model = compress(ours_from(tiny_hf_model("llama")), "post-rope", 4, quant_bits=4)
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="ort-cpu")
    prompt = torch.randint(3, 97, (1, 19), generator=torch.Generator().manual_seed(5))
    runs = {}
    for path in ("in place", "copied"):
        m = OrtModel(tmp_path / "exp", threads=2)
        m.setup_caches(1, 64)
        if path == "copied":
            m.row_targets, m.logits_buf = {}, None  # every output allocated by ONNX Runtime, then copied
        logits = [m.forward(prompt, 0)]
        for i in range(40):
            logits.append(m.forward(logits[-1][:, -1].argmax(-1, keepdim=True), 19 + i))
        runs[path] = (torch.cat(logits, 1), {k: b.copy() for k, b in m.buffers.items()})
    (l1, c1), (l2, c2) = runs.values()
    assert torch.equal(l1, l2)
    with torch.inference_mode():  # and both are the reference runtime's, step by step (the ring included)
        model.setup_caches(1, 64)
        ref = [model(prompt, 0, last_only=True)[:, -1:]]
        for i in range(40):
            ref.append(model(l1[:, i:i + 1].argmax(-1), 19 + i, last_only=True)[:, -1:])
    ref = torch.cat(ref, 1).float()
    assert (ref - l1).abs().max() < 1e-3 * max(1.0, float(ref.abs().max())), float((ref - l1).abs().max())
    assert c1.keys() == c2.keys() and all(np.array_equal(c1[k], c2[k]) for k in c1)
    assert all(np.any(c1[k] != 0) for k in c1)  # every buffer was written (rows and rings)


def test_missing_library_is_one_line():
    from shrinkrt.errors import ShrinkError

    with pytest.raises(ShrinkError, match="no such library"):
        ort_ops.resolve("/nonexistent/libshrinkrt_ort_ops.so")
    assert ort_ops.resolve("off") is None


def test_foreign_library_is_refused(tmp_path):
    from shrinkrt.errors import ShrinkError

    bad = tmp_path / "libnot_ops.so"
    bad.write_bytes(b"\x7fELF not really")
    opts = ort.SessionOptions()
    with pytest.raises(ShrinkError, match="cannot register it"):
        ort_ops.register(opts, bad)


# ---------------------------------------------------------------- QuantMatMulW4A8
def w4a8_model(m, dtype: str = "float32", x_shape=None, gated: bool = False, body_gated: bool | None = None,
               quantized_sums: int | None = 1):
    """One QuantMatMulW4A8 node (with its body) for a 4-bit group-32 min layer m; X of x_shape (default
    (B, T, in_features)); gated: m's rows are gate and up side by side, Y silu(gate) * up; quantized_sums
    the attribute (None: absent, as in the exports before it, which means 0)."""
    import onnx
    from onnx import helper, numpy_helper

    from shrinkrt.export import ops

    F = ops.ONNX_DTYPE[dtype]
    body_gated = gated if body_gated is None else body_gated  # (a node the library must refuse: its body differs)
    fn = ops.quant_matmul_w4a8_function(m.in_features, m.out_features, dtype, body_gated, bool(quantized_sums))
    inits = [numpy_helper.from_array(m.codes.numpy().astype(np.int32), "codes"),
             numpy_helper.from_array(m.group_scales().float().numpy().astype(np.float16), "scales"),
             numpy_helper.from_array(m.group_mins().float().numpy().astype(np.float16), "mins")]
    node = ops.node("QuantMatMulW4A8", ["X", "codes", "scales", "mins"], ["Y"], "w4a8", fn.overload,
                    in_features=m.in_features, out_features=m.out_features, gated=int(gated),
                    quantized_sums=int(quantized_sums or 0))
    if quantized_sums is None:  # a node as written before the attribute
        node.attribute.remove(next(a for a in node.attribute if a.name == "quantized_sums"))
    graph = helper.make_graph([node], "w4a8", [helper.make_tensor_value_info("X", F, x_shape or ["B", "T", m.in_features])],
                              [helper.make_tensor_value_info("Y", F, ["B", "T", m.out_features // (2 if body_gated else 1)])],
                              inits)
    model = helper.make_model(graph, ir_version=10, functions=[fn], opset_imports=[
        helper.make_opsetid("", ops.OPSET), helper.make_opsetid(ops.DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    sess = {k: ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
            for k, o in sessions().items()}
    return model, sess


def int8_product(m, x: np.ndarray, quantized_sums: bool = True) -> np.ndarray:
    """The op's arithmetic in float64, written independently of the body: x quantized per block of 32
    columns (dx = max|x| / 127, codes rounded half to even), integer code sums times scale * dx, plus
    the min times the block's sum: of the codes times dx (quantized_sums) or of x itself."""
    from shrinkrt.runtime.packing import unpack_bits

    K, G = m.in_features, -(-m.in_features // 32)
    q = unpack_bits(m.codes, 4, G * 32).numpy().astype(np.float64).reshape(-1, G, 32)
    s, mn = (t.float().numpy().astype(np.float64) for t in (m.group_scales(), m.group_mins()))
    xb = np.zeros((x.reshape(-1, K).shape[0], G * 32), np.float32)
    xb[:, :K] = x.reshape(-1, K)
    xb = xb.reshape(-1, G, 32)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(xb * inv[..., None]).astype(np.float64)
    isum = np.einsum("rgi,ngi->rng", xq, q)
    y = (isum * s[None] * (amax / np.float32(127)).astype(np.float64)[:, None]).sum(-1)
    sums = xq.sum(-1) * (amax / np.float32(127)).astype(np.float64) if quantized_sums else xb.sum(-1, dtype=np.float64)
    y += (sums[:, None] * mn[None]).sum(-1)
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("K", [40, 200, 576, 1536])
@pytest.mark.parametrize("param_bits", [16, 8])
@pytest.mark.parametrize("quantized_sums", [1, None])
def test_w4a8_library_and_body_compute_the_int8_product(K, param_bits, quantized_sums):
    """4-bit group-32 layers with mins (fp16 or 8-bit params; K not a multiple of 32, of 64 or of 256; an
    odd N): library and body both give the int8-activation product to fp32 rounding, at 1 row (the
    decode path), 3 and 10 rows (weight rows unpacked once, tiles of 4 rows plus the rest), a row of
    zeros among them; and they stay within int8 activation rounding of the fp32 reference. Both forms of
    the min's block sum: the int8 block's (quantized_sums = 1) and x's own (the attribute absent)."""
    from tests.test_export_ops import quant_layer

    m = quant_layer(37, K, 4, 32, 0, seed=K + param_bits, mins=True, param_bits=param_bits)
    _, sess = w4a8_model(m, quantized_sums=quantized_sums)
    for T in (1, 3, 10):
        x = torch.randn(1, T, K, generator=torch.Generator().manual_seed(T)).numpy()
        x[0, T // 2, :32] = 0.0  # an all-zero block: dx = 0, no NaN
        lib, body = (sess[k].run(None, {"X": x})[0] for k in ("library", "body"))
        exact, ref = int8_product(m, x, bool(quantized_sums)), m(torch.from_numpy(x)).detach().numpy()
        for got in (lib, body):
            assert np.abs(got - exact).max() < 1e-5 * np.abs(exact).max(), (T, np.abs(got - exact).max())
        assert 1e-4 < np.abs(lib - ref).max() / np.abs(ref).max() < 5e-2  # int8 activations: close, not equal


def test_w4a8_quantized_sums_are_the_dequantized_product():
    """quantized_sums = 1 is exactly the dequantized weight times the dequantized int8 activations (float64
    from the stored tensors; 1 row, the decode path, and 40), and over 40 rows it is ~2.4x closer to the
    fp32 product than the plain sums (measured 2.4x on Gaussian rows, also with an outlier column per
    block): the codes' q * s is uncentred (0..15 s), and only a min term that sees the same rounding
    cancels its share of the error."""
    from shrinkrt.runtime.packing import unpack_bits
    from tests.test_export_ops import quant_layer

    K = 576
    m = quant_layer(64, K, 4, 32, 0, seed=5, mins=True)
    q = unpack_bits(m.codes, 4, K).numpy().astype(np.float64).reshape(64, K // 32, 32)
    s, mn = (t.float().numpy().astype(np.float64)[..., None] for t in (m.group_scales(), m.group_mins()))
    w = (q * s + mn).reshape(64, K)  # the dequantized weight
    sess = {qs: w4a8_model(m, quantized_sums=qs)[1]["library"] for qs in (1, None)}
    for rows, outlier in ((1, False), (40, False), (40, True)):
        x = torch.randn(1, rows, K, generator=torch.Generator().manual_seed(9)).numpy()
        if outlier:  # hidden states' few large channels: one per block
            x[..., ::32] *= 40
        xb = x.reshape(rows, K // 32, 32)
        amax = np.abs(xb).max(-1, keepdims=True)
        xd = (np.rint(xb * (np.float32(127) / amax)) * (amax / np.float32(127)).astype(np.float64)).reshape(rows, K)
        fp32 = x.reshape(rows, K).astype(np.float64) @ w.T
        got = {qs: sess[qs].run(None, {"X": x})[0].reshape(rows, -1).astype(np.float64) for qs in sess}
        assert np.abs(got[1] - xd @ w.T).max() < 1e-5 * np.abs(fp32).max(), rows
        if rows > 1:
            err = {qs: np.linalg.norm(g - fp32) / np.linalg.norm(fp32) for qs, g in got.items()}
            assert err[1] < 0.6 * err[None], (outlier, err)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_w4a8_gated_is_silu_gate_times_up(dtype):
    """gated = 1: the packed gate/up product's halves as silu(gate) * up, (rows, N/2), library and body,
    at 1 row (decode), 3 and 40 rows (the gate pass split over the pool); large |gate| on both sides."""
    from tests.test_export_ops import quant_layer

    m = quant_layer(2 * 40, 200, 4, 32, 0, seed=11, mins=True)
    _, sess = w4a8_model(m, dtype, gated=True)
    for T in (1, 3, 40):
        x = (torch.randn(1, T, 200, generator=torch.Generator().manual_seed(T)) * 3).numpy().astype(dtype)
        p = int8_product(m, x.astype(np.float32))
        gate, up = p[..., :40], p[..., 40:]
        exact = gate / (1 + np.exp(-gate)) * up
        assert np.abs(gate).max() > 10  # both saturated sides of the sigmoid are exercised
        tol = (1e-5 if dtype == "float32" else 2e-3) * np.abs(exact).max()
        for k in ("library", "body"):
            got = sess[k].run(None, {"X": x})[0]
            assert got.shape == (1, T, 40) and got.dtype == np.dtype(dtype)
            assert np.abs(got.astype(np.float64) - exact).max() < tol, (k, T, np.abs(got - exact).max())


def test_w4a8_gated_odd_width_is_one_line():
    from tests.test_export_ops import quant_layer

    m = quant_layer(9, 64, 4, 32, 0, seed=1, mins=True)
    with pytest.raises(Exception, match=r"shrinkrt::QuantMatMulW4A8: gated needs an even out_features"):
        w4a8_model(m, gated=True, body_gated=False)


def test_w4a8_fp16_activations():
    from tests.test_export_ops import quant_layer

    m = quant_layer(24, 576, 4, 32, 0, seed=3, mins=True)
    _, sess = w4a8_model(m, "float16")
    x = torch.randn(1, 5, 576, generator=torch.Generator().manual_seed(4)).half().numpy()
    lib = sess["library"].run(None, {"X": x})[0]
    assert lib.dtype == np.float16
    exact = int8_product(m, x.astype(np.float32))
    assert np.abs(lib.astype(np.float64) - exact).max() < 2e-3 * np.abs(exact).max()


def test_w4a8_bad_shapes_are_one_line():
    from tests.test_export_ops import quant_layer

    m = quant_layer(8, 64, 4, 32, 0, seed=1, mins=True)
    _, sess = w4a8_model(m, x_shape=["B", "T", "K"])
    with pytest.raises(Exception, match=r"shrinkrt::QuantMatMulW4A8: X must be \(\.\.\., in_features\) with in_features 64"):
        sess["library"].run(None, {"X": np.zeros((1, 2, 96), np.float32)})


def assert_library_matches_bodies_and_reference(model, export_dir):
    """An ort-cpu export's logits: library vs bodies to 1e-4 on a prompt, and within int8 activation
    rounding of the reference model's over 12 greedy steps."""
    from shrinkrt.export.validate import compare
    from shrinkrt.runtime.ort_model import OrtModel

    prompt = torch.randint(3, 97, (1, 23), generator=torch.Generator().manual_seed(1))
    logits = {}
    for setting in ("off", str(LIB)):
        m = OrtModel(export_dir, threads=2, ops_library=setting)
        m.setup_caches(1, 40)
        logits[setting] = m.forward(prompt, 0)
    assert (logits["off"] - logits[str(LIB)]).abs().max() < 1e-4 * max(1.0, float(logits["off"].abs().max()))
    assert compare(model, OrtModel(export_dir, ops_library=str(LIB)), prompt[0].tolist(), steps=12,
                   tol=5e-2) < 5e-2


def test_ort_cpu_gated_mlp_is_one_node(tmp_path):
    """Where gate and up are both 4-bit min layers (8-bit and fp16 params here) the ort-cpu graph's MLP
    is one QuantMatMulW4A8 with gated = 1 (no Split, Sigmoid or Mul of the activation); library and
    bodies give the same logits, within int8 activation rounding of the reference's."""
    import onnx

    from shrinkrt.export import artifact
    from tests.test_export import Loaded, model_with_min_layers
    from tests.test_export_ops import quant_layer

    model = model_with_min_layers()
    for i, layer in enumerate(model.layers):
        up = layer.mlp.up_proj
        layer.mlp.up_proj = quant_layer(up.out_features, up.in_features, 4, 32, 0, seed=7 * i + 1, mins=True)
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="ort-cpu", ort_accuracy=4)
    graph = onnx.load(tmp_path / "exp" / "model.onnx", load_external_data=False).graph
    gated = {n.name.split("/")[0]: next(a.i for a in n.attribute if a.name == "gated")
             for n in graph.node if n.op_type == "QuantMatMulW4A8"}
    for i in range(len(model.layers)):
        assert gated[f"layers.{i}.mlp.gate_up_proj"] == 1 and gated[f"layers.{i}.self_attn.q_proj"] == 0
    assert not [n for n in graph.node if n.op_type == "Sigmoid"]
    assert_library_matches_bodies_and_reference(model, tmp_path / "exp")


def test_ort_cpu_min_layers_run_as_w4a8(tmp_path):
    """At accuracy level 4 the ort-cpu graph carries 4-bit group-32 min layers (fp16 and 8-bit params) as
    shrinkrt::QuantMatMulW4A8 nodes with fp16 scales and mins (not MatMulNBits' 8-bit container), an 8-bit
    zero-point layer stays MatMulNBits; library and bodies give the same logits, within int8 activation
    rounding of the reference's."""
    import json

    import onnx

    from shrinkrt.export import artifact
    from tests.test_export import Loaded, model_with_min_layers

    model = model_with_min_layers()
    artifact.export(Loaded(model, tmp_path), tmp_path / "exp", target="ort-cpu", ort_accuracy=4)
    graph = onnx.load(tmp_path / "exp" / "model.onnx", load_external_data=False).graph
    kinds = {n.name.split("/")[0]: n.op_type for n in graph.node if n.op_type in ("QuantMatMulW4A8", "MatMulNBits")}
    for i in range(len(model.layers)):
        assert kinds[f"layers.{i}.self_attn.q_proj"] == "QuantMatMulW4A8"
        assert kinds[f"layers.{i}.mlp.gate_proj"] == "QuantMatMulW4A8"
        assert kinds[f"layers.{i}.mlp.up_proj"] == "MatMulNBits"
    inits = {t.name: t.data_type for t in graph.initializer}
    assert inits["layers.0.mlp.gate_proj.scales"] == onnx.TensorProto.FLOAT16
    assert inits["layers.0.mlp.gate_proj.mins"] == onnx.TensorProto.FLOAT16
    meta = json.loads((tmp_path / "exp" / "export.json").read_text())["ort_cpu"]
    assert meta["w4a8_layers"] == 2 * len(model.layers)
    assert_library_matches_bodies_and_reference(model, tmp_path / "exp")
