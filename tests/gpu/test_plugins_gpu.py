"""The TensorRT plugins' enqueue on a GPU without TensorRT: tests/plugin_probe.cpp creates each plugin
from libshrinkrt_trt_plugins.so, attaches it to a CUDA context (the AOT images load: the sm_75 PTX JIT
on newer GPUs) and runs one enqueue on device buffers; the outputs are compared with the Triton
kernels' op (which the CPU tests check against the reference) and the PyTorch reference.

Needs the TensorRT headers (TensorRT_INCLUDE_DIR, or build/trt_headers/include: copy include/ of a
NVIDIA/TensorRT checkout there and carry it to the GPU machine; never committed).
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: these run on a lent GPU machine (scripts/gpu.sh)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
if not os.environ.get("TensorRT_INCLUDE_DIR") and (ROOT / "build" / "trt_headers" / "include" / "NvInfer.h").is_file():
    os.environ["TensorRT_INCLUDE_DIR"] = str(ROOT / "build" / "trt_headers" / "include")

from tests.test_trt_plugins import build_plugins, build_probe  # noqa: E402

TYPE = {torch.float16: "h", torch.float32: "f", torch.int8: "b", torch.int32: "i", torch.int64: "l"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return build_probe(build_plugins(tmp_path_factory.mktemp("cmake")))


def run_plugin(probe, tmp_path, op, fields, tensors):
    for i, t in enumerate(tensors):
        (tmp_path / f"in{i}.bin").write_bytes(t.detach().cpu().contiguous().numpy().tobytes())
    got, err = probe(op, fields, [(TYPE[t.dtype], tuple(t.shape)) for t in tensors], tmp_path)
    assert got["rc_enqueue"] == 0, err
    outs = []
    for o, shape in enumerate(got["out_shapes"]):
        dt = {"h": np.float16, "b": np.int8}[got["out_types"][o]]
        outs.append(torch.from_numpy(np.fromfile(tmp_path / f"out{o}.bin", dtype=dt).reshape(shape)))
    return outs


@pytest.mark.parametrize("rows", [5, 20])
def test_quant_matmul_plugin_on_gpu(probe, tmp_path, rows):
    """5 rows: the fused GEMV; 20 rows: dequant + cuBLASLt (or the chunked GEMV without cuBLASLt)."""
    from shrinkrt.export import ops
    from tests.test_export_ops import quant_layer
    from onnx import numpy_helper

    m = quant_layer(1536, 576, 4, 128, 7, seed=1)
    packed = [torch.from_numpy(numpy_helper.to_array(t)) for t in ops.quant_matmul_inputs("w", m)["initializers"]]
    x = torch.randn(1, rows, 576).half()
    (y,) = run_plugin(probe, tmp_path, "QuantMatMul", dict(bits=4, group_size=128, in_features=576, out_features=1536),
                      [x] + packed)
    ref = m(x.float())
    assert (y.float() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("bits,key_mode,past,T", [(4, 1, 300, 1), (16, 0, 0, 70), (8, 0, 100, 3)])
def test_bibranch_attention_plugin_on_gpu(probe, tmp_path, bits, key_mode, past, T):
    """Decode deep in the cache, a prompt longer than the window, a short chunk: every output equals
    the Triton op's (ring and stored rows bit for bit, y to fp16 rounding)."""
    from shrinkrt.plugins.kernels.bibranch_attn import bibranch_attention
    from shrinkrt.runtime import kv_quant

    H, G, D, W, rk, rv, B, S = 9, 3, 64, 64, 48, 96, 1, 512
    gen = torch.Generator().manual_seed(bits + T)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = r(B, T, H * D).half(), r(B, T, G * D).half(), r(B, T, G * D).half()
    c_k, c_v = r(B, T, rk).half(), r(B, T, rv).half()
    win_k, win_v = r(B, G, W, D).half(), r(B, G, W, D).half()
    if bits == 16:
        fk, fv, fks, fvs = r(B, S, rk).half(), r(B, S, rv).half(), None, None
    else:
        fk, fks = kv_quant.quantize(r(B, S, rk), bits)
        fv, fvs = kv_quant.quantize(r(B, S, rv), bits)
        fk, fv = fk.view(torch.int8), fv.view(torch.int8)
    k_up, v_up = (r(rk, G * D) * 0.1).half(), (r(rv, G * D) * 0.1).half()
    k_bias, v_bias = (r(G * D) * 0.1).half(), (r(G * D) * 0.1).half()
    ang = torch.arange(S)[:, None] * torch.rand(D // 2, generator=gen).repeat(2)[None, :]
    cos, sin = ang.cos().half(), ang.sin().half()
    past_t = torch.tensor([past], dtype=torch.int64)
    ins = [q, k, v, c_k, c_v, win_k, win_v, fk, fv, k_up, v_up, k_bias, v_bias, cos, sin, past_t]
    ins += [fks, fvs] if bits < 16 else []
    fields = dict(num_heads=H, num_kv_heads=G, head_dim=D, window=W, rank_k=rk, rank_v=rv, bits=bits, key_mode=key_mode)
    got = run_plugin(probe, tmp_path, "BiBranchAttention", fields, ins)
    cu = [t.cuda() for t in ins]
    ref = bibranch_attention(*cu[:16], bits=bits, key_mode=key_mode, feat_k_scales=cu[16] if bits < 16 else None,
                             feat_v_scales=cu[17] if bits < 16 else None)
    names = ["y", "win_k_out", "win_v_out", "feat_k_new", "feat_v_new"] + \
        (["feat_k_scales_new", "feat_v_scales_new"] if bits < 16 else [])
    for name, g in zip(names, got):
        want = ref[name].cpu()
        if name == "y":
            assert (g.float() - want.float()).abs().max().item() < 1e-2 * want.float().abs().max().item(), name
        else:
            assert torch.equal(g, want), name
