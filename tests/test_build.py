"""`shrinkrt build`: SM75 engines from the exported graph with TensorRT-RTX on a machine without a GPU."""
import json

import pytest

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu12)")


def test_build_sm75_engine_with_compressed_model(tiny_dir, tmp_path, capsys):
    from shrinkrt.cli import main

    ck = tmp_path / "ck"
    # int8 features: on this tiny model's degenerate calibration data (the test tokenizer maps the text to
    # <unk>) int4 group scales overflow FP16, which calibration now refuses instead of writing NaN factors
    assert main(["calibrate", "--model", str(tiny_dir), "--kv-ratio", "0.5", "--window", "4", "--kv-bits", "8",
                 "--weight-budget", "4bpw", "--calib-tokens", "256", "--kv-fit-steps", "5", "--out", str(ck),
                 "--quiet"]) == 0
    out = tmp_path / "build"
    assert main(["build", "--model", str(tiny_dir), "--checkpoint", str(ck), "--out", str(out),
                 "--max-prefill", "16"]) == 0
    info = json.loads((out / "build.json").read_text())
    engine = out / "engine.sm75.plan"
    assert info["trt_module"] == "tensorrt_rtx" and info["target"] == "sm75"
    assert engine.stat().st_size == info["engine_bytes"] > 100_000 and info["layers"] > 100
    meta = json.loads((out / "export.json").read_text())
    assert meta["target"] == "tensorrt" and meta["dtype"] == "float16"
    assert "shrinkrt::BiBranchAttention" in meta["custom_ops"]  # the node is there; its body was inlined
    capsys.readouterr()
    assert main(["build", "--model", str(tiny_dir), "--out", str(tmp_path / "b2"), "--target", "sm61"]) == 2
    assert "unknown build target 'sm61'" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


def test_missing_tensorrt_is_named(tiny_dir, tmp_path, capsys, monkeypatch):
    import importlib

    from shrinkrt.cli import main

    real = importlib.import_module

    def no_trt(name, *a):
        if name.startswith("tensorrt"):
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_trt)
    assert main(["build", "--model", str(tiny_dir), "--out", str(tmp_path / "b")]) == 2
    assert "pip install tensorrt-rtx-cu12" in capsys.readouterr().err


def test_plugin_build_refusals_name_the_problem(tiny_dir, tmp_path, capsys):
    """`build --plugins` with TensorRT-RTX (which aborts on plugin layers) or a missing library is
    one clear error before any export is written."""
    from shrinkrt.cli import main

    out = tmp_path / "b"
    assert main(["build", "--model", str(tiny_dir), "--out", str(out), "--plugins", str(tmp_path / "none.so")]) == 2
    err = capsys.readouterr().err
    assert "--plugins needs standard TensorRT (--trt-module tensorrt)" in err and not out.exists()


def test_trt_backend_without_gpu_is_named(tiny_dir, tmp_path, capsys):
    """The trt backend names what is missing: a build directory, then a GPU."""
    import torch

    from shrinkrt.cli import main

    assert main(["generate", "hi", "--backend", "trt", "--model", str(tiny_dir)]) == 2
    assert "has no build.json: pass the --out directory of `shrinkrt build`" in capsys.readouterr().err
    if not torch.cuda.is_available():
        (tmp_path / "build.json").write_text(json.dumps({"target": "sm75", "trt_module": "tensorrt_rtx"}))
        assert main(["generate", "hi", "--backend", "trt", "--model", str(tmp_path)]) == 2
        assert "runs a TensorRT engine on an NVIDIA GPU: no CUDA device" in capsys.readouterr().err
        assert main(["profile", "--backend", "trt", "--model", str(tmp_path), "--contexts", "64"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_trt_runtime_checks_name_the_problem():
    """The engine's ranges (build.json) are checked before TensorRT sees a shape, and a shape TensorRT
    refuses is named with its profile (runtime/trt_model.py; no GPU needed for these checks)."""
    from shrinkrt.errors import ShrinkError
    from shrinkrt.runtime import trt_model

    info = {"profiles": {"prefill": {"seq": [1, 256, 512]}, "decode": {"seq": [1, 1, 1]}, "capacity": [512, 1024, 2048]}}
    limits = trt_model.profile_limits(info, "build.json")
    assert limits == {"capacity": (512, 2048), "prefill_tokens": 512}
    trt_model.check_capacity(limits, 1, 2048)
    with pytest.raises(ShrinkError, match=r"a cache of 4096 tokens is outside the engine's capacity range 512\.\.2048"):
        trt_model.check_capacity(limits, 1, 4096)
    with pytest.raises(ShrinkError, match="batch 1"):
        trt_model.check_capacity(limits, 2, 1024)
    with pytest.raises(ShrinkError, match="a call of 600 tokens exceeds the engine's prefill profile"):
        trt_model.check_call_length(limits, 600)
    with pytest.raises(ShrinkError, match="has no engine profiles"):
        trt_model.profile_limits({"profiles": {}}, "build.json")

    class Ctx:  # TensorRT's IExecutionContext: set_input_shape returns False for a shape outside the profile
        def __init__(self):
            self.bound = {}

        def set_input_shape(self, name, shape):
            return name != "win_k.0" or shape[2] <= 64

        def set_tensor_address(self, name, address):
            self.bound[name] = address

    ctx = Ctx()
    trt_model.bind_inputs(ctx, 1, [("input_ids", (1, 1), 10), ("win_k.0", (1, 3, 64, 64), 20)])
    assert ctx.bound == {"input_ids": 10, "win_k.0": 20}
    with pytest.raises(ShrinkError, match=r"TensorRT refused input win_k.0 of shape \[1, 3, 80, 64\] for profile 0 \(prefill\)"):
        trt_model.bind_inputs(ctx, 0, [("win_k.0", (1, 3, 80, 64), 30)])


def test_build_refuses_bodies_imported_for_plugins():
    """A parser that imported some shrinkrt nodes as their function bodies (no plugin override) is named
    at build time, not found out when the engine runs."""
    from onnx import helper

    from shrinkrt.errors import ShrinkError
    from shrinkrt.export.trt_build import check_plugin_layers

    class LayerType:
        PLUGIN_V3, MATMUL = "plugin_v3", "matmul"

    class Trt:
        pass

    Trt.LayerType = LayerType

    class Network:
        def __init__(self, kinds):
            self.layers = [type("L", (), {"type": k}) for k in kinds]
            self.num_layers = len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    nodes = [helper.make_node("BiBranchAttention", [], [], domain="shrinkrt"), helper.make_node("QuantMatMul", [], [], domain="shrinkrt"),
             helper.make_node("Add", [], [])]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    check_plugin_layers(Trt, Network(["plugin_v3", "plugin_v3", "matmul"]), model)
    with pytest.raises(ShrinkError, match="imported 1 of the model's 2 shrinkrt nodes as plugin layers"):
        check_plugin_layers(Trt, Network(["plugin_v3", "matmul", "matmul"]), model)
