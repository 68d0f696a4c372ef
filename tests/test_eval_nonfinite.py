"""The evaluation metrics never count a row of non-finite logits (NaN or inf) as correct or as
fooled, as the attacks do (``finite_rows``): torch's argmax takes a NaN for the largest entry,
so a raw ``argmax == y`` would. Tiny linear models on 8 features: nothing here is slow."""
import math

import pytest
import torch
from torch import nn

import fastadv
from fastadv.eval import metrics, report

NAN = float("nan")


class _Sentinel(nn.Module):
    """A linear classifier whose logit 0 is NaN where feature 0 is above 0.95 (clean points
    put there) or feature 1 is above 0.9 (points an attack reaches from 0.8): torch's argmax
    then says class 0."""

    def __init__(self, d=8, k=4):
        super().__init__()
        self.lin = nn.Linear(d, k)
        with torch.no_grad():   # class c: feature 2 + c is the largest (every class occurs)
            self.lin.weight.zero_()
            self.lin.bias.zero_()
            self.lin.weight[torch.arange(k), 2 + torch.arange(k)] = 4.0

    def forward(self, x):
        z = self.lin(x.flatten(1))
        bad = (x.flatten(1)[:, 0] > 0.95) | (x.flatten(1)[:, 1] > 0.9)
        return torch.where(bad[:, None] & (torch.arange(z.shape[1]) == 0), torch.full_like(z, NAN), z)


class _NaNOffReference(nn.Module):
    """``net``, with logit 0 NaN at any input that is not one of the poisoned reference points."""

    def __init__(self, net, ref, poison):
        super().__init__()
        self.net = net
        self.register_buffer("ref", ref.clone())
        self.register_buffer("poison", poison.clone())

    def forward(self, x):
        z = self.net(x)
        d = (x.flatten(1)[:, None, :] - self.ref.flatten(1)[None]).abs().amax(2)
        dist, j = d.min(1)
        bad = (dist > 1e-6) & self.poison[j]
        return torch.where(bad[:, None] & (torch.arange(z.shape[1]) == 0), torch.full_like(z, NAN), z)


def test_predictions_mark_nonfinite_rows():
    z = torch.tensor([[NAN, 1.0, 2.0], [math.inf, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, -math.inf]])
    y = torch.tensor([0, 0, 1, 2])
    assert (z.argmax(1) == y).tolist() == [True, True, True, False]   # what a raw argmax counts
    assert metrics.predictions(z).tolist() == [-1, -1, 1, -1]
    assert (metrics.predictions(z) == y).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="logits"):
        metrics.predictions(torch.zeros(3))


def _points(n=32, d=8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, d, generator=g) * 0.5


def test_calibration_counts_nonfinite_rows_as_wrong_and_leaves_them_out_of_the_bins():
    model = _Sentinel()
    x = _points()
    x_adv = x.clone()
    with torch.no_grad():
        y = model.lin(x).argmax(1)            # every finite clean row is right
    bad_clean = torch.arange(32) % 4 == 0
    x[bad_clean, 0] = 1.0                     # NaN logits on these clean points ...
    y[bad_clean] = 0                          # ... whose label a raw argmax would match
    bad_adv = (y == 0) & ~bad_clean           # NaN logits on these adversarial ones, label 0 too
    k = int(bad_adv.sum())
    assert k >= 2
    x_adv[bad_adv, 1] = 1.0
    with pytest.warns(RuntimeWarning, match=rf"calibration_under_attack: .*8 of 32 clean inputs and {k} of "
                                            r"32 adversarial inputs"):
        cal = metrics.calibration_under_attack(model, x, y, x_adv, n_bins=10)
    assert cal["clean"]["nonfinite"] == 8 and cal["adversarial"]["nonfinite"] == k
    assert cal["clean"]["accuracy"] == pytest.approx(24 / 32)
    with torch.no_grad():
        right_adv = (model.lin(x_adv).argmax(1) == y) & ~bad_adv
    assert cal["adversarial"]["accuracy"] == pytest.approx(right_adv.float().mean().item())
    assert sum(cal["clean"]["bins"]["count"]) == 24 and sum(cal["adversarial"]["bins"]["count"]) == 32 - k
    assert math.isfinite(cal["clean"]["ece"]) and math.isfinite(cal["clean"]["mean_confidence"])


def test_transfer_counts_a_nonfinite_transferred_point_neither_robust_nor_fooled():
    net = _Sentinel().lin
    x = _points()
    with torch.no_grad():
        y = net(x).argmax(1)                  # all clean-correct
    poison = torch.arange(32) % 2 == 0
    target = _NaNOffReference(net, x, poison)
    surrogate = nn.Sequential(net)            # the same weights: white-box-strength transfer
    atk = fastadv.FGSM(surrogate, eps=0.2)
    x_adv = atk(x, y)
    with torch.no_grad():
        pred = net(x_adv).argmax(1)
    assert bool(((y == 0) & poison).any()) and bool(((y != 0) & poison).any())   # both cases occur
    with pytest.warns(RuntimeWarning, match=r"transfer_robustness: .*16 of 32 target transferred inputs"):
        tr = metrics.transfer_robustness(surrogate, target, x, y, eps=0.2, attack=atk)
    assert tr["nonfinite"] == {"target_clean": 0, "target_transferred": 16, "surrogate_adversarial": 0}
    robust = ~poison & (pred == y)            # a poisoned point is never robust ...
    fooled = ~poison & (pred != y)            # ... and never fooled
    assert tr["target_clean_accuracy"] == 1.0
    assert tr["transfer_robust_accuracy"] == pytest.approx(robust.float().mean().item())
    assert tr["transfer_success_rate"] == pytest.approx(fooled.float().mean().item())
    assert tr["surrogate_robust_accuracy"] == pytest.approx((pred == y).float().mean().item())


def test_eps_curve_does_not_count_a_nonfinite_clean_point_robust():
    model = _Sentinel()
    x = _points(16)
    bad_clean = torch.arange(16) % 4 == 0
    x[bad_clean, 0] = 1.0
    near = torch.arange(16) % 4 == 1
    x[near, 1] = 0.8                          # an attack at eps 0.2 can step into NaN logits here
    with torch.no_grad():
        y = model.lin(x).argmax(1)
    y[bad_clean] = 0                          # a raw argmax would call them clean-correct
    with pytest.warns(RuntimeWarning, match=r"robust_accuracy_curve: .*4 of 16 clean points"):
        c = metrics.robust_accuracy_curve(model, x, y, [0.0, 0.2], attacks=("apgd-ce",), steps=5, seed=0,
                                          lower=0.0, upper=1.0)
    assert c["nonfinite"]["clean"] == 4
    assert c["clean_accuracy"] == pytest.approx(12 / 16)
    assert not c["robust"][bad_clean].any()
    assert c["robust_accuracy"][0] == pytest.approx(12 / 16)
    assert c["nonfinite"]["attacked"] >= 1   # the attack met the NaN region near feature 1


def test_report_says_how_many_rows_were_nonfinite(tmp_path):
    rep = {"config": {"n": 4, "norm": "Linf", "eps": 0.1, "version": "custom", "seed": 0},
           "autoattack": {"n": 4, "clean_accuracy": 0.75, "robust_accuracy": 0.5, "time_s": {"apgd-ce": 0.1},
                          "per_class": {"clean": [1.0], "robust": [0.5]}, "nonfinite": 2},
           "calibration": {k: {"accuracy": 0.5, "mean_confidence": 0.9, "ece": 0.1, "nonfinite": n,
                               "bins": {"edges": [0, 0.5, 1], "count": [0, 2], "confidence": [0, 0.9],
                                        "accuracy": [0, 0.5]}} for k, n in (("clean", 1), ("adversarial", 3))},
           "transfer": {"white_box_robust_accuracy": 0.5, "transfer_robust_accuracy": 0.5,
                        "surrogate_robust_accuracy": 0.25, "nonfinite": {"target_transferred": 2}}}
    md = open(report.write_report(rep, str(tmp_path))["markdown"]).read()
    assert "non-finite logits (NaN or inf)** at points tried for 2 of 4 inputs" in md
    assert "Non-finite logits (NaN or inf) on 1 clean and 3 adversarial inputs" in md
    assert "target transferred 2" in md
