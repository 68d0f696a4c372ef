"""Normalization, two ways, on every attack family: ``normalization=(mean, std)`` keeps
inputs and outputs in pixel space; ``set_normalization_used(mean, std)`` takes and
returns normalized tensors (torchattacks 3.5). Both must run the very same attack."""
from __future__ import annotations

import pytest
import torch

import fastadv
import zoo

MEAN, STD = [0.1307], [0.3081]


class _Normalized(torch.nn.Module):
    """A model that expects normalized input (the zoo CNN with the inverse in front)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, z):
        return self.inner(z * STD[0] + MEAN[0])


@pytest.fixture(scope="module")
def setup():
    model = _Normalized(zoo.mnist_cnn()).eval()
    _, (x, y) = zoo.mnist_split()
    return model, x[:32], y[:32]


def _builders():
    return {
        "PGD": lambda m, **kw: fastadv.PGD(m, eps=0.1, alpha=0.025, steps=5, seed=0, **kw),
        "PGDL2": lambda m, **kw: fastadv.PGDL2(m, eps=1.5, alpha=0.4, steps=5, seed=0, **kw),
        "APGD": lambda m, **kw: fastadv.APGD(m, eps=0.1, steps=5, seed=0, **kw),
        "AutoAttack": lambda m, **kw: fastadv.AutoAttack(
            m, eps=0.1, version="custom", attacks_to_run=["apgd-ce"], steps=5, seed=0, **kw),
    }


@pytest.mark.parametrize("name", list(_builders()))
def test_normalized_io_runs_the_same_attack_as_pixel_io(setup, name):
    model, x, y = setup
    build = _builders()[name]
    pixel = build(model, normalization=(MEAN, STD))
    normed = build(model).set_normalization_used(MEAN, STD)
    xn = (x - MEAN[0]) / STD[0]
    if name == "AutoAttack":
        a = pixel.run_standard_evaluation(x, y, bs=32)
        b = normed.run_standard_evaluation(xn, y, bs=32)
        assert pixel.robust_accuracy == normed.robust_accuracy
    else:
        a, b = pixel(x, y), normed(xn, y)
    assert b.shape == x.shape and b.dtype == x.dtype
    back = b * STD[0] + MEAN[0]          # normalized output, back to pixel space
    assert (back - a).abs().max().item() <= 1e-4   # float32 rounding of the (de)normalization
    assert back.min().item() >= -1e-6 and back.max().item() <= 1 + 1e-6
    with torch.no_grad():
        assert (model(xn).argmax(1) != y).sum() < (model(b).argmax(1) != y).sum()  # it attacked


def test_pixel_input_to_a_normalized_attack_is_refused_when_out_of_box(setup):
    model, x, y = setup
    # normalized MNIST spans about [-0.42, 2.8]: handed to a pixel-space attack it is out of the box
    with pytest.raises(ValueError, match="normalization"):
        fastadv.PGD(model, eps=0.1, normalization=(MEAN, STD))((x - MEAN[0]) / STD[0], y)


def test_multi_channel_mismatch_is_named(setup):
    model, x, y = setup
    atk = fastadv.PGD(model, eps=0.1).set_normalization_used([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match="channels"):
        atk(x, y)
