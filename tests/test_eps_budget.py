"""An eps that covers the whole input range (``eps=8`` meant as 8/255) is refused by every
attack with a budget unless ``allow_large_eps=True``: L∞ when the attack is built, L2/L1 when
a run starts (their reach depends on the input size). The CLI's ``--allow-large-eps`` reaches
the attacks it builds."""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastadv
import fastadv.attacks as A
from fastadv.attacks.base import Attack, AttackResult
from fastadv.eval import masking, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 64   # values per input: 1x8x8; L2 covers [0, 1]^64 from eps 8, L1 from eps 64


def _model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * D, 5)).eval()


def _data(b=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g)


# every exported attack with an eps budget, with settings that make a run cheap
CHEAP = {"AutoAttack": dict(version="custom", attacks_to_run=["apgd-ce"], steps=1, verbose=False, checks=False),
         "Square": dict(n_queries=2), "APGD": dict(steps=1), "APGDT": dict(steps=1, n_target_classes=1),
         "FAB": dict(steps=1), "FABT": dict(steps=1, n_target_classes=1), "DeepFool": dict(steps=1),
         "VMIFGSM": dict(steps=1, N=2), "VNIFGSM": dict(steps=1, N=2), "EOTPGD": dict(steps=1, eot_iter=1),
         "PGDRS": dict(steps=1, noise_batch_size=2), "PGDRSL2": dict(steps=1, noise_batch_size=2),
         "PGDL2RS": dict(steps=1, noise_batch_size=2)}


def _own(cls, arg):
    """Whether a constructor of ``cls`` other than the base's names ``arg``."""
    return any(arg in inspect.signature(k.__dict__["__init__"]).parameters
               for k in cls.__mro__ if k not in (Attack, object) and "__init__" in k.__dict__)


WITH_EPS = sorted(n for n in A.__all__ if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), Attack)
                  and getattr(A, n) is not Attack and _own(getattr(A, n), "eps"))


def _build(name, eps, **kw):
    cls = getattr(A, name)
    opts = dict(CHEAP.get(name, {}))
    if _own(cls, "steps") and "steps" not in opts and name not in ("FGSM", "FFGSM"):
        opts["steps"] = 1
    return cls(_model(), eps=eps, **opts, **kw)


def test_the_list_is_every_exported_attack_with_an_eps():
    # a new attack exported with eps joins these tests by itself
    assert {"PGD", "PGDL2", "FGSM", "APGD", "APGDT", "FAB", "FABT", "Square", "AutoAttack", "DeepFool",
            "BIM", "RFGSM", "FFGSM", "EOTPGD", "UPGD", "TPGD", "Jitter", "MIFGSM", "NIFGSM", "SINIFGSM",
            "VMIFGSM", "VNIFGSM", "DIFGSM", "TIFGSM", "PGDRS", "PGDRSL2"} <= set(WITH_EPS)


@pytest.mark.parametrize("name", WITH_EPS)
def test_every_attack_refuses_a_budget_covering_the_inputs(name):
    x, y = _data()
    # 8 covers [0, 1] in L∞ and [0, 1]^64 in L2 (sqrt(64) = 8): refused when built (L∞) or
    # when a run starts (L2, which needs the input size)
    with pytest.raises(ValueError) as err:
        _build(name, 8.0).run(x, y)
    msg = str(err.value)
    assert msg.startswith("eps: 8 covers the whole input range [0, 1]"), msg
    assert "allow_large_eps=True" in msg
    # allowed: it runs, and returns a batch in the box
    res = _build(name, 8.0, allow_large_eps=True).run(x, y)
    assert res.x_adv.shape == x.shape and 0 <= float(res.x_adv.min()) and float(res.x_adv.max()) <= 1


@pytest.mark.parametrize("name", ["PGD", "FGSM", "APGD", "FAB", "Square", "AutoAttack", "BIM", "MIFGSM", "PGDRS"])
def test_linf_is_refused_when_built(name):
    with pytest.raises(ValueError, match=r"^eps: 8 covers .*\(Linf\) \(did you mean 8/255\?\)"):
        _build(name, 8.0)
    with pytest.raises(ValueError, match=r"^eps: 1 covers"):
        _build(name, 1.0)              # the span itself already covers the box
    _build(name, 0.99).run(*_data())   # one grey level less does not
    _build(name, 8 / 255).run(*_data())


def test_the_box_decides_the_range():
    x, y = _data()
    # inputs in [-1, 1]: eps 1.5 (L∞) does not cover the span 2, eps 2 does
    atk = fastadv.PGD(_model(), eps=1.5, steps=1, lower=-1.0, upper=1.0)
    atk.run(x * 2 - 1, y)
    with pytest.raises(ValueError, match=r"^eps: 2 covers the whole input range \[-1, 1\]"):
        fastadv.PGD(_model(), eps=2.0, lower=-1.0, upper=1.0)


def test_l2_and_l1_are_refused_at_the_first_run_with_the_input_size():
    x, y = _data()
    atk = fastadv.PGDL2(_model(), eps=8.0, steps=1)       # built: the input size is unknown yet
    with pytest.raises(ValueError, match=r"^eps: 8 covers .*\(L2, 64 values per input\).*allow_large_eps=True"):
        atk.run(x, y)
    fastadv.PGDL2(_model(), eps=7.9, steps=1).run(x, y)
    with pytest.raises(ValueError, match=r"\(L1, 64 values per input\)"):
        fastadv.APGD(_model(), norm="L1", eps=64.0, steps=1).run(x, y)
    fastadv.APGD(_model(), norm="L1", eps=63.0, steps=1).run(x, y)
    # the same L2 radius is a small one on bigger inputs
    xb = torch.rand(2, 1, 16, 16)
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 5)).eval()
    fastadv.PGDL2(net, eps=8.0, steps=1).run(xb, torch.zeros(2, dtype=torch.long))


def test_an_eps_changed_after_building_is_checked_at_the_run():
    x, y = _data()
    atk = fastadv.PGD(_model(), eps=8 / 255, steps=1)
    atk.eps = 8.0
    with pytest.raises(ValueError, match=r"^eps: 8 covers"):
        atk.run(x, y)
    atk.allow_large_eps = True
    atk.run(x, y)
    aa = fastadv.AutoAttack(_model(), eps=8 / 255, **CHEAP["AutoAttack"])
    aa.epsilon = 8.0
    with pytest.raises(ValueError, match=r"^eps: 8 covers.*allow_large_eps=True to AutoAttack"):
        aa.run(x, y)


def test_autoattack_names_itself_and_passes_the_permission_on():
    with pytest.raises(ValueError, match=r"allow_large_eps=True to AutoAttack"):
        fastadv.AutoAttack(_model(), eps=8.0)
    aa = fastadv.AutoAttack(_model(), eps=8.0, allow_large_eps=True, verbose=False)
    assert aa.apgd.allow_large_eps and aa.fab.allow_large_eps and aa.square.allow_large_eps
    # L1 (no L1 Square: its object is built as L∞) with a usual L1 radius builds as before
    l1 = fastadv.AutoAttack(_model(), norm="L1", eps=10.0, verbose=False)
    assert not l1.square.allow_large_eps and not l1.apgd.allow_large_eps
    x, y = _data()
    with pytest.raises(ValueError, match=r"\(L1, 64 values per input\)"):
        fastadv.AutoAttack(_model(), norm="L1", eps=64.0, version="custom", attacks_to_run=["apgd-ce"],
                           steps=1, verbose=False, checks=False).run(x, y)


def test_deepfool_checks_only_a_budget_it_was_given():
    x, y = _data()
    fastadv.DeepFool(_model(), steps=1).run(x, y)                 # eps 0: unbounded, no budget
    fastadv.DeepFool(_model(), steps=1, eps=7.0).run(x, y)
    with pytest.raises(ValueError, match=r"^eps: 1 covers .*\(Linf\)"):
        fastadv.DeepFool(_model(), steps=1, norm="Linf", eps=1.0)
    # minimum-norm attacks without a ball are not checked: CW has no eps at all
    fastadv.CW(_model(), steps=1, binary_search_steps=1).run(x, y)


class _Mine(Attack):
    """A new attack: eps to the base, norm set after it, as the attacks here do."""

    def __init__(self, model, eps=8 / 255, norm="Linf", **kwargs):
        super().__init__("Mine", model, eps=eps, **kwargs)
        self.norm = norm

    def _attack(self, x, y, target, gen):
        return AttackResult(x.clone(), torch.zeros_like(y, dtype=torch.bool), torch.zeros(len(y)),
                            torch.zeros_like(y))


class _MineNoNorm(_Mine):
    def __init__(self, model, eps=8 / 255, **kwargs):
        Attack.__init__(self, "MineNoNorm", model, eps=eps, **kwargs)


class _MineMinNorm(_Mine):
    eps_ball = False


def test_a_new_attack_gets_the_check_from_the_base():
    x, y = _data()
    with pytest.raises(ValueError, match=r"allow_large_eps=True to Mine"):
        _Mine(_model(), eps=8)
    _Mine(_model(), eps=8, allow_large_eps=True).run(x, y)
    with pytest.raises(ValueError, match=r"\(L2, 64 values per input\)"):
        _Mine(_model(), eps=9, norm="L2").run(x, y)
    with pytest.raises(ValueError, match=r"\(Linf\)"):
        _MineNoNorm(_model(), eps=8)          # no norm: an L∞ radius
    _MineMinNorm(_model(), eps=8).run(x, y)   # eps_ball = False: no ball, nothing to check
    with pytest.raises(TypeError, match=r"allow_large_eps: expected True or False"):
        _Mine(_model(), allow_large_eps="yes")


def test_eval_helpers_pass_the_permission_on():
    x, y = _data()
    with pytest.raises(ValueError, match=r"^eps_list: 8 covers"):
        metrics.robust_accuracy_curve(_model(), x, y, [0.1, 8.0], steps=1)
    c = metrics.robust_accuracy_curve(_model(), x, y, [0.1, 8.0], steps=1, allow_large_eps=True)
    assert c["robust_accuracy"][1] == 0.0
    with pytest.raises(ValueError, match=r"^eps_list: 9 covers .*\(L2, 64 values per input\)"):
        metrics.robust_accuracy_curve(_model(), x, y, [1.0, 9.0], norm="L2", steps=1)
    # the masking check's whole-box budget is its point: never refused
    chk = masking.check_large_eps(_model(), x, y, "Linf", None, 2, warn=False)
    assert chk.details["eps"] == 1.0
    with pytest.raises(ValueError, match=r"^eps: 8 covers"):
        metrics.transfer_robustness(_model(), _model(), x, y, 8.0, steps=1)
    metrics.transfer_robustness(_model(), _model(), x, y, 8.0, steps=1, allow_large_eps=True)


def _fastadv(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "FASTADV_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastadv", *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_allow_large_eps_reaches_the_attacks(tmp_path):
    cheap = ["--data", "digits", "--n", "12", "--version", "custom", "--attacks", "apgd-ce", "--steps", "2",
             "--no-calibration", "--no-progress"]
    r = _fastadv("eval", *cheap, "--eps", "8", "--allow-large-eps", "--eps-curve", "0.05,8",
                 "--out", "big", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.load(open(tmp_path / "big" / "report.json"))
    assert rep["config"]["eps"] == 8.0
    assert rep["autoattack"]["robust_accuracy"] == 0.0           # by construction
    assert rep["eps_curve"]["robust_accuracy"][1] == 0.0
    # without the flag: one line naming the flag, nothing written
    r = _fastadv("eval", *cheap, "--eps", "8", "--out", "refused", cwd=tmp_path)
    assert r.returncode == 2 and "--allow-large-eps" in r.stderr and "8/255" in r.stderr
    assert not (tmp_path / "refused" / "report.json").exists()
    # a fraction is a budget in the inputs' units, accepted as it is
    r = _fastadv("eval", *cheap, "--eps", "8/255", "--out", "frac", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "frac" / "report.json"))["config"]["eps"] == pytest.approx(8 / 255)
