"""Checkpoints that survive a kill: atomic writes (tmp + fsync + rename), checksummed safe loads.

Everything fastadv writes holds only tensors, numbers, strings, lists and dicts, so
it loads with ``torch.load(weights_only=True)``: a checkpoint can never run code.
A ``.pt`` file is torch's own zip archive, unchanged except for its archive comment,
which holds a SHA-256 of every byte before it: ``load_checkpoint`` refuses a file whose
bytes changed (one flipped bit included), and plain ``torch.load`` still reads it.
Model weights can also go to ``.safetensors`` (a digest of the tensors in its metadata).
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import warnings
import zipfile
from typing import Dict, Optional, Tuple

import torch

__all__ = ["CheckpointError", "atomic_write_bytes", "save_checkpoint", "load_checkpoint",
           "verify_checkpoint", "save_weights", "load_weights", "load_weights_and_metadata",
           "check_writable_dir"]

_TAG = b"fastadv-sha256:"
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22          # the end-of-central-directory record without its comment
_legacy_noted = set()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted or refused by the
    safe loader. The message is one line that names the file and what is wrong with it."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(data, path: str, keep_previous: Optional[str] = None) -> None:
    """Write ``data`` (bytes, or a list of byte chunks) to ``path`` so that a reader sees the
    old file or the new one, never a torn one.

    ``keep_previous``: move the file ``path`` held to this name first, so that the
    previous good version survives a corruption of the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in (data if isinstance(data, list) else [data]):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path)


def check_writable_dir(path, name: str = "checkpoint_dir") -> str:
    """Create ``path`` if needed and prove that a file can be written and removed there,
    so that a run learns at its start, not after its first epoch, that it cannot save."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name}: {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{name}: cannot create the directory {path}: {exc.strerror or exc}") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastadv-write-test", dir=path)
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as exc:
        raise ValueError(f"{name}: cannot write files in {path}: {exc.strerror or exc}") from exc
    return path


# ------------------------------------------------------------------ the checksum
def _with_checksum(data: memoryview) -> list:
    """torch's zip archive ``data`` with a SHA-256 of all bytes before the comment as its
    comment, as chunks to write (no copy of a checkpoint that may be gigabytes)."""
    end = len(data) - _EOCD_SIZE
    if end < 0 or bytes(data[end:end + 4]) != _EOCD:
        raise RuntimeError("torch.save wrote no zip archive (or one with a comment)")
    head, comment_len = data[:end + 20], struct.pack("<H", len(_TAG) + 64)
    h = hashlib.sha256(head)
    h.update(comment_len)
    return [head, comment_len, _TAG + h.hexdigest().encode()]


def _legacy_note(path: str) -> None:
    if path not in _legacy_noted:
        _legacy_noted.add(path)
        warnings.warn(f"fastadv: {path} was written before checkpoints carried a checksum; "
                      "it was checked against its zip CRCs only", UserWarning, stacklevel=4)


def _verify_bytes(data: bytes, path: str) -> None:
    """Raise CheckpointError unless ``data`` is an intact checkpoint file."""
    if not data:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    if not data.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path}: not a checkpoint (no zip archive: garbage or another format)")
    tail = len(_TAG) + 64
    end = len(data) - _EOCD_SIZE - tail
    if end >= 0 and data[end:end + 4] == _EOCD and data[end + _EOCD_SIZE:].startswith(_TAG):
        want = data[end + _EOCD_SIZE + len(_TAG):]
        if hashlib.sha256(memoryview(data)[:end + _EOCD_SIZE]).hexdigest().encode() != want:
            raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted")
        return
    if data.rfind(_TAG, max(0, len(data) - 4096)) >= 0:
        raise CheckpointError(f"{path}: corrupted: bytes were added or lost at its end")
    # no checksum of ours: a file from before checksums (or one whose last bytes are lost)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupted ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: CRC mismatch in {bad}: the file is corrupted")
    # torch's reader treats a member flagged as a directory differently from zipfile
    if any(i.external_attr & 0x10 or i.filename.endswith("/") for i in infos):
        raise CheckpointError(f"{path}: corrupted (a member is flagged as a directory)")
    if not any(i.CRC for i in infos if i.file_size):
        raise CheckpointError(f"{path}: has neither a checksum nor zip CRCs to verify it")
    _legacy_note(path)


def verify_checkpoint(path: str) -> None:
    """Raise ``CheckpointError`` (one line: the file, what is wrong) unless ``path`` is intact."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    _verify_bytes(data, path)


def save_checkpoint(obj: Dict[str, object], path: str, keep_previous: Optional[str] = None) -> None:
    """``torch.save`` ``obj`` atomically, with a checksum. Keep ``obj`` to plain containers
    of tensors and numbers. ``keep_previous``: see ``atomic_write_bytes``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with buf.getbuffer() as view:
        atomic_write_bytes(_with_checksum(view), path, keep_previous)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, object]:
    """Verify ``path``'s checksum, then load it with ``weights_only=True`` (no arbitrary code
    runs on load). Anything wrong is one ``CheckpointError`` line naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    _verify_bytes(data, path)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds here; all mean the same to a caller
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: refused by the safe loader: it holds objects other than "
                                  f"tensors and plain data ({first[:200]})") from None
        raise CheckpointError(f"{path}: cannot be loaded: {type(exc).__name__}: {first[:200]}") from None


# ------------------------------------------------------------------ weights
def _plain_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def _weights_digest(state: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def save_weights(state_dict: Dict[str, torch.Tensor], path: str,
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """Model weights to ``path``: safetensors when it ends in ``.safetensors``, else torch."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import save as _st_save
        except ImportError as exc:
            raise ImportError("saving .safetensors needs the 'safetensors' package: "
                              "pip install safetensors (or fastadv[report])") from exc
        plain = _plain_state(state_dict)
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["fastadv_sha256"] = _weights_digest(plain)
        atomic_write_bytes(_st_save(plain, metadata=meta), path)
    else:
        save_checkpoint({"model": _plain_state(state_dict), "metadata": dict(metadata or {})}, path)


def _load_safetensors(path: str, map_location) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # safetensors' own errors for a torn or garbage header
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot be loaded: {first[:200]}") from None
    want = meta.get("fastadv_sha256")
    if want is None:
        _legacy_note(path)
    elif _weights_digest(state) != want:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted")
    device = str(map_location) if map_location is not None else "cpu"
    if device != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state, {k: v for k, v in meta.items() if k != "fastadv_sha256"}


def load_weights_and_metadata(path: str, map_location="cpu"
                              ) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """(weights, metadata) as ``save_weights`` stored them; verified and loaded safely
    (safetensors' metadata values are strings)."""
    if path.endswith(".safetensors"):
        return _load_safetensors(path, map_location)
    obj = load_checkpoint(path, map_location)
    if isinstance(obj, dict) and "model" in obj:
        return obj["model"], dict(obj.get("metadata") or {})
    return obj, {}


def load_weights(path: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Model weights from ``save_weights`` (safetensors or torch, verified, loaded safely)."""
    return load_weights_and_metadata(path, map_location)[0]
