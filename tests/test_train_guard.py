"""The catastrophic-overfitting guard: a collapse of PGD accuracy on the held-out batch is
reported, the best weights are kept on disk and put back; and no collapse happens at a
method's recommended settings."""
import math
import warnings

import pytest
import torch

from fastadv import data, models
from fastadv.train import AdversarialTrainer
from fastadv.train.checkpoint import load_weights


def _setup(method="fgsm_rs", eps=0.1):
    x, y = data.load_digits()
    torch.manual_seed(0)
    model = models.SmallCNN(width=4, input_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tr = AdversarialTrainer(model, opt, method=method, eps=eps, seed=0)
    return tr, model, data.make_loader(x[:256], y[:256], batch_size=64), \
        data.make_loader(x[256:356], y[256:356], batch_size=100, shuffle=False)


def _scripted_robustness(monkeypatch, fractions):
    """The guard's PGD verdicts follow a script (fractions of the guard batch robust)."""
    seq = iter(fractions)

    def fake(self, x, y, eps=None, steps=10, restarts=1, seed=0):
        k = round(next(seq) * x.shape[0])
        m = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        m[:k] = True
        return m

    monkeypatch.setattr(AdversarialTrainer, "robust_mask", fake)


def test_collapse_reported_best_kept_and_restored(tmp_path, monkeypatch):
    tr, model, loader, val = _setup()
    _scripted_robustness(monkeypatch, [0.30, 0.50, 0.45, 0.10])
    snapshots = {}

    def on_batch_end(trainer, epoch, b):
        if b == len(loader):
            snapshots[epoch + 1] = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.warns(RuntimeWarning, match="catastrophic overfitting at epoch 4"):
        hist = tr.fit(loader, epochs=4, val_loader=val, checkpoint_dir=str(tmp_path),
                      guard_size=100, verbose=False, on_batch_end=on_batch_end)
    assert [r["collapse"] for r in hist] == [False, False, False, True]
    assert [r["best"] for r in hist] == [True, True, False, False]
    assert hist.collapsed and hist.collapsed_epochs == [4]
    assert hist.best_epoch == 2 and hist.best_robust_acc == pytest.approx(0.5)
    best = load_weights(str(tmp_path / "best.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k]), "the model was not restored to the best epoch"
        assert torch.equal(best[k], snapshots[2][k])


def test_no_restore_without_collapse_and_stop_on_collapse(monkeypatch):
    tr, model, loader, val = _setup()
    _scripted_robustness(monkeypatch, [0.30, 0.50, 0.45])
    tr.fit(loader, epochs=3, val_loader=val, guard_size=100, verbose=False)
    last = {k: v.clone() for k, v in model.state_dict().items()}
    assert not tr.history.collapsed
    # a drop smaller than co_drop is not a collapse; the weights stay the last epoch's
    assert torch.equal(last["features.0.weight"], model.state_dict()["features.0.weight"])

    tr2, _, loader, val = _setup()
    _scripted_robustness(monkeypatch, [0.6, 0.1, 0.5, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hist = tr2.fit(loader, epochs=4, val_loader=val, guard_size=100, verbose=False,
                       stop_on_collapse=True)
    assert len(hist) == 2 and hist[-1]["collapse"]


def test_records_have_the_promised_fields():
    tr, _, loader, val = _setup()
    hist = tr.fit(loader, epochs=1, val_loader=val, guard_size=50, guard_steps=3, verbose=False)
    r = hist[0]
    for k in ("epoch", "lr", "train_loss", "train_adv_acc", "val_clean_acc", "robust_acc",
              "guard_clean_acc", "time", "eval_time", "peak_mem_mb", "collapse", "best"):
        assert k in r, k
    assert 0 <= r["robust_acc"] <= r["guard_clean_acc"] <= 1
    assert r["time"] > 0 and r["peak_mem_mb"] > 0


# ------------------------------------------------------------------ a model the guard cannot attack
class _Gated(torch.nn.Module):
    """A net whose output stops depending on x when ``open`` is set to 0, as a model does
    whose training collapsed (seen with TRADES and MART under SGD lr 0.05, momentum 0.9,
    a cyclic schedule): the guard's PGD then finds a zero input gradient everywhere."""

    def __init__(self):
        super().__init__()
        self.net = models.SmallCNN(width=4, input_size=8)
        self.register_buffer("open", torch.ones(()))

    def forward(self, x):
        return self.net(x * self.open)


def _gated_setup():
    x, y = data.load_digits()
    torch.manual_seed(0)
    model = _Gated()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tr = AdversarialTrainer(model, opt, method="fgsm_rs", eps=0.1, seed=0)
    loader = data.make_loader(x[:128], y[:128], batch_size=64)
    val = data.make_loader(x[256:288], y[256:288], batch_size=32, shuffle=False)
    return tr, model, loader, val


def _close_after_epoch(n_epoch, n_batches):
    def on_batch_end(trainer, epoch, b):
        if epoch + 1 == n_epoch and b == n_batches:
            trainer.module.open.zero_()
    return on_batch_end


def test_guard_reports_a_model_it_cannot_attack_as_a_collapse_and_goes_on():
    tr, model, loader, val = _gated_setup()
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting at epoch 2: the guard's PGD cannot "
                                            "attack the model.*input gradient is zero") as rec:
        hist = tr.fit(loader, epochs=3, val_loader=val, guard_size=32, guard_steps=2, verbose=False,
                      on_batch_end=_close_after_epoch(2, len(loader)))
    assert len([w for w in rec if "catastrophic" in str(w.message)]) == 1   # once per collapse
    assert [r["epoch"] for r in hist] == [1, 2, 3]                          # training went on
    assert [r["collapse"] for r in hist] == [False, True, True]
    assert hist.collapsed_epochs == [2, 3] and hist.best_epoch == 1
    assert all(math.isnan(r["robust_acc"]) and "zero" in r["guard_error"] for r in hist[1:])
    assert 0 <= hist[0]["robust_acc"] <= 1 and "guard_error" not in hist[0]
    assert model.open.item() == 1.0    # the best (epoch 1) weights and buffers were put back

    tr, model, loader, val = _gated_setup()
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting at epoch 2"):
        hist = tr.fit(loader, epochs=3, val_loader=val, guard_size=32, guard_steps=2, verbose=False,
                      on_batch_end=_close_after_epoch(2, len(loader)), stop_on_collapse=True)
    assert [r["epoch"] for r in hist] == [1, 2]


def test_resuming_after_such_a_collapse_goes_on(tmp_path):
    tr, model, loader, val = _gated_setup()
    with pytest.warns(RuntimeWarning, match="epoch 1: the guard's PGD cannot attack"):
        tr.fit(loader, epochs=1, val_loader=val, guard_size=32, guard_steps=2, verbose=False,
               checkpoint_dir=str(tmp_path), on_batch_end=_close_after_epoch(1, len(loader)))
    tr, model, loader, val = _gated_setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # an ongoing collapse is not warned about again
        hist = tr.fit(loader, epochs=3, val_loader=val, guard_size=32, guard_steps=2, verbose=False,
                      checkpoint_dir=str(tmp_path))
    assert [r["collapse"] for r in hist] == [True, True, True]
    assert hist.best_epoch is None and model.open.item() == 0.0   # nothing better to put back


@pytest.mark.parametrize("kw,err", [({"guard_steps": 0}, ValueError), ({"guard_size": 0}, ValueError),
                                    ({"guard_size": -1}, ValueError), ({"guard_steps": 1.5}, TypeError),
                                    ({"guard_size": True}, TypeError)])
def test_bad_guard_arguments_refused_before_training(kw, err):
    tr, model, loader, val = _setup()
    name = next(iter(kw))

    def no_training(*a):
        pytest.fail("trained before the arguments were checked")

    with pytest.raises(err, match=name):
        tr.fit(loader, epochs=1, val_loader=val, verbose=False, on_batch_end=no_training, **kw)


def test_evaluate_checks_steps_and_restarts():
    tr, model, loader, val = _setup()
    with pytest.raises(ValueError, match="steps"):
        tr.evaluate(val, steps=0)
    with pytest.raises(TypeError, match="restarts"):
        tr.evaluate(val, restarts=1.5)
    assert tr.evaluate(val, attack=False, steps=0)["n"] == 100   # no attack: steps unused


def test_epoch_line_labels_standard_trainings_accuracy_as_clean(capsys):
    from fastadv.train.trainer import _format_record
    rec = {"epoch": 1, "method": "standard", "train_loss": 0.5, "train_adv_acc": 0.9, "val_clean_acc": 0.8,
           "robust_acc": 0.1, "lr": 1e-3, "time": 2.0, "collapse": False}
    assert "train-clean 90.0%" in _format_record(rec) and "train-adv" not in _format_record(rec)
    assert "train-adv 90.0%" in _format_record(dict(rec, method="pgd"))
    # as fit() prints it
    x, y = data.load_digits()
    model = models.SmallCNN(width=4, input_size=8)
    tr = AdversarialTrainer(model, torch.optim.SGD(model.parameters(), lr=0.05), method="standard", eps=0.1)
    tr.fit(data.make_loader(x[:64], y[:64], batch_size=64), epochs=1, guard=False)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch   1"))
    assert "train-clean" in line and "train-adv" not in line
