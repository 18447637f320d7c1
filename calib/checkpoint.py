"""The compressed checkpoint: one directory = manifest.json + tensors.safetensors.

One place for the format (documented in docs/formats.md). A checkpoint holds any of the
compressions ("kv": CSKV low-rank cache, "weights": LLM-MQ mixed precision) over one base model,
identified by the sha256 of its weight files, so it can never be applied to another model.
Writing goes to a temp directory that is renamed into place; loading validates everything before
any module is touched.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shrinkrt.atomic import write_dir
from shrinkrt.errors import ShrinkError

FORMAT = "shrinkrt-checkpoint"
FORMAT_VERSION = 1
MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"
SECTIONS = ("kv", "weights")


def weights_sha256(model_dir: Path) -> str:
    """Identity of a base model: sha256 over its safetensors files (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ShrinkError(f"{model_dir} has no .safetensors weights to identify the base model by")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def base_identity(lm) -> dict:
    return {"name": lm.name, "weights_sha256": weights_sha256(lm.model_dir),
            "model_type": lm.model.args.model_type, "n_layers": lm.model.args.n_layers}


def is_checkpoint(path: Path) -> bool:
    """A directory this tool wrote as a checkpoint (its manifest says so): the only kind `save` replaces."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT


def save(path: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write atomically. `manifest` holds base_model, calibration and one entry per section."""
    path = Path(path)
    unknown = set(manifest) - {"base_model", "calibration", "quality", *SECTIONS}
    if unknown:
        raise ValueError(f"unknown manifest keys {sorted(unknown)}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
            "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                        for k, v in tensors.items()}}

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / TENSORS, metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")

    write_dir(path, fill, is_checkpoint, "--out")
    return path


def load(path: Path, base: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint. `base` (from base_identity) must match the one it was made on."""
    path = Path(path)
    if not path.is_dir():
        raise ShrinkError(f"checkpoint '{path}' is not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ShrinkError(f"checkpoint '{path}' has no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShrinkError(f"{mpath} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShrinkError(f"{mpath} is not a ShrinkRT checkpoint (format "
                          f"'{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShrinkError(f"checkpoint format version {manifest.get('format_version')} is not supported "
                          f"(this ShrinkRT reads version {FORMAT_VERSION})")
    if base is not None:
        theirs = manifest.get("base_model", {}).get("weights_sha256")
        if theirs != base["weights_sha256"]:
            raise ShrinkError(f"checkpoint '{path}' was calibrated on another base model "
                              f"({manifest.get('base_model', {}).get('name')}, weights {str(theirs)[:12]}) "
                              f"than the one loaded ({base['name']}, weights {base['weights_sha256'][:12]})")
    tpath = path / TENSORS
    if not tpath.is_file():
        raise ShrinkError(f"checkpoint '{path}' has no {TENSORS}")
    specs = manifest.get("tensors", {})
    if not isinstance(specs, dict) or not all(isinstance(v, dict) and isinstance(v.get("shape"), list)
                                              and isinstance(v.get("dtype"), str) for v in specs.values()):
        raise ShrinkError(f"{mpath}: 'tensors' must map each name to its dtype and shape")
    for key in SECTIONS:
        if key in manifest and not isinstance(manifest[key], dict):
            raise ShrinkError(f"{mpath}: section '{key}' must be an object")
    tensors = {}
    try:
        with safe_open(tpath, framework="pt") as f:
            have = set(f.keys())
            for name, spec in specs.items():
                if name not in have:
                    raise ShrinkError(f"checkpoint '{path}': tensor '{name}' listed in the manifest is missing")
                t = f.get_tensor(name)
                if list(t.shape) != spec["shape"] or str(t.dtype).removeprefix("torch.") != spec["dtype"]:
                    raise ShrinkError(f"checkpoint '{path}': tensor '{name}' is "
                                      f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}, the manifest says "
                                      f"{spec['dtype']}{spec['shape']}")
                tensors[name] = t
    except ShrinkError:
        raise
    except Exception as e:  # safetensors' own errors: truncated, garbled header, bad offsets
        raise ShrinkError(f"{tpath} is not a readable safetensors file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else '?'})") from None
    extra = have - set(specs)
    if extra:
        raise ShrinkError(f"checkpoint '{path}': tensor '{sorted(extra)[0]}' is not in the manifest")
    return manifest, tensors
