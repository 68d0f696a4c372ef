"""Checkpoints that survive a kill: atomic writes (tmp + fsync + rename), safe loads.

Everything fastadv writes holds only tensors, numbers, strings, lists and dicts, so
it loads with ``torch.load(weights_only=True)``: a checkpoint can never run code.
Model weights can also go to ``.safetensors``.
"""
from __future__ import annotations

import io
import os
from typing import Dict, Optional

import torch

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "save_weights",
           "load_weights"]


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


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path)


def save_checkpoint(obj: Dict[str, object], path: str) -> None:
    """``torch.save`` ``obj`` atomically. Keep ``obj`` to plain containers of tensors and numbers."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, object]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code on load)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _plain_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_weights(state_dict: Dict[str, torch.Tensor], path: str,
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """Model weights to ``path``: safetensors when it ends in ``.safetensors``, else torch."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import save as _st_save
        except ImportError as exc:
            raise ImportError("saving .safetensors needs the 'safetensors' package: "
                              "pip install safetensors (or fastadv[report])") from exc
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        atomic_write_bytes(_st_save(_plain_state(state_dict), metadata=meta), path)
    else:
        save_checkpoint({"model": _plain_state(state_dict), "metadata": dict(metadata or {})}, path)


def load_weights(path: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Model weights from ``save_weights`` (safetensors or torch, loaded safely)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        device = str(map_location) if map_location is not None else "cpu"
        return load_file(path, device=device)
    obj = load_checkpoint(path, map_location)
    return obj["model"] if isinstance(obj, dict) and "model" in obj else obj
