"""The command line's checks and helpers, in process (fast): budgets and fractions, flags
checked before work, help that shows defaults, checkpoints identified and rebuilt, user data
read, atomic outputs, the report's plots and progress totals, AutoAttack's readable summary."""
import argparse
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastadv import budget, cli, data, models, runs
from fastadv.commands import _args

import zoo


# ------------------------------------------------------------------ budgets
def test_budget_parses_fractions_as_the_field_writes_them():
    assert _args.budget("8/255") == pytest.approx(8 / 255)
    assert _args.budget(" 0.5 / 2 ") == pytest.approx(0.25)
    assert _args.budget("2e-3") == pytest.approx(2e-3)
    for bad in ("eight", "8/", "8/0", "1/2/3"):
        with pytest.raises(argparse.ArgumentTypeError, match="fraction such as 8/255"):
            _args.budget(bad)


def test_eps_covering_the_input_range_is_refused_unless_allowed():
    assert budget.eps_covers_range(8, "Linf") and budget.eps_covers_range(1.0, "Linf")
    assert not budget.eps_covers_range(8 / 255, "Linf") and not budget.eps_covers_range(0.99, "Linf")
    assert budget.eps_covers_range(1.5, "Linf", -1, 1) is False and budget.eps_covers_range(2, "Linf", -1, 1)
    # L2/L1 cover the box only at span·√d / span·d
    assert budget.eps_covers_range(28.0, "L2", dim=784) and not budget.eps_covers_range(27.9, "L2", dim=784)
    assert budget.eps_covers_range(784, "L1", dim=784) and not budget.eps_covers_range(783, "L1", dim=784)
    assert not budget.eps_covers_range(1e6, "L2")                      # no size: nothing known
    assert budget.eps_covers_range(torch.tensor([0.1, 3.0]), "Linf")  # per-sample: the largest
    with pytest.raises(ValueError, match=r"eps: 8 covers the whole input range \[0, 1\] \(Linf\) "
                                         r"\(did you mean 8/255\?\).*allow_large_eps=True"):
        budget.check_eps_budget(8)
    budget.check_eps_budget(8, allow_large_eps=True)
    budget.check_eps_budget(8 / 255)
    with pytest.raises(ValueError, match="norm"):
        budget.eps_covers_range(1, "L3", dim=4)
    with pytest.raises(TypeError, match="eps"):
        budget.eps_covers_range("8")


# ------------------------------------------------------------- flags first
def _one_line(capsys, prefix):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


@pytest.mark.parametrize("argv, prefix", [
    (["eval", "--threads", "-1"], "fastadv eval: --threads:"),
    (["eval", "--out", "/proc/x"], "fastadv eval: --out: cannot write in '/proc/x'"),
    (["eval", "--steps", "0"], "fastadv eval: --steps:"),
    (["eval", "--checkpoint", "nope.pt"], "fastadv eval: --checkpoint: no such file"),
    (["eval", "--eps", "nan"], "fastadv eval: --eps:"),
    (["train", "--width", "0"], "fastadv train: --width:"),
    (["train", "--width", "-1"], "fastadv train: --width:"),
    (["train", "--threads", "-1"], "fastadv train: --threads:"),
    (["train", "--eval-steps", "0"], "fastadv train: --eval-steps:"),
    (["train", "--guard-steps", "0"], "fastadv train: --guard-steps:"),
    (["train", "--out", "/proc/x"], "fastadv train: --out:"),
    (["train", "--eps", "8"], "fastadv train: --eps: 8 covers the whole input range"),
    (["demo", "--width", "0"], "fastadv demo: --width:"),
    (["demo", "--threads", "-1"], "fastadv demo: --threads:"),
    (["demo", "--pgd-steps", "0"], "fastadv demo: --pgd-steps:"),
    (["demo", "--out", "/proc/x"], "fastadv demo: --out:"),
    (["bench", "ops", "--json", "/proc/x/rows.json"], "fastadv bench: ops: --json: cannot write"),
    (["bench", "ops", "--threads", "-1"], "fastadv bench: ops: --threads:"),
    (["bench", "attacks", "--json", "/proc/x/rows.json"], "fastadv bench: attacks: --json:"),
    (["bench", "train", "--json", "/proc/x/rows.json"], "fastadv bench train: --json:"),
    (["bench", "train", "--threads", "0"], "fastadv bench train: --threads:"),
])
def test_bad_flags_are_one_line_before_any_work(argv, prefix, tmp_path, capsys, monkeypatch):
    from fastadv.eval import report
    from fastadv.train import trainer

    def boom(*a, **k):
        raise AssertionError("work started before the flags were checked")
    monkeypatch.setattr(report, "evaluate", boom)
    monkeypatch.setattr(trainer.AdversarialTrainer, "fit", boom)
    monkeypatch.setattr(data, "load_dataset", boom)
    monkeypatch.chdir(tmp_path)
    if "--out" not in argv and argv[0] in ("eval", "train", "demo"):
        argv = argv + ["--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    _one_line(capsys, prefix)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_bench_ops_cuda_on_a_cpu_torch_says_why(capsys):
    assert cli.main(["bench", "ops", "--device", "cuda"]) == 2
    line = _one_line(capsys, "fastadv bench: ops: --device: 'cuda' requested but CUDA is not available")
    assert torch.__version__ in line


def test_every_flag_has_help_that_shows_its_default():
    top, _ = cli.build_parser()
    seen = 0
    for p in cli._walk(top):
        fmt = cli.HelpFormatter(p.prog)
        for a in p._actions:
            if not a.option_strings or "--help" in a.option_strings:
                continue
            seen += 1
            text = fmt._get_help_string(a)
            assert a.help, f"{p.prog} {a.option_strings[0]}: no help"
            assert "default" in text.lower(), f"{p.prog} {a.option_strings[0]}: {text!r}"
    assert seen > 100
    # what --help prints, for one flag of each kind
    sub = {p.prog: p for p in cli._walk(top)}
    text = sub["fastadv eval"].format_help()
    assert "(default: 250)" in text and "(default: off)" in text
    assert "(default: 2)" in sub["fastadv bench attacks"].format_help()


def test_train_and_eval_share_the_progress_switch(monkeypatch):
    top, _ = cli.build_parser()
    for argv in (["eval"], ["train"], ["demo"], ["bench", "attacks"]):
        assert top.parse_args(argv).progress is None                  # auto: the terminal decides
        assert top.parse_args(argv + ["--no-progress"]).progress is False
        assert top.parse_args(argv + ["--progress"]).progress is True
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert _args.progress_on(None) is False and _args.progress_on(True) is True


def test_near_miss_and_wrong_subcommand_flags(capsys):
    assert cli.main(["train", "--epsilon", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastadv train") and "did you mean --eps" in err
    assert cli.main(["bench", "attacks", "--quik"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastadv bench attacks") and "did you mean --quick?" in err
    assert cli.main(["demo", "--transfer"]) == 2
    assert "it is a flag of `fastadv eval`" in capsys.readouterr().err


def test_ctrl_c_in_process_is_one_line_and_130(monkeypatch, capsys):
    from fastadv.commands import doctor

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(doctor, "run", interrupted)
    assert cli.main(["doctor"]) == 130
    assert capsys.readouterr().err.strip() == "fastadv doctor: interrupted"


# ------------------------------------------------------------- checkpoints
def _spec(**kw):
    return {"name": "small_cnn", "kwargs": dict(dict(in_channels=1, num_classes=10, width=4, input_size=8), **kw)}


@pytest.mark.parametrize("spec", [_spec(), _spec(width=6, input_size=28), _spec(batchnorm=True),
                                  _spec(in_channels=3, input_size=32, num_classes=4),
                                  {"name": "preact_resnet18", "kwargs": {"num_classes": 10, "in_channels": 3}}])
def test_zoo_architecture_is_read_from_the_weights_shapes(spec):
    sd = runs.build_model(spec).state_dict()
    got = runs.infer_model_spec(sd)
    want = dict(spec["kwargs"])
    if spec["name"] == "small_cnn":
        want.setdefault("batchnorm", False)
    assert got == {"name": spec["name"], "kwargs": want}
    sd.pop(next(iter(sd)))
    assert runs.infer_model_spec(sd) is None


def test_checkpoint_metadata_rebuilds_the_model_and_foreign_files_say_what_was_expected(tmp_path):
    from fastadv.train import checkpoint as ckpt
    torch.manual_seed(0)
    model = runs.build_model(_spec(width=6))
    desc = runs.run_description("small_cnn", _spec(width=6)["kwargs"], data="digits", eps=0.1, n_test=100,
                                method="pgd")
    for name in ("final.pt", "final.safetensors"):
        d = tmp_path / name.replace(".", "_")
        ckpt.save_weights(model.state_dict(), str(d / name), runs.weights_metadata(desc, method="pgd"))
        rng = torch.get_rng_state()
        got, ck = runs.load_trained(str(d))     # a run directory: finds the checkpoint
        assert torch.equal(torch.get_rng_state(), rng)
        assert ck.spec_source == "metadata" and ck.run["data"] == "digits" and not got.training
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), model.state_dict().values()))
        assert "SmallCNN(" in ck.describe() and "width=6" in ck.describe() and "eps 0.1" in ck.describe()
    # a plain state dict of a zoo model: recognised by its shapes, and said so
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    _, ck = runs.load_trained(str(tmp_path / "plain.pt"))
    assert "inferred from the tensor shapes" in ck.describe()
    # foreign files: one line saying what was expected
    torch.save({"net": model.state_dict(), "step": 3}, tmp_path / "other.pt")
    (tmp_path / "notes.pt").write_text("hello")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    torch.save({"a.weight": torch.zeros(2, 2)}, tmp_path / "mlp.pt")
    for f, msg in (("other.pt", r"holds a dict with keys \['net', 'step'\]"), ("notes.pt", "cannot be read"),
                   ("bad.safetensors", "not a readable safetensors file"),
                   ("mlp.pt", "says nothing of the architecture")):
        with pytest.raises(ValueError, match=msg) as ei:
            runs.load_trained(str(tmp_path / f))
        assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match="holds no fastadv checkpoint"):
        runs.find_checkpoint(str(tmp_path))


def test_weights_alone_are_a_checkpoint(tmp_path, capsys):
    """`fastadv eval --weights final.pt` (no --model): the checkpoint names its model."""
    from fastadv.train import checkpoint as ckpt
    desc = runs.run_description("small_cnn", _spec(width=16)["kwargs"], data="digits", eps=0.1, n_test=500)
    ckpt.save_weights(zoo.digits_cnn().state_dict(), str(tmp_path / "final.pt"), runs.weights_metadata(desc))
    rc = cli.main(["eval", "--weights", str(tmp_path / "final.pt"), "--n", "6", "--version", "custom",
                   "--attacks", "apgd-ce", "--steps", "1", "--no-checks", "--no-calibration", "--no-progress",
                   "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0 and "final.pt: a fastadv weights file" in out
    rep = json.load(open(tmp_path / "rep" / "report.json"))
    assert rep["config"]["data"] == "digits" and rep["config"]["eps"] == pytest.approx(0.1)
    assert rep["autoattack"]["clean_accuracy"] > 0.5     # the trained digits model, rebuilt
    torch.save({"w": torch.zeros(3)}, tmp_path / "plain.pt")
    assert cli.main(["eval", "--weights", str(tmp_path / "plain.pt"), "--out", str(tmp_path / "r2")]) == 2
    assert "says nothing of the architecture" in _one_line(capsys, "fastadv eval: --weights:")


def test_model_flag_with_a_fastadv_checkpoint_builds_the_recorded_size(tmp_path, capsys, monkeypatch):
    from fastadv.commands.eval import load_model
    from fastadv.train import checkpoint as ckpt
    model = runs.build_model(_spec(width=6))
    desc = runs.run_description("small_cnn", _spec(width=6)["kwargs"], data="digits", eps=0.1)
    ckpt.save_weights(model.state_dict(), str(tmp_path / "final.safetensors"), runs.weights_metadata(desc))
    got = load_model("fastadv.models:SmallCNN", str(tmp_path / "final.safetensors"))
    assert got.features[0].out_channels == 6
    assert "building SmallCNN(" in capsys.readouterr().out
    # (a module name of this test's own: imported modules stay cached for the session)
    (tmp_path / "wide32net.py").write_text("from fastadv.models import SmallCNN\n\n"
                                           "def make():\n    return SmallCNN(width=32, input_size=8)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--weights: do not fit.*fastadv eval --checkpoint"):
        load_model("wide32net:make", str(tmp_path / "final.safetensors"))


# ------------------------------------------------------------------- data
def test_tensor_files_of_every_kind(tmp_path):
    _, (x, y) = zoo.digits_split()
    x, y = x[:30], y[:30]
    torch.save({"x": x, "y": y, "mean": [0.5], "std": [0.25]}, tmp_path / "d.pt")
    torch.save((x, y), tmp_path / "t.pt")
    np.savez(tmp_path / "d.npz", (x * 255).round().byte().numpy(), y.numpy())   # arr_0, arr_1
    from safetensors.torch import save_file
    save_file({"images": x[:, 0].contiguous(), "labels": y}, str(tmp_path / "d.safetensors"))
    for name in ("d.pt", "t.pt", "d.npz", "d.safetensors"):
        got = data.load_data(str(tmp_path / name))
        assert got.x.shape == (30, 1, 8, 8) and got.x.dtype == torch.float32 and got.total == 30
        assert torch.allclose(got.x, x, atol=1 / 255) and torch.equal(got.y, y)
    assert data.load_data(str(tmp_path / "d.pt")).normalization == ([0.5], [0.25])
    assert any("uint8" in n for n in data.load_data(str(tmp_path / "d.npz")).notes)
    sub = data.load_data(str(tmp_path / "d.pt"), n=10)
    assert len(sub) == 10 and sub.total == 30
    # the same seeded sample every time, a different one for another seed
    assert torch.equal(sub.x, data.load_data(str(tmp_path / "d.pt"), n=10).x)
    assert not torch.equal(sub.x, data.load_data(str(tmp_path / "d.pt"), n=10, seed=1).x)
    torch.save({"x": x, "y": y[:5]}, tmp_path / "bad.pt")
    torch.save({"inputs": x}, tmp_path / "nolabels.pt")
    for name, msg in (("bad.pt", r"expected y of shape \[30\]"), ("nolabels.pt", "expected the labels")):
        with pytest.raises(ValueError, match=msg):
            data.load_data(str(tmp_path / name))
    with pytest.raises(ValueError, match="--data: expected mnist5k or digits, a .pt/.npz"):
        data.load_data(str(tmp_path / "missing.npz"))


def test_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), "L").save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    got = data.load_data(str(tmp_path / "imgs"))
    assert got.x.shape == (6, 1, 6, 6) and got.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert got.classes == ["cat", "dog"] and 0 <= float(got.x.min()) and float(got.x.max()) <= 1
    # one colour image makes them all RGB
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").save(tmp_path / "imgs" / "dog" / "c.png")
    assert data.load_data(str(tmp_path / "imgs")).x.shape == (7, 3, 6, 6)
    Image.fromarray(np.zeros((5, 6), dtype=np.uint8), "L").save(tmp_path / "imgs" / "cat" / "small.png")
    with pytest.raises(ValueError, match="expected images of one size"):
        data.load_data(str(tmp_path / "imgs"))


def test_module_function_returning_dataset_loader_or_tensors(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\n"
        "X = torch.rand(40, 1, 8, 8)\nY = torch.arange(40) % 10\n"
        "def tensors():\n    return X, Y\n"
        "def dataset():\n    return TensorDataset(X, Y)\n"
        "def loader():\n    return DataLoader(TensorDataset(X, Y), batch_size=16)\n"
        "def nothing():\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    for fn, n in (("tensors", None), ("dataset", None), ("loader", None), ("dataset", 12), ("loader", 20)):
        got = data.load_data(f"mydata:{fn}", n=n)
        assert got.x.shape == (n or 40, 1, 8, 8) and got.total == 40
    assert data.load_data("mydata:loader", n=20).y.tolist() == (torch.arange(20) % 10).tolist()
    with pytest.raises(ValueError, match="expected the function to return"):
        data.load_data("mydata:nothing")
    with pytest.raises(ValueError, match="cannot import"):
        data.load_data("no_such_mod_xyz:f")


def test_eval_on_a_folder_of_images_and_a_function(tmp_path, capsys, monkeypatch):
    """The user's data through the eval command (in process): the digits as PNG folders."""
    from PIL import Image
    from safetensors.torch import save_file
    _, (x, y) = zoo.digits_split()
    for i in range(20):
        d = tmp_path / "imgs" / f"digit{int(y[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0] * 255).round().byte().numpy(), "L").save(d / f"{i}.png")
    save_file(zoo.digits_cnn().state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "digitsnet.py").write_text("from fastadv.models import SmallCNN\n\n"
                                           "def make():\n    return SmallCNN(width=16, input_size=8)\n")
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["eval", "--model", "digitsnet:make", "--weights", "w.safetensors", "--data", "imgs",
                   "--eps", "0.1", "--n", "8", "--version", "custom", "--attacks", "apgd-ce", "--steps", "2",
                   "--no-checks", "--no-calibration", "--no-progress", "--out", "rep"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "classes from the folder names" in out and "8 of the 20 points of imgs" in out
    assert json.load(open(tmp_path / "rep" / "report.json"))["config"]["n"] == 8
    # inputs outside [0, 1] with no normalization: one line, before any attack
    torch.save({"x": x[:10] * 255, "y": y[:10]}, tmp_path / "raw.pt")
    assert cli.main(["eval", "--model", "digitsnet:make", "--weights", "w.safetensors", "--data", "raw.pt",
                     "--out", "rep2"]) == 2
    assert "expected pixel values in [0, 1], got [0, 255]" in _one_line(capsys, "fastadv eval: --data:")


# ------------------------------------------------------------- outputs
def test_outputs_are_atomic_a_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    from fastadv import _files
    from fastadv.eval import report
    rep = {"config": {"n": 1, "norm": "Linf", "eps": 0.1, "version": "standard", "seed": 0}, "total_s": 1.0}
    paths = report.write_report(rep, str(tmp_path))
    before = open(paths["json"]).read()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(_files.os, "fsync", full)
    rep["config"]["seed"] = 1
    with pytest.raises(OSError, match="No space"):
        report.write_report(rep, str(tmp_path))
    assert open(paths["json"]).read() == before
    assert json.loads(before)["config"]["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]    # no temporary left behind


def test_output_checks(tmp_path):
    from fastadv import _files
    assert _files.check_output_dir("--out", str(tmp_path / "a" / "b")) and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--out: expected a directory"):
        _files.check_output_dir("--out", str(tmp_path / "f"))
    with pytest.raises(ValueError, match="--json: expected a file"):
        _files.check_output_file("--json", str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        _files.check_output_file("--json", str(tmp_path / "no" / "x.json"))
    _files.check_output_file("--json", str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()


def test_plot_helpers_show_clean_accuracy_and_every_bin():
    from fastadv.eval.report import eps_curve_points, reliability_bins
    rep = {"eps_curve": {"eps": [0.05, 0.1], "robust_accuracy": [0.6, 0.3], "clean_accuracy": 0.9}}
    assert eps_curve_points(rep) == ([0.0, 0.05, 0.1], [0.9, 0.6, 0.3])
    rep["eps_curve"]["eps"] = [0.0, 0.1]
    assert eps_curve_points(rep) == ([0.0, 0.1], [0.6, 0.3])
    bins = {"edges": [0, 0.5, 1.0], "count": [0, 4], "accuracy": [0.0, 0.0], "confidence": [0, 0.9]}
    assert [b["state"] for b in reliability_bins(bins)] == ["empty", "zero"]
    bins["accuracy"] = [0.0, 0.5]
    assert [b["state"] for b in reliability_bins(bins)] == ["empty", "ok"]


def test_report_progress_totals_resume_note_and_summary(tmp_path, monkeypatch):
    """The bars' totals are the points each attack really attacks; a second run says it resumed;
    autoattack_summary agrees with the report."""
    pytest.importorskip("tqdm")
    import tqdm.auto
    from fastadv.eval import report
    totals = {}

    class Bar:   # records each bar's total and count
        def __init__(self, desc=None, total=None, **kw):
            self.desc, self.start_t = desc, 0.0
            totals[desc] = [total, 0]

        def update(self, n):
            totals[self.desc][1] += n

        def close(self):
            pass
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model = zoo.digits_cnn()
    _, (x, y) = zoo.digits_split()
    x, y = x[:24], y[:24]
    logs = []
    kw = dict(eps=0.1, steps=3, n_queries=10, bs=8, masking_checks=False, calibration=False,
              state_path=str(tmp_path / "state.json"), log=logs.append)
    rep = report.evaluate(model, x, y, progress=True, **kw)
    aa = rep["autoattack"]
    n = aa["n"]
    order = aa["attacks"]
    still = round(aa["clean_accuracy"] * n)
    assert still > 0
    for name in order:
        if still == 0:   # nothing left to attack: no bar
            assert name not in totals
            continue
        total, done = totals[name]
        assert total == still and done == still, (name, totals)
        still = round(aa["robust_accuracy_after"][name] * n)
    assert len(totals) >= 2
    again = []
    report.evaluate(model, x, y, progress=False, **dict(kw, log=again.append))
    assert any("AutoAttack resumed from" in m for m in again), again
    # the readable summary of the same run
    from fastadv import AutoAttack
    from fastadv.eval import autoattack_summary
    a = AutoAttack(model, norm="Linf", eps=0.1, version="standard", seed=0, steps=3, n_queries=10)
    a.run_standard_evaluation(x, y, bs=8)
    s = autoattack_summary(a)
    assert [r["attack"] for r in s] == a.attacks_to_run
    assert sum(r["fooled"] for r in s) == round((a.clean_accuracy - a.robust_accuracy) * len(x))
    assert s[-1]["robust_accuracy_after"] == pytest.approx(a.robust_accuracy)
    text = str(s)
    assert "robust after" in text and "apgd-ce" in text and "clean" in text
    assert autoattack_summary(a.last_result) == s and autoattack_summary(a.last_result.extra) == s
    with pytest.raises(ValueError, match="has not run"):
        autoattack_summary(AutoAttack(model, norm="Linf", eps=0.3))
    with pytest.raises(TypeError, match="expected an AutoAttack"):
        autoattack_summary({"x": 1})


def test_report_steps_zero_is_refused_before_autoattack():
    from fastadv.eval import report
    model = zoo.digits_cnn()
    _, (x, y) = zoo.digits_split()
    for k in ("steps", "n_queries"):
        with pytest.raises(ValueError, match=f"{k}: expected an int >= 1"):
            report.evaluate(model, x[:4], y[:4], eps=0.1, progress=False, log=lambda m: None, **{k: 0})


# ------------------------------------------------------------- bench output
def test_bench_attacks_says_what_it_trains_and_names_eps_points_models_load(tmp_path, monkeypatch):
    from fastadv import bench_attacks as ba
    monkeypatch.setattr(ba, "CACHE", str(tmp_path))
    monkeypatch.setitem(ba._MODELS, "tiny", (lambda: models.SmallCNN(width=4), "mnist", 1))
    monkeypatch.setitem(ba.MODEL_NOTES, "tiny", "SmallCNN(width=4), a test model")
    cases = [ba.Case("PGD-2 tiny", "tiny", 16, 2, ba._fa("PGD", eps=8 / 255, steps=2), "none", None),
             ba.Case("DeepFool tiny", "tiny", 8, 2, ba._fa("DeepFool", steps=2), "none", None)]
    logs = []
    loads = iter([0.5, 0.7, 9.0, 9.5] * 3)
    monkeypatch.setattr(ba.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    rows = ba.attacks_table(device="cpu", threads=1, repeats=1, cases=cases, log=logs.append)
    assert logs[0].startswith("first run: training and caching tiny")
    assert any(m.startswith("training tiny once (SmallCNN(width=4), a test model)") for m in logs)
    assert any("training tiny:" in m and "batches" in m for m in logs)        # progress without tqdm
    assert any(m.startswith("[2/2] DeepFool tiny") for m in logs)
    assert rows[0]["eps"] == pytest.approx(8 / 255) and rows[1]["eps"] is None
    table = ba.format_table(rows)
    assert "| ε " in table and "8/255" in table and "points" in table
    assert "tiny = SmallCNN(width=4), a test model" in table
    cores = ba._cores()
    assert "load average (1 min) 0.5–9.5" in table
    if cores < 9.5:
        assert "WARNING: the load exceeded" in table
    # a second run loads the cached model: nothing to announce
    logs.clear()
    ba.attacks_table(device="cpu", threads=1, repeats=1, cases=cases[:1], log=logs.append)
    assert not any("training" in m for m in logs)
    assert ba.load_note([{"load": [0.1, 0.2], "cores": 4}]) == "load average (1 min) 0.1–0.2 while the rows ran, on 4 cores"


def test_demo_labels_standard_training_as_clean():
    from fastadv.commands.demo import _epoch_line
    rec = {"epoch": 1, "train_loss": 0.5, "train_adv_acc": 0.9, "val_clean_acc": 0.9, "robust_acc": 0.1,
           "time": 2.0, "cpu_time": 3.0}
    assert "train-clean 90.0%" in _epoch_line("standard", rec) and "train-adv" not in _epoch_line("standard", rec)
    assert "train-adv 90.0%" in _epoch_line("pgd", rec) and "CPU 3.0s" in _epoch_line("pgd", rec)


def test_ctrl_c_leaves_even_when_the_interrupt_is_swallowed():
    """A KeyboardInterrupt that never reaches main() (CPython drops one raised inside a
    __del__ or weakref callback) still ends the command: one line, exit 130, after the grace
    period; without the watchdog this child would run until killed."""
    import signal
    import subprocess
    import sys
    import time
    code = (
        "import argparse, sys, time\n"
        "import fastadv.cli as cli\n"
        "cli.INTERRUPT_GRACE_S = 1.0\n"
        "cli._install_interrupt_handler(argparse.Namespace(command='eval'))\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        time.sleep(0.05)\n"
        "    except KeyboardInterrupt:\n"
        "        pass   # swallowed, as an exception in a __del__ would be\n")
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": root},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert time.monotonic() - t >= 0.9
        assert [ln for ln in err.splitlines() if ln.strip()] == [
            "fastadv eval: interrupted; run the same command again to resume from its state file"]
    finally:
        if p.poll() is None:
            p.kill()
