"""Real English text that every Debian machine has: the license texts in /usr/share/common-licenses.

The split is by whole license family, fixed here and nowhere else, so calibration text and
evaluation text never overlap: the FSF texts (GPL-3, GFDL-1.3) and Apache-2.0 are evaluation; the
others are calibration; texts that share whole paragraphs with an evaluation text (GPL-1/2, LGPL-*,
GFDL-1.2) are in neither. Measured: 0.23% of the evaluation text's 13-word spans (25 spans of
generic legal phrasing) also occur in the calibration text; tests/test_corpus.py keeps it < 0.5%.
About 15.1k evaluation tokens and 12.6k calibration tokens with the SmolLM2 tokenizer.

A second evaluation text of another domain, never used for calibration: Python's language and
library reference as pydoc shows it (`pydoc_data.topics`, part of every CPython's standard library):
technical prose with code, about 110k tokens. A model calibrated on licenses is judged on it too.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from shrinkrt.errors import ShrinkError

LICENSE_DIR = Path("/usr/share/common-licenses")
EVAL_FILES = ("GPL-3", "GFDL-1.3", "Apache-2.0")
CALIB_FILES = ("Artistic", "MPL-1.1", "MPL-2.0", "CC0-1.0", "BSD")
OTHER_DOMAIN = "pydoc_data.topics"  # the other-domain evaluation text (Python's reference documentation)


def read_texts(names: tuple[str, ...], root: Path = LICENSE_DIR) -> str:
    parts = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise ShrinkError(f"evaluation text {path} is missing (Debian's base-files package ships it)")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def eval_text() -> str:
    return read_texts(EVAL_FILES)


def calib_text() -> str:
    return read_texts(CALIB_FILES)


def other_domain_text() -> str:
    """The Python reference topics in a fixed order (sorted by topic name), one text."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its pydoc data
        raise ShrinkError(f"the other-domain evaluation text ({OTHER_DOMAIN}) is missing from this Python") from None
    return "\n\n".join(topics[name] for name in sorted(topics))


def read_text_file(path: Path, what: str = "--text") -> str:
    """Any UTF-8 text a user evaluates on instead of the license texts; `what` names it in errors."""
    path = Path(path)
    if not path.exists():
        raise ShrinkError(f"{what} {path}: no such file")
    if not path.is_file():
        raise ShrinkError(f"{what} {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShrinkError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShrinkError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not text to score
    if not text.strip():
        raise ShrinkError(f"{what} {path} holds no text")
    return text


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
