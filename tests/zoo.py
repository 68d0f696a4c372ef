"""Small models trained on real data for the tests, cached on disk between runs.

Training is seeded and deterministic; a cached state dict is reused when the
key (name, torch version) matches. The cache lives in FASTADV_TEST_CACHE or
``~/.cache/fastadv-tests``.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from fastadv import data, models

CACHE = os.environ.get("FASTADV_TEST_CACHE", os.path.expanduser("~/.cache/fastadv-tests"))


@functools.lru_cache(maxsize=None)
def mnist_split(n_test: int = 1000):
    """((x_train, y_train), (x_test, y_test)) from the embedded MNIST-5k, seed 0."""
    return data.load_dataset("mnist5k", n_test=n_test, seed=0)


def _train(model, x, y, epochs: int, lr: float, batch_size: int = 64, seed: int = 0, step_fn=None):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            if step_fn is not None:
                xb = step_fn(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    return model


def cached_model(name: str, build, train):
    """Load ``name`` from the cache or build and train it, then save it."""
    path = os.path.join(CACHE, f"{name}-torch{torch.__version__}.pt")
    # The initial weights come from a fixed seed, not from whatever the global RNG
    # holds after the tests that happened to run first in this process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    # One thread: the same bits on every machine of the same CPU family, whatever its
    # core count, so a fresh clone trains the very model the thresholds were set on.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model)
    finally:
        torch.set_num_threads(threads)
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _mnist_cnn_state():
    (xtr, ytr), _ = mnist_split()
    m = cached_model("mnist-smallcnn-std", lambda: models.SmallCNN(width=16),
                     lambda m: _train(m, xtr, ytr, epochs=3, lr=2e-3))
    return {k: v.clone() for k, v in m.state_dict().items()}


def mnist_cnn() -> torch.nn.Module:
    """A standard (non-robust) SmallCNN(width=16) trained on 4,000 real MNIST digits
    (~97% test accuracy). A fresh copy each call, in eval mode."""
    m = models.SmallCNN(width=16)
    m.load_state_dict(_mnist_cnn_state())
    return m.eval()


@functools.lru_cache(maxsize=None)
def _mnist_cnn_bn_state():
    (xtr, ytr), _ = mnist_split()
    build = lambda: models.SmallCNN(width=8, batchnorm=True, dropout=0.25)  # noqa: E731
    m = cached_model("mnist-smallcnn-bn-dropout", build,
                     lambda m: _train(m, xtr, ytr, epochs=2, lr=3e-3))
    return {k: v.clone() for k, v in m.state_dict().items()}


def mnist_cnn_bn() -> torch.nn.Module:
    """A SmallCNN(width=8) with BatchNorm and dropout(0.25) trained on the MNIST-5k
    training split: the model for state-preservation tests (put it in train mode there)."""
    m = models.SmallCNN(width=8, batchnorm=True, dropout=0.25)
    m.load_state_dict(_mnist_cnn_bn_state())
    return m.eval()


@functools.lru_cache(maxsize=None)
def digits_split(n_test: int = 500):
    """((x_train, y_train), (x_test, y_test)) from scikit-learn's 8x8 digits, seed 0."""
    return data.load_dataset("digits", n_test=n_test, seed=0)


@functools.lru_cache(maxsize=None)
def _digits_cnn_state():
    (xtr, ytr), _ = digits_split()
    build = lambda: models.SmallCNN(width=16, input_size=8)  # noqa: E731
    m = cached_model("digits-smallcnn", build,
                     lambda m: _train(m, xtr, ytr, epochs=12, lr=5e-3, batch_size=64))
    return {k: v.clone() for k, v in m.state_dict().items()}


def digits_cnn() -> torch.nn.Module:
    """A SmallCNN(width=16) for scikit-learn's 8x8 digits (~97% test accuracy), eval mode."""
    m = models.SmallCNN(width=16, input_size=8)
    m.load_state_dict(_digits_cnn_state())
    return m.eval()


@functools.lru_cache(maxsize=None)
def _mnist_cnn_surrogate_state():
    (xtr, ytr), _ = mnist_split()
    m = cached_model("mnist-smallcnn-std-seed1", lambda: models.SmallCNN(width=16),
                     lambda m: _train(m, xtr, ytr, epochs=3, lr=2e-3, seed=1))
    return {k: v.clone() for k, v in m.state_dict().items()}


def mnist_cnn_surrogate() -> torch.nn.Module:
    """Like ``mnist_cnn`` but trained from another seed: a surrogate for transfer attacks."""
    m = models.SmallCNN(width=16)
    m.load_state_dict(_mnist_cnn_surrogate_state())
    return m.eval()


def mnist_cnn_and_points(n: int, start: int = 0):
    """(the standard MNIST CNN, n held-out test digits from ``start``, their labels)."""
    _, (xt, yt) = mnist_split()
    return mnist_cnn(), xt[start:start + n], yt[start:start + n]


class LinearModel(torch.nn.Module):
    """logits = W·flatten(x) + b with the given weights: a model whose decision boundaries
    (and so minimal adversarial distances) are known in closed form."""

    def __init__(self, w, b):
        super().__init__()
        self.lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.lin.weight.copy_(w)
            self.lin.bias.copy_(b)

    def forward(self, x):
        return self.lin(x.flatten(1))


# ------------------------------------------------------------ shared checks
def awkward_bn_model(mixed: bool = True) -> torch.nn.Module:
    """The BatchNorm + dropout MNIST CNN in train mode, with a .grad set on the first
    parameter and the second frozen (``mixed``: its first BatchNorm in eval mode): all the
    state an attack in train mode could disturb."""
    model = mnist_cnn_bn().train()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    params[1].requires_grad_(False)
    if mixed:
        model.features[1].eval()
    return model


def model_state(model: torch.nn.Module):
    """What an attack must give back: train flags, buffers, parameters, the .grad objects
    and requires_grad flags (compare with ``assert_state_as_found``)."""
    return ([m.training for m in model.modules()], [b.clone() for b in model.buffers()],
            [p.detach().clone() for p in model.parameters()], [p.grad for p in model.parameters()],
            [p.requires_grad for p in model.parameters()])


def assert_state_as_found(before, model: torch.nn.Module) -> None:
    """``model`` is bitwise as ``model_state`` saw it (the .grad tensors the same objects)."""
    after = model_state(model)
    assert before[0] == after[0] and before[4] == after[4]
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    assert all(a is b for a, b in zip(before[3], after[3]))


def assert_signatures_match(names, ours_mod, theirs_mod) -> None:
    """Each class takes the peer's constructor arguments in its order with its defaults."""
    import inspect
    for name in names:
        ours = inspect.signature(getattr(ours_mod, name).__init__).parameters
        theirs = inspect.signature(getattr(theirs_mod, name).__init__).parameters
        pos = [p for p in theirs if p != "self"]
        assert list(ours)[1:len(pos) + 1] == pos, name
        for p in pos:
            assert ours[p].default == theirs[p].default, (name, p)
