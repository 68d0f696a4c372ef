"""Layout: one-channel batches reach the model with NHWC strides when channels_last is on
(base._prepare and the APGD/FAB/Square loops share _groups.channels_last), and x_adv comes
back with the caller's strides."""
import pytest
import torch

import zoo
from fastadv.attacks import APGD, FAB, FGSM, PGD, PGDL2, Square
from fastadv.attacks._groups import channels_last, layout_like


@pytest.fixture(scope="module")
def mnist():
    return zoo.mnist_cnn_and_points(16)


def test_layout_like_restores_the_callers_strides():
    x = torch.rand(4, 1, 5, 6)
    v = channels_last(x)
    assert v.stride() == (30, 1, 6, 1) and v.data_ptr() == x.data_ptr()  # a free view
    back = layout_like(v, x)
    assert back.stride() == x.stride() and torch.equal(back, x)
    assert layout_like(x, v).stride() == v.stride()
    x3 = torch.rand(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert layout_like(x3.contiguous(), x3).stride() == x3.stride()
    assert layout_like(x3, x3.contiguous()).stride() == (60, 20, 5, 1)


@pytest.mark.parametrize("make", [
    lambda m: PGD(m, eps=0.1, alpha=0.02, steps=3, seed=0),
    lambda m: FGSM(m, eps=0.1),
    lambda m: APGD(m, eps=0.1, steps=3, seed=0),
    lambda m: PGDL2(m, eps=1.0, alpha=0.2, steps=3, seed=0),
    lambda m: FAB(m, "Linf", 0.1, 3, 1, multi_targeted=True, n_target_classes=3, seed=0),
    lambda m: Square(m, "Linf", 0.1, 20, 1, seed=0),
], ids=["PGD", "FGSM", "APGD", "PGDL2", "FAB-T", "Square"])
def test_one_channel_input_reaches_the_convolution_as_nhwc(mnist, make):
    model, x, y = mnist
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_pre_hook(lambda m, i: seen.append((i[0].shape[0], i[0].stride(1))))
    try:
        xa = make(model).run(x, y).x_adv
    finally:
        hook.remove()
    # every call with more than a few rows (the clean check, the attack steps, FAB's
    # gradient passes on batches rebuilt by arithmetic) gets NHWC strides: the channel
    # stride is 1; before, a one-channel batch kept the NCHW stride H·W (the probe that
    # sizes CPU chunks runs on 1-4 rows and is not counted)
    full = [s for n, s in seen if n > 4]
    assert full and all(s == 1 for s in full), seen
    assert xa.stride() == x.stride()
    xb = make(model).run(channels_last(x), y).x_adv
    assert xb.stride() == channels_last(x).stride()
