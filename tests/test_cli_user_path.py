"""The command-line path a new user walks, run as subprocesses the way a user types it:
train -> the printed eval command -> a report; any checkpoint file; their own data and model;
a budget typed wrong; a flag typed wrong; Ctrl-C. Tiny settings (8×8 digits, a width-4 CNN,
one epoch, an attack step or two): the point is that each step works, not the numbers."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the reference ops backend (the path is about the CLI, not kernels: nothing compiles), one
# thread per process on the shared cores
ENV = {"PYTHONPATH": ROOT, "FASTADV_BACKEND": "torch", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
# an AutoAttack that costs little: APGD-CE only, 2 steps, no self-checks
CHEAP = ["--version", "custom", "--attacks", "apgd-ce", "--steps", "2", "--no-checks"]


def fastadv(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastadv", *map(str, args)], cwd=str(cwd),
                          env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`fastadv train` once, as a user would, into a run directory (about 10 s of training)."""
    home = tmp_path_factory.mktemp("user")
    r = fastadv("train", "--data", "digits", "--method", "fgsm_rs", "--eps", "0.1", "--epochs", "1",
                "--n-test", "100", "--width", "4", "--eval-steps", "2", "--guard-size", "32",
                "--guard-steps", "2", "--safetensors", "--out", "run", cwd=home)
    assert r.returncode == 0, r.stderr
    return home, r.stdout


def test_train_prints_the_eval_command_and_it_works(run_dir):
    home, out = run_dir
    for name in ("run.json", "final.safetensors", "best.safetensors", "last.pt", "history.json"):
        assert (home / "run" / name).exists(), name
    lines = out.splitlines()
    cmd = lines[lines.index(next(ln for ln in lines if ln.startswith("evaluate it"))) + 1].strip()
    assert cmd == "fastadv eval run"
    argv = shlex.split(cmd)[1:]
    # the printed command, as printed, plus what keeps the test small (and --n past the data's size)
    r = fastadv(*argv, *CHEAP, "--n", "999999", "--out", "rep", cwd=home)
    assert r.returncode == 0, r.stderr
    assert "final.safetensors: a fastadv weights file" in r.stdout
    assert "SmallCNN(" in r.stdout and "width=4" in r.stdout
    assert "--n 999999: digits holds 100 test points; evaluating all 100" in r.stdout
    rep = json.load(open(home / "rep" / "report.json"))
    # the trained model, data and eps came from the checkpoint's metadata, not from defaults
    assert rep["config"]["eps"] == pytest.approx(0.1) and rep["config"]["data"] == "digits"
    assert rep["config"]["n"] == 100
    assert 0 <= rep["autoattack"]["robust_accuracy"] <= rep["autoattack"]["clean_accuracy"] <= 1


def test_any_checkpoint_says_what_it_is_and_a_foreign_file_gets_one_line(run_dir):
    home, _ = run_dir
    r = fastadv("eval", "--checkpoint", "run/last.pt", *CHEAP, "--n", "8", "--no-calibration",
                "--out", "rep-last", cwd=home)
    assert r.returncode == 0, r.stderr
    assert "last.pt: a fastadv training checkpoint" in r.stdout and "epoch 1" in r.stdout
    torch.save({"net": torch.zeros(3), "epoch": 4}, home / "foreign.pt")
    r = fastadv("eval", "--checkpoint", "foreign.pt", cwd=home)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "expected a fastadv checkpoint" in err[0] and "'epoch', 'net'" in err[0]


def test_own_data_file_and_model_with_weights(run_dir):
    home, _ = run_dir
    from fastadv import data
    _, (x, y) = data.load_dataset("digits", n_test=100, seed=0)
    # uint8 pixels, channels-last: what users have; converted on the way in, and said so
    np.savez(home / "mine.npz", images=(x[:20] * 255).round().byte().permute(0, 2, 3, 1).numpy(),
             labels=y[:20].numpy())
    (home / "mynet.py").write_text("from fastadv.models import SmallCNN\n\n"
                                   "def make():\n    return SmallCNN(width=4, input_size=8)\n")
    r = fastadv("eval", "--model", "mynet:make", "--weights", "run/final.safetensors", "--data", "mine.npz",
                "--eps", "8/255", *CHEAP, "--n", "12", "--no-calibration", "--out", "rep-mine", cwd=home)
    assert r.returncode == 0, r.stderr
    assert "uint8: divided by 255" in r.stdout and "channels-last" in r.stdout
    assert "12 of the 20 points of mine.npz" in r.stdout
    rep = json.load(open(home / "rep-mine" / "report.json"))
    assert rep["config"]["eps"] == pytest.approx(8 / 255) and rep["config"]["n"] == 12
    assert rep["config"]["model"] == "mynet:make"


def test_a_budget_covering_the_inputs_is_refused_unless_allowed(run_dir):
    home, _ = run_dir
    r = fastadv("eval", "run", "--eps", "8", "--out", "rep-big", cwd=home)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("fastadv eval: --eps: 8 covers the whole input range [0, 1]")
    assert "8/255" in err[0] and "--allow-large-eps" in err[0]
    assert not (home / "rep-big" / "report.json").exists()


def test_a_near_miss_flag_gets_the_usage_and_the_close_match(tmp_path):
    r = fastadv("eval", "--epsilon", "8/255", "--epochs", "3", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("usage: fastadv eval")
    assert "unrecognized argument --epsilon; did you mean --eps " in r.stderr
    assert "unrecognized argument --epochs (it is a flag of `fastadv train`" in r.stderr


def test_ctrl_c_prints_one_line(run_dir):
    home, _ = run_dir
    # a run long enough to be interrupted in the middle of AutoAttack, on two threads: the model
    # passes then run as row blocks on worker threads, which must not print tracebacks either
    # (PYTHONFAULTHANDLER: a hang is dumped, every thread's stack, by the SIGABRT below)
    p = subprocess.Popen([sys.executable, "-m", "fastadv", "eval", "run", "--steps", "100000", "--n", "100",
                          "--threads", "2", "--no-checks", "--out", "rep-int"], cwd=str(home),
                         env={**os.environ, **ENV, "PYTHONFAULTHANDLER": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        seen = ""
        while time.time() < deadline:
            line = p.stdout.readline()
            seen += line
            if line.startswith("AutoAttack (") or not line:
                break
        assert "AutoAttack (" in seen, seen + p.stderr.read()
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            out, err = p.communicate(timeout=60)
            pytest.fail(f"still running 120 s after Ctrl-C; its stacks:\n{err[-6000:]}")
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["fastadv eval: interrupted; run the same command again to resume from its state file"], err
    assert "Traceback" not in err
