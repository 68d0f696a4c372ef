"""``fastadv train`` and ``fastadv demo`` end to end (tiny settings)."""
import json
import os

import pytest

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
