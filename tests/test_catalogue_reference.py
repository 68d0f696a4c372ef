"""The torchattacks catalogue (BIM ... GN) against torchattacks 3.5.1 itself, on the MNIST CNN
and the same points: the same run from the same seed, at least as many points fooled with
the defaults, inside the ball and the box, and the same constructor signatures.

fastadv draws its random numbers from the attack's generator in torchattacks' order and
shapes, so on a CPU ``seed=s`` (one restart, the batch in one chunk) gives the run that
torchattacks gives after ``torch.manual_seed(s)``: the comparisons below are of whole runs,
deterministic, not of averages.
"""

import pytest
import torch

import fastadv
import zoo

ta = pytest.importorskip("torchattacks")

N = 64        # points (a power of 2: torchattacks' mean-reduced loss scales gradients by 1/N exactly)
SEED = 3


@pytest.fixture(scope="module")
def mnist():
    return zoo.mnist_cnn_and_points(N)


class ThreeChannels(torch.nn.Module):
    """The MNIST CNN on 3-channel input (their mean): for TIFGSM, whose torchattacks kernel
    is fixed at 3 channels."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.mean(1, keepdim=True))


LINF = dict(eps=0.1, alpha=0.02, steps=4)
# (class, torchattacks keywords, input: "mnist" | "three" (3 channels) | "inner" (away from
# the box: torchattacks' PGDRS clamps only what the model sees, fastadv the iterate))
CASES = [
    ("BIM", LINF, "mnist"),
    ("RFGSM", LINF, "mnist"),
    ("FFGSM", dict(eps=0.1, alpha=0.125), "mnist"),
    ("TPGD", LINF, "mnist"),
    ("EOTPGD", dict(LINF, eot_iter=2), "mnist"),
    ("UPGD", dict(LINF, random_start=True, eot_iter=2), "mnist"),
    ("UPGD", dict(LINF, loss="dlr"), "mnist"),
    ("Jitter", LINF, "mnist"),
    ("MIFGSM", LINF, "mnist"),
    ("NIFGSM", LINF, "mnist"),
    ("SINIFGSM", dict(LINF, m=3), "mnist"),
    ("VMIFGSM", dict(LINF, N=2), "mnist"),
    ("VNIFGSM", dict(LINF, N=2), "mnist"),
    ("DIFGSM", dict(LINF, decay=1.0), "mnist"),
    ("DIFGSM", dict(LINF, random_start=True, diversity_prob=0.7), "mnist"),
    ("TIFGSM", dict(LINF, len_kernel=5, decay=1.0), "three"),
    ("PGDRS", dict(LINF, noise_batch_size=3), "inner"),
    ("PGDRSL2", dict(eps=0.5, alpha=0.1, steps=4, noise_batch_size=3, noise_type="uniform"), "inner"),
    ("GN", dict(std=0.1), "mnist"),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def _inputs(mnist, kind):
    model, x, y = mnist
    if kind == "three":
        return ThreeChannels(model).eval(), x.repeat(1, 3, 1, 1), y
    if kind == "inner":
        return model, 0.2 + 0.6 * x, y
    return model, x, y


def _torchattacks(name, model, x, y, kw, seed=SEED):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return getattr(ta, name)(model, **kw)(x, y)


def _fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


@pytest.mark.parametrize("name,kw,kind", CASES, ids=IDS)
def test_same_run_as_torchattacks(mnist, name, kw, kind):
    """keep="last" (torchattacks' output), NCHW layout, one chunk, the same seed: the same
    adversarial points (to float rounding: a sign flip of a gradient entry within rounding
    of 0 may move one pixel of a row; 1.0 of the rows were identical when this was written)."""
    model, x, y = _inputs(mnist, kind)
    ref = _torchattacks(name, model, x, y, kw)
    opts = dict(seed=SEED, channels_last=False)
    if name != "GN":
        opts["max_batch"] = N
    if name not in ("GN", "PGDRS", "PGDRSL2"):
        opts["keep"] = "last"
    ours = getattr(fastadv, name)(model, **kw, **opts).run(x, y)
    same = ((ours.x_adv - ref).abs().flatten(1).amax(1) <= 1e-5).float().mean().item()
    assert same >= 0.95, same
    fooled_ref = _fooled(model, ref, y)
    assert torch.equal(ours.success, _fooled(model, ours.x_adv, y))
    assert ours.success.sum().item() >= fooled_ref.sum().item() - 1


@pytest.mark.parametrize("name,kw,kind", [c for c in CASES if c[0] != "GN"],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] != "GN"])
def test_defaults_fool_at_least_as_many(mnist, name, kw, kind):
    """fastadv's own defaults (the best iterate for the white-box attacks, the last for the
    transfer ones; channels_last) on the same trajectory as torchattacks (same seed, one
    chunk): at least as many points fooled, each x_adv inside the ball and the box."""
    model, x, y = _inputs(mnist, kind)
    ref = _torchattacks(name, model, x, y, kw)
    res = getattr(fastadv, name)(model, **kw, seed=SEED, max_batch=N).run(x, y)
    assert res.success.sum().item() >= _fooled(model, ref, y).sum().item()
    assert torch.equal(res.success, _fooled(model, res.x_adv, y))
    d = (res.x_adv - x).flatten(1)
    if name == "PGDRSL2":
        assert d.norm(dim=1).max().item() <= kw["eps"] + 1e-5
    else:
        assert d.abs().max().item() <= kw["eps"] + 1e-6
    assert res.x_adv.min().item() >= 0.0 and res.x_adv.max().item() <= 1.0


@pytest.mark.parametrize("name", ["BIM", "MIFGSM", "NIFGSM", "VMIFGSM", "DIFGSM"])
def test_default_chunking_stays_as_strong(mnist, name):
    """The defaults as a user runs them (CPU cache-sized chunks, the attack's own draws per
    chunk): as strong as torchattacks' run on the same 128 points, within sampling noise for
    the random ones (two seeds each side)."""
    model, x, y = zoo.mnist_cnn_and_points(128)
    kw = dict(eps=0.08, alpha=0.02, steps=5, **({"N": 2} if name == "VMIFGSM" else {}))
    ours = [getattr(fastadv, name)(model, **kw, seed=s).run(x, y).success.sum().item() for s in (0, 1)]
    ref = [_fooled(model, _torchattacks(name, model, x, y, kw, seed=s), y).sum().item() for s in (0, 1)]
    assert sum(ours) >= sum(ref) - 4, (ours, ref)


def test_targeted_by_label_same_run_as_torchattacks(mnist):
    model, x, y = mnist
    tgt = (y + 1) % 10
    ref = ta.MIFGSM(model, **LINF)
    ref.set_mode_targeted_by_label(quiet=True)
    a = ref(x, tgt)
    ours = fastadv.MIFGSM(model, **LINF, keep="last", channels_last=False, max_batch=N)
    ours.set_mode_targeted_by_label()
    b = ours(x, tgt)
    assert ((a - b).abs().flatten(1).amax(1) <= 1e-5).float().mean().item() >= 0.95
    with torch.no_grad():
        assert (model(b).argmax(1) == tgt).sum() >= (model(a).argmax(1) == tgt).sum()


def test_set_normalization_used_same_run_as_torchattacks(mnist):
    """DI²-FGSM pads with 0 in pixel space, before the model's normalization, in both."""
    model, x, y = mnist
    mean, std = [0.1307], [0.3081]

    class Normalized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, z):
            return self.inner(z * std[0] + mean[0])

    net = Normalized().eval()
    xn = (x - mean[0]) / std[0]
    kw = dict(LINF, decay=1.0, diversity_prob=1.0)
    ref = ta.DIFGSM(net, **kw)
    ref.set_normalization_used(mean, std)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        a = ref(xn, y)
    ours = fastadv.DIFGSM(net, **kw, seed=SEED, channels_last=False, max_batch=N)
    ours.set_normalization_used(mean, std)
    b = ours(xn, y)
    assert ((a - b).abs().flatten(1).amax(1) <= 1e-4).float().mean().item() >= 0.95


NAMES = ["BIM", "RFGSM", "FFGSM", "TPGD", "EOTPGD", "UPGD", "Jitter", "MIFGSM", "NIFGSM",
         "SINIFGSM", "VMIFGSM", "VNIFGSM", "DIFGSM", "TIFGSM", "PGDRS", "PGDRSL2", "GN", "VANILA"]


def test_constructor_signatures_match_torchattacks():
    zoo.assert_signatures_match(NAMES, fastadv, ta)


@pytest.mark.parametrize("kernel_name", ["gaussian", "linear", "uniform"])
def test_ti_kernel_is_torchattacks(kernel_name):
    ref = ta.TIFGSM(torch.nn.Identity(), kernel_name=kernel_name, len_kernel=7, nsig=3).stacked_kernel
    ours = fastadv.attacks.transfer.smoothing_kernel(kernel_name, 7, 3)
    assert torch.allclose(ours, ref[0, 0], rtol=1e-6, atol=1e-9)
