"""Bad input to the evaluation layer (AutoAttack, report, smoothing, metrics, ``fastadv eval``):
a clear error naming the argument, and no saved result reused for other data or settings."""
import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

import fastadv as fa
from fastadv.eval import metrics as M
from fastadv.eval import report
from fastadv.eval import smoothing as S


def _net(classes=10, channels=1, seed=123):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, classes)).eval()


def _data(n=8, channels=1, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 6, 6, generator=g), torch.randint(0, classes, (n,), generator=g)


_AA = dict(eps=0.03, steps=3, n_queries=5, version="custom", attacks_to_run=["apgd-ce"], seed=0, checks=False)


# ------------------------------------------------------------- AutoAttack resume
def _aa_clean_predictions():
    model = _net(channels=3)
    x, _ = _data(16, channels=3)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point clean-correct without normalization
    return model, x, y


def test_autoattack_resume_refuses_a_state_saved_under_another_normalization(tmp_path):
    model, x, y = _aa_clean_predictions()
    path = str(tmp_path / "aa.pt")
    fa.AutoAttack(model, **_AA).run_standard_evaluation(x, y, state_path=path)
    norm = ([0.9, 0.1, 0.5], [0.05, 0.5, 0.1])
    resumed = fa.AutoAttack(model, normalization=norm, **_AA)
    with pytest.warns(UserWarning, match=r"other data or settings \(normalization changed\)"):
        resumed.run_standard_evaluation(x, y, state_path=path)
    fresh = fa.AutoAttack(model, normalization=norm, **_AA)
    fresh.run_standard_evaluation(x, y)
    assert resumed.robust_accuracy <= resumed.clean_accuracy
    assert (resumed.clean_accuracy, resumed.robust_accuracy) == (fresh.clean_accuracy, fresh.robust_accuracy)


@pytest.mark.parametrize("change, what", [
    (dict(seed=1), "seed"),
    (dict(lower=-1.0), "bounds"),
    (dict(steps=4), "steps"),
    (dict(eps=0.05), "eps"),
])
def test_autoattack_resume_names_the_changed_setting(tmp_path, change, what):
    model, x, y = _aa_clean_predictions()
    path = str(tmp_path / "aa.pt")
    fa.AutoAttack(model, **_AA).run_standard_evaluation(x, y, state_path=path)
    with pytest.warns(UserWarning, match=what):
        fa.AutoAttack(model, **dict(_AA, **change)).run_standard_evaluation(x, y, state_path=path)


def test_autoattack_resume_sees_weights_that_keep_their_moments(tmp_path):
    # permuted weights: same sum and sum of squares, another model
    model, x, y = _aa_clean_predictions()
    path = str(tmp_path / "aa.pt")
    fa.AutoAttack(model, **_AA).run_standard_evaluation(x, y, state_path=path)
    with torch.no_grad():
        w = model[3].weight
        w.copy_(w.flip(1))
    with pytest.warns(UserWarning, match=r"\(model changed\)"):
        fa.AutoAttack(model, **_AA).run_standard_evaluation(x, y, state_path=path)
    # unchanged: resumed silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.AutoAttack(model, **_AA).run_standard_evaluation(x, y, state_path=path)


@pytest.mark.filterwarnings("ignore:fastadv. the model is a plain callable:RuntimeWarning")
def test_autoattack_resume_is_refused_for_a_plain_callable(tmp_path):
    model, x, y = _aa_clean_predictions()
    path = str(tmp_path / "aa.pt")
    with pytest.warns(UserWarning, match="state_path=.* ignored.*plain callable"):
        fa.AutoAttack(lambda t: model(t), **_AA).run_standard_evaluation(x, y, state_path=path)
    assert not os.path.exists(path)


# ------------------------------------------------------------- AutoAttack arguments
@pytest.mark.parametrize("kw, err, msg", [
    (dict(steps=2.7), TypeError, "steps"), (dict(steps="5"), TypeError, "steps"),
    (dict(steps=True), TypeError, "steps"), (dict(steps=0), ValueError, "steps"),
    (dict(n_queries=0), ValueError, "n_queries"), (dict(n_classes=1), ValueError, "n_classes"),
    (dict(n_classes=2.0), TypeError, "n_classes"),
    (dict(version="custom", attacks_to_run="apgd-ce"), TypeError, "attacks_to_run"),
    (dict(version="custom", attacks_to_run=["apgd-ce", "apgd-ce"]), ValueError, "attacks_to_run"),
])
def test_autoattack_rejects_bad_constructor_arguments(kw, err, msg):
    with pytest.raises(err, match=msg):
        fa.AutoAttack(_net(), **kw)


@pytest.mark.parametrize("bs, err", [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_autoattack_rejects_bad_bs(bs, err):
    x, y = _data(4)
    with pytest.raises(err, match="bs"):
        fa.AutoAttack(_net(), **_AA).run_standard_evaluation(x, y, bs=bs)


def test_autoattack_mismatched_n_classes_warns():
    x, y = _data(4)
    with pytest.warns(RuntimeWarning, match="n_classes=5 given.*10 classes"):
        fa.AutoAttack(_net(), n_classes=5, **_AA).run_standard_evaluation(x, y)


def test_autoattack_few_classes_says_what_to_run_instead():
    x, y = _data(4, classes=3)
    with pytest.raises(ValueError) as info:
        fa.AutoAttack(_net(classes=3), eps=0.03, steps=2, n_queries=3).run_standard_evaluation(x, y)
    msg = str(info.value)
    assert "loss='ce'" not in msg and "apgd-t" in msg
    assert "version='custom', attacks_to_run=['apgd-ce', 'fab-t', 'square']" in msg
    # and the suggestion works
    aa = fa.AutoAttack(_net(classes=3), eps=0.03, steps=2, n_queries=3, version="custom",
                       attacks_to_run=["apgd-ce", "fab-t", "square"], checks=False)
    aa.run_standard_evaluation(x, y)
    assert 0 <= aa.robust_accuracy <= aa.clean_accuracy


# ------------------------------------------------------------- report state
_EV = dict(eps=0.03, steps=2, n_queries=3, version="custom", attacks_to_run=["apgd-ce"], bs=8,
           progress=False, masking_checks=False, smoothing_n0=5, smoothing_n=20)


def test_report_recomputes_sections_saved_for_other_data(tmp_path):
    model = _net()
    x1, y1 = _data(6, seed=1)
    x2, y2 = _data(6, seed=2)
    state = str(tmp_path / "state.json")
    report.evaluate(model, x1, y1, state_path=state, smoothing_sigma=0.25, log=lambda s: None, **_EV)
    lines = []
    with pytest.warns(UserWarning, match="data changed"):  # AutoAttack's own state file
        resumed = report.evaluate(model, x2, y2, state_path=state, smoothing_sigma=0.25, log=lines.append, **_EV)
    fresh = report.evaluate(model, x2, y2, smoothing_sigma=0.25, log=lambda s: None, **_EV)
    for sec in ("calibration", "smoothing"):
        assert resumed[sec] == fresh[sec]
    said = [s for s in lines if "recomputing" in s]
    assert len(said) == 1 and "calibration (data changed)" in said[0] and "smoothing (data changed)" in said[0]
    saved = json.load(open(state))
    assert saved["sections"]["smoothing"] == json.loads(json.dumps(fresh["smoothing"]))


def test_report_recomputes_only_the_section_whose_settings_changed(tmp_path, monkeypatch):
    model = _net()
    x, y = _data(6)
    state = str(tmp_path / "state.json")
    report.evaluate(model, x, y, state_path=state, smoothing_sigma=0.25, log=lambda s: None, **_EV)

    def boom(*a, **k):
        raise AssertionError("recomputed calibration although nothing it depends on changed")
    monkeypatch.setattr(report.metrics, "calibration_under_attack", boom)
    lines = []
    rep = report.evaluate(model, x, y, state_path=state, smoothing_sigma=1.0, log=lines.append, **_EV)
    assert rep["smoothing"]["sigma"] == 1.0
    assert any("smoothing (sigma changed)" in s for s in lines)


def test_report_uses_the_normalization_in_every_section():
    model = _net(channels=3)
    x, _ = _data(8, channels=3)
    norm = ([0.9, 0.1, 0.5], [0.05, 0.5, 0.1])
    with torch.no_grad():
        y = model((x - torch.tensor(norm[0]).view(1, 3, 1, 1)) / torch.tensor(norm[1]).view(1, 3, 1, 1)).argmax(1)
    rep = report.evaluate(model, x, y, normalization=norm, calibration=True, log=lambda s: None,
                          smoothing_sigma=0.01, smoothing_alpha=0.1, **_EV)
    assert rep["autoattack"]["clean_accuracy"] == 1.0
    assert rep["calibration"]["clean"]["accuracy"] == 1.0
    # tiny noise: the smoothed classifier agrees with the (normalized) base classifier
    assert rep["smoothing"]["certified_accuracy"][0] > 0.5


@pytest.mark.parametrize("kw, msg", [
    (dict(smoothing_sigma=-1.0), "smoothing_sigma"), (dict(smoothing_sigma=0.0), "smoothing_sigma"),
    (dict(smoothing_sigma=0.25, smoothing_n=0), "smoothing_n"),
    (dict(smoothing_sigma=0.25, smoothing_alpha=5), "smoothing_alpha"),
    (dict(smoothing_sigma=0.25, smoothing_radii=[float("nan")]), "smoothing_radii"),
    (dict(eps_curve=[0.1, float("nan")]), "eps_list"), (dict(eps_curve="0.1"), "eps_list"),
    (dict(bs=0), "bs"), (dict(n_classes=3), "n_classes"),
])
def test_report_checks_its_arguments_before_autoattack(kw, msg, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("AutoAttack ran before the arguments were checked")
    monkeypatch.setattr(report.sharded, "run_standard_evaluation_sharded", boom)
    x, y = _data(6)
    y[0] = 7
    with pytest.raises((ValueError, TypeError), match=msg):
        report.evaluate(_net(), x, y, **dict(_EV, log=lambda s: None, **kw))


# ------------------------------------------------------------- smoothing
class _NaNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(36, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)) * float("nan")


@pytest.mark.parametrize("sigma, err", [(float("inf"), ValueError), (float("nan"), ValueError),
                                        (0.0, ValueError), (-1.0, ValueError), ("0.25", TypeError)])
def test_smoothing_rejects_bad_sigma(sigma, err):
    x, _ = _data(2)
    with pytest.raises(err, match="sigma"):
        S.certify(_net(), x, sigma, n0=5, n=10)
    with pytest.raises(err, match="sigma"):
        S.predict(_net(), x, sigma, n=10)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(n0=0), ValueError, "n0"), (dict(n=0), ValueError, "n:"), (dict(n=2.5), TypeError, "n:"),
    (dict(alpha=5.0), ValueError, "alpha"), (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(batch_size=0), ValueError, "batch_size"),
])
def test_smoothing_rejects_bad_counts_and_levels(kw, err, msg):
    x, _ = _data(2)
    args = dict(dict(n0=5, n=10), **kw)
    with pytest.raises(err, match=msg):
        S.certify(_net(), x, 0.25, **args)
    if "n0" not in kw:
        args.pop("n0")
        with pytest.raises(err, match=msg):
            S.predict(_net(), x, 0.25, **args)


def test_smoothing_refuses_non_finite_logits_and_non_tensors():
    x, _ = _data(2)
    with pytest.raises(ValueError, match="non-finite logits"):
        S.certify(_NaNNet(), x, 0.25, n0=5, n=10)
    with pytest.raises(ValueError, match="logits of shape"):
        S.certify(lambda t: (_net()(t),), x, 0.25, n0=5, n=10)
    with pytest.raises(TypeError, match="floating"):
        S.certify(_net(), (x * 255).to(torch.uint8), 0.25, n0=5, n=10)


def test_smoothing_empty_batch_gives_empty_results():
    x, _ = _data(2)
    pred, radius = S.certify(_net(), x[:0], 0.25, n0=5, n=10)
    assert pred.shape == (0,) and radius.shape == (0,) and pred.dtype == torch.long
    assert S.predict(_net(), x[:0], 0.25, n=10).shape == (0,)


def test_smoothing_normalization_is_the_model_seeing_normalized_input():
    model = _net(channels=3)
    x, _ = _data(3, channels=3)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]
    inner = nn.Sequential()
    inner.forward = lambda t: model((t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    a = S.certify(model, x, 0.1, n0=5, n=20, normalization=(mean, std))
    b = S.certify(inner, x, 0.1, n0=5, n=20)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="normalization"):
        S.certify(model, x, 0.1, n0=5, n=20, normalization=([0.5], [0.0]))


def test_certified_accuracy_checks_shapes():
    pred, r = torch.tensor([1, 2, 3]), torch.tensor([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="y: expected shape"):
        S.certified_accuracy(pred, r, torch.tensor([[1], [2], [3]]), [0.0])
    with pytest.raises(ValueError, match="y: expected shape"):
        S.certified_accuracy(pred, r, torch.tensor([1, 2]), [0.0])
    with pytest.raises(ValueError, match="radius"):
        S.certified_accuracy(pred, r[:2], torch.tensor([1, 2, 3]), [0.0])
    out = S.certified_accuracy(pred, r, torch.tensor([1, 2, 0]), [0.0, 0.6])
    assert out["certified_accuracy"] == pytest.approx([2 / 3, 0.0])


# ------------------------------------------------------------- metrics
def test_calibration_metrics_reject_bad_input():
    z, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="logits: expected finite"):
        M.expected_calibration_error(torch.full((4, 10), float("nan")), y)
    with pytest.raises(ValueError, match="n_bins"):
        M.expected_calibration_error(z, y, n_bins=0)
    with pytest.raises(ValueError, match="y: expected shape"):
        M.expected_calibration_error(z, y[:, None])
    x, yy = _data(3)
    with pytest.raises(ValueError, match="x_adv"):
        M.calibration_under_attack(_net(), x, yy, x[:2])


def test_accuracy_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="labels >= 0"):
        M.per_class_accuracy(torch.tensor([True, False]), torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="n_classes=3"):
        M.per_class_accuracy(torch.tensor([True, False]), torch.tensor([0, 5]), n_classes=3)
    with pytest.raises(ValueError, match="robust_per_attack"):
        M.worst_case({})
    with pytest.raises(ValueError, match="clean_correct"):
        M.accuracy_summary(torch.tensor([0, 1, 2]), torch.tensor([True, False]), torch.tensor([True, False, True]))
    assert M.per_class_accuracy(torch.tensor([True, False, True]), torch.tensor([0, 0, 2])) == \
        pytest.approx([0.5, math.nan, 1.0], nan_ok=True)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(eps_list=[0.1, float("nan")]), ValueError, "eps_list"),
    (dict(eps_list=[0.1, float("inf")]), ValueError, "eps_list"),
    (dict(eps_list="0.1"), TypeError, "eps_list"), (dict(eps_list=[]), ValueError, "eps_list"),
    (dict(eps_list=[0.1], attacks=()), ValueError, "attacks"),
    (dict(eps_list=[0.1], attacks="apgd-ce"), TypeError, "attacks"),
    (dict(eps_list=[0.1], bs=0), ValueError, "bs"),
])
def test_eps_curve_rejects_bad_arguments(kw, err, msg):
    x, y = _data(3)
    with pytest.raises(err, match=msg):
        M.robust_accuracy_curve(_net(), x, y, steps=2, **kw)


# ------------------------------------------------------------- the command line
@pytest.mark.parametrize("argv, flag", [
    (["--n", "0"], "--n/--points:"), (["--points", "0"], "--n/--points:"), (["--bs", "0"], "--bs:"), (["--steps", "0"], "--steps:"),
    (["--normalization", "0.5"], "--normalization:"), (["--normalization", "0.5;0"], "--normalization:"),
    (["--normalization", "0.5,0.4;0.2"], "--normalization:"),
    (["--smoothing-sigma", "-1"], "--smoothing-sigma:"), (["--smoothing-alpha", "2"], "--smoothing-alpha:"),
    (["--eps", "nan"], "--eps:"), (["--eps-curve", "0.1,x"], "--eps-curve:"),
    (["--attacks", "apgd-ce"], "--attacks:"), (["--version", "custom"], "--attacks:"),
    (["--version", "custom", "--attacks", "pgd"], "--attacks:"), (["--weights", "w.pt"], "--weights:"),
    (["--model", "no_such_module_here:make"], "--model:"), (["--model", "os:getcwd"], "--model:"),
])
def test_eval_command_bad_flags_exit_2_with_one_line(argv, flag, tmp_path, capsys, monkeypatch):
    from fastadv import cli
    from fastadv.eval import report as rep_mod

    def boom(*a, **k):
        raise AssertionError("the evaluation started before the flags were checked")
    monkeypatch.setattr(rep_mod, "evaluate", boom)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["eval", *argv, "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"fastadv eval: {flag}"), err


def test_report_total_time_counts_the_sections_it_reused(tmp_path):
    model = _net()
    x, y = _data(6)
    state = str(tmp_path / "state.json")
    kw = dict(_EV, smoothing_sigma=0.25, smoothing_n=400, log=lambda s: None)
    first = report.evaluate(model, x, y, state_path=state, **kw)
    assert "resumed" not in first
    spent = json.load(open(state))["times"]
    assert spent["smoothing"] > 0 and first["total_s"] >= sum(spent.values())
    again = report.evaluate(model, x, y, state_path=state, **kw)
    assert again.get("resumed") is True and again["total_s"] >= sum(spent.values())
    # only AutoAttack's settings changed: the smoothing section (and its time) is reused
    with pytest.warns(UserWarning, match="steps changed"):
        other = report.evaluate(model, x, y, state_path=state, **dict(kw, steps=3))
    assert other.get("resumed") is True and other["total_s"] >= spent["smoothing"]
    assert other["smoothing"] == first["smoothing"]
