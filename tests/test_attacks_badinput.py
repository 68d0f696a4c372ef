"""Unusual models and inputs: callables, reassigned buffers, non-float32 models and inputs,
non-tensor outputs, inference mode, and arguments of the wrong kind. Each either works
exactly (the eps-ball and the box hold in the caller's dtype, the model comes back as
found) or fails with an error that names the argument and what was expected."""
import math
import warnings

import pytest
import torch
from torch import nn

import fastadv
from fastadv.attacks.base import fit_to_ball

N_CLASSES = 10


def _tiny(c=1, drop=False, bn=False, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Conv2d(c, 4, 3, padding=1)]
        if bn:
            layers.append(nn.BatchNorm2d(4))
        layers += [nn.ReLU(), nn.Flatten()]
        if drop:
            layers.append(nn.Dropout(0.3))
        layers.append(nn.Linear(4 * 36, N_CLASSES))
        return nn.Sequential(*layers).eval()


def _data(b=8, c=1):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, c, 6, 6, generator=g), torch.randint(0, N_CLASSES, (b,), generator=g)


def _labels(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def _state(model):
    return ([m.training for m in model.modules()],
            {k: (v, v.detach().clone()) for k, v in model.named_buffers()},
            {k: v.detach().clone() for k, v in model.named_parameters()})


def _assert_state(model, s):
    modes, bufs, params = s
    assert [m.training for m in model.modules()] == modes
    now = dict(model.named_buffers())
    assert now.keys() == bufs.keys()
    for k, (obj, val) in bufs.items():
        assert now[k] is obj and torch.equal(now[k], val), k
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), params[k])


# ------------------------------------------------------------ 1. callables
def test_plain_callable_leaves_the_global_rng_alone_and_warns_once():
    model = _tiny(drop=True).train()
    x, y = _data()
    f = lambda t: model(t)  # noqa: E731 - the case under test
    with pytest.warns(RuntimeWarning, match="plain callable.*nn.Module"):
        atk = fastadv.PGD(f, eps=0.1, alpha=0.05, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastadv.APGD(f, eps=0.1, steps=2)  # the same callable: no second warning
    rng = torch.get_rng_state()
    atk(x, y)
    assert torch.equal(torch.get_rng_state(), rng)


def test_bound_method_is_treated_as_its_module():
    model = _tiny(bn=True, drop=True).train()
    x, y = _data()
    s = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atk = fastadv.PGD(model.forward, eps=0.1, alpha=0.05, steps=2, model_mode="train")
    rng = torch.get_rng_state()
    atk(x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    _assert_state(model, s)


# ------------------------------------------------------- 2. reassigned buffers
class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _tiny(bn=True)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls = self.calls + 1  # a new tensor each call
        return self.net(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_reassigned_buffer_comes_back_as_the_same_object(mode):
    model = _Counting()
    x, y = _data()
    s = _state(model)
    fastadv.PGD(model, eps=0.1, alpha=0.05, steps=3, model_mode=mode)(x, y)
    _assert_state(model, s)
    assert model.calls.item() == 0


def test_lazy_module_is_refused_untouched():
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(N_CLASSES))
    x, y = _data()
    with pytest.raises(ValueError, match="lazy"):
        fastadv.PGD(model, eps=0.1, steps=1)(x, y)
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


# ------------------------------------------------- 3. the ball in the caller's dtype
def _ball_norm(d, norm):
    d = d.flatten(1)
    if norm == "Linf":
        return d.abs().amax(1)
    return d.norm(dim=1) if norm == "L2" else d.abs().sum(1)


_BALL_ATTACKS = {
    "FGSM": ("Linf", 0.1, lambda m: fastadv.FGSM(m, eps=0.1)),
    "PGD": ("Linf", 0.1, lambda m: fastadv.PGD(m, eps=0.1, alpha=0.05, steps=3)),
    "PGDL2": ("L2", 0.5, lambda m: fastadv.PGDL2(m, eps=0.5, alpha=0.3, steps=3)),
    "APGD": ("Linf", 0.1, lambda m: fastadv.APGD(m, eps=0.1, steps=3)),
    "APGD-L2": ("L2", 0.5, lambda m: fastadv.APGD(m, norm="L2", eps=0.5, steps=3)),
    "APGD-L1": ("L1", 2.0, lambda m: fastadv.APGD(m, norm="L1", eps=2.0, steps=3)),
    "APGDT": ("Linf", 0.1, lambda m: fastadv.APGDT(m, eps=0.1, steps=3, n_target_classes=2)),
    "Square": ("Linf", 0.1, lambda m: fastadv.Square(m, eps=0.1, n_queries=10)),
    "Square-L2": ("L2", 0.5, lambda m: fastadv.Square(m, norm="L2", eps=0.5, n_queries=10)),
    "FAB": ("Linf", 0.3, lambda m: fastadv.FAB(m, eps=0.3, steps=5)),
    "FAB-L2": ("L2", 1.5, lambda m: fastadv.FAB(m, norm="L2", eps=1.5, steps=5)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", list(_BALL_ATTACKS))
def test_ball_and_box_hold_in_the_callers_dtype(name, dtype):
    norm, eps, make = _BALL_ATTACKS[name]
    model = _tiny()
    x, _ = _data()
    x = x.to(dtype)
    y = _labels(model, x.float())
    res = make(model).run(x, y)
    assert res.x_adv.dtype == dtype
    d = res.x_adv.double() - x.double()
    assert bool((_ball_norm(d, norm) <= eps).all()), _ball_norm(d, norm).max().item()
    assert 0.0 <= res.x_adv.double().min() and res.x_adv.double().max() <= 1.0
    # the flags describe the very tensor returned
    fooled = _labels(model, res.x_adv.float()) != y
    assert torch.equal(res.success, fooled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("make", [lambda m: fastadv.CW(m, steps=3, binary_search_steps=1),
                                  lambda m: fastadv.DeepFool(m, steps=3)])
def test_min_norm_attacks_keep_the_box_and_honest_flags(make, dtype):
    model = _tiny()
    x, _ = _data()
    x = x.to(dtype)
    y = _labels(model, x.float())
    res = make(model).run(x, y)
    assert res.x_adv.dtype == dtype
    assert 0.0 <= res.x_adv.double().min() and res.x_adv.double().max() <= 1.0
    fooled = _labels(model, res.x_adv.float()) != y
    assert not bool((res.success & ~fooled).any())


def test_normalized_io_ball_holds_in_pixel_space():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    model = _tiny(c=3)
    xp, _ = _data(c=3)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    xn = ((xp - m) / s).to(torch.bfloat16)
    y = _labels(model, xp)
    # seeds whose random start once left an element at the ball's edge, where rounding put
    # it 1.5e-9 outside (the float32 mean and std) and unit steps towards x could not undo it
    for seed in (None, 88, 116, 145):
        atk = fastadv.PGD(model, eps=0.1, alpha=0.05, steps=2, seed=seed)
        out = atk.set_normalization_used(mean, std)(xn, y)
        assert out.dtype == torch.bfloat16
        d = (out.double() - xn.double()) * s.double()
        assert d.abs().max() <= 0.1, seed


def test_fit_to_ball_gets_a_normalized_zero_back_in():
    from fastadv.attacks.base import fit_to_ball
    mean = torch.tensor([0.4], dtype=torch.float32).double().view(1, 1)
    std = torch.tensor([0.2], dtype=torch.float32).double().view(1, 1)
    x = torch.tensor([[-0.5, -0.5]], dtype=torch.bfloat16)
    # pixel x = 0.30000000447; the bf16 0 is pixel 0.40000000596: 0.1 + 1.5e-9 away
    x_adv = torch.tensor([[0.0, -0.5]], dtype=torch.bfloat16)
    out = fit_to_ball(x_adv, x, ("Linf", 0.1), 0.0, 1.0, (mean, std))
    d = (out.double() - x.double()) * std
    assert d.abs().max() <= 0.1
    assert d[0, 0] > 0.099  # moved back to the edge, not to x


def _threshold_model(c, dtype):
    """Class 1 wins where x > c (one input feature)."""
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0], [1.0]]))
        lin.bias.copy_(torch.tensor([0.0, -c], dtype=torch.float64))
    return lin.to(dtype).eval()


@pytest.mark.parametrize("dtype,c,expect", [
    # float32 steps 0.5 -> 0.6 (past c); bf16 rounds it to 0.6015625, outside the ball, and
    # one step in gives 0.59765625, short of c: the returned point does not fool the model
    (torch.bfloat16, 0.599, 0.59765625),
    # float64: the float32 0.6 is 0.60000002384...; the float64 ball ends at 0.6, short of c
    (torch.float64, 0.60000001, 0.6),
])
def test_rounding_back_into_the_ball_updates_success(dtype, c, expect):
    model = _threshold_model(c, torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.full((1, 1), 0.5, dtype=dtype)
    y = torch.zeros(1, dtype=torch.long)
    res = fastadv.PGD(model, eps=0.1, alpha=0.1, steps=1, random_start=False).run(x, y)
    assert res.x_adv.item() == expect
    assert not bool(res.success.any())
    # in float32 the very same attack succeeds: the flags are not copied from the iterate
    res32 = fastadv.PGD(_threshold_model(c, torch.float32), eps=0.1, alpha=0.1, steps=1,
                        random_start=False).run(x.float(), y)
    assert bool(res32.success.all()) == (dtype == torch.bfloat16)


def test_fit_to_ball_moves_one_ulp_towards_x():
    x = torch.tensor([[0.5, 0.25, 0.75]], dtype=torch.bfloat16)
    out = torch.tensor([[0.6015625, 0.25, 0.6640625]], dtype=torch.bfloat16)  # first is out
    got = fit_to_ball(out, x, ("Linf", 0.1), 0.0, 1.0)
    assert got.tolist() == [[0.59765625, 0.25, 0.6640625]]
    # L2: every changed element of a violating row steps in; an untouched one stays
    x2 = torch.zeros(1, 3, dtype=torch.float16)
    inside = torch.tensor([[0.6, 0.8, 0.0]], dtype=torch.float16)
    out2 = torch.where(inside > 0, torch.nextafter(inside, torch.ones_like(inside)), inside)
    assert out2.double().norm() > 1.0 >= inside.double().norm()
    got2 = fit_to_ball(out2, x2, ("L2", 1.0), 0.0, 1.0)
    assert torch.equal(got2, inside)
    # the box too, for float64 in float64
    x3 = torch.tensor([[0.95]], dtype=torch.float64)
    got3 = fit_to_ball(torch.tensor([[1.0000001]], dtype=torch.float64), x3, ("Linf", 0.1), 0.0, 1.0)
    assert got3.item() == 1.0


# ------------------------------------------------------ 4. non-float32 models
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [
    lambda m: fastadv.PGD(m, eps=0.1, alpha=0.05, steps=2),
    lambda m: fastadv.APGD(m, eps=0.1, steps=2),
    lambda m: fastadv.FAB(m, eps=0.1, steps=2),
    lambda m: fastadv.Square(m, eps=0.1, n_queries=3),
    lambda m: fastadv.CW(m, steps=2, binary_search_steps=1),
    lambda m: fastadv.DeepFool(m, steps=2),
])
def test_models_in_other_dtypes_run(make, dtype):
    model = _tiny().to(dtype)
    x, _ = _data()
    y = _labels(model, x.to(dtype))
    for xin in (x.to(dtype), x):
        res = make(model).run(xin, y)
        assert res.x_adv.dtype == xin.dtype and res.loss.dtype == torch.float32
    assert all(p.dtype == dtype for p in model.parameters())


# ------------------------------------------------------- 5. non-tensor outputs
class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _tiny()

    def forward(self, x):
        return self.net(x), x.sum()


class _Dict(_Tuple):
    def forward(self, x):
        return {"logits": self.net(x)}


@pytest.mark.parametrize("wrap", [_Tuple, _Dict])
@pytest.mark.parametrize("make", [lambda m: fastadv.PGD(m, steps=1), lambda m: fastadv.APGD(m, steps=1),
                                  lambda m: fastadv.Square(m, n_queries=1),
                                  lambda m: fastadv.DeepFool(m, steps=1)])
def test_non_tensor_output_is_named(wrap, make):
    x, y = _data()
    with pytest.raises(TypeError, match=r"model: expected its output to be a logits tensor \[B, classes\]"):
        make(wrap())(x, y)


# ------------------------------------------------------------ 6. inference mode
def test_inference_mode_is_refused_with_the_reason():
    model = _tiny()
    x, y = _data()
    atk = fastadv.PGD(model, eps=0.1, steps=1, seed=0)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            atk(x, y)
        xi, yi = x.clone(), y.clone()
    # tensors made under inference mode are fine outside it
    out = atk(xi, yi)
    assert torch.equal(out, atk(x, y))


# ------------------------------------------------------------------ 7. norm
@pytest.mark.parametrize("cls", [fastadv.APGD, fastadv.FAB, fastadv.Square, fastadv.DeepFool])
@pytest.mark.parametrize("bad", [1.9, 2.5, 0, -math.inf, float("nan"), "L3", "2.5", None, True])
def test_norm_refuses_what_it_would_have_rounded(cls, bad):
    with pytest.raises(ValueError, match="norm: expected 'Linf', 'L2' or 'L1'"):
        cls(_tiny(), norm=bad)


@pytest.mark.parametrize("spelling,name", [(2, "L2"), (2.0, "L2"), ("l2", "L2"), (math.inf, "Linf"),
                                           ("inf", "Linf"), ("Linf", "Linf")])
def test_norm_spellings_still_accepted(spelling, name):
    assert fastadv.APGD(_tiny(), norm=spelling).norm == name


# -------------------------------------------------------------- 8. channels
def test_constructor_normalization_checks_channels_like_set_normalization_used():
    model = _tiny(c=3)
    x, y = _data(c=1)
    stats = ([0.5] * 3, [0.2] * 3)
    with pytest.raises(ValueError, match="expected 3 channels"):
        fastadv.PGD(model, eps=0.1, steps=1, normalization=stats)(x, y)
    with pytest.raises(ValueError, match="expected 3 channels"):
        fastadv.PGD(model, eps=0.1, steps=1).set_normalization_used(*stats)(x, y)


# --------------------------------------------------------------- 9. targets
@pytest.mark.parametrize("target,err,match", [
    (torch.tensor([1.9] * 8), TypeError, "target: expected integer class labels"),
    (torch.ones(8, dtype=torch.bool), TypeError, "target: expected integer class labels"),
    ([1] * 8, TypeError, "target: expected a tensor"),
    (torch.ones(3, dtype=torch.long), ValueError, r"target: expected shape \[8\]"),
    (torch.full((8,), 12), ValueError, r"target: expected labels in \[0, 9\]"),
])
def test_bad_targets_are_named(target, err, match):
    x, y = _data()
    with pytest.raises(err, match=match):
        fastadv.PGD(_tiny(), eps=0.1, steps=1).run(x, y, target=target)


@pytest.mark.parametrize("fn,err,match", [
    (lambda a, b: [1] * len(b), TypeError, "target_map_function"),
    (lambda a, b: (b + 1).float(), TypeError, "target_map_function"),
    (lambda a, b: b[:2], ValueError, r"target \(returned by the target_map_function\): expected shape"),
])
def test_target_function_output_is_checked(fn, err, match):
    x, y = _data()
    atk = fastadv.PGD(_tiny(), eps=0.1, steps=1)
    atk.set_mode_targeted_by_function(fn, quiet=True)
    with pytest.raises(err, match=match):
        atk(x, y)


def test_integer_targets_of_any_width_work():
    x, y = _data()
    t = (y + 1) % N_CLASSES
    a = fastadv.PGD(_tiny(), eps=0.1, steps=2, seed=0).run(x, y, target=t)
    b = fastadv.PGD(_tiny(), eps=0.1, steps=2, seed=0).run(x, y, target=t.to(torch.int32))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.extra["target"], t)


# ------------------------------------------------------------ 10. kth_min
def test_least_likely_beyond_the_class_count():
    x, y = _data()
    atk = fastadv.PGD(_tiny(), eps=0.1, steps=1)
    atk.set_mode_targeted_least_likely(11, quiet=True)
    with pytest.raises(ValueError, match=r"kth_min: expected at most the number of classes other "
                                         r"than the label \(9\), got 11"):
        atk(x, y)
    atk.set_mode_targeted_least_likely(10, quiet=True)   # the label is never a target
    with pytest.raises(ValueError, match=r"\(9\), got 10"):
        atk(x, y)
    with pytest.raises(ValueError, match="kth_min"):
        fastadv.PGD(_tiny()).set_mode_targeted_least_likely(True)


# --------------------------------------------------- 11. output independent of x
class _Const(nn.Module):
    """Predicts class 0 for everything: every sample with y != 0 is 'fooled' already."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.arange(N_CLASSES, 0, -1).float())

    def forward(self, x):
        return self.bias.expand(x.shape[0], N_CLASSES)


@pytest.mark.filterwarnings("ignore:fastadv. the model is a plain callable")
@pytest.mark.parametrize("make", [
    lambda m: fastadv.PGD(m, eps=0.1, steps=1),
    lambda m: fastadv.APGD(m, eps=0.1, steps=2),
    lambda m: fastadv.APGDT(m, eps=0.1, steps=2, n_target_classes=2),
    lambda m: fastadv.FAB(m, eps=0.1, steps=2),
    lambda m: fastadv.CW(m, steps=2, binary_search_steps=1),
    lambda m: fastadv.DeepFool(m, steps=2),
])
def test_gradient_attacks_refuse_a_model_blind_to_x(make):
    x, _ = _data()
    y = torch.ones(8, dtype=torch.long)  # all misclassified: no attack would take a gradient
    with pytest.raises(ValueError, match="does not depend on the input x"):
        make(_Const())(x, y)
    with pytest.raises(ValueError, match="does not depend on the input x"):
        make(lambda t: _tiny()(t).detach())(x, y)


def test_square_needs_no_gradient():
    x, _ = _data()
    res = fastadv.Square(_Const(), eps=0.1, n_queries=2).run(x, torch.zeros(8, dtype=torch.long))
    assert not bool(res.success.any())


# --------------------------------------------------------- 12. argument kinds
@pytest.mark.parametrize("make,name", [
    (lambda v: fastadv.PGD(_tiny(), steps=v), "steps"),
    (lambda v: fastadv.PGD(_tiny(), restarts=v), "restarts"),
    (lambda v: fastadv.APGD(_tiny(), steps=v), "steps"),
    (lambda v: fastadv.APGD(_tiny(), n_restarts=v), "n_restarts"),
    (lambda v: fastadv.APGDT(_tiny(), n_target_classes=v), "n_target_classes"),
    (lambda v: fastadv.FAB(_tiny(), steps=v), "steps"),
    (lambda v: fastadv.FAB(_tiny(), n_classes=v), "n_classes"),
    (lambda v: fastadv.Square(_tiny(), n_queries=v), "n_queries"),
    (lambda v: fastadv.CW(_tiny(), steps=v), "steps"),
    (lambda v: fastadv.DeepFool(_tiny(), steps=v), "steps"),
    (lambda v: fastadv.PGD(_tiny(), seed=v), "seed"),
])
@pytest.mark.parametrize("bad", [2.7, "5", True])
def test_counts_are_never_converted(make, name, bad):
    with pytest.raises(TypeError, match=f"{name}: expected an int"):
        make(bad)


@pytest.mark.parametrize("make,name", [
    (lambda v: fastadv.APGD(_tiny(), rho=v), "rho"),
    (lambda v: fastadv.FAB(_tiny(), alpha_max=v), "alpha_max"),
    (lambda v: fastadv.FAB(_tiny(), eta=v), "eta"),
    (lambda v: fastadv.Square(_tiny(), p_init=v), "p_init"),
    (lambda v: fastadv.PGD(_tiny(), lower=v), "lower"),
    (lambda v: fastadv.PGD(_tiny(), early_stop=v), "early_stop"),
])
def test_numbers_and_flags_are_never_converted(make, name):
    with pytest.raises(TypeError, match=name):
        make("0.5")


def test_a_mismatched_n_classes_warns_and_the_model_decides():
    x, y = _data()
    want = fastadv.APGDT(_tiny(), eps=0.1, steps=2)(x, y)
    with pytest.warns(RuntimeWarning, match="n_classes=3 given, but the model returns logits for 10"):
        got = fastadv.APGDT(_tiny(), eps=0.1, steps=2, n_classes=3)(x, y)
    assert torch.equal(got, want)


# ------------------------------------------------------ AutoAttack, the same rules
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_autoattack_ball_and_flags_in_the_callers_dtype(norm, eps, dtype):
    model = _tiny()
    x, _ = _data(16)
    x = x.to(dtype)
    y = _labels(model, x.float())
    aa = fastadv.AutoAttack(model, norm=norm, eps=eps, version="standard", steps=3, n_queries=20,
                            seed=0, checks=False)
    xa = aa.run_standard_evaluation(x, y)
    assert xa.dtype == dtype
    assert bool((_ball_norm(xa.double() - x.double(), norm) <= eps).all())
    robust = aa.last_result.extra["robust"]
    assert torch.equal(~robust, _labels(model, xa.float()) != y)   # flags of the tensor returned
    assert aa.robust_accuracy == robust.float().mean().item()


def test_autoattack_square_alone_needs_no_gradient_and_the_check_warns():
    x, _ = _data()
    y = torch.zeros(8, dtype=torch.long)     # _Const predicts class 0: all clean-correct
    square = fastadv.AutoAttack(_Const(), eps=0.1, version="custom", attacks_to_run=["square"],
                                n_queries=5, seed=0)
    with pytest.warns(UserWarning, match="no gradient path"):
        square.run_standard_evaluation(x, y)
    assert square.robust_accuracy == 1.0
    whitebox = fastadv.AutoAttack(_Const(), eps=0.1, version="standard", steps=2, n_queries=5, seed=0)
    with pytest.raises(ValueError, match="does not depend on the input x.*Square"):
        whitebox.run_standard_evaluation(x, y)


def test_autoattack_rescoring_in_another_dtype_keeps_to_bs():
    """The forward that re-decides success after rounding to the caller's dtype goes ``bs``
    rows at a time, like every other AutoAttack pass (a 10k-point fp16 run must not OOM)."""
    model = _tiny()
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    x, _ = _data(40)
    x = x.double()
    y = _labels(model, x.float())
    seen.clear()
    aa = fastadv.AutoAttack(model, eps=0.1, version="custom", attacks_to_run=["apgd-ce"], steps=2,
                            seed=0, checks=False)
    aa.apgd.n_restarts = 1  # one row per point (custom keeps the reference's 5 restarts: 5 rows each)
    aa.run_standard_evaluation(x, y, bs=8)
    assert seen and max(seen) <= 16   # the 16-row clean probe is the largest
