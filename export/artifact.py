"""The export artifact: one directory that ONNX Runtime (and TensorRT) can take on its own.

DIR/
  model.onnx     the decoder graph (export/llama.py) with the custom ops and their reference bodies
  export.json    format version, model args, dtype, target, base model and checkpoint identity
  tokenizer files copied from the base model directory
Written atomically; the same model and checkpoint give byte-identical files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import onnx

from shrinkrt.atomic import write_dir
from shrinkrt.errors import ShrinkError

from . import llama

FORMAT, FORMAT_VERSION = "shrinkrt-export", 1
TARGETS = ("generic", "ort-cpu", "tensorrt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def export(lm, out: Path, dtype: str = "float32", target: str = "generic", base: dict | None = None,
           checkpoint: dict | None = None, check=None, ort_accuracy: int = 0) -> Path:
    """lm: a LoadedModel with any checkpoint already applied; `checkpoint` = its manifest (identity).
    `check(tmp_dir)` runs on the complete files before they replace `out`: an export that fails its
    validation never appears."""
    if target not in TARGETS:
        raise ShrinkError(f"unknown export target '{target}' (use {', '.join(TARGETS)})")
    stats = {}
    if ort_accuracy not in (0, 4):
        raise ShrinkError(f"--ort-accuracy must be 0 or 4 (got {ort_accuracy})")
    model = llama.build(lm.model, dtype, target, stats=stats, ort_accuracy=ort_accuracy)
    data = model.SerializeToString()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": lm.name, "dtype": dtype, "target": target,
            "model_args": dataclasses.asdict(lm.model.args), "base_model": base,
            "checkpoint": None if checkpoint is None else {
                "sha256": checkpoint_digest(checkpoint),
                "sections": sorted(k for k in ("kv", "weights") if k in checkpoint)},
            "custom_ops": sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == "shrinkrt"}),
            "model_sha256": hashlib.sha256(data).hexdigest()}
    if "matmul_nbits" in stats:
        layers = stats["matmul_nbits"]
        packed = sum(lm.model.get_submodule(r["name"]).nbytes() for r in layers)
        meta["ort_cpu"] = {"matmul_nbits_layers": len(layers), "accuracy_level": ort_accuracy,
                           "layers_in_wider_container": sum(r["bits"] != r["container_bits"] for r in layers),
                           "bytes": sum(r["bytes"] for r in layers), "packed_checkpoint_bytes": packed,
                           "note": "3-bit layers use MatMulNBits' 4-bit container; outliers as int64 rows/cols "
                                   "+ fp32 values for the gather/scatter correction"}

    def fill(tmp: Path) -> None:
        (tmp / "model.onnx").write_bytes(data)
        (tmp / "export.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            if (Path(lm.model_dir) / name).is_file():
                shutil.copyfile(Path(lm.model_dir) / name, tmp / name)
        if check is not None:
            check(tmp)

    return write_dir(out, fill)


def checkpoint_digest(manifest: dict) -> str:
    """Identity of a checkpoint: its manifest (which lists every tensor's dtype and shape and the
    calibration record) in canonical JSON."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def read_meta(path: Path) -> dict:
    path = Path(path)
    f = path / "export.json"
    if not (path / "model.onnx").is_file() or not f.is_file():
        raise ShrinkError(f"{path} is not a ShrinkRT export (model.onnx and export.json expected; run shrinkrt export)")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ShrinkError(f"{path}: unsupported export format {meta.get('format')} v{meta.get('format_version')}")
    return meta


def load_model_proto(path: Path) -> onnx.ModelProto:
    return onnx.load(str(Path(path) / "model.onnx"))
