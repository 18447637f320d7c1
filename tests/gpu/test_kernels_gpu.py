"""The kernel checks again on a CUDA device (Triton JIT), the sm_75 AOT PTX through the driver, and
greedy tokens with the kernels swapped in. Skipped where there is no GPU (run by scripts/gpu.sh)."""
import ctypes
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: these run on a lent GPU machine (scripts/gpu.sh)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need compiled kernels", allow_module_level=True)

from shrinkrt.plugins.kernels.qgemv import qgemv  # noqa: E402
from tests.test_export_ops import quant_layer  # noqa: E402


def to(m, dev):
    for name, b in list(m.named_buffers(recurse=False)):
        setattr(m, name, b.to(dev) if b is not None else None)
    return m


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,n_out", [(64, 0), (128, 11)])
def test_qgemv_on_gpu(bits, group, n_out):
    m = quant_layer(4103, 4096, bits, group, n_out, seed=bits)
    x = torch.randn(4, 4096)
    ref = m(x)
    y = qgemv(x.cuda().half(), to(m, "cuda")).float().cpu()
    assert (y - ref).abs().max().item() < 2e-2 * ref.abs().max().item()  # fp16 activations in and out


def test_aot_ptx_runs_through_the_driver(tmp_path):
    """The sm_75 PTX of an AOT qgemv image, loaded with cuModuleLoadData and launched with
    cuLaunchKernel: the path the TensorRT plugins take (an sm_75 cubin does not load on sm_90)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "shrinkrt.plugins.kernels.aot", "--out", str(tmp_path), "--limit", "8"],
                   check=True, env=env, timeout=600)
    kern = next(k for k in json.loads((tmp_path / "kernels.json").read_text())["kernels"]
                if k["const"]["BITS"] == 4 and k["const"]["GROUP"] == 128 and not k["const"]["HAS_OUTLIERS"])
    src = (tmp_path / "shrinkrt_kernels.gen.cpp").read_text()
    assert kern["name"] in src
    from shrinkrt.plugins.kernels import aot

    spec = next(s for s in aot.specializations() if s["name"] == kern["name"])
    ptx = aot.compile_one(spec)[1].encode() + b"\0"
    cuda = ctypes.CDLL("libcuda.so.1")
    torch.cuda.init()
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    assert cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(ptx)) == 0
    assert cuda.cuModuleGetFunction(ctypes.byref(fn), mod, kern["entry"].encode()) == 0
    m = to(quant_layer(256, 512, 4, 128, 0), "cuda")
    x = torch.randn(2, 512, device="cuda").half()
    y = torch.zeros(2, 256, device="cuda", dtype=torch.float16)
    dummy = torch.zeros(1, dtype=torch.int32, device="cuda")
    ptrs = [x, m.codes, m.scales, m.zeros, dummy, dummy, dummy.half(), y]
    ints = [2, 256, 512, m.scales.shape[1], m.codes.shape[1], m.zeros.shape[1], x.stride(0), y.stride(0)]
    args = [ctypes.c_void_p(t.data_ptr()) for t in ptrs] + [ctypes.c_int32(v) for v in ints]
    args.append(ctypes.c_void_p(0))  # global scratch pointer that Triton kernels take last
    args.append(ctypes.c_void_p(0))  # profile scratch
    argv = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    grid = (256 + 31) // 32
    assert cuda.cuLaunchKernel(fn, grid, 1, 1, 32 * kern["num_warps"], 1, 1, kern["shared"], None, argv, None) == 0
    torch.cuda.synchronize()
    ref = m(x.float()).half()
    assert (y - ref).abs().max().item() < 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
def test_greedy_tokens_with_kernels_swapped_in(key_mode, monkeypatch):
    """The compressed tiny model on the GPU: kernels (JIT) vs the PyTorch reference on the same
    device (kernels switched off), teacher-forced; greedy tokens identical where the reference is not
    a near tie (top-2 margin > 0.05)."""
    from tests.kernel_swap import compare, compressed_tiny, forced_logits

    model = compressed_tiny("cuda", key_mode)
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3)).cuda()
    from shrinkrt.runtime.kernels import set_kernels

    set_kernels(False)
    try:
        ref = forced_logits(model, tokens, prefill=20)
    finally:
        set_kernels(True)
    got = forced_logits(model, tokens, prefill=20)
    rel, flips = compare(ref, got)
    assert rel < 1e-2 and flips == [], (rel, flips)
