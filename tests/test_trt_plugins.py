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


@pytest.fixture(scope="module")
def plugin_lib(tmp_path_factory):
    headers = _headers()
    if headers is None:
        pytest.skip("no TensorRT headers: set TensorRT_INCLUDE_DIR (e.g. include/ of a NVIDIA/TensorRT checkout)")
    if not shutil.which("cmake") or not shutil.which("c++"):
        pytest.skip("cmake and a C++ compiler are needed to build the plugin library")
    if _trt_module() is None:
        pytest.skip("no TensorRT Python module (tensorrt or tensorrt_rtx)")
    build = tmp_path_factory.mktemp("cmake")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    extra = [f"-DSHRINKRT_CUBLASLT_ROOT={os.environ['SHRINKRT_CUBLASLT_ROOT']}"] \
        if os.environ.get("SHRINKRT_CUBLASLT_ROOT") else []  # the prefill GEMM path compiled in too
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DTensorRT_INCLUDE_DIR={headers}",
                    f"-DSHRINKRT_PYTHON={sys.executable}", *extra], check=True, capture_output=True, env=env,
                   timeout=300)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, env=env, timeout=1200)
    lib = build / "plugins" / "tensorrt" / "libshrinkrt_trt_plugins.so"
    assert lib.is_file()
    return lib


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
                  in_features=576, out_features=1536)
    cases = [["BiBranchAttention", _node_fields(attn)], ["BiBranchAttention", _node_fields(attn16)],
             ["QuantMatMul", _node_fields(mm)],
             ["QuantMatMul", {**_node_fields(mm), "bits": 5}],
             ["BiBranchAttention", {**_node_fields(attn), "window": 32}],
             ["BiBranchAttention", {k: v for k, v in _node_fields(attn).items() if k != "rank_v"}]]
    got, log = run_check(plugin_lib, cases)
    assert got["created"] == [7, 5, 1, None, None, None]
    assert "QuantMatMul: bits must be 2, 3, 4 or 8 (got 5)" in log
    assert "no kernel bibranch_split_b4_post_h9g3d64w32" in log
    assert "missing field 'rank_v'" in log
