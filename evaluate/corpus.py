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

Calibration draws from two domains (`calib_tokens`): the calibration licenses and Python source code
(CODE_MODULES of the running Python's standard library: code, comments and docstrings), alternating
segment by segment. Measured: none of either evaluation text's 13-word spans occurs in the code text
(tests/test_corpus.py keeps it < 0.1%). The code is near the Python docs in kind (both Python), so
the docs are no longer a domain the calibration never saw; the licenses still stand for prose.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from shrinkrt.errors import ShrinkError

LICENSE_DIR = Path("/usr/share/common-licenses")
EVAL_FILES = ("GPL-3", "GFDL-1.3", "Apache-2.0")
CALIB_FILES = ("Artistic", "MPL-1.1", "MPL-2.0", "CC0-1.0", "BSD")
OTHER_DOMAIN = "pydoc_data.topics"  # the other-domain evaluation text (Python's reference documentation)
# the second calibration domain: standard-library modules' source (none of them documented in pydoc's topics)
CODE_MODULES = ("argparse", "textwrap", "dataclasses", "functools", "heapq", "fractions", "shlex", "csv",
                "calendar", "difflib")
CALIB_DOMAINS = ("licenses", "code")  # names users pass to --calib-text


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


def code_text() -> str:
    """The CODE_MODULES' source files of the running Python, in that order, one text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in CODE_MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            raise ShrinkError(f"calibration text {path} is missing (this Python ships no standard-library source)")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def calib_sources() -> dict[str, dict]:
    """Each calibration domain: its text and where it comes from (the manifest records both)."""
    return {"licenses": {"text": calib_text(), "source": f"{LICENSE_DIR}: {', '.join(CALIB_FILES)}"},
            "code": {"text": code_text(), "source": f"Python {sysconfig.get_python_version()} "
                                                               f"stdlib: {', '.join(CODE_MODULES)}"}}


def calib_tokens(encode, count: int, segment: int, domains: tuple[str, ...] = CALIB_DOMAINS) -> tuple[list[int], dict]:
    """`count` calibration token ids: `segment`-long pieces taken from each domain in turn (so any prefix
    mixes them), and the record of what was drawn. `encode` maps text to token ids."""
    sources = calib_sources()
    unknown = [d for d in domains if d not in sources]
    if unknown or not domains:
        raise ShrinkError(f"calibration domains must be among {', '.join(CALIB_DOMAINS)} (got {', '.join(domains) or 'none'})")
    ids = {d: encode(sources[d]["text"]) for d in domains}
    tokens, offset, drawn = [], 0, {d: 0 for d in domains}
    while len(tokens) < count and any(offset < len(ids[d]) for d in domains):
        for d in domains:
            piece = ids[d][offset:offset + segment][:count - len(tokens)]
            tokens += piece
            drawn[d] += len(piece)
        offset += segment
    record = {"segment": segment,
              "domains": [{"name": d, "source": sources[d]["source"], "text_sha256": digest(sources[d]["text"]),
                           "tokens": drawn[d]} for d in domains]}
    return tokens, record


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
