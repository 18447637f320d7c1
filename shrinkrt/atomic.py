"""The one write path of every artifact (checkpoint, export, build, kernels, results).

Guarantees (docs/deploy.md, "Errors and guarantees"):
- `check_target` runs before any long work: the location is writable, has room for what is known of
  the artifact's size, and anything already there is ours to replace (a directory this tool wrote,
  recognised by its manifest; a results file with our marker). A user's own file or folder is
  never replaced, a symbolic link never followed.
- `write_dir` / `write_file` fill a hidden temp sibling, then swap it into place under a lock on the
  parent directory: the old artifact stays whole until the new one is complete (an atomic exchange
  on Linux, so readers never see the path missing), concurrent writers serialise on the lock (the
  last complete one wins), and a failed or interrupted run leaves nothing behind (its temp sibling
  and any parent folders it created are removed; temp siblings of killed runs are swept by the next
  write to the same path).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from shrinkrt.errors import ShrinkError

TMP_TAG = ".shrinkrt-tmp-"  # temp sibling of a write in progress: .NAME.shrinkrt-tmp-<pid>-<random>
SPACE_MARGIN = 1.05  # free space asked for beyond an artifact's known size
RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
AT_FDCWD = -100


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_target(path: Path, what: str, is_ours: Callable[[Path], bool] | None = None, kind: str = "dir",
                 need_bytes: int = 0, ours_hint: str = "") -> Path:
    """Fail now, with one line, if `path` cannot take the artifact: `what` names it in the message
    (e.g. "--out"), `is_ours(path)` says whether an existing one may be replaced (None: only a missing
    path is acceptable ... never for dirs), `kind` is "dir" or "file", `need_bytes` the known size."""
    path = Path(path)
    if path.is_symlink():
        raise ShrinkError(f"{what} {path} is a symbolic link; give the real path (links are never followed or replaced)")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise ShrinkError(f"{what} {path} is an existing file; refusing to replace it with a directory")
        if kind == "file" and path.is_dir():
            raise ShrinkError(f"{what} {path} is a directory; give a file path")
        if not _replaceable(path, is_ours):
            raise ShrinkError(f"{what} {path} exists and was not written by shrinkrt{ours_hint}; refusing to "
                              f"replace it (remove it or choose another path)")
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        raise ShrinkError(f"{what} {path}: cannot create it, {anc} is not a directory")
    try:  # a real probe: permissions, read-only mounts and quotas all show here (os.access lies to root)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ShrinkError(f"{what} {path}: {anc} is not writable ({e.strerror})") from None
    check_space(anc, need_bytes, f"{what} {path}")
    return path


def check_space(where: Path, need_bytes: int, what: str) -> None:
    """One line when the file system holding `where` lacks room for `need_bytes` (plus a margin)."""
    if need_bytes:
        free = shutil.disk_usage(where).free
        if free < need_bytes * SPACE_MARGIN:
            raise ShrinkError(f"{what}: needs about {_mib(need_bytes)}, only {_mib(free)} free on {where}")


def _replaceable(path: Path, is_ours: Callable[[Path], bool] | None) -> bool:
    """Ours to replace: what `is_ours` recognises, or an empty directory (nothing in it to lose)."""
    if path.is_dir() and not path.is_symlink() and not any(os.scandir(path)):
        return True
    return is_ours is not None and is_ours(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path, name: str) -> None:
    """Remove temp siblings of `name` left by runs that were killed (their process is gone)."""
    pattern = re.compile(re.escape(f".{name}{TMP_TAG}") + r"(\d+)-")
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            m = pattern.match(entry.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


@contextlib.contextmanager
def locked(directory: Path):
    """An exclusive flock on the directory itself (no lock file to leave behind)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p, returning the folders created (deepest last), so a failed write can remove them."""
    made = []
    for p in reversed([parent, *parent.parents]):
        if not p.exists():
            p.mkdir()
            made.append(p)
    return made


def _remove_made(made: list[Path]) -> None:
    for p in reversed(made):
        with contextlib.suppress(OSError):
            p.rmdir()  # only if still empty


def _replace(tmp: Path, path: Path, is_ours, what: str, kind: str) -> None:
    """Under the parent's lock: re-check what is at `path` now, then swap `tmp` in."""
    with locked(path.parent):
        if path.is_symlink() or path.exists():
            if path.is_symlink() or (kind == "dir") != path.is_dir() or \
                    (is_ours is not None and not _replaceable(path, is_ours)):
                raise ShrinkError(f"{what} {path} appeared meanwhile and was not written by shrinkrt; left it as it is")
            if kind == "file":
                os.replace(tmp, path)
                return
            if _exchange(tmp, path):  # tmp now holds the old artifact
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)


def write_dir(path: Path, fill: Callable[[Path], None], is_ours: Callable[[Path], bool] | None = None,
              what: str = "output") -> Path:
    """Fill a temp sibling directory, then swap it in. `is_ours` guards an existing `path` (None: the
    caller has checked; an existing directory is then replaced)."""
    path = Path(path).absolute()
    made = _make_parents(path.parent)
    sweep_stale(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_TAG}{os.getpid()}-", dir=path.parent))
    try:
        fill(tmp)
        _replace(tmp, path, is_ours, what, "dir")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise
    return path


def write_file(path: Path, data: str | bytes, is_ours: Callable[[Path], bool] | None = None,
               what: str = "output") -> Path:
    """A temp file in the same folder, flushed to disk, then renamed over `path`: readers see the old
    file or the new one, never half of one."""
    path = Path(path).absolute()
    made = _make_parents(path.parent)
    sweep_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        _replace(Path(tmp), path, is_ours, what, "file")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _remove_made(made)
        raise
    return path


def write_atomic(text: str, path: Path) -> None:
    """Text to a file through `write_file` (benchmarks, reports)."""
    write_file(path, text)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG through `write_file`, tagged as ours (PNG text chunk)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png", metadata={"Software": RESULTS_MARKER})
    write_file(path, buf.getvalue())


# ---------------------------------------------------------------- results files (JSON + .md + .png)
RESULTS_MARKER = "shrinkrt"
MD_MARKER = "<!-- written by shrinkrt -->"


def results_file_is_ours(path: Path) -> bool:
    """A results file we wrote: a JSON object with a shrinkrt `format` (or the keys of our reports
    from before that field), a markdown file with our marker line, or a PNG with our Software tag;
    an .md/.png beside a JSON of ours counts too (they are written as one set)."""
    import json

    path = Path(path)
    try:
        if path.suffix == ".json":
            r = json.loads(path.read_text())
            return isinstance(r, dict) and (str(r.get("format", "")).startswith("shrinkrt-")
                                            or {"perplexity", "passkey", "memory"} <= set(r)
                                            or {"threads", "runs"} <= set(r))
        sibling = path.with_suffix(".json")
        if sibling.is_file() and results_file_is_ours(sibling):
            return True
        head = path.read_bytes()[:1 << 16]
        return (MD_MARKER.encode() in head) if path.suffix == ".md" else (RESULTS_MARKER.encode() in head)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
