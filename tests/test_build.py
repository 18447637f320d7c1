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
