"""The compressed checkpoint container: round trip, atomic writes and every validation error."""
import json

import pytest
import torch

from shrinkrt.calib import checkpoint
from shrinkrt.errors import ShrinkError

BASE = {"name": "tiny", "weights_sha256": "ab" * 32, "model_type": "llama", "n_layers": 2}


def write(tmp_path, **over):
    manifest = {"base_model": BASE, "calibration": {"seed": 0}, "kv": {"method": "test"}}
    manifest.update(over)
    tensors = {"kv.layers.0.k_down": torch.arange(12.0).view(3, 4), "kv.layers.0.v_down": torch.ones(2, dtype=torch.int8)}
    return checkpoint.save(tmp_path / "ckpt", manifest, tensors), tensors


def test_round_trip(tmp_path):
    path, tensors = write(tmp_path)
    manifest, loaded = checkpoint.load(path, BASE)
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION and manifest["kv"] == {"method": "test"}
    assert manifest["tensors"]["kv.layers.0.v_down"] == {"dtype": "int8", "shape": [2]}
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left


def test_same_inputs_same_bytes(tmp_path):
    a, _ = write(tmp_path / "a")
    b, _ = write(tmp_path / "b")
    for name in (checkpoint.MANIFEST, checkpoint.TENSORS):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_rewrite_replaces_whole_directory(tmp_path):
    path, _ = write(tmp_path)
    (path / "stray.txt").write_text("x")
    write(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [checkpoint.MANIFEST, checkpoint.TENSORS]


def test_failed_write_leaves_old_checkpoint(tmp_path, monkeypatch):
    path, _ = write(tmp_path)
    before = (path / checkpoint.MANIFEST).read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path)
    assert (path / checkpoint.MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def edit_manifest(path, fn):
    m = json.loads((path / checkpoint.MANIFEST).read_text())
    fn(m)
    (path / checkpoint.MANIFEST).write_text(json.dumps(m))


def test_base_model_mismatch(tmp_path):
    path, _ = write(tmp_path)
    other = dict(BASE, name="other", weights_sha256="cd" * 32)
    with pytest.raises(ShrinkError, match="calibrated on another base model"):
        checkpoint.load(path, other)


def test_unknown_version(tmp_path):
    path, _ = write(tmp_path)
    edit_manifest(path, lambda m: m.update(format_version=99))
    with pytest.raises(ShrinkError, match="format version 99 is not supported"):
        checkpoint.load(path, BASE)


def test_missing_tensor(tmp_path):
    path, _ = write(tmp_path)
    edit_manifest(path, lambda m: m["tensors"].update({"kv.layers.1.k_down": {"dtype": "float32", "shape": [3, 4]}}))
    with pytest.raises(ShrinkError, match="tensor 'kv.layers.1.k_down' listed in the manifest is missing"):
        checkpoint.load(path, BASE)


def test_misshaped_tensor(tmp_path):
    path, _ = write(tmp_path)
    edit_manifest(path, lambda m: m["tensors"]["kv.layers.0.k_down"].update(shape=[4, 3]))
    with pytest.raises(ShrinkError, match=r"'kv.layers.0.k_down' is float32\[3, 4\], the manifest says float32\[4, 3\]"):
        checkpoint.load(path, BASE)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ShrinkError, match="is not a directory"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(ShrinkError, match="has no manifest.json"):
        checkpoint.load(tmp_path / "d")
    (tmp_path / "d" / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(ShrinkError, match="is not valid JSON"):
        checkpoint.load(tmp_path / "d")
