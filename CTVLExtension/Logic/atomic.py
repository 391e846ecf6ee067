"""Atomic file writes: temp file in the same folder, fsync, ``os.replace``, fsync of the folder — a crash never
leaves half a file. `atomic_file` for writers that take a file object, `atomic_path` for those that need a name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _default_mode() -> int:
    """0o666 minus the process umask: what ``open(path, "w")`` would give (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


NEW_FILE_MODE = _default_mode()  # read once at import: os.umask can only be read by setting it


def fsync_dir(folder: str | Path) -> None:
    """Persist a rename inside ``folder`` (best effort: not possible on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (parent created); on success fsync it and rename it onto ``path``;
    on any error remove it and leave ``path`` untouched. ``suffix`` keeps extension-sniffing writers happy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):  # an existing file keeps its mode, a new one gets the umask default
            os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on success it replaces ``path`` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh
        fh.flush()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating the parent folder; returns the path."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def ensure_writable_dir(folder: str | Path, subdirs: tuple[str, ...] = (), flag: str = "--out") -> Path:
    """Create ``folder`` (and ``subdirs`` in it) and prove a file can be written there, before any long work;
    a CTVLInputError in one line otherwise. Returns the folder."""
    from ctvl.errors import CTVLInputError

    out = Path(folder)
    try:
        for sub in ("", *subdirs):
            (out / sub).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CTVLInputError(out, f"cannot write the output directory ({exc.strerror or exc})",
                             f"choose a writable {flag} directory") from None
    return out
