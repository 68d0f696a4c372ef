"""AdversarialTrainer: the step() API, its contract with the model and optimizer, bad input."""
import math
import os

import pytest
import torch
from torch import nn

import fastadv
from fastadv import data, models
from fastadv.train import AdversarialTrainer, METHODS, RandomCropFlip, method_defaults
from fastadv.train import checkpoint as ckpt
from fastadv.train import schedules

ALL = sorted(METHODS)


def _digits(n=256):
    x, y = data.load_digits()
    return x[:n], y[:n]


def _tiny(seed=0, bn=False):
    torch.manual_seed(seed)
    return models.SmallCNN(width=4, input_size=8, batchnorm=bn)


def _trainer(method="fgsm_rs", model=None, eps=0.1, **kw):
    model = model or _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if method == "atta":
        kw.setdefault("dataset_size", 256)
    return AdversarialTrainer(model, opt, method=method, eps=eps, seed=0, **kw)


def test_lazy_top_level_export():
    assert fastadv.AdversarialTrainer is AdversarialTrainer


@pytest.mark.parametrize("method", ALL)
def test_step_updates_weights_and_returns_device_loss(method):
    x, y = _digits(64)
    tr = _trainer(method)
    before = [p.detach().clone() for p in tr.model.parameters()]
    idx = torch.arange(64)
    loss = tr.step(x, y, idx)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert math.isfinite(loss.item())
    changed = [not torch.equal(b, p) for b, p in zip(before, tr.model.parameters())]
    assert all(changed), f"{method}: some parameters were not updated"
    per_batch = {"free": 4}.get(method, 1)
    assert tr.global_step == per_batch


def test_published_defaults():
    e = 8 / 255
    assert method_defaults("fgsm_rs", e)["alpha"] == pytest.approx(1.25 * e)
    d = method_defaults("pgd", e)
    assert d["steps"] == 10 and d["alpha"] == pytest.approx(2 / 255)
    nf = method_defaults("n_fgsm", e)
    assert nf["alpha"] == pytest.approx(e) and nf["noise"] == 2.0
    assert method_defaults("trades", e)["beta"] == 6.0 and method_defaults("mart", e)["beta"] == 6.0
    assert method_defaults("free", e)["replays"] == 4
    y = method_defaults("yopo", e)
    assert (y["outer"], y["steps"]) == (5, 3)
    assert method_defaults("gradalign", e)["lam"] == 0.2
    assert method_defaults("atta", e)["steps"] == 1


def test_step_restores_mode_and_leaves_requires_grad():
    x, y = _digits(32)
    model = _tiny(bn=True).eval()
    frozen = model.features[0].bias
    frozen.requires_grad_(False)
    tr = _trainer("pgd", model=model, steps=2)
    tr.step(x, y)
    assert not model.training
    assert not frozen.requires_grad and frozen.grad is None
    model.train()
    tr.step(x, y)
    assert model.training


def test_attack_does_not_touch_weight_grads_or_global_rng():
    """The inner attack uses input-only gradients and the trainer's generator: with a
    clean-training method the global RNG would be consumed identically."""
    x, y = _digits(32)
    tr = _trainer("pgd", steps=3)
    state = torch.get_rng_state()
    tr.step(x, y)
    assert torch.equal(state, torch.get_rng_state())


def test_free_replays_and_carries_delta():
    x, y = _digits(64)
    tr = _trainer("free", replays=3)
    tr.step(x[:32], y[:32])
    assert tr.global_step == 3
    d = tr._method.delta.clone()
    assert d.abs().max() <= 0.1 + 1e-6 and d.abs().max() > 0
    tr.step(x[32:64], y[32:64])
    assert not torch.equal(d, tr._method.delta)


def test_atta_cache_is_refined_across_visits():
    x, y = _digits(64)
    tr = _trainer("atta")
    idx = torch.arange(64)
    tr.step(x, y, idx)
    c1 = tr._method.cache[:64].clone()
    tr.step(x, y, idx)
    c2 = tr._method.cache[:64]
    assert not torch.equal(c1, c2)
    assert c2.abs().max() <= 0.1 + 1e-6
    # samples not in the batch keep their start
    untouched = tr._method.cache[64:].clone()
    tr.step(x[:8], y[:8], idx[:8])
    assert torch.equal(untouched, tr._method.cache[64:])


def test_yopo_first_layer_found():
    x, y = _digits(32)
    tr = _trainer("yopo", outer=2, steps=2)
    tr.step(x, y)
    assert tr._method.first is tr.model.features[0]


def test_amp_bf16_and_channels_last_run():
    x, y = _digits(32)
    for method in ("fgsm_rs", "free", "trades"):
        tr = _trainer(method, amp="bf16", channels_last=True)
        assert math.isfinite(tr.step(x, y).item())


def test_amp_fp16_grad_scaler_runs():
    x, y = _digits(32)
    tr = _trainer("fgsm_rs", amp="fp16")
    assert tr._scaler is not None
    assert math.isfinite(tr.step(x, y).item())


def test_augment_crop_flip_is_invertible():
    g = torch.Generator().manual_seed(0)
    aug = RandomCropFlip(padding=2)
    x = torch.rand(16, 3, 8, 8)
    params = aug.sample(16, g, "cpu")
    xa = aug.apply(x, params)
    back = aug.invert_into(torch.zeros_like(x), xa, params)
    oy, ox, fl = params
    for b in range(16):
        # compare on the rows/columns the crop kept
        r0, r1 = max(0, int(oy[b]) - 2), min(8, 8 + int(oy[b]) - 2)
        c0, c1 = max(0, int(ox[b]) - 2), min(8, 8 + int(ox[b]) - 2)
        assert torch.equal(back[b, :, r0:r1, c0:c1], x[b, :, r0:r1, c0:c1])
    # a flip with zero offset is its own inverse
    ident = (torch.full((2,), 2), torch.full((2,), 2), torch.tensor([True, False]))
    assert torch.equal(aug.apply(x[:2], ident)[0], x[0].flip(-1))
    assert torch.equal(aug.apply(x[:2], ident)[1], x[1])


def test_atta_with_augmentation_runs():
    x, y = _digits(64)
    tr = _trainer("atta", augment=RandomCropFlip(padding=1))
    tr.step(x, y, torch.arange(64))
    assert tr._method.cache[:64].abs().max() <= 0.1 + 1e-6


# ------------------------------------------------------------------ schedules
def test_schedules_shapes():
    c = schedules.Cyclic(total_steps=100)
    assert c(0) == 0.0 and c(40) == pytest.approx(1.0) and c(100) == 0.0 and c(70) == pytest.approx(0.5)
    p = schedules.Piecewise(total_steps=100)
    assert (p(10), p(50), p(80)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    o = schedules.OneCycle(total_steps=100, pct_start=0.25)
    assert o(0) == pytest.approx(1 / 25) and o(25) == pytest.approx(1.0) and o(100) < 1e-4
    with pytest.raises(RuntimeError, match="total_steps"):
        schedules.Cyclic()(3)


def test_trainer_applies_schedule_per_step():
    x, y = _digits(32)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    tr = AdversarialTrainer(model, opt, "fgsm_rs", eps=0.1, scheduler=schedules.Cyclic(total_steps=10))
    lrs = []
    for _ in range(10):
        tr.step(x, y)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[3] == pytest.approx(0.2) and lrs[-1] == pytest.approx(0.0) and lrs[0] == pytest.approx(0.05)


def test_fit_sets_total_steps_for_named_schedule():
    x, y = _digits(128)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = AdversarialTrainer(model, opt, "fgsm_rs", eps=0.1, scheduler="piecewise")
    tr.fit(data.make_loader(x, y, batch_size=32), epochs=2, verbose=False, guard=False)
    assert tr.schedule.total_steps == 8
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    p = str(tmp_path / "c.pt")
    ckpt.save_checkpoint({"a": torch.ones(3), "n": 1}, p)
    assert ckpt.load_checkpoint(p)["n"] == 1
    assert [f for f in os.listdir(tmp_path)] == ["c.pt"]  # no temporary left behind

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, str(tmp_path / "evil.pt"))
    with pytest.raises(Exception):
        ckpt.load_checkpoint(str(tmp_path / "evil.pt"))


def test_save_weights_safetensors_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    m = _tiny()
    p = str(tmp_path / "w.safetensors")
    ckpt.save_weights(m.state_dict(), p, {"epoch": 3})
    sd = ckpt.load_weights(p)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_trainer_state_dict_roundtrip_loads_weights_only(tmp_path):
    x, y = _digits(64)
    tr = _trainer("atta")
    tr.step(x, y, torch.arange(64))
    tr.save_checkpoint(str(tmp_path))
    raw = torch.load(str(tmp_path / "last.pt"), weights_only=True)
    assert raw["global_step"] == 1
    tr2 = _trainer("atta", model=_tiny(seed=5))
    tr2.load_checkpoint(str(tmp_path))
    for a, b in zip(tr.model.parameters(), tr2.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(tr._method.cache, tr2._method.cache)
    with pytest.raises(ValueError, match="eps"):
        _trainer("atta", eps=0.2).load_checkpoint(str(tmp_path))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("eps", [0, -0.1, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        _trainer(eps=eps)


def test_bad_method_and_options():
    with pytest.raises(ValueError, match="method"):
        _trainer("fgsm_magic")
    with pytest.raises(TypeError, match="unknown option"):
        _trainer("fgsm_rs", beta=3.0)
    with pytest.raises(ValueError, match="steps"):
        _trainer("fgsm_rs", steps=3)
    with pytest.raises(ValueError, match="alpha"):
        _trainer("pgd", alpha=-1.0)
    with pytest.raises(ValueError, match="amp"):
        _trainer(amp="fp8")
    # options keep their types: a string or a bool is not a number, 'yes' is not a flag
    with pytest.raises(TypeError, match="random_start.*True or False"):
        _trainer("pgd", random_start="yes")
    with pytest.raises(TypeError, match="replays.*number"):
        _trainer("free", replays="4")
    with pytest.raises(TypeError, match="beta.*number"):
        _trainer("trades", beta=True)


def test_wrong_label_range_fails_before_training():
    x, y = _digits(64)
    tr = _trainer()
    before = [p.detach().clone() for p in tr.model.parameters()]
    with pytest.raises(ValueError, match="labels"):
        tr.step(x, y + 10)
    with pytest.raises(ValueError, match="labels"):
        tr.step(x, y - 1 - y.max())
    assert all(torch.equal(b, p) for b, p in zip(before, tr.model.parameters()))


def test_wrong_shapes_fail_clearly():
    x, y = _digits(64)
    tr = _trainer()
    with pytest.raises(ValueError, match="y: expected shape"):
        tr.step(x, y[:10])
    with pytest.raises(TypeError, match="integer class labels"):
        tr.step(x, y.float())
    with pytest.raises(ValueError, match=r"values in \[lower, upper\]"):
        tr.step(x * 255, y)
    tr.step(x, y)
    with pytest.raises(ValueError, match="samples of shape"):
        tr.step(torch.rand(8, 1, 9, 9), y[:8])


def test_loader_with_wrong_batch_structure_fails_in_fit():
    x, y = _digits(64)
    loader = [(x[:32],)]
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        _trainer().fit(loader, epochs=1, verbose=False)


def test_atta_without_indices_fails_before_training():
    x, y = _digits(64)
    tr = _trainer("atta")
    before = [p.detach().clone() for p in tr.model.parameters()]
    with pytest.raises(ValueError, match="index"):
        tr.fit(data.make_loader(x, y, batch_size=32), epochs=1, verbose=False)
    assert all(torch.equal(b, p) for b, p in zip(before, tr.model.parameters()))


def test_atta_index_out_of_range():
    x, y = _digits(64)
    tr = _trainer("atta", dataset_size=32)
    with pytest.raises(ValueError, match="index"):
        tr.step(x, y, torch.arange(64))
    with pytest.raises(ValueError, match="non-negative"):
        _trainer("atta").step(x, y, torch.arange(64) - 1)


class _InputSkip(nn.Module):
    """Uses its input after the first layer too: YOPO's first-layer-only steps would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(3 * 64, 10)

    def forward(self, x):
        return self.fc(torch.cat([self.conv(x), x], 1).flatten(1))


class _ScaledInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc((2 * x).flatten(1))


class _BareWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 10) * 0.1)

    def forward(self, x):
        return x.flatten(1) @ self.w


@pytest.mark.parametrize("cls,match", [(_InputSkip, "outside its first layer"),
                                       (_ScaledInput, "no identifiable first layer")])
def test_yopo_without_identifiable_first_layer(cls, match):
    x, y = _digits(32)
    model = cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = AdversarialTrainer(model, opt, "yopo", eps=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        tr.step(x, y)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_yopo_bare_weights_rejected_at_construction():
    model = _BareWeights()
    with pytest.raises(ValueError, match="first layer"):
        AdversarialTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "yopo", eps=0.1)


def test_optimizer_of_another_model_rejected():
    a, b = _tiny(), _tiny()
    with pytest.raises(ValueError, match="optimizer"):
        AdversarialTrainer(a, torch.optim.SGD(b.parameters(), lr=0.1), "fgsm_rs", eps=0.1)


def test_second_fit_continues_to_the_total_epochs():
    x, y = _digits(128)
    tr = _trainer()
    loader = data.make_loader(x, y, batch_size=64)
    tr.fit(loader, epochs=1, verbose=False, guard=False)
    tr.fit(loader, epochs=2, verbose=False, guard=False)
    assert [r["epoch"] for r in tr.history] == [1, 2] and tr.global_step == 4
    tr.fit(loader, epochs=2, verbose=False, guard=False)   # nothing left to do
    assert tr.global_step == 4


def test_torch_lr_scheduler_is_stepped_per_optimizer_step():
    x, y = _digits(64)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    tr = AdversarialTrainer(model, opt, "free", eps=0.1, replays=3, scheduler=sched)
    tr.step(x, y)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_frozen_batchnorm_stays_frozen():
    """A BatchNorm the user put in eval mode keeps its running statistics through training
    steps, also across attacks that switch BatchNorm to eval mode and back."""
    x, y = _digits(32)
    model = _tiny(bn=True).train()
    bn = model.features[1]
    bn.eval()
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    for method in ("trades", "fgsm_rs"):
        tr = _trainer(method, model=model, steps=1 if method == "fgsm_rs" else 2)
        tr.step(x, y)
        assert not bn.training and model.training
        assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
