"""Backend registry: which op implementations exist, which are ready, which one to use.

A backend is an object with:
  ``name``                      "torch" | "cpp" | "cuda" | "triton"
  ``status() -> True | str``    True when usable, else one line saying why not
                                (may trigger a just-in-time build the first time)
  ``supports(device) -> True | str``
  ``linf_step(out, x_adv, x_nat, grad, alpha, eps, lower, upper) -> None``
  ``l2_step(out, x_adv, x_nat, grad, alpha, eps, lower, upper) -> None``
  ``linf_project(out, x, x_nat, eps, lower, upper) -> None``
  ``l2_project(out, x, x_nat, eps, lower, upper) -> None``

The kernel-level contract every backend relies on (``_library`` guarantees it):
all tensors have the same shape and the same strides, are non-overlapping and
dense, and dimension 0 (the batch) is outermost in memory, so the sample of
flat storage index ``i`` is ``i // (numel // B)``; ``out`` may be the same
tensor as ``x_adv`` / ``x`` (in place); ``x_adv``, ``x_nat`` and ``out`` share
a dtype (float32/float16/bfloat16), ``grad`` may be another float dtype;
``alpha``/``eps`` are Python floats or contiguous float32 tensors ``[B]`` on
the same device; ``lower <= upper``; arithmetic is float32.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Dict, Union

import torch

BACKEND_NAMES = ("torch", "cpp", "cuda", "triton")

# name -> "module:attribute" providing the backend object; imported lazily so a
# missing compiler or triton never breaks ``import fastadv``.
_PROVIDERS = {
    "torch": "fastadv.ops._torch_backend:backend",
    "cpp": "fastadv.ops._native:cpp_backend",
    "cuda": "fastadv.ops._native:cuda_backend",
    "triton": "fastadv.ops._triton_backend:backend",
}

_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}
_warned: set = set()

# On a device, the order in which backend=None tries backends.
_PREFERENCE = {
    "cpu": ("cpp", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}


def _backend_object(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    modname, attr = _PROVIDERS[name].split(":")
    try:
        obj = getattr(importlib.import_module(modname), attr)
    except Exception as exc:  # ImportError, missing triton, ...
        _load_errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None
    _loaded[name] = obj
    return obj


def status(name: str) -> Union[bool, str]:
    """True if backend ``name`` is usable here, else a one-line reason."""
    if name not in _PROVIDERS:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {name!r}")
    obj = _backend_object(name)
    if obj is None:
        return _load_errors[name]
    try:
        st = obj.status()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return True if st is True else str(st)


def backends() -> Dict[str, Union[bool, str]]:
    """``{"torch": True, "cpp": True | "why not", "cuda": ..., "triton": ...}``."""
    return {name: status(name) for name in BACKEND_NAMES}


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


# os.environ.get costs ~1 µs a call (the key is encoded, an unset one raises KeyError
# inside): a tenth of an attack step's host budget. CPython's dict behind os.environ
# answers the same question in ~0.1 µs; elsewhere, the mapping itself.
_ENV_NAME = "FASTADV_BACKEND"
try:
    _env_data, _env_key, _env_decode = os.environ._data, os.environ.encodekey(_ENV_NAME), os.environ.decodevalue
except AttributeError:  # not CPython's os._Environ
    _env_data, _env_key, _env_decode = os.environ, _ENV_NAME, str


def env_backend():
    """``FASTADV_BACKEND`` as set now ("" or None when unset)."""
    v = _env_data.get(_env_key)
    return None if v is None else _env_decode(v)


def resolve(backend, device: torch.device):
    """The backend object to run on ``device``.

    ``backend`` None picks the best ready one (``FASTADV_BACKEND`` overrides);
    an explicit name that cannot run here warns once and falls back to torch,
    except that a device it can never serve is a ValueError.
    """
    if backend is None:
        backend = env_backend() or None
    if backend is not None:
        if not isinstance(backend, str) or backend not in _PROVIDERS:
            raise ValueError(f"backend: expected None or one of {BACKEND_NAMES}, got {backend!r}")
        if backend == "torch":
            return _backend_object("torch")
        st = status(backend)
        if st is not True:
            _warn_once(f"{backend}:status",
                       f"fastadv: backend {backend!r} is not available ({st}); using 'torch'")
            return _backend_object("torch")
        obj = _backend_object(backend)
        sup = obj.supports(device)
        if sup is not True:
            raise ValueError(f"backend: {backend!r} cannot run on device {device}: {sup}")
        return obj
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if name == "torch":
            break
        if status(name) is True and _backend_object(name).supports(device) is True:
            return _backend_object(name)
    return _backend_object("torch")


def resolve_name(backend, device: torch.device) -> str:
    return resolve(backend, device).name


# (backend or None, FASTADV_BACKEND, device) -> backend object, for resolve_cached.
_resolved: Dict[tuple, object] = {}


def resolve_cached(backend, device: torch.device):
    """``resolve`` remembered per (backend, FASTADV_BACKEND, device): ~0.3 µs instead of
    several. A backend's readiness is decided once (its status() is cached), so the answer
    cannot change, except where a test replaces ``status``: it then clears ``_resolved``."""
    key = (backend, env_backend() if backend is None else None, device)
    obj = _resolved.get(key)
    if obj is None:
        obj = resolve(backend, device)
        _resolved[key] = obj
    return obj


@contextlib.contextmanager
def substitute(name: str, obj):
    """Within it, backend ``name`` is ``obj`` (the host-time benchmark times the torch
    path with no-op kernels this way)."""
    _backend_object(name)
    before = _loaded.get(name)
    _loaded[name] = obj
    _resolved.clear()
    try:
        yield obj
    finally:
        if before is None:
            _loaded.pop(name, None)
        else:
            _loaded[name] = before
        _resolved.clear()
