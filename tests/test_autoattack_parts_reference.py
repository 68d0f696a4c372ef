"""AutoAttack's parts one by one against their ports in torchattacks (the reference
implementations' code): the same model, points, eps and budget; fastadv's robust accuracy
may not be higher (one point of slack for the attacks' own randomness)."""
import pytest
import torch

import zoo
import fastadv.attacks as fa

ta = pytest.importorskip("torchattacks")

EPS = 0.1
N = 64


@pytest.fixture(scope="module")
def mnist():
    model = zoo.mnist_cnn()
    _, (xt, yt) = zoo.mnist_split()
    return model, xt[100:100 + N], yt[100:100 + N]


PAIRS = {
    "apgd-ce": (lambda m: fa.APGD(m, eps=EPS, steps=20, loss="ce", seed=0),
                lambda m: ta.APGD(m, eps=EPS, steps=20, loss="ce", seed=0)),
    "apgd-dlr": (lambda m: fa.APGD(m, eps=EPS, steps=20, loss="dlr", seed=0),
                 lambda m: ta.APGD(m, eps=EPS, steps=20, loss="dlr", seed=0)),
    "apgd-t": (lambda m: fa.APGDT(m, eps=EPS, steps=20, seed=0),
               lambda m: ta.APGDT(m, eps=EPS, steps=20, n_classes=10, seed=0)),
    "fab-t": (lambda m: fa.FABT(m, eps=EPS, steps=20, seed=0),
              lambda m: ta.FAB(m, eps=EPS, steps=20, multi_targeted=True, n_classes=10, seed=0)),
    "square": (lambda m: fa.Square(m, eps=EPS, n_queries=300, seed=0),
               lambda m: ta.Square(m, eps=EPS, n_queries=300, seed=0)),
}


def _robust(model, x, y, x_adv):
    assert (x_adv - x).abs().max() <= EPS + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_part_not_weaker_than_the_reference(mnist, name):
    model, x, y = mnist
    make_fa, make_ta = PAIRS[name]
    rng = torch.get_rng_state()
    ours = _robust(model, x, y, make_fa(model)(x, y))
    assert torch.equal(torch.get_rng_state(), rng)           # fastadv draws from its own generator
    ref = _robust(model, x, y, make_ta(model)(x, y))
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert ours.sum() <= ref.sum() + 1
    assert ours.sum() < clean.sum()                          # the attack does something
