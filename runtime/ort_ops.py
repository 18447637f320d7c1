"""The CPU custom-op library (plugins/onnxruntime, libshrinkrt_ort_ops.so): where it is and how a
session takes it. With it registered, ONNX Runtime runs its kernels for the shrinkrt nodes; without
it, the same artifact runs the nodes' reference bodies (docs/ops.md). Which path a session took is
reported (OrtModel.ops_library, results JSON `ops_library`).

scripts/setup.sh builds the library into build/native (CMake target shrinkrt_ort_ops); where ONNX
Runtime's headers cannot be had it writes build/native/ort-ops.unavailable with the reason.
"""
from __future__ import annotations

from pathlib import Path

from shrinkrt.errors import ShrinkError

LIBRARY = "libshrinkrt_ort_ops.so"
BUILD_DIR = Path(__file__).resolve().parents[1] / "build" / "native"
DEFAULT = BUILD_DIR / "plugins" / "onnxruntime" / LIBRARY
UNAVAILABLE = BUILD_DIR / "ort-ops.unavailable"  # the setup's reason, when it could not build it
SETTINGS = ("auto", "off")


def resolve(setting: str | Path | None = "auto") -> Path | None:
    """'auto': the built library if there is one; 'off' / None: the reference bodies; a path: that
    library, which must exist."""
    if setting is None or setting == "off":
        return None
    if setting == "auto":
        return DEFAULT if DEFAULT.is_file() else None
    path = Path(setting)
    if not path.is_file():
        raise ShrinkError(f"--ort-ops {path}: no such library (build it with scripts/setup.sh, or use auto/off)")
    return path


def why_missing() -> str:
    """One line: why 'auto' finds no library."""
    if UNAVAILABLE.is_file():
        return UNAVAILABLE.read_text().strip().splitlines()[0]
    return f"{DEFAULT} not built (run scripts/setup.sh)"


def register(opts, path: Path) -> None:
    """Add the library to ONNX Runtime SessionOptions, or one line naming it."""
    try:
        opts.register_custom_ops_library(str(path))
    except Exception as e:  # ORT's own error: a foreign .so, an API older than the headers, ...
        raise ShrinkError(f"{path}: ONNX Runtime cannot register it as a custom-op library "
                          f"({(str(e).strip().splitlines() or ['?'])[0][:200]})") from None
