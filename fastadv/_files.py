"""Output files written atomically, and output paths checked before any work starts.

A report, a table or a history written in place is truncated first and filled after:
a full disk or a kill in between leaves a torn file (4096 bytes of invalid JSON). Here a
file is written to a temporary name beside it, flushed to disk and renamed over the old
one, so a reader sees the old file or the new one, never a torn one.
"""
from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any, Callable, Optional

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_savefig",
           "check_output_dir", "check_output_file"]


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes, path: str) -> None:
    """``data`` to ``path``: the old file stays whole until the new one is complete on disk."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str, indent: Optional[int] = 1,
                      default: Optional[Callable[[Any], Any]] = str) -> None:
    """``obj`` as JSON; serialised in memory first, so an unserialisable value leaves the
    old file as it was."""
    atomic_write_text(json.dumps(obj, indent=indent, default=default) + "\n", path)


def atomic_savefig(fig, path: str, **kwargs) -> None:
    """A matplotlib figure saved atomically (rendered in memory, then written)."""
    buf = io.BytesIO()
    fmt = kwargs.pop("format", None) or os.path.splitext(path)[1].lstrip(".") or "png"
    fig.savefig(buf, format=fmt, **kwargs)
    atomic_write_bytes(buf.getvalue(), path)


def _probe(directory: str) -> None:
    probe = os.path.join(directory, f".fastadv-write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    with open(probe, "wb") as fh:
        fh.write(b"x")
    os.remove(probe)


def check_output_dir(flag: str, path: str) -> str:
    """Create ``path`` (a directory) and check a file can be written in it; a ValueError
    naming ``flag`` otherwise. Run before minutes of work, not after."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{flag}: expected a directory path, got {path!r}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}: expected a directory, but {path!r} is a file")
    try:
        os.makedirs(path, exist_ok=True)
        _probe(path)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write in {path!r} ({type(exc).__name__}: "
                         f"{exc.strerror or exc})") from None
    return path


def check_output_file(flag: str, path: str, create_dir: bool = False) -> str:
    """Check ``path`` can be written as a file (its directory exists, or is created with
    ``create_dir``, and takes a file; it is not a directory); a ValueError naming ``flag``
    otherwise. Nothing but that directory is left behind."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{flag}: expected a file path, got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{flag}: expected a file, but {path!r} is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if create_dir and not os.path.isdir(directory):
        check_output_dir(flag, directory)
    if not os.path.isdir(directory):
        raise ValueError(f"{flag}: cannot write {path!r}: its directory {directory!r} does not exist")
    try:
        _probe(directory)
        if os.path.exists(path):
            with open(path, "ab"):
                pass
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write {path!r} ({type(exc).__name__}: "
                         f"{exc.strerror or exc})") from None
    return path
