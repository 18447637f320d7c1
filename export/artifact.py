"""The export artifact: one directory that ONNX Runtime (and TensorRT) can take on its own.

DIR/
  model.onnx     the decoder graph (export/llama.py) with the custom ops and their reference bodies
  model.onnx.data  its weights as ONNX external data (streamed while the graph is built; identical
                 tensors stored once)
  export.json    format version, model args, dtype, target, base model and checkpoint identity, the
                 graph description ("io": every cache tensor, its shape, dtype and update rule)
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
from shrinkrt.runtime.loader import file_sha256
from shrinkrt.errors import ShrinkError

from . import llama

FORMAT, FORMAT_VERSION = "shrinkrt-export", 2  # 2: the graph description ("io")
TARGETS = ("generic", "ort-cpu", "tensorrt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def is_export(path: Path) -> bool:
    """A directory this tool wrote as an export (export.json says so): the only kind `export` replaces."""
    try:
        meta = json.loads((Path(path) / "export.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def export(lm, out: Path, dtype: str = "float32", target: str = "generic", base: dict | None = None,
           checkpoint: dict | None = None, check=None, ort_accuracy: int = 0, lm_head_bits: int = 0) -> Path:
    """lm: a LoadedModel with any checkpoint already applied; `checkpoint` = its manifest (identity).
    `check(tmp_dir)` runs on the complete files before they replace `out`: an export that fails its
    validation never appears. `out` may only be missing or an earlier export."""

    def fill(tmp: Path) -> None:
        write(lm, tmp, dtype, target, base, checkpoint, ort_accuracy, lm_head_bits)
        if check is not None:
            check(tmp)

    return write_dir(out, fill, is_export, "--out")


def write(lm, directory: Path, dtype: str = "float32", target: str = "generic", base: dict | None = None,
          checkpoint: dict | None = None, ort_accuracy: int = 0, lm_head_bits: int = 0) -> dict:
    """The export's files into an existing (temp) directory; returns export.json's content."""
    if target not in TARGETS:
        raise ShrinkError(f"unknown export target '{target}' (use {', '.join(TARGETS)})")
    stats = {}
    if ort_accuracy not in (0, 4):
        raise ShrinkError(f"--ort-accuracy must be 0 or 4 (got {ort_accuracy})")
    directory = Path(directory)
    with open(directory / llama.DATA_FILE, "wb") as weights:  # weights streamed as they are made
        model = llama.build(lm.model, dtype, target, stats=stats, ort_accuracy=ort_accuracy, data_file=weights,
                            lm_head_bits=lm_head_bits)
    data = model.SerializeToString()  # the graph alone: small whatever the model's size
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": lm.name, "dtype": dtype, "target": target,
            "model_args": dataclasses.asdict(lm.model.args), "base_model": base,
            "checkpoint": None if checkpoint is None else {
                "sha256": checkpoint_digest(checkpoint),
                "sections": sorted(k for k in ("kv", "weights") if k in checkpoint)},
            "custom_ops": sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == "shrinkrt"}),
            "model_sha256": hashlib.sha256(data).hexdigest(),
            "weights_file": llama.DATA_FILE,
            "weights_sha256": file_sha256(directory / llama.DATA_FILE),
            "io": llama.describe(lm.model, dtype).to_json(),
            "custom_op_attributes": custom_op_attributes(model)}
    if target == "ort-cpu":
        layers = stats.get("matmul_nbits", [])
        packed = sum(lm.model.get_submodule(r["name"]).nbytes() for r in layers)
        meta["ort_cpu"] = {"matmul_nbits_layers": sum(r["op"] == "MatMulNBits" for r in layers),
                           "w4a8_layers": sum(r["op"] == "QuantMatMulW4A8" for r in layers),
                           "accuracy_level": ort_accuracy,
                           "lm_head": stats.get("lm_head", {"bits": 0}),
                           "layers_in_wider_container": sum(r["bits"] != r["container_bits"] for r in layers),
                           "bytes": sum(r["bytes"] for r in layers), "packed_checkpoint_bytes": packed,
                           "note": "at accuracy level 4, 4-bit group-32 min layers are shrinkrt::QuantMatMulW4A8 "
                                   "nodes (the CPU ops library; their body without it), the rest MatMulNBits; "
                                   "3-bit layers use MatMulNBits' 4-bit container; q/k/v and gate/up packed "
                                   "into one node where their lowering and group agree; outliers as one dense "
                                   "correction over the columns they occupy (bytes shared pro rata)"}
    (directory / "model.onnx").write_bytes(data)
    (directory / "export.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (Path(lm.model_dir) / name).is_file():
            shutil.copyfile(Path(lm.model_dir) / name, directory / name)
    return meta


def custom_op_attributes(model: onnx.ModelProto) -> dict:
    """Each custom op's distinct attribute sets: what the plugins' kernels must be specialised for
    (plugins/kernels/aot.py --export, `shrinkrt build --plugins`)."""
    seen: dict[str, set] = {}
    for n in model.graph.node:
        if n.domain == "shrinkrt":
            attrs = tuple(sorted((a.name, a.i) for a in n.attribute if a.type == onnx.AttributeProto.INT))
            seen.setdefault(n.op_type, set()).add(attrs)
    return {op: [dict(a) for a in sorted(v)] for op, v in sorted(seen.items())}


def estimated_bytes(lm, dtype: str) -> int:
    """What an export will take at least: every parameter once in the artifact's float type (packed
    weights of the ort-cpu target are smaller, so this is for the up-front check only where no
    checkpoint shrinks it)."""
    return sum(p.numel() for p in lm.model.parameters()) * (2 if dtype == "float16" else 4)


def checkpoint_digest(manifest: dict) -> str:
    """Identity of a checkpoint: its manifest (which lists every tensor's dtype and shape and the
    calibration record) in canonical JSON."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def read_meta(path: Path, verify_model: bool = False) -> dict:
    """export.json of an export directory, validated; with `verify_model`, model.onnx is checked
    against the sha256 it was written with (a truncated or edited graph is named, not crashed on)."""
    path = Path(path)
    f = path / "export.json"
    if not (path / "model.onnx").is_file() or not f.is_file():
        raise ShrinkError(f"{path} is not a ShrinkRT export (model.onnx and export.json expected; run shrinkrt export)")
    try:
        meta = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ShrinkError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        got = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (type(meta).__name__, "?")
        raise ShrinkError(f"{f}: unsupported export format {got[0]} v{got[1]} (this ShrinkRT reads {FORMAT} "
                          f"v{FORMAT_VERSION}: export again)")
    from shrinkrt.runtime.config import ModelArgs
    from shrinkrt.runtime.graph_io import GraphIO

    GraphIO.from_json(meta.get("io"), str(f))

    try:
        ModelArgs(**meta["model_args"])
    except (KeyError, TypeError) as e:
        raise ShrinkError(f"{f}: model_args is missing or malformed ({type(e).__name__}: {e})") from None
    if meta.get("dtype") not in ("float32", "float16") or meta.get("target") not in TARGETS:
        raise ShrinkError(f"{f}: dtype '{meta.get('dtype')}' / target '{meta.get('target')}' is not one this tool writes")
    if verify_model:
        for name, key in (("model.onnx", "model_sha256"), (meta.get("weights_file"), "weights_sha256")):
            if name is None:
                continue
            if not (path / name).is_file():
                raise ShrinkError(f"{path}: {name} is missing (the export's weights): export it again")
            if file_sha256(path / name) != meta.get(key):
                raise ShrinkError(f"{path / name} does not match the sha256 in export.json (truncated or "
                                  f"modified since export): export it again")
    return meta


def load_model_proto(path: Path) -> onnx.ModelProto:
    return onnx.load(str(Path(path) / "model.onnx"))
