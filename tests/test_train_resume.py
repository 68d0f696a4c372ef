"""A run killed at any point resumes from its last checkpoint (end-of-epoch or mid-epoch)
and ends exactly where an uninterrupted run ends (same weights bit for bit, optimizer
state, per-epoch records), for every method: killed with SIGKILL in a subprocess, and
stopped in-process by an exception from ``on_batch_end``."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from fastadv import data, models
    from fastadv.train import AdversarialTrainer


    def main(method, ckpt_dir, out, kill_at, every=5):
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(384, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (384,), generator=g)
        torch.manual_seed(0)
        model = models.SmallCNN(width=4, input_size=8, dropout=0.2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        tr = AdversarialTrainer(model, opt, method=method, eps=0.1, seed=1, scheduler="cyclic")
        loader = data.make_loader(x, y, batch_size=32, indexed=True, seed=3)
        val = data.make_loader(x[:64], y[:64], batch_size=64, shuffle=False)

        def on_batch_end(trainer, epoch, b):
            if kill_at and epoch * len(loader) + b == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no flush: a hard kill

        hist = tr.fit(loader, epochs=2, val_loader=val, checkpoint_dir=ckpt_dir,
                      checkpoint_every=every or None, guard_size=32, guard_steps=2, verbose=False,
                      on_batch_end=on_batch_end, eps_warmup=1)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out + ".pt")
        keep = ("epoch", "step", "lr", "train_loss", "train_adv_acc", "val_clean_acc", "robust_acc")
        json.dump([{k: r[k] for k in keep} for r in hist], open(out + ".json", "w"))


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
""")


# the reference backend everywhere: the test is about resuming, not about kernels
ENV = {"FASTADV_BACKEND": "torch", "OMP_NUM_THREADS": "1"}


def _run(script, *args):
    env = dict(os.environ, **ENV)
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method,every", [("atta", 5), ("free", 5), ("fgsm_rs", 0)])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, method, every, monkeypatch):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # the uninterrupted run, here (one thread, reference backend, like the children)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    ns = {}
    exec(compile(CHILD, str(script), "exec"), ns)
    threads = torch.get_num_threads()
    try:
        ns["main"](method, str(tmp_path / "ck_full"), str(tmp_path / "full"), 0, every)
    finally:
        torch.set_num_threads(threads)
    # 12 batches an epoch; checkpoints at each epoch's end (and at batches 5 and 10 with
    # every=5): killed at batch 8 of epoch 2, the run has lost batches 6..8 of that epoch,
    # or all 8 of them without mid-epoch checkpoints
    killed = _run(script, method, tmp_path / "ck", tmp_path / "killed", 12 + 8, every)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "killed.pt")
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["rank"]["batch"] == (5 if every else 0)
    resumed = _run(script, method, tmp_path / "ck", tmp_path / "resumed", 0, every)
    assert resumed.returncode == 0, resumed.stderr

    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"weights differ at {k}"
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ha = json.load(open(tmp_path / "full.json"))
    hb = json.load(open(tmp_path / "resumed.json"))
    assert ha == hb


# ------------------------------------------------------------------ every method, in-process
# Small enough for every method and kind: 48 digits, 3 batches an epoch, 3 epochs, 1-2
# attack steps, a BatchNorm + dropout net (dropout draws from the global RNG).
OPTIONS = {"pgd": dict(steps=2), "trades": dict(steps=1), "mart": dict(steps=1), "fgsm_rs": {},
           "n_fgsm": {}, "gradalign": {}, "free": dict(replays=2), "yopo": dict(outer=2, steps=1),
           "atta": {}}
# (checkpoint_every, (epoch, batch) after which the run dies, (epoch, batch) of the checkpoint
# it resumes from; batch 0 = that epoch's end-of-epoch checkpoint, of the epoch before)
KINDS = {"end_of_epoch": (None, (1, 2), (1, 0)),
         "mid_epoch": (2, (1, 3), (1, 2)),
         "end_of_epoch_between_mid": (2, (2, 1), (2, 0))}


class _Killed(Exception):
    pass


def _inprocess_run(method, ckpt_dir, every, kill=None, scramble=False):
    import random

    import numpy as np

    from fastadv import data, models
    from fastadv.train import AdversarialTrainer

    x, y = data.load_digits()
    x, y = x[:48], y[:48]
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = models.SmallCNN(width=4, input_size=8, batchnorm=True, dropout=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    tr = AdversarialTrainer(model, opt, method=method, eps=0.1, seed=1, scheduler="cyclic",
                            **OPTIONS[method])
    loader = data.make_loader(x, y, batch_size=16, indexed=True, seed=3)
    val = data.make_loader(x[:16], y[:16], batch_size=16, shuffle=False)
    if scramble:   # a new process: every global RNG elsewhere; the checkpoint must restore them
        torch.manual_seed(12345)
        random.seed(12345)
        np.random.seed(12345)

    def on_batch_end(trainer, epoch, b):
        if kill is not None and (epoch, b) == kill:
            raise _Killed

    try:
        hist = tr.fit(loader, epochs=3, val_loader=val, checkpoint_dir=ckpt_dir, checkpoint_every=every,
                      guard_size=8, guard_steps=1, verbose=False, on_batch_end=on_batch_end)
    except _Killed:
        return None
    drop = ("time", "cpu_time", "eval_time", "peak_mem_mb")
    return (model.state_dict(), opt.state_dict(), [{k: v for k, v in r.items() if k not in drop}
                                                   for r in hist], tr.global_step)


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_killed_at_every_checkpoint_kind_resumes_bit_exactly(tmp_path, method, monkeypatch):
    monkeypatch.setenv("FASTADV_BACKEND", "torch")
    torch.set_num_threads(1)   # bit-exact needs the same reduction order (conftest restores it)
    full_model, full_opt, full_hist, full_step = _inprocess_run(method, str(tmp_path / "full"), None)
    for kind, (every, kill, resumes_from) in KINDS.items():
        ck = str(tmp_path / kind)
        assert _inprocess_run(method, ck, every, kill=kill) is None
        saved = torch.load(os.path.join(ck, "last.pt"), weights_only=True)
        assert (saved["epoch"], saved["rank"]["batch"]) == resumes_from, kind
        got_model, got_opt, got_hist, got_step = _inprocess_run(method, ck, every, scramble=True)
        for k, v in full_model.items():
            assert torch.equal(v, got_model[k]), f"{kind}: weights differ at {k}"
        for a, b in zip(full_opt["state"].values(), got_opt["state"].values()):
            assert torch.equal(a["momentum_buffer"], b["momentum_buffer"]), kind
        assert got_hist == full_hist, kind
        assert got_step == full_step
