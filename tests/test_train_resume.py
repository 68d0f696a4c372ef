"""A run killed with SIGKILL mid-epoch resumes from its last checkpoint and ends exactly
where an uninterrupted run ends (same weights, optimizer state, per-epoch records)."""
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


    def main(method, ckpt_dir, out, kill_at):
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
                      checkpoint_every=5, guard_size=32, guard_steps=2, verbose=False,
                      on_batch_end=on_batch_end, eps_warmup=1)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out + ".pt")
        keep = ("epoch", "step", "lr", "train_loss", "train_adv_acc", "val_clean_acc", "robust_acc")
        json.dump([{k: r[k] for k in keep} for r in hist], open(out + ".json", "w"))


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
""")


# the reference backend everywhere: the test is about resuming, not about kernels
ENV = {"FASTADV_BACKEND": "torch", "OMP_NUM_THREADS": "1"}


def _run(script, *args):
    env = dict(os.environ, **ENV)
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", ["atta", "free"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, method, monkeypatch):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # the uninterrupted run, here (one thread, reference backend, like the children)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    ns = {}
    exec(compile(CHILD, str(script), "exec"), ns)
    threads = torch.get_num_threads()
    try:
        ns["main"](method, str(tmp_path / "ck_full"), str(tmp_path / "full"), 0)
    finally:
        torch.set_num_threads(threads)
    # 12 batches an epoch; checkpoints at batches 5 and 10 and at each epoch's end:
    # killed at batch 8 of epoch 2, the run has lost batches 6..8 of that epoch
    killed = _run(script, method, tmp_path / "ck", tmp_path / "killed", 12 + 8)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "killed.pt")
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["rank"]["batch"] == 5
    resumed = _run(script, method, tmp_path / "ck", tmp_path / "resumed", 0)
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
