"""The TensorRT plugins' launch glue, executed on the CPU: the launchers (plugins/tensorrt/*_launch.cpp,
through libshrinkrt_launchers.so's C API, no TensorRT needed) over the CUDA driver stand-in
(tests/fake_libcuda.c), each launch checked and run by the kernel's Triton source under the interpreter
(tests/stand_in.py), the outputs compared with the Python launch of the same kernels
(plugins/kernels/bibranch_attn.bibranch_attention) and with a dense reference for QuantMatMul.

The library is built once per session for two model shapes (SmolLM2's 9/3/64 with window 64, and
8 heads over 1 KV head of head_dim 128 with window 32: Llama-3's head_dim, GQA ratio 8), through the
project's CMake with -DSHRINKRT_EXPORT naming an export.json that lists both.
"""
import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import stand_in

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(num_heads=9, num_kv_heads=3, head_dim=64, window=64)
LLAMA3ISH = dict(num_heads=8, num_kv_heads=1, head_dim=128, window=32)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the stand-in runs kernels under Triton's interpreter (no GPU here); "
                                       "on a GPU, tests/gpu drives the real driver")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(libshrinkrt_launchers.so, kernels.json) for both shapes, and the stand-in driver."""
    for tool in ("cmake", "c++", "cc"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is needed to build the launchers and the driver stand-in")
    d = tmp_path_factory.mktemp("launchers")
    configs = [dict(shape, bits=b, key_mode=m) for shape in (SMOLLM2, LLAMA3ISH) for b in (16, 8, 4) for m in (0, 1)]
    (d / "export").mkdir()
    (d / "export" / "export.json").write_text(json.dumps({"custom_op_attributes": {"BiBranchAttention": configs}}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the AOT step compiles for sm_75
    cmake = d / "cmake"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(cmake), f"-DSHRINKRT_PYTHON={sys.executable}",
                    f"-DSHRINKRT_EXPORT={d / 'export'}"], check=True, capture_output=True, env=env, timeout=300)
    r = subprocess.run(["cmake", "--build", str(cmake), "--target", "shrinkrt_launchers", "-j2"], capture_output=True,
                       text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    driver = stand_in.build(d / "driver")
    return cmake / "plugins" / "tensorrt" / "libshrinkrt_launchers.so", cmake / "kernels" / "kernels.json", driver


@pytest.fixture(scope="session")
def gpu(built):
    """The stand-in, loaded before the launchers (their dlopen("libcuda.so.1") then finds it)."""
    lib, manifest, driver = built
    return stand_in.StandIn(driver, manifest)


@pytest.fixture(scope="session")
def launchers(built, gpu):
    return Launchers(built[0])


@pytest.fixture(autouse=True)
def clean(request):
    yield
    if "gpu" in request.fixturenames:
        g = request.getfixturevalue("gpu")
        g.failure = None
        g.launches.clear()
        g.free_all()


class Launchers:
    """libshrinkrt_launchers.so's C API (plugins/tensorrt/launch_api.cpp)."""

    def __init__(self, path: Path):
        L = self.lib = ctypes.CDLL(str(path))
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        for op in ("bibranch", "quant_matmul"):
            getattr(L, f"shrinkrt_{op}_create").restype = vp
            getattr(L, f"shrinkrt_{op}_create").argtypes = [ctypes.POINTER(ctypes.c_int32), cp, sz]
            getattr(L, f"shrinkrt_{op}_workspace").restype = sz
            getattr(L, f"shrinkrt_{op}_workspace").argtypes = [vp, ctypes.c_int64]
            getattr(L, f"shrinkrt_{op}_load").argtypes = [vp, cp, sz]
            getattr(L, f"shrinkrt_{op}_destroy").argtypes = [vp]
        L.shrinkrt_bibranch_enqueue.argtypes = [vp, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                                ctypes.POINTER(vp), ctypes.POINTER(vp), vp, vp, cp, sz]
        L.shrinkrt_quant_matmul_enqueue.argtypes = [vp, ctypes.c_int64, ctypes.POINTER(vp), vp, vp, vp, cp, sz]

    def create(self, op: str, attrs: list[int]):
        err = ctypes.create_string_buffer(512)
        h = getattr(self.lib, f"shrinkrt_{op}_create")((ctypes.c_int32 * len(attrs))(*attrs), err, 512)
        return h, err.value.decode()

    def call(self, fn: str, *args) -> str:
        """'' when the call returned 0, else its error line."""
        err = ctypes.create_string_buffer(1024)
        rc = getattr(self.lib, fn)(*args, err, 1024)
        assert (rc == 0) == (err.value == b""), (rc, err.value)
        return err.value.decode()


def _ptrs(values):
    return (ctypes.c_void_p * len(values))(*values)


# BiBranchAttention ------------------------------------------------------------------------------------

def _bibranch_case(shape, bits, key_mode, B, T, past, S, seed=0):
    """Random op inputs in docs/ops.md order (names -> tensors) for one call."""
    g = torch.Generator().manual_seed(seed)
    H, G, D, W = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], shape["window"]
    rk, rv = min(48, G * D), min(96, G * D)
    C = (lambda r: (r + 1) // 2) if bits == 4 else (lambda r: r)
    fdt = torch.float16 if bits == 16 else torch.int8

    def h(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).half()

    def store(r):
        return h(B, S, C(r)) if bits == 16 else torch.randint(-128, 128, (B, S, C(r)), generator=g, dtype=fdt)

    pos = torch.arange(S + T, dtype=torch.float32)[:, None]
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = torch.cat([pos * inv, pos * inv], dim=1)
    x = dict(q=h(B, T, H * D), k=h(B, T, G * D), v=h(B, T, G * D), c_k=h(B, T, rk), c_v=h(B, T, rv),
             win_k=h(B, G, W, D), win_v=h(B, G, W, D), feat_k=store(rk), feat_v=store(rv),
             k_up=h(rk, G * D, scale=0.2), v_up=h(rv, G * D, scale=0.2), k_bias=h(G * D, scale=0.1),
             v_bias=h(G * D, scale=0.1), rope_cos=ang.cos().half(), rope_sin=ang.sin().half(),
             past_length=torch.tensor([past], dtype=torch.int64))
    if bits < 16:
        ng = -(-rk // 32), -(-rv // 32)
        x.update(feat_k_scales=(torch.rand(B, S, ng[0], generator=g) * 0.02 + 0.001).half(),
                 feat_v_scales=(torch.rand(B, S, ng[1], generator=g) * 0.02 + 0.001).half())
    attrs = [shape["num_heads"], G, D, W, rk, rv, bits, key_mode]  # contract::BiBranchAttention::kAttributes
    return x, attrs


def _run_bibranch(gpu, launchers, x, attrs, B, T, S):
    from shrinkrt.runtime.op_contract import SCHEMAS

    in_names, out_names, _ = SCHEMAS["BiBranchAttention"]
    bits = attrs[6]
    n_in = len(in_names) - (2 if bits == 16 else 0)
    G, D, W, rk, rv = attrs[1], attrs[2], attrs[3], attrs[4], attrs[5]
    C = (lambda r: (r + 1) // 2) if bits == 4 else (lambda r: r)
    fdt = torch.float16 if bits == 16 else torch.int8
    out_specs = {"y": ((B, T, attrs[0] * D), torch.float16), "win_k_out": ((B, G, W, D), torch.float16),
                 "win_v_out": ((B, G, W, D), torch.float16), "feat_k_new": ((B, T, C(rk)), fdt),
                 "feat_v_new": ((B, T, C(rv)), fdt), "feat_k_scales_new": ((B, T, -(-rk // 32)), torch.float16),
                 "feat_v_scales_new": ((B, T, -(-rv // 32)), torch.float16)}
    outs = out_names[:len(out_names) - (2 if bits == 16 else 0)]
    h, err = launchers.create("bibranch", attrs)
    assert h, err
    try:
        assert launchers.call("shrinkrt_bibranch_load", h) == ""
        ins = [gpu.upload(x[n]) for n in in_names[:n_in]]
        out_ptrs = [gpu.alloc(int(torch.Size(out_specs[n][0]).numel()) * torch.empty(0, dtype=out_specs[n][1])
                              .element_size()) for n in outs]
        ws = gpu.alloc(launchers.lib.shrinkrt_bibranch_workspace(h, B))
        err = launchers.call("shrinkrt_bibranch_enqueue", h, B, T, S, _ptrs(ins), _ptrs(out_ptrs), ws, None)
        gpu.raise_failure()
        assert err == ""
        assert gpu.guards_broken() == 0  # no kernel wrote past a buffer
        return {n: gpu.download(p, *out_specs[n]) for n, p in zip(outs, out_ptrs)}
    finally:
        launchers.lib.shrinkrt_bibranch_destroy(h)


def _reference(x, attrs):
    from shrinkrt.plugins.kernels.bibranch_attn import bibranch_attention

    return bibranch_attention(x["q"], x["k"], x["v"], x["c_k"], x["c_v"], x["win_k"], x["win_v"], x["feat_k"],
                              x["feat_v"], x["k_up"], x["v_up"], x["k_bias"], x["v_bias"], x["rope_cos"],
                              x["rope_sin"], x["past_length"], attrs[6], attrs[7], x.get("feat_k_scales"),
                              x.get("feat_v_scales"))


def _check_bibranch(gpu, launchers, shape, bits, key_mode, B, T, past, S):
    from shrinkrt.runtime.op_contract import split_plan

    x, attrs = _bibranch_case(shape, bits, key_mode, B, T, past, S)
    got = _run_bibranch(gpu, launchers, x, attrs, B, T, S)
    names = [ln["name"] for ln in gpu.launches]
    H, G, D, W = attrs[0], attrs[1], attrs[2], attrs[3]
    split = f"bibranch_split_b{bits}_{'post' if key_mode else 'pre'}_h{H}g{G}d{D}w{W}"
    # both feature rows quantized, then per query token: the ring append, the splits, the merge
    assert names == [f"feature_quant_b{bits}"] * 2 + [f"bibranch_append_g{G}d{D}w{W}", split,
                                                        f"bibranch_reduce_h{H}g{G}d{D}"] * T
    n_splits = split_plan(S, W)[0]
    grids = {"feature_quant": [B * T, 1, 1], "bibranch_append": [B * G, 1, 1], "bibranch_split": [B * H, n_splits + 1, 1],
             "bibranch_reduce": [B * H, 1, 1]}
    for ln in gpu.launches:
        assert ln["grid"] == next(v for k, v in grids.items() if ln["name"].startswith(k)), ln
    ref = _reference(x, attrs)
    for name in got:  # the ring and the stored rows byte for byte; y to fp16 rounding (padded reductions)
        if name == "y":
            err = (got[name].float() - ref[name].float()).abs().max().item()
            assert err <= 2e-3 * max(1.0, ref[name].float().abs().max().item()), (name, err)
        else:
            assert torch.equal(got[name], ref[name]), name
    return got, ref


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("key_mode", [0, 1])
def test_bibranch_decode_smollm2(gpu, launchers, bits, key_mode):
    """A decode step deep into the cache at each feature branch and key mode: post-RoPE at batch 2, past 700
    of 1024 (4 splits + the window); pre-RoPE (every key rebuilt and rotated per row: ~5x the interpreter's
    time) at batch 1, past 330 of 768 (2 of 3 splits reached)."""
    if key_mode:
        _check_bibranch(gpu, launchers, SMOLLM2, bits, key_mode, B=2, T=1, past=700, S=1024)
    else:
        _check_bibranch(gpu, launchers, SMOLLM2, bits, key_mode, B=1, T=1, past=330, S=768)


@pytest.mark.parametrize("bits, key_mode, past", [(4, 1, 0), (8, 0, 60), (16, 1, 200)])
def test_bibranch_prefill_smollm2(gpu, launchers, bits, key_mode, past):
    """A prompt chunk from an empty cache, one crossing the window (60 + 7 > 64) and one past it."""
    _check_bibranch(gpu, launchers, SMOLLM2, bits, key_mode, B=1, T=7, past=past, S=512)


@pytest.mark.parametrize("bits, key_mode, T, past", [(4, 0, 1, 300), (8, 1, 1, 40), (16, 0, 5, 30), (4, 1, 5, 100)])
def test_bibranch_second_shape(gpu, launchers, bits, key_mode, T, past):
    """The other model shape of the same library: head_dim 128, GQA ratio 8, window 32."""
    _check_bibranch(gpu, launchers, LLAMA3ISH, bits, key_mode, B=1, T=T, past=past, S=512)


def test_bibranch_ptx_path(gpu, launchers, monkeypatch):
    """On a device above 7.5 the launcher loads the PTX images (identified by their hash) and they run the same."""
    monkeypatch.setenv("SHRINKRT_FAKE_CUDA_CC", "8.6")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"launchers-ptx-{os.getpid()}.log"
    log.unlink(missing_ok=True)
    monkeypatch.setenv("SHRINKRT_FAKE_CUDA_LOG", str(log))
    _check_bibranch(gpu, launchers, SMOLLM2, 4, 1, B=1, T=2, past=90, S=512)
    loads = [json.loads(line) for line in log.read_text().splitlines() if '"load"' in line]
    log.unlink()
    assert len(loads) == 4 and {e["kind"] for e in loads} == {"ptx"}


def test_bibranch_modules_load_once_per_image(gpu, launchers, monkeypatch, tmp_path):
    """Two launchers of one configuration (two layers) load its four images once; the second shares them,
    and the images unload with the last user."""
    monkeypatch.setenv("SHRINKRT_FAKE_CUDA_LOG", str(tmp_path / "log"))
    x, attrs = _bibranch_case(SMOLLM2, 8, 0, 1, 1, 10, 512)
    a, _ = launchers.create("bibranch", attrs)
    b, _ = launchers.create("bibranch", attrs)
    assert launchers.call("shrinkrt_bibranch_load", a) == "" and launchers.call("shrinkrt_bibranch_load", b) == ""
    launchers.lib.shrinkrt_bibranch_destroy(a)
    events = [json.loads(line)["event"] for line in (tmp_path / "log").read_text().splitlines()]
    assert events.count("load") == 4 and events.count("unload") == 0
    launchers.lib.shrinkrt_bibranch_destroy(b)
    events = [json.loads(line)["event"] for line in (tmp_path / "log").read_text().splitlines()]
    assert events.count("unload") == 4


# QuantMatMul ------------------------------------------------------------------------------------------

def _quant_case(bits, group, K, N, n_outliers, seed=0):
    from shrinkrt.runtime import packing

    g = torch.Generator().manual_seed(seed)
    ng = -(-K // group)
    q = torch.randint(0, 2 ** bits, (N, K), generator=g)
    zeros = torch.randint(0, 2 ** bits, (N, ng), generator=g)
    scales = (torch.rand(N, ng, generator=g) * 0.02 + 0.002).half()
    p = packing.pack(q, scales, zeros, bits, group)
    dense = packing.dequantize(p.codes, p.scales, p.zeros, bits, group, K)
    rows = torch.randint(0, N, (n_outliers,), generator=g).sort().values
    cols = torch.randint(0, K, (n_outliers,), generator=g)
    vals = torch.randn(n_outliers, generator=g).half()
    rowptr = torch.zeros(N + 1, dtype=torch.int32)
    rowptr[1:] = torch.bincount(rows, minlength=N).cumsum(0).to(torch.int32)
    for r, c, v in zip(rows.tolist(), cols.tolist(), vals.float().tolist()):
        dense[r, c] += v
    ins = [p.codes, p.scales, p.zeros, rowptr, cols.to(torch.int32) if n_outliers else torch.zeros(1, dtype=torch.int32),
           vals if n_outliers else torch.zeros(1, dtype=torch.float16)]
    return ins, dense


def _run_quant_matmul(gpu, launchers, attributes, x, ins):
    """One QuantMatMul launcher (attributes in kAttributes order) created, loaded and enqueued on the
    stand-in for x (1, rows, K) -> Y (rows, N) as float32; no launch may fail or touch a guard byte."""
    rows, N = x.shape[1], attributes[3]
    h, err = launchers.create("quant_matmul", attributes)
    assert h, err
    try:
        assert launchers.call("shrinkrt_quant_matmul_load", h) == ""
        ptrs = [gpu.upload(t) for t in [x, *ins]]
        y = gpu.alloc(rows * N * 2)
        ws = gpu.alloc(max(1, launchers.lib.shrinkrt_quant_matmul_workspace(h, rows)))
        err = launchers.call("shrinkrt_quant_matmul_enqueue", h, rows, _ptrs(ptrs), y, ws, None)
        gpu.raise_failure()
        assert err == "" and gpu.guards_broken() == 0
        return gpu.download(y, (rows, N), torch.float16).float()
    finally:
        launchers.lib.shrinkrt_quant_matmul_destroy(h)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group, rows", [(64, 1), (128, 5), (64, 20), (32, 3)])
def test_quant_matmul(gpu, launchers, bits, group, rows):
    """Y = X @ W^T for the packed W with FP16 outliers: rows 1 and 5 through one GEMV each (padded to 2 and
    8 rows), 20 rows in chunks of 8, 8 and 4 (no cuBLASLt behind the stand-in); within fp16 rounding of
    the dense fp32 product."""
    K, N = 576, 96
    ins, dense = _quant_case(bits, group, K, N, n_outliers=37)
    x = (torch.randn(1, rows, K, generator=torch.Generator().manual_seed(1))).half()
    got = _run_quant_matmul(gpu, launchers, [bits, group, K, N, 0], x, ins)
    pad = lambda m: 2 if m <= 2 else 4 if m <= 4 else 8  # noqa: E731
    chunks = [min(8, rows - r0) for r0 in range(0, rows, 8)]
    assert [ln["name"] for ln in gpu.launches] == [f"qgemv_b{bits}_g{group}_m{pad(m)}_o1" for m in chunks]
    assert [ln["scalars"]["M"] for ln in gpu.launches] == chunks
    assert all(ln["grid"] == [-(-N // 32), 1, 1] for ln in gpu.launches)
    ref = x[0].float() @ dense.T
    err = (got - ref).abs().max().item()
    assert err <= 2e-3 * ref.abs().max().item(), err


def test_quant_matmul_with_mins(gpu, launchers):
    """The fp16-min format (4-bit, groups of 32, w = q * s + m, no outliers): one GEMV for 1 row and the
    dequant + GEMM path is not reached (no cuBLASLt): 3 rows through the m4 GEMV named `_min`; within
    fp16 rounding of the dense fp32 product."""
    from shrinkrt.runtime import packing

    K, N, rows = 576, 96, 3
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (N, K), generator=g)
    scales = (torch.rand(N, K // 32, generator=g) * 0.02 + 0.002).half()
    mins = (-(torch.rand(N, K // 32, generator=g) * 0.15)).half()
    p = packing.pack(q, scales, mins, 4, 32, mins=True)
    dense = packing.dequantize(p.codes, p.scales, None, 4, 32, K, mins=p.mins)
    ins = [p.codes, p.scales, p.mins, torch.zeros(N + 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
           torch.zeros(1, dtype=torch.float16)]
    x = torch.randn(1, rows, K, generator=torch.Generator().manual_seed(1)).half()
    got = _run_quant_matmul(gpu, launchers, [4, 32, K, N, 1], x, ins)
    assert [ln["name"] for ln in gpu.launches] == ["qgemv_b4_g32_min_m4_o1"]
    ref = x[0].float() @ dense.T
    assert (got - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()


# what the stand-in catches and what the launchers report -----------------------------------------------

def test_a_pointer_outside_every_allocation_fails_the_launch(gpu, launchers):
    """The checks have teeth: an input that is host memory, not a device allocation, fails the launch
    naming the kernel's parameter, and the launcher reports the failed launch in one line."""
    ins, _ = _quant_case(4, 64, 576, 96, n_outliers=0)
    x = torch.zeros(1, 1, 576, dtype=torch.float16)
    h, _ = launchers.create("quant_matmul", [4, 64, 576, 96, 0])
    try:
        assert launchers.call("shrinkrt_quant_matmul_load", h) == ""
        ptrs = [x.data_ptr()] + [gpu.upload(t) for t in ins]  # X left in host memory
        err = launchers.call("shrinkrt_quant_matmul_enqueue", h, 1, _ptrs(ptrs), gpu.alloc(96 * 2), None, None)
    finally:
        launchers.lib.shrinkrt_quant_matmul_destroy(h)
    assert "launching qgemv_b4_g64_m2_o1: CUDA_ERROR_LAUNCH_FAILED" in err, err
    with pytest.raises(AssertionError, match="qgemv_b4_g64_m2_o1: x_ptr = 0x[0-9a-f]+ is in no allocation"):
        gpu.raise_failure()


@pytest.mark.parametrize("fail, at, said", [
    ("context", "load", "no current CUDA context: CUDA_ERROR_INVALID_CONTEXT"),
    ("load", "load", "loading kernel qgemv_b3_g128_m2_o1 (cubin): CUDA_ERROR_INVALID_IMAGE"),
    ("launch", "enqueue", "launching qgemv_b3_g128_m2_o1: CUDA_ERROR_LAUNCH_FAILED")])
def test_injected_driver_faults(gpu, launchers, monkeypatch, fail, at, said):
    """Each injected driver fault fails the call it hits with one line naming the kernel and the
    driver's error; a launcher whose load failed refuses to enqueue."""
    monkeypatch.setenv("SHRINKRT_FAKE_CUDA_FAIL", fail)
    ins, _ = _quant_case(3, 128, 576, 96, n_outliers=0)
    h, _ = launchers.create("quant_matmul", [3, 128, 576, 96, 0])
    try:
        load_err = launchers.call("shrinkrt_quant_matmul_load", h)
        ptrs = [gpu.upload(t) for t in [torch.zeros(1, 1, 576, dtype=torch.float16), *ins]]
        enq_err = launchers.call("shrinkrt_quant_matmul_enqueue", h, 1, _ptrs(ptrs), gpu.alloc(96 * 2), None, None)
    finally:
        launchers.lib.shrinkrt_quant_matmul_destroy(h)
    if at == "load":
        assert said in load_err and enq_err == "kernels not loaded", (load_err, enq_err)
    else:
        assert load_err == "" and said in enq_err, enq_err
    assert "\n" not in load_err + enq_err and not gpu.launches


@pytest.mark.parametrize("op, attrs, said", [
    ("bibranch", [9, 3, 64, 64, 48, 96, 5, 0], "bits must be 16, 8 or 4 (got 5)"),
    ("bibranch", [9, 3, 64, 48, 48, 96, 4, 0], "no kernel bibranch_split_b4_pre_h9g3d64w48"),
    ("bibranch", [9, 3, 64, 64, 300, 96, 4, 0], "rank_k and rank_v must be in 1..256"),
    ("quant_matmul", [5, 64, 576, 96, 0], "bits must be one of 2, 3, 4, 8 (got 5)"),
    ("quant_matmul", [4, 16, 576, 96, 0], "group_size must be one of 32, 64, 128 (got 16)")])
def test_create_names_what_the_library_cannot_run(launchers, op, attrs, said):
    h, err = launchers.create(op, attrs)
    assert not h and said in err, err
