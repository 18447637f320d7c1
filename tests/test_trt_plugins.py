"""The TensorRT plugin library (plugins/tensorrt) against a real TensorRT plugin registry.

Needs TensorRT headers (TensorRT_INCLUDE_DIR or TensorRT_ROOT: never vendored, so CI has none and
these tests skip there, saying so), CMake and a C++ compiler, and a TensorRT Python module
(tensorrt, or tensorrt_rtx which CI installs). TensorRT-RTX aborts once a plugin layer is added to a
network (FACTS.md), so this checks registration, fields and plugin creation, not an engine.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shrinkrt.export import ops

ROOT = Path(__file__).resolve().parents[1]


def _headers() -> Path | None:
    for var, sub in (("TensorRT_INCLUDE_DIR", ""), ("TensorRT_ROOT", "include")):
        if os.environ.get(var) and (Path(os.environ[var]) / sub / "NvInfer.h").is_file():
            return Path(os.environ[var]) / sub
    return None


def _trt_module() -> str | None:
    for name in ("tensorrt", "tensorrt_rtx"):
        if subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0:
            return name
    return None


def build_plugins(build: Path, *cmake_args: str) -> Path:
    """libshrinkrt_trt_plugins.so built by the project's CMake (skips the test when it cannot be)."""
    headers = _headers()
    if headers is None:
        pytest.skip("no TensorRT headers: set TensorRT_INCLUDE_DIR (e.g. include/ of a NVIDIA/TensorRT checkout)")
    if not shutil.which("cmake") or not shutil.which("c++"):
        pytest.skip("cmake and a C++ compiler are needed to build the plugin library")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    extra = [f"-DSHRINKRT_CUBLASLT_ROOT={os.environ['SHRINKRT_CUBLASLT_ROOT']}"] \
        if os.environ.get("SHRINKRT_CUBLASLT_ROOT") else []  # the prefill GEMM path compiled in too
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DTensorRT_INCLUDE_DIR={headers}",
                    f"-DSHRINKRT_PYTHON={sys.executable}", *extra, *cmake_args], check=True, capture_output=True, env=env,
                   timeout=300)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, env=env, timeout=1200)
    lib = build / "plugins" / "tensorrt" / "libshrinkrt_trt_plugins.so"
    assert lib.is_file()
    return lib


def build_probe(lib: Path):
    """tests/plugin_probe.cpp built against the same headers: drives a plugin's build phase, and on a
    GPU one enqueue. Returns run(op, fields, inputs, data_dir=None) -> (json, stderr)."""
    exe = lib.parent / "plugin_probe"
    subprocess.run(["c++", "-std=c++17", "-O1", "-Wall", "-Wno-deprecated-declarations", "-isystem", str(_headers()),
                    "-isystem", "/usr/local/cuda/include", "-isystem", "/usr/local/cuda-13.0/include",
                    str(ROOT / "tests" / "plugin_probe.cpp"), "-o", str(exe), "-ldl"], check=True, capture_output=True,
                   timeout=300)

    def run(op, fields, inputs, data_dir=None, env=None):
        spec = ";".join(f"{t}:{'x'.join(map(str, shape))}" for t, shape in inputs)
        r = subprocess.run([str(exe), str(lib), op, ",".join(f"{k}={v}" for k, v in fields.items()), spec]
                           + ([str(data_dir)] if data_dir else []), capture_output=True, text=True, timeout=300,
                           env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout), r.stderr
    return run


@pytest.fixture(scope="module")
def plugin_lib(tmp_path_factory):
    if _trt_module() is None:
        pytest.skip("no TensorRT Python module (tensorrt or tensorrt_rtx)")
    return build_plugins(tmp_path_factory.mktemp("cmake"))


@pytest.fixture(scope="module")
def probe(plugin_lib):
    return build_probe(plugin_lib)


CHECK = r"""
import json, sys
import numpy as np
mod = __import__(sys.argv[2])
reg = mod.get_plugin_registry()
assert reg.load_library(sys.argv[1]) is not None, "loadLibrary refused the library"
out = {"creators": {c.name: [c.plugin_version, c.plugin_namespace, [f.name for f in c.field_names]]
                    for c in reg.all_creators if c.plugin_namespace == "shrinkrt"}, "created": []}
for op, fields in json.loads(sys.argv[3]):
    arrays = {k: np.array([v], np.int32) for k, v in fields.items()}  # alive while the plugin reads them
    fc = mod.PluginFieldCollection([mod.PluginField(k, a, mod.PluginFieldType.INT32) for k, a in arrays.items()])
    p = reg.get_creator(op, "1", "shrinkrt").create_plugin("n", fc, mod.TensorRTPhase.BUILD)
    outs = p.get_capability_interface(mod.PluginCapabilityType.BUILD).num_outputs if p is not None else None
    out["created"].append(outs)
print(json.dumps(out))
"""


def run_check(lib, cases):
    r = subprocess.run([sys.executable, "-c", CHECK, str(lib), _trt_module(), json.dumps(cases)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr + r.stdout


def test_registry_lists_the_creators_of_docs_ops(plugin_lib):
    got, _ = run_check(plugin_lib, [])
    assert got["creators"] == {op: ["1", "shrinkrt", list(ops.SCHEMAS[op][2])] for op in ("QuantMatMul", "BiBranchAttention")}


def _node_fields(node):
    return {a.name: a.i for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")}


def test_create_plugin_with_exported_node_fields(plugin_lib):
    """Fields as the exporter writes them (ops.node, SmolLM2's attention shape) create plugins with
    the op's outputs; unsupported values are refused with one line naming the field."""
    ins, outs, _ = ops.bi_branch_io(4)
    attn = ops.node("BiBranchAttention", ins, outs, "a", num_heads=9, num_kv_heads=3, head_dim=64, window=64,
                    rank_k=48, rank_v=96, bits=4, key_mode=1)
    attn16 = ops.node("BiBranchAttention", *ops.bi_branch_io(16)[:2], "b", num_heads=9, num_kv_heads=3, head_dim=64,
                      window=64, rank_k=80, rank_v=112, bits=16, key_mode=0)
    mm = ops.node("QuantMatMul", list(ops.SCHEMAS["QuantMatMul"][0]), ["Y"], "m", bits=3, group_size=128,
                  in_features=576, out_features=1536, has_mins=0)
    cases = [["BiBranchAttention", _node_fields(attn)], ["BiBranchAttention", _node_fields(attn16)],
             ["QuantMatMul", _node_fields(mm)],
             ["QuantMatMul", {**_node_fields(mm), "bits": 5}],
             ["BiBranchAttention", {**_node_fields(attn), "window": 32}],
             ["BiBranchAttention", {k: v for k, v in _node_fields(attn).items() if k != "rank_v"}]]
    got, log = run_check(plugin_lib, cases)
    assert got["created"] == [7, 5, 1, None, None, None]
    assert "QuantMatMul: bits must be one of 2, 3, 4, 8 (got 5)" in log
    assert "no kernel bibranch_split_b4_post_h9g3d64w32" in log
    assert "missing field 'rank_v'" in log


def test_quant_matmul_build_phase(probe):
    """Shapes, dtypes, formats, workspace and serialised fields as TensorRT's builder would query
    them; without a GPU driver the runtime says so and enqueue fails cleanly."""
    fields = dict(bits=3, group_size=64, in_features=576, out_features=1536, has_mins=0)
    packed = [("i", (1536, 54)), ("h", (1536, 9)), ("i", (1536, 1)), ("i", (1537,)), ("i", (4,)), ("h", (4,))]
    got, err = probe("QuantMatMul", fields, [("h", (1, 5, 576))] + packed)
    assert got["out_shapes"] == [[1, 5, 1536]] and got["out_types"] == "h" and got["supported"]
    assert not got["fp32_supported"] and got["serialized"] == fields
    assert got["workspace"] == 0  # <= 8 rows: the fused GEMV needs none
    # no driver: attachToContext gives TensorRT no plugin (the context fails to create), and an instance run
    # without attaching tries to load its kernels at enqueue, then fails cleanly, saying why
    assert got["attached"] is False and got["rc_enqueue"] == -1 and err.count("libcuda.so.1 not found") == 2
    got, _ = probe("QuantMatMul", fields, [("h", (2, 32, 576))] + packed)
    assert got["out_shapes"] == [[2, 32, 1536]] and got["workspace"] == 1536 * 576 * 2  # dense fp16 weight


@pytest.mark.parametrize("bits", [16, 4])
def test_bibranch_attention_build_phase(probe, bits):
    H, G, D, W, rk, rv, B, T, S = 9, 3, 64, 64, 48, 96, 2, 5, 2048
    fields = dict(num_heads=H, num_kv_heads=G, head_dim=D, window=W, rank_k=rk, rank_v=rv, bits=bits, key_mode=1)
    f, C = ("h", lambda r: r) if bits == 16 else ("b", lambda r: (r + 1) // 2)
    ins = [("h", (B, T, H * D)), ("h", (B, T, G * D)), ("h", (B, T, G * D)), ("h", (B, T, rk)), ("h", (B, T, rv)),
           ("h", (B, G, W, D)), ("h", (B, G, W, D)), (f, (B, S, C(rk))), (f, (B, S, C(rv))), ("h", (rk, G * D)),
           ("h", (rv, G * D)), ("h", (G * D,)), ("h", (G * D,)), ("h", (S, D)), ("h", (S, D)), ("l", (1,))]
    outs = [[B, T, H * D], [B, G, W, D], [B, G, W, D], [B, T, C(rk)], [B, T, C(rv)]]
    if bits < 16:
        ins += [("h", (B, S, 2)), ("h", (B, S, 3))]
        outs += [[B, T, 2], [B, T, 3]]
    assert len(ins) == len(ops.bi_branch_io(bits)[0]) and len(outs) == len(ops.bi_branch_io(bits)[1])
    got, err = probe("BiBranchAttention", fields, ins)
    assert got["nb_outputs"] == len(outs) and got["out_shapes"] == outs and got["supported"]
    assert got["out_types"] == "hhh" + f * 2 + ("hh" if bits < 16 else "")
    assert got["serialized"] == fields and got["rc_configure"] == 0 and not got["fp32_supported"]
    assert got["workspace"] == B * H * 64 * (2 + D + 256) * 4 + 256  # split partials + the scales dummy
    assert got["attached"] is False and got["rc_enqueue"] == -1 and err.count("libcuda.so.1 not found") == 2


@pytest.fixture(scope="module")
def fake_cuda(tmp_path_factory):
    """tests/fake_libcuda.c built as libcuda.so.1: the driver stand-in the plugins dlopen."""
    from tests import stand_in

    if not shutil.which("cc"):
        pytest.skip("a C compiler is needed to build the CUDA driver stand-in")
    return stand_in.build(tmp_path_factory.mktemp("fake_cuda")).parent


def _through_stand_in(probe, fake_cuda, tmp_path, op, fields, ins, fail=None, cc=None):
    """One enqueue of `op` by the probe against the stand-in driver; (probe json, stderr, logged events)."""
    sizes = {"h": 2, "b": 1, "i": 4, "l": 8}
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for i, (t, shape) in enumerate(ins):
        n = int(np.prod(shape)) * sizes[t]
        (data / f"in{i}.bin").write_bytes(np.array([3], np.int64).tobytes() if t == "l" else bytes(n))
    log = tmp_path / "cuda.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{fake_cuda}:{os.environ.get('LD_LIBRARY_PATH', '')}",
           "SHRINKRT_FAKE_CUDA_LOG": str(log)}
    env |= {"SHRINKRT_FAKE_CUDA_FAIL": fail} if fail else {}
    env |= {"SHRINKRT_FAKE_CUDA_CC": cc} if cc else {}
    got, err = probe(op, fields, ins, data_dir=data, env=env)
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return got, err, events


def _kernels_meta(plugin_lib):
    meta = json.loads((plugin_lib.parent.parent.parent / "kernels" / "kernels.json").read_text())
    return {k["name"]: k for k in meta["kernels"]}


@pytest.mark.parametrize("cc, kind", [(None, "cubin"), ("8.6", "ptx")])
def test_bibranch_attention_launches_through_the_driver_stand_in(plugin_lib, probe, fake_cuda, tmp_path, cc, kind):
    """The plugin's whole launch path on the CPU: attach loads its four images once per context (cubin
    at 7.5, PTX above; instances share them), enqueue launches the split, reduce, append and quantize kernels with kernels.json's block
    (32 x warps) and shared bytes, and returns 0; nothing executes (the stand-in logs the launches)."""
    H, G, D, W, rk, rv, B, T, S = 9, 3, 64, 64, 48, 96, 1, 1, 512
    fields = dict(num_heads=H, num_kv_heads=G, head_dim=D, window=W, rank_k=rk, rank_v=rv, bits=4, key_mode=1)
    C = lambda r: (r + 1) // 2  # noqa: E731
    ins = [("h", (B, T, H * D)), ("h", (B, T, G * D)), ("h", (B, T, G * D)), ("h", (B, T, rk)), ("h", (B, T, rv)),
           ("h", (B, G, W, D)), ("h", (B, G, W, D)), ("b", (B, S, C(rk))), ("b", (B, S, C(rv))), ("h", (rk, G * D)),
           ("h", (rv, G * D)), ("h", (G * D,)), ("h", (G * D,)), ("h", (S, D)), ("h", (S, D)), ("l", (1,)),
           ("h", (B, S, 2)), ("h", (B, S, 3))]
    got, err, events = _through_stand_in(probe, fake_cuda, tmp_path, "BiBranchAttention", fields, ins, cc=cc)
    assert got["attached"] is True and got["rc_enqueue"] == 0, (got, err)
    loads = [e for e in events if e["event"] == "load"]
    launches = [e for e in events if e["event"] == "launch"]
    # the probe attaches, deletes, attaches again and attaches a second instance alongside: the four images
    # load twice (the first instance's unloaded with it), the second instance shares the live ones
    unloads = [e for e in events if e["event"] == "unload"]
    assert len(loads) == 8 and {e["kind"] for e in loads} == {kind} and len(unloads) == 8
    meta = _kernels_meta(plugin_lib)
    names = [f"bibranch_split_b4_post_h{H}g{G}d{D}w{W}", f"bibranch_reduce_h{H}g{G}d{D}", f"bibranch_append_g{G}d{D}w{W}",
             "feature_quant_b4"]
    entries = {meta[n]["entry"]: meta[n] for n in names}
    from shrinkrt.runtime.op_contract import split_plan

    n_splits = split_plan(S, W)[0]
    grids = {"bibranch_split_kernel": [B * H, n_splits + 1, 1], "bibranch_reduce_kernel": [B * H, 1, 1],
             "bibranch_append_kernel": [B * G, 1, 1], "feature_quant_kernel": [B * T, 1, 1]}  # kernels.json "grid"
    # both feature rows quantized, the ring appended, the splits (+ the window's slot), the merge
    assert [e["entry"] for e in launches] == ["feature_quant_kernel"] * 2 + ["bibranch_append_kernel",
                                                                             "bibranch_split_kernel", "bibranch_reduce_kernel"]
    for e in launches:
        k = entries[e["entry"]]
        assert e["block"] == [32 * k["num_warps"], 1, 1] and e["shared"] == k["shared"], (e, k)
        assert e["grid"] == grids[e["entry"]], e
    ring = B * G * W * D * 2  # the ring outputs: the input ring copied, then this call's rows appended
    assert [e["bytes"] for e in events if e["event"] == "copy"] == [ring, ring]


@pytest.mark.parametrize("bits, rows", [(2, 20), (3, 20), (4, 20), (8, 20), (4, 1)])
def test_quant_matmul_launches_through_the_driver_stand_in(plugin_lib, probe, fake_cuda, tmp_path, bits, rows):
    """QuantMatMul's enqueue on the stand-in (no cuBLASLt there, so every call runs the GEMV): chunks of at
    most 8 rows, each through the specialization padded to its row count, grid ceil(N / 32)."""
    K, N, group = 576, 192, 64
    fields = dict(bits=bits, group_size=group, in_features=K, out_features=N, has_mins=0)
    ins = [("h", (1, rows, K)), ("i", (N, K // 32 * bits)), ("h", (N, K // group)),
           ("i", (N, -(-(K // group) * bits // 32))), ("i", (N + 1,)), ("i", (1,)), ("h", (1,))]
    got, err, events = _through_stand_in(probe, fake_cuda, tmp_path, "QuantMatMul", fields, ins)
    assert got["attached"] is True and got["rc_enqueue"] == 0, (got, err)
    meta = _kernels_meta(plugin_lib)
    live = [e["module"] for e in events if e["event"] == "load"][-4:]  # the attached instance's: m2, m4, m8, dequant
    by_module = dict(zip(live, [f"qgemv_b{bits}_g{group}_m{m}_o1" for m in (2, 4, 8)] + ["dequant"]))
    launches = [e for e in events if e["event"] == "launch"]
    chunks = [min(8, rows - r0) for r0 in range(0, rows, 8)]
    pad = lambda m: 2 if m <= 2 else 4 if m <= 4 else 8  # noqa: E731
    assert [by_module[e["module"]] for e in launches] == [f"qgemv_b{bits}_g{group}_m{pad(m)}_o1" for m in chunks]
    for e in launches:
        k = meta[by_module[e["module"]]]
        assert e["entry"] == k["entry"] and e["grid"] == [-(-N // 32), 1, 1]
        assert e["block"] == [32 * k["num_warps"], 1, 1] and e["shared"] == k["shared"]


@pytest.mark.parametrize("fail, said", [("context", "CUDA_ERROR_INVALID_CONTEXT"), ("load", "CUDA_ERROR_INVALID_IMAGE"),
                                        ("launch", "CUDA_ERROR_LAUNCH_FAILED")])
def test_injected_driver_faults_fail_enqueue_with_one_clear_line(plugin_lib, probe, fake_cuda, tmp_path, fail, said):
    fields = dict(bits=4, group_size=64, in_features=576, out_features=192, has_mins=0)
    packed = [("i", (192, 36)), ("h", (192, 9)), ("i", (192, 1)), ("i", (193,)), ("i", (1,)), ("h", (1,))]
    got, err, events = _through_stand_in(probe, fake_cuda, tmp_path, "QuantMatMul", fields,
                                         [("h", (1, 1, 576))] + packed, fail=fail)
    if fail in ("context", "load"):  # no plugin for the context (TensorRT would fail its creation): nothing enqueued
        assert got["attached"] is False and got["rc_enqueue"] == -2 and not [e for e in events if e["event"] == "launch"]
    else:
        assert got["attached"] is True and got["rc_enqueue"] == -1
    assert said in err and "QuantMatMul" in err, err


@pytest.mark.parametrize("at, shape, said", [
    (5, (2, 3, 80, 64), "win_k has 80 at axis 2, the fields say window = 64"),
    (3, (2, 5, 40), "c_k has 40 at axis 2, the fields say rank_k = 48"),
    (8, (2, 2048, 47), "feat_v has 47 at axis 2, the fields say the row width of rank_v = 48"),
    (16, (2, 2048, 3), "feat_k_scales has 3 at axis 2, the fields say groups of rank_k = 2"),
    (7, (1, 2048, 24), "a cache input has 1 at axis 0, the fields say the batch of q = 2"),
    (13, (1024, 64), "rope_cos has fewer rows than the feature store's capacity 2048")])
def test_bibranch_configure_names_a_shape_the_fields_contradict(probe, at, shape, said):
    H, G, D, W, rk, rv, B, T, S = 9, 3, 64, 64, 48, 96, 2, 5, 2048
    fields = dict(num_heads=H, num_kv_heads=G, head_dim=D, window=W, rank_k=rk, rank_v=rv, bits=4, key_mode=1)
    ins = [("h", (B, T, H * D)), ("h", (B, T, G * D)), ("h", (B, T, G * D)), ("h", (B, T, rk)), ("h", (B, T, rv)),
           ("h", (B, G, W, D)), ("h", (B, G, W, D)), ("b", (B, S, rk // 2)), ("b", (B, S, rv // 2)), ("h", (rk, G * D)),
           ("h", (rv, G * D)), ("h", (G * D,)), ("h", (G * D,)), ("h", (S, D)), ("h", (S, D)), ("l", (1,)),
           ("h", (B, S, 2)), ("h", (B, S, 3))]
    got, _ = probe("BiBranchAttention", fields, ins)
    assert got["rc_configure"] == 0
    ins[at] = (ins[at][0], shape)
    got, err = probe("BiBranchAttention", fields, ins)
    assert got["rc_configure"] == -1 and said in err, err


def test_library_built_for_another_model(plugin_lib, fake_cuda, tmp_path):
    """A library per model (-DSHRINKRT_EXPORT): an export of another attention shape (4 heads, 2 KV
    heads, head_dim 32, window 16, int4 pre-RoPE) gets its kernels; the default library names what it
    lacks for that shape, at plugin creation (and `build --plugins` before any engine, tests/test_second_shape)."""
    from shrinkrt.cli import main
    from shrinkrt.export import trt_build
    from tests.conftest import tiny_hf_model
    from tests.test_second_shape import VOCAB, corpus_tokenizer

    m, ck, exp = tmp_path / "m", tmp_path / "ck", tmp_path / "exp"
    tiny_hf_model("llama", attention_bias=True, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=192, max_position_embeddings=256, vocab_size=VOCAB).save_pretrained(m)
    corpus_tokenizer(m)
    assert main(["calibrate", "--model", str(m), "--kv-ratio", "0.5", "--window", "16", "--kv-bits", "4",
                 "--calib-tokens", "256", "--kv-fit-steps", "2", "--out", str(ck), "--quiet"]) == 0
    assert main(["export", "--model", str(m), "--checkpoint", str(ck), "--out", str(exp), "--no-validate",
                 "--precision", "float16"]) == 0
    meta = json.loads((exp / "export.json").read_text())
    cfg = meta["custom_op_attributes"]["BiBranchAttention"][0]
    case = [["BiBranchAttention", cfg]]
    got, log = run_check(plugin_lib, case)
    assert got["created"] == [None] and "no kernel bibranch_split_b4_pre_h4g2d32w16" in log
    lib = build_plugins(tmp_path / "cmake", f"-DSHRINKRT_EXPORT={exp}")
    trt_build.check_library_kernels(lib, meta["custom_op_attributes"])  # every kernel the export needs
    got, _ = run_check(lib, case)
    assert got["created"] == [7]
    # and its whole lifecycle through the driver stand-in at that shape: attach, configure, enqueue
    H, G, D, W, rk, rv = (cfg[k] for k in ("num_heads", "num_kv_heads", "head_dim", "window", "rank_k", "rank_v"))
    B, T, S, C = 1, 3, 256, (lambda r: (r + 1) // 2)
    ins = [("h", (B, T, H * D)), ("h", (B, T, G * D)), ("h", (B, T, G * D)), ("h", (B, T, rk)), ("h", (B, T, rv)),
           ("h", (B, G, W, D)), ("h", (B, G, W, D)), ("b", (B, S, C(rk))), ("b", (B, S, C(rv))), ("h", (rk, G * D)),
           ("h", (rv, G * D)), ("h", (G * D,)), ("h", (G * D,)), ("h", (S, D)), ("h", (S, D)), ("l", (1,)),
           ("h", (B, S, -(-rk // 32))), ("h", (B, S, -(-rv // 32)))]
    got, err, events = _through_stand_in(build_probe(lib), fake_cuda, tmp_path, "BiBranchAttention", cfg, ins)
    assert got["attached"] is True and got["rc_enqueue"] == 0, (got, err)
    launched = [e["entry"] for e in events if e["event"] == "launch"]
    assert launched == ["feature_quant_kernel"] * 2 + ["bibranch_append_kernel", "bibranch_split_kernel",
                                                       "bibranch_reduce_kernel"] * T

