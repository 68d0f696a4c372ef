"""The trainer's accuracies never count a row with non-finite logits (NaN or inf) as correct
by its argmax (an all-NaN row's argmax is class 0), nor as fooled: evaluate's clean and PGD
accuracy, pgd_robust_mask / robust_mask, the overfitting guard's clean count and fit's
train accuracy."""
import warnings

import pytest
import torch
from torch import nn

from fastadv import data
from fastadv.train import AdversarialTrainer, pgd_robust_mask

B = 24
LABEL = 3   # the class the net predicts everywhere (a large margin: no eps here moves it)


class _NaNNet(nn.Module):
    """A linear net on 8x8 inputs predicting class LABEL, with all-NaN logits

    - for every input whose first pixel is above 0.5 (clean and perturbed alike), and
    - away from (L∞ > 1e-4) the reference points marked in ``poison`` (finite at the point
      itself, NaN at any perturbed point near it)."""

    def __init__(self, ref, poison):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        with torch.no_grad():
            self.lin.weight.mul_(0.01)
            self.lin.bias.zero_()
            self.lin.bias[LABEL] = 5.0
        self.register_buffer("ref", ref.clone())
        self.register_buffer("poison", poison.clone())

    def forward(self, x):
        z = self.lin(x.flatten(1))
        d = (x.flatten(1)[:, None, :] - self.ref.flatten(1)[None]).abs().amax(2)
        dist, j = d.min(1)
        bad = (x[:, 0, 0, 0] > 0.5) | ((dist > 1e-4) & self.poison[j])
        return torch.where(bad[:, None], torch.full_like(z, float("nan")), z)


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 1, 8, 8, generator=g) * 0.4
    always = torch.arange(B) % 4 == 0      # NaN at the clean point too: labelled 0, the NaN argmax
    near = torch.arange(B) % 4 == 1        # finite at the clean point, NaN at any other
    x[always, 0, 0, 0] = 1.0
    y = torch.full((B,), LABEL, dtype=torch.long)
    y[always] = 0
    return _NaNNet(x, near).eval(), x, y, always, near


def _trainer(model, eps=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return AdversarialTrainer(model, opt, method="fgsm_rs", eps=eps, seed=0)


def test_argmax_of_nan_rows_is_class_0():
    # the premise: counted by argmax, an all-NaN row labelled 0 is "correct"
    assert int(torch.full((1, 10), float("nan")).argmax(1)) == 0


def test_pgd_robust_mask_never_decides_on_nan():
    model, x, y, always, near = _setup()
    for restarts in (1, 2):
        mask = pgd_robust_mask(model, x, y, 0.05, steps=3, restarts=restarts,
                               generator=torch.Generator().manual_seed(0))
        # NaN clean logits: not correct, so not robust; NaN at the iterates: not fooled there
        assert torch.equal(mask, ~always), restarts


def test_evaluate_and_robust_mask_count_nan_rows_as_neither_correct_nor_fooled():
    model, x, y, always, near = _setup()
    tr = _trainer(model)
    loader = data.make_loader(x, y, batch_size=8, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # PGD says that points met NaN logits
        out = tr.evaluate(loader, steps=3)
        mask = tr.robust_mask(x, y, steps=3)
        mask2 = tr.robust_mask(x, y, steps=3, restarts=2)
    assert out["clean_acc"] == pytest.approx(1 - always.float().mean().item())
    assert out["robust_acc"] == pytest.approx(1 - always.float().mean().item())
    assert torch.equal(mask.cpu(), ~always) and torch.equal(mask2.cpu(), ~always)
    assert out["n"] == B


def test_fit_train_accuracy_and_guard_clean_count_leave_nan_rows_out():
    model, x, y, always, near = _setup()
    tr = _trainer(model)
    loader = data.make_loader(x, y, batch_size=8, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hist = tr.fit(loader, epochs=1, guard_size=B, guard_steps=2, verbose=False)
    rec = hist[-1]
    # at the training points (perturbed): the `always` rows and the `near` rows are NaN
    assert rec["train_adv_acc"] == pytest.approx(1 - (always | near).float().mean().item())
    # the guard's clean count: the `always` rows are NaN at the clean point
    assert rec["guard_clean_acc"] == pytest.approx(1 - always.float().mean().item())
    assert rec["robust_acc"] == pytest.approx(1 - always.float().mean().item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
