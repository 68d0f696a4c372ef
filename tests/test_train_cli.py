"""``fastadv train`` and ``fastadv demo`` end to end (tiny settings)."""
import json
import math
import os
import warnings

import pytest
import torch

from fastadv import cli


def test_train_cli_runs_resumes_and_writes_outputs(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--data", "digits", "--method", "fgsm_rs", "--eps", "0.1", "--epochs", "1",
            "--n-test", "200", "--width", "4", "--batch-size", "64", "--eval-steps", "2",
            "--guard-size", "64", "--guard-steps", "2", "--out", out, "--schedule", "cyclic",
            "--safetensors"]
    assert cli.main(args) == 0
    for name in ("last.pt", "history.json", "final.safetensors", "best.safetensors", "run.json"):
        assert os.path.exists(os.path.join(out, name)), name
    hist = json.load(open(os.path.join(out, "history.json")))
    assert len(hist["history"]) == 1 and 0 <= hist["final"]["robust_acc"] <= 1
    assert hist["run"]["model"] == {"name": "small_cnn", "kwargs": {"in_channels": 1, "num_classes": 10,
                                                                    "width": 4, "input_size": 8}}
    text = capsys.readouterr().out
    assert "| fgsm_rs |" in text
    assert f"evaluate it (AutoAttack, report in fastadv-report/):\n  fastadv eval {out}" in text
    # a second call with more epochs continues from the checkpoint
    args[args.index("--epochs") + 1] = "2"
    assert cli.main(args) == 0
    hist = json.load(open(os.path.join(out, "history.json")))
    assert [r["epoch"] for r in hist["history"]] == [1, 2]
    assert "resumed" in capsys.readouterr().out


def test_train_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["train", "--data", "digits", "--eps", "0", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "eps" in capsys.readouterr().err
    rc = cli.main(["train", "--data", "digits", "--method", "fgsm_rs", "--option", "beta=2",
                   "--out", str(tmp_path / "y")])
    assert rc == 2
    assert "unknown option" in capsys.readouterr().err
    rc = cli.main(["train", "--data", "digits", "--n-train", "0", "--out", str(tmp_path / "z")])
    assert rc == 2
    assert "--n-train" in capsys.readouterr().err


def test_demo_rejects_bad_arguments_before_training(tmp_path, capsys):
    # each would otherwise fail only after the baseline's minutes of training
    for args, what in ((["--method", "nope"], "method"), (["--n-train", "0"], "--n-train"),
                       (["--method", "pgd", "--steps", "0"], "steps")):
        rc = cli.main(["demo", "--out", str(tmp_path / "d"), *args])
        assert rc == 2
        out = capsys.readouterr()
        assert what in out.err and "==" not in out.out


def test_demo_quick(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "demo")
    rc = cli.main(["demo", "--quick", "--no-baseline", "--width", "8", "--n-train", "600",
                   "--n-test", "100", "--pgd-steps", "5", "--aa-samples", "8", "--out", out])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| atta |" in text and "AutoAttack" in text and "median epoch (s)" in text
    assert "train-adv" in text and f"fastadv eval {out}" in text
    assert os.path.getsize(os.path.join(out, "curve.png")) > 1000
    res = json.load(open(os.path.join(out, "results.json")))
    row = res["rows"][0]
    assert row["method"] == "atta" and 0 <= row["clean_acc"] <= 1
    assert "autoattack_acc" in row
    assert row["median_epoch_s"] == pytest.approx(sorted(row["epoch_times_s"])[0], abs=0.01)
    # the demo's weights say what they are: `fastadv eval OUT` rebuilds the model
    from fastadv import runs
    model, ck = runs.load_trained(out)
    assert ck.spec["kwargs"]["width"] == 8 and ck.run["eps"] == pytest.approx(0.3)


def test_recommended_method_gets_the_free_step_unless_told_otherwise():
    from fastadv.commands.train import RECOMMENDED, method_options
    assert RECOMMENDED == "atta"
    assert method_options("atta") == {"free_step": True}
    assert method_options("atta", ["free_step=false"]) == {"free_step": False}
    assert method_options("pgd", ["steps=3"]) == {"steps": 3}
    with pytest.raises(ValueError, match="--option"):
        method_options("atta", ["free_step"])


# ------------------------------------------------------------------ a run that collapses in epoch 1
class _Closed(torch.nn.Module):
    """The zoo CNN behind a closed gate: its output does not depend on x, as a model's whose
    training collapsed, so the guard's PGD (and the final one) find a zero input gradient."""

    def __init__(self, **kwargs):
        super().__init__()
        from fastadv import models
        self.net = models.SmallCNN(**kwargs)
        self.register_buffer("open", torch.zeros(()))

    def forward(self, x):
        return self.net(x * self.open)


def test_train_cli_collapse_in_epoch_1_still_writes_outputs_and_says_why(tmp_path, capsys, monkeypatch):
    from fastadv import runs
    from fastadv.commands.train import EXIT_COLLAPSED
    from fastadv.train.checkpoint import load_weights
    monkeypatch.setattr(runs, "build_model", lambda spec: _Closed(**spec["kwargs"]))
    out = str(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting at epoch 1"):
        rc = cli.main(["train", "--data", "digits", "--method", "fgsm_rs", "--eps", "0.1", "--epochs", "1",
                       "--n-test", "64", "--n-train", "128", "--width", "4", "--batch-size", "64",
                       "--eval-steps", "2", "--guard-size", "32", "--guard-steps", "2", "--out", out])
    assert rc == EXIT_COLLAPSED == 1
    hist = json.load(open(os.path.join(out, "history.json")))
    assert hist["collapsed_epochs"] == [1] and hist["best_epoch"] is None
    final = hist["final"]
    assert math.isnan(final["robust_acc"]) and "input gradient is zero" in final["robust_error"]
    assert 0 <= final["clean_acc"] <= 1 and final["n"] == 64
    assert not os.path.exists(os.path.join(out, "best.pt"))
    weights = load_weights(os.path.join(out, "final.pt"))
    assert weights["open"].item() == 0.0 and any(k.startswith("net.") for k in weights)
    text = capsys.readouterr().out
    table = next(ln for ln in text.splitlines() if ln.startswith("| fgsm_rs |"))
    assert table.endswith("| not measurable |")
    why = [ln for ln in text.splitlines() if "robust accuracy cannot be measured" in ln]
    assert len(why) == 1 and "epoch(s) [1] and no earlier epoch to go back to" in why[0]
    assert "fastadv eval" not in text and "best.*" not in text
    # a rerun resumes, trains on and ends the same way (nothing crashes on the resumed collapse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(["train", "--data", "digits", "--method", "fgsm_rs", "--eps", "0.1", "--epochs", "2",
                       "--n-test", "64", "--n-train", "128", "--width", "4", "--batch-size", "64",
                       "--eval-steps", "2", "--guard-size", "32", "--guard-steps", "2", "--out", out])
    assert rc == 1
    assert json.load(open(os.path.join(out, "history.json")))["collapsed_epochs"] == [1, 2]


def test_train_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 trained and evaluated" in text and "1 trained, weights and history.json written" in text


def test_final_evaluation_under_ddp_trusts_the_guard_instead_of_attacking():
    # on several ranks an attack that fails on one of them would hang the others: the guard's
    # (all-reduced) verdict decides, and only the clean pass runs
    from fastadv.commands.train import final_evaluation
    from fastadv.train.trainer import History

    class Trainer:
        calls = []

        def evaluate(self, loader, steps=10, attack=True):
            self.calls.append(attack)
            return {"clean_acc": 0.5, "n": 4, **({"robust_acc": 0.25} if attack else {})}

    hist = History([{"epoch": 1, "collapse": True, "guard_error": "model: the input gradient is zero"}])
    tr = Trainer()
    ev = final_evaluation(tr, hist, None, 2, distributed=True)
    assert tr.calls == [False] and math.isnan(ev["robust_acc"]) and ev["robust_error"].startswith("model:")
    hist.best_epoch = 1          # the best weights were put back: that model is attacked as usual
    assert final_evaluation(tr, hist, None, 2, distributed=True) == {"clean_acc": 0.5, "n": 4, "robust_acc": 0.25}
    assert tr.calls == [False, True]


def test_demo_collapse_in_epoch_1_reports_not_measurable(tmp_path, capsys, monkeypatch):
    """The demo evaluates like `fastadv train` (final_evaluation): a model whose training
    collapsed in epoch 1 gets 'not measurable' and the reason, not a traceback."""
    from fastadv import runs
    from fastadv.commands.train import EXIT_COLLAPSED
    monkeypatch.setattr(runs, "build_model", lambda spec: _Closed(**spec["kwargs"]))
    out = str(tmp_path / "demo")
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting at epoch 1"):
        rc = cli.main(["demo", "--quick", "--no-baseline", "--method", "fgsm_rs", "--width", "4",
                       "--n-train", "128", "--n-test", "64", "--pgd-steps", "2", "--aa-samples", "8",
                       "--out", out])
    assert rc == EXIT_COLLAPSED
    text = capsys.readouterr().out
    row = next(ln for ln in text.splitlines() if ln.startswith("| fgsm_rs |"))
    assert row.endswith("| not measurable | skipped |")
    why = [ln for ln in text.splitlines() if "robust accuracy cannot be measured" in ln]
    assert len(why) == 1 and "input gradient is zero" in why[0]
    assert "PGD not measurable" in text and "fastadv eval" not in text
    res = json.load(open(os.path.join(out, "results.json")))
    r = res["rows"][0]
    assert math.isnan(r["pgd2_acc"]) and "input gradient is zero" in r["robust_error"]
    assert r["autoattack_acc"] is None and 0 <= r["clean_acc"] <= 1
    assert os.path.exists(os.path.join(out, "results.md"))
