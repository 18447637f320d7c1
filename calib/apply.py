"""Load a compressed checkpoint onto a loaded base model: validate, then swap modules per section."""
from __future__ import annotations

from pathlib import Path

from . import checkpoint


def apply_checkpoint(lm, path: Path, sections: tuple[str, ...] = ("kv", "weights")) -> dict:
    """sections: which compressions to apply (both by default; one alone to measure its share)."""
    manifest, tensors = checkpoint.load(path, checkpoint.base_identity(lm))
    if "kv" in manifest and "kv" in sections:
        from .cskv import apply_kv

        apply_kv(lm.model, manifest["kv"], {k: v for k, v in tensors.items() if k.startswith("kv.")})
    if "weights" in manifest and "weights" in sections:
        from .mq import apply_weights

        apply_weights(lm.model, manifest["weights"], {k: v for k, v in tensors.items() if k.startswith("weights.")})
    return manifest
