"""Evaluation metrics (hand-computed cases), the one-pass eps curve, calibration under attack,
transfer robustness, the report (resumable) and the ``fastadv eval`` command."""
import json
import math
import os

import pytest
import torch

import zoo
from fastadv.attacks import APGD
from fastadv.eval import metrics


@pytest.fixture(scope="module")
def mnist():
    model = zoo.mnist_cnn()
    _, (xt, yt) = zoo.mnist_split()
    return model, xt[200:232], yt[200:232]


# ------------------------------------------------------------ hand cases
def test_per_class_worst_case_and_summary():
    y = torch.tensor([0, 0, 1, 1, 2])
    clean = torch.tensor([True, True, True, False, True])
    a1 = torch.tensor([True, False, True, False, True])   # robust against attack 1
    a2 = torch.tensor([True, True, False, False, True])
    robust = metrics.worst_case({"a1": a1, "a2": a2})
    assert robust.tolist() == [True, False, False, False, True]
    pc = metrics.per_class_accuracy(robust, y, 4)
    assert pc[:3] == [0.5, 0.0, 1.0] and math.isnan(pc[3])
    fooled = {"a1": clean & ~a1, "a2": clean & a1 & ~a2}
    s = metrics.accuracy_summary(y, clean, robust, fooled, ["a1", "a2"], n_classes=3)
    assert s["clean_accuracy"] == pytest.approx(0.8) and s["robust_accuracy"] == pytest.approx(0.4)
    assert s["robust_accuracy_after"] == pytest.approx({"a1": 0.6, "a2": 0.4})
    assert s["fooled_by"] == {"a1": 1, "a2": 1}


def test_ece_hand_computed():
    # two classes; confidences 0.9 (one right, one wrong) and 0.6 (both right), 10 bins:
    # ECE = 0.5·|0.5 − 0.9| + 0.5·|1.0 − 0.6| = 0.4
    def logit(p):
        return [math.log(p), math.log(1 - p)]
    z = torch.tensor([logit(0.9), logit(0.9), logit(0.6), logit(0.6)])
    y = torch.tensor([0, 1, 0, 0])
    assert math.isclose(metrics.expected_calibration_error(z, y, n_bins=10), 0.4, abs_tol=1e-6)
    bins = metrics.calibration_bins(z, y, 10)
    assert bins["count"][9] == 2 and bins["count"][6] == 2
    assert math.isclose(bins["accuracy"][9], 0.5) and math.isclose(bins["confidence"][6], 0.6, rel_tol=1e-6)
    # perfectly calibrated: confidence 1 and always right
    assert metrics.expected_calibration_error(torch.tensor([[50.0, 0.0]] * 3), torch.zeros(3, dtype=torch.long)) < 1e-6


# ---------------------------------------------------------- on the model
def test_eps_curve_one_pass(mnist):
    model, x, y = mnist
    eps = [0.0, 0.05, 0.1, 0.3]
    c = metrics.robust_accuracy_curve(model, x, y, eps, steps=10, seed=0)
    acc = c["robust_accuracy"]
    assert c["eps"] == eps and len(acc) == 4
    assert math.isclose(acc[0], c["clean_accuracy"])                # eps 0: nothing moves
    assert all(a >= b for a, b in zip(acc, acc[1:]))               # non-increasing
    assert acc[-1] < 0.05  # a non-robust MNIST CNN at eps 0.3
    # one pass (APGD-CE + APGD-T) is at least as strong as a separate APGD-CE run per eps
    for e, a in zip(eps[1:], acc[1:]):
        sep = 1 - APGD(model, eps=e, steps=10, seed=0).run(x, y).success.float().mean().item()
        assert a <= sep + 1 / len(x) + 1e-9


def test_calibration_under_attack(mnist):
    model, x, y = mnist
    xa = APGD(model, eps=0.15, steps=10, seed=0)(x, y)
    cal = metrics.calibration_under_attack(model, x, y, xa, n_bins=10)
    assert cal["adversarial"]["accuracy"] < cal["clean"]["accuracy"]
    # fooled yet confident: the model is much worse calibrated under attack
    assert cal["adversarial"]["ece"] > cal["clean"]["ece"]
    assert sum(cal["clean"]["bins"]["count"]) == len(x)


def test_transfer_is_weaker_than_white_box(mnist):
    model, x, y = mnist
    surrogate = zoo.mnist_cnn_surrogate()
    tr = metrics.transfer_robustness(surrogate, model, x, y, eps=0.15, steps=10)
    white = 1 - APGD(model, eps=0.15, steps=10, seed=0).run(x, y).success.float().mean().item()
    assert tr["surrogate_robust_accuracy"] <= tr["transfer_robust_accuracy"]
    assert white <= tr["transfer_robust_accuracy"]
    assert tr["transfer_robust_accuracy"] <= tr["target_clean_accuracy"]
    assert 0 <= tr["transfer_success_rate"] <= 1


# ------------------------------------------------------------ the report
def test_report_writes_and_resumes(mnist, tmp_path, monkeypatch):
    from fastadv.eval import report
    model, x, y = mnist
    x, y = x[:12], y[:12]
    state = str(tmp_path / "state.json")
    kw = dict(norm="Linf", eps=0.1, steps=5, n_queries=20, eps_curve=[0.05, 0.1], eps_curve_steps=5,
              smoothing_sigma=0.25, smoothing_n=50, smoothing_points=4, state_path=state,
              progress=False, log=lambda s: None, masking_checks=False)
    rep = report.evaluate(model, x, y, **kw)
    paths = report.write_report(rep, str(tmp_path / "out"))
    md = open(paths["markdown"]).read()
    assert "robust (worst case over all attacks)" in md and "Robust accuracy vs eps" in md
    assert "Certified robustness" in md and "Calibration under attack" in md
    data = json.load(open(paths["json"]))
    assert data["autoattack"]["robust_accuracy"] == rep["autoattack"]["robust_accuracy"]
    for name in ("eps_curve.png", "reliability.png", "certified.png", "per_class.png"):
        assert os.path.getsize(str(tmp_path / "out" / name)) > 1000
    # a second run with the same state resumes: finished sections are not computed again
    def boom(*a, **k):
        raise AssertionError("recomputed a finished section")
    monkeypatch.setattr(report.metrics, "robust_accuracy_curve", boom)
    monkeypatch.setattr(report.smoothing, "certify", boom)
    rep2 = report.evaluate(model, x, y, **kw)
    assert rep2["eps_curve"] == rep["eps_curve"] and rep2["smoothing"] == rep["smoothing"]
    assert rep2["autoattack"]["robust_accuracy"] == rep["autoattack"]["robust_accuracy"]


def test_eval_command(mnist, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from fastadv import cli
    model, _, _ = mnist
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "mynet.py").write_text("from fastadv.models import SmallCNN\n\n"
                                       "def make():\n    return SmallCNN(width=16)\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rep"
    rc = cli.main(["eval", "--model", "mynet:make", "--weights", "w.safetensors", "--n", "10",
                   "--eps", "0.1", "--steps", "5", "--n-queries", "10", "--no-checks", "--no-progress",
                   "--out", str(out)])
    assert rc == 0
    rep = json.load(open(out / "report.json"))
    assert rep["config"]["model"] == "mynet:make" and rep["config"]["n"] == 10
    assert 0 <= rep["autoattack"]["robust_accuracy"] <= rep["autoattack"]["clean_accuracy"]
    assert (out / "state.json").exists()
