"""Triton kernels under the CPU interpreter against the PyTorch reference, and their sm_75 AOT build."""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it where there is no GPU
    pytest.skip("kernels are compiled for the GPU here: tests/gpu checks them on the device",
                allow_module_level=True)

from shrinkrt.runtime.op_contract import WEIGHT_BITS, WEIGHT_GROUP_SIZES, WEIGHT_MIN_FORMATS  # noqa: E402
from shrinkrt.plugins.kernels import aot  # noqa: E402
from shrinkrt.plugins.kernels.qgemv import qgemv  # noqa: E402
from tests.test_export_ops import quant_layer  # noqa: E402

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,n_out", [(64, 0), (128, 11)])
def test_qgemv_matches_reference(bits, group, n_out):
    # odd shapes: N not a multiple of the row block, K not a multiple of the group, of 32 or of BLOCK_K
    m = quant_layer(45, 200, bits, group, n_out, seed=bits + group)
    for M in (1, 3, 8):
        x = torch.randn(M, 200, generator=torch.Generator().manual_seed(M))
        y, ref = qgemv(x, m), m(x)
        # fp32 both sides; the kernel sums in its own order: ~1e-6 relative
        assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-5


@pytest.mark.parametrize("param_bits", [16, 8])
def test_qgemv_and_dequant_with_mins_match_reference(param_bits):
    """The min format (w = q * s + m, 4-bit group 32), its scales and mins fp16 or 8-bit codes (expanded
    to the fp16 values they stand for): the GEMV at 1/3/8 rows and the prefill dequantization give
    QuantLinear's product and weight; K not a multiple of 32 (masked tail codes)."""
    from shrinkrt.plugins.kernels.dequant import dequant

    m = quant_layer(45, 200, 4, 32, 0, seed=7, mins=True, param_bits=param_bits)
    assert m.param_bits == param_bits
    for M in (1, 3, 8):
        x = torch.randn(M, 200, generator=torch.Generator().manual_seed(M))
        y, ref = qgemv(x, m), m(x)
        assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-5
    assert torch.equal(dequant(m), m.weight().half())


@pytest.mark.model
def test_qgemv_on_the_embedded_weights(embedded):
    """A real SmolLM2 projection (layers.0.self_attn.k_proj, 192 x 576) quantized at 3 bits with outliers."""
    from shrinkrt.calib import quantize as qz
    from shrinkrt.calib.mq import select_outliers, to_csr
    from shrinkrt.runtime.quant_linear import QuantLinear

    w = embedded.model.layers[0].self_attn.k_proj.weight.detach().float()
    keep = select_outliers(w, torch.ones(w.shape[1]), 200)
    q, s, z, _ = qz.quantize_rtn(w, 3, 64, keep=keep)
    p = qz.pack(q, s, z, 3, 64)
    m = QuantLinear(w.shape[1], w.shape[0], 3, 64, p.codes, p.scales, p.zeros, to_csr(keep, w))
    x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0))
    assert (qgemv(x, m) - m(x)).abs().max().item() < 1e-4


def test_qgemv_rejects_bad_shapes():
    m = quant_layer(8, 64, 4, 64, 0)
    with pytest.raises(ValueError, match="M <= 8"):
        qgemv(torch.randn(9, 64), m)


def run_aot(out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    subprocess.run([sys.executable, "-m", "shrinkrt.plugins.kernels.aot", "--out", str(out), *extra], env=env,
                   check=True, capture_output=True, timeout=900)
    return json.loads((out / "kernels.json").read_text())


def test_aot_builds_every_kernel_for_sm75(tmp_path):
    manifest = run_aot(tmp_path / "a")
    names = [k["name"] for k in manifest["kernels"]]
    weights = len(WEIGHT_BITS) * len(WEIGHT_GROUP_SIZES)  # 4 widths x 3 group sizes
    # per (bits, group): a GEMV per padded row count, with and without outliers, and a dequant kernel;
    # per fp16-min format (4 bits, group 32): the GEMVs the plugin launches (o1) and a dequant kernel;
    # then SmolLM2's attention: 8 split + 3 reduce/feature kernels
    mins = len(WEIGHT_MIN_FORMATS) * (len(aot.QGEMV_ROWS) + 1)
    assert len(names) == len(aot.specializations()) == weights * (2 * len(aot.QGEMV_ROWS) + 1) + mins + 11 == 99
    assert len(set(names)) == 99 and "qgemv_b4_g32_min_m8_o1" in names and "dequant_b4_g32_min" in names
    src = (tmp_path / "a" / "shrinkrt_kernels.gen.cpp").read_text()
    assert "kNumKernels = 99" in src and all(f'"{n}"' in src for n in names)
    for k in manifest["kernels"]:
        cubin = tmp_path / "a" / f"{k['name']}.sm_75.cubin"
        assert k["arch"] == "sm_75" and cubin.stat().st_size == k["cubin_bytes"] > 1000
    # the bundled disassembler reads each ELF's architecture: every image is SM75 machine code
    tool = os.path.join(NVIDIA_BIN, "nvdisasm")
    for k in manifest["kernels"]:
        out = subprocess.run([tool, "-c", str(tmp_path / "a" / f"{k['name']}.sm_75.cubin")], capture_output=True,
                             text=True, timeout=60).stdout
        assert "EF_CUDA_SM75" in out, k["name"]
    # deterministic: a second build gives the same bytes
    again = run_aot(tmp_path / "b", "--limit", "3")
    assert [k["cubin_sha256"] for k in again["kernels"]] == [k["cubin_sha256"] for k in manifest["kernels"][:3]]
    assert manifest["triton"] == triton.__version__


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_bibranch_decode_matches_cskv_attention(key_mode, bits):
    """The split + reduce kernels, fed the cache as CSKVAttention leaves it after appending a token,
    give that layer's output (through o_proj) at several positions: before the feature branch is
    reached, at the window boundary, and with the sequence split unevenly."""
    from shrinkrt.plugins.kernels.bibranch_attn import bibranch_decode
    from shrinkrt.runtime.cskv import CSKVAttention, CSKVConfig
    from shrinkrt.runtime.model import apply_rope
    from tests.conftest import tiny_hf_model
    from tests.test_model import ours_from

    model = ours_from(tiny_hf_model("qwen2"))  # K/V biases, GQA (4 query heads, 2 KV heads)
    a = model.layers[0].self_attn
    gen = torch.Generator().manual_seed(1)
    W, S = 6, 40
    in_k = a.n_kv_heads * a.head_dim if key_mode == "post-rope" else 64
    layer = CSKVAttention(a, CSKVConfig(key_mode, W, bits), torch.randn(in_k, 5, generator=gen),
                          torch.randn(5, 32, generator=gen) * 0.3, torch.randn(64, 37, generator=gen),
                          torch.randn(37, 32, generator=gen) * 0.3, model.rope_cos, model.rope_sin)
    layer.setup_cache(1, S, torch.float32, "cpu")
    H, D = layer.n_heads, layer.head_dim
    x_all = torch.randn(1, S, 64, generator=gen)
    c = layer.cache
    with torch.no_grad():
        layer(x_all[:, :3], model.rope_cos[:3], model.rope_sin[:3], 0)
        for p in range(3, 29):
            x = x_all[:, p:p + 1]
            cos, sin = model.rope_cos[p:p + 1], model.rope_sin[p:p + 1]
            ref = layer(x, cos, sin, p)
            if p not in (4, W, W + 1, 17, 28):
                continue
            q = apply_rope(a.q_proj(x).view(1, 1, H, D).transpose(1, 2), cos, sin)[:, :, 0]
            fk, fv = c.feat_k, c.feat_v
            codes = lambda f: f.codes.view(torch.int8) if bits == 4 else f.codes  # noqa: E731
            y = bibranch_decode(q, c.win_k, c.win_v, codes(fk), fk.scales if bits < 16 else None, codes(fv),
                                fv.scales if bits < 16 else None, layer.k_up, layer.v_up, a.k_proj.bias.detach(),
                                a.v_proj.bias.detach(), model.rope_cos, model.rope_sin, p, bits,
                                key_mode == "post-rope", split_len=5, block_j=4)
            out = a.o_proj(y.reshape(1, 1, H * D))
            assert (out - ref).abs().max().item() < 1e-4, (p, (out - ref).abs().max().item())


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("r", [5, 37, 64])
def test_feature_quant_is_bit_identical_to_the_runtime(bits, r):
    """The cache-append quantization kernel stores exactly the bytes runtime/kv_quant.py stores,
    including rounding ties (half to even) and a rank not a multiple of the group or of 2."""
    from shrinkrt.plugins.kernels.bibranch_attn import quantize_features
    from shrinkrt.runtime import kv_quant

    gen = torch.Generator().manual_seed(r)
    c = torch.randn(2, 3, r, generator=gen)
    c[0, 0, :4] = torch.tensor([2.5, -1.5, 0.5, 127.0])[: min(4, r)]  # ties for the int8 grid
    got, scales = quantize_features(c, bits)
    if bits == 16:
        assert scales is None and torch.equal(got, c.half())
        return
    codes, ref_scales = kv_quant.quantize(c, bits)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(got.view(torch.uint8) if bits == 4 else got, codes)


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_bibranch_op_from_kernels_matches_cskv_attention(key_mode, bits):
    """The whole op as the plugin runs it (feature quantization, window append, split + reduce per
    query token) reproduces CSKVAttention call by call: a prompt longer than the window, decode at
    the window boundary (token W+1), and a chunk crossing it; the stored rows match byte for byte."""
    from tests.conftest import tiny_hf_model
    from tests.test_model import ours_from

    check_op_against_cskv(ours_from(tiny_hf_model("qwen2")), key_mode, bits, W=6)


@pytest.mark.parametrize("H,G,D,key_mode,bits", [
    (4, 4, 32, "pre-rope", 4),    # GQA ratio 1 (multi-head)
    (6, 2, 32, "post-rope", 8),   # ratio 3 (SmolLM2's)
    (8, 2, 16, "pre-rope", 16),   # ratio 4
    (8, 1, 128, "post-rope", 4),  # ratio 8, head_dim 128 (Llama-3 / Mistral)
])
def test_bibranch_op_other_shapes(H, G, D, key_mode, bits):
    """The same op contract at the shapes users bring (issue 16): GQA ratios 1, 3, 4, 8, head_dim 128,
    a window that is not SmolLM2's."""
    from tests.conftest import tiny_hf_model
    from tests.test_model import ours_from

    hf = tiny_hf_model("qwen2", hidden_size=H * D, num_attention_heads=H, num_key_value_heads=G, head_dim=D,
                       num_hidden_layers=1)
    check_op_against_cskv(ours_from(hf), key_mode, bits, W=5)


def check_op_against_cskv(model, key_mode, bits, W):
    from shrinkrt.plugins.kernels.bibranch_attn import bibranch_attention
    from shrinkrt.runtime.cskv import CSKVAttention, CSKVConfig
    from tests.conftest import bibranch_call_inputs

    a = model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    S = 24
    dim, kv_dim = model.args.dim, a.n_kv_heads * a.head_dim
    in_k = kv_dim if key_mode == "post-rope" else dim
    rk, rv = 5, min(37, kv_dim)
    layer = CSKVAttention(a, CSKVConfig(key_mode, W, bits), torch.randn(in_k, rk, generator=gen),
                          torch.randn(rk, kv_dim, generator=gen) * 0.3, torch.randn(dim, rv, generator=gen),
                          torch.randn(rv, kv_dim, generator=gen) * 0.3, model.rope_cos, model.rope_sin)
    layer.setup_cache(1, S, torch.float32, "cpu")
    H, G, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    cache = layer.cache
    win = {n: torch.zeros(1, G, W, D, dtype=torch.float16) for n in ("win_k", "win_v")}
    fdt = torch.float16 if bits == 16 else torch.int8
    store = {f"feat_{kv}": torch.zeros(getattr(cache, f"feat_{kv}").codes.shape, dtype=fdt) for kv in "kv"}
    store.update({f"feat_{kv}_scales": torch.zeros(getattr(cache, f"feat_{kv}").scales.shape, dtype=torch.float16)
                  for kv in "kv"} if bits < 16 else {})
    x_all = torch.randn(1, S, dim, generator=gen)
    start = 0
    for T in (8, 1, 5, 1):  # prompt > W; decode at token W+1... ; a chunk crossing the window
        inp, ref = bibranch_call_inputs(model, a, layer, x_all[:, start:start + T], start)
        with torch.no_grad():
            got = bibranch_attention(inp["q"], inp["k"], inp["v"], inp["c_k"], inp["c_v"], win["win_k"], win["win_v"],
                                     store["feat_k"], store["feat_v"], layer.k_up, layer.v_up, a.k_proj.bias.detach(),
                                     a.v_proj.bias.detach(), model.rope_cos, model.rope_sin,
                                     torch.tensor([start]), bits, int(key_mode == "post-rope"),
                                     store.get("feat_k_scales"), store.get("feat_v_scales"), split_len=4, block_j=4)
            out = a.o_proj(got["y"])
        assert (out - ref).abs().max().item() < 1e-4, (T, start, (out - ref).abs().max().item())
        win = {"win_k": got["win_k_out"], "win_v": got["win_v_out"]}
        for name in store:
            store[name][:, start:start + T] = got[name + "_new"]
        start += T
    for kv in "kv":
        fs = getattr(cache, f"feat_{kv}")
        codes = store[f"feat_{kv}"][:, :start]
        assert torch.equal(codes.view(torch.uint8) if bits == 4 else codes, fs.codes[:, :start])


@pytest.mark.parametrize("bits,group,n_out", [(2, 64, 0), (3, 128, 9), (4, 128, 5), (8, 64, 3)])
def test_dequant_matches_the_reference_weight(bits, group, n_out):
    """The prefill path's dequantization kernel gives QuantLinear.weight() (outliers included) in fp16,
    with rows and columns that are not multiples of the tile."""
    from shrinkrt.plugins.kernels.dequant import dequant

    m = quant_layer(70, 200, bits, group, n_out, seed=bits)
    ref = m.weight()
    assert torch.equal(dequant(m), ref.half())


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
def test_runtime_with_kernels_swapped_in(key_mode, monkeypatch):
    """The reference runtime's kernel dispatch (runtime/kernels.py: qgemv for decode, dequant +
    matmul for prefill, the bi-branch decode kernels), forced on under the interpreter, gives the
    reference logits and greedy tokens (tests/gpu runs the same on a CUDA device)."""
    from shrinkrt.runtime import kernels
    from tests.kernel_swap import compare, compressed_tiny, forced_logits

    model = compressed_tiny("cpu", key_mode)
    tokens = torch.randint(0, 97, (1, 22), generator=torch.Generator().manual_seed(3))
    ref = forced_logits(model, tokens, prefill=10)
    monkeypatch.setattr(kernels, "enabled", lambda t: True)
    got = forced_logits(model, tokens, prefill=10)
    rel, flips = compare(ref, got)
    assert rel < 1e-2 and flips == [], (rel, flips)
    assert not torch.equal(ref, got)  # the kernels really ran (fp16 activations round differently)
