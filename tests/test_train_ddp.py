"""DistributedDataParallel: 2 CPU processes with the gloo backend.

Ranks end with identical weights, per-epoch metrics are reduced across ranks (so
every rank reports the same record), ATTA keeps a per-rank cache of the shard the
rank sees, and a DDP run resumes from its checkpoint (rank 0's index + per-rank parts)
to the same weights as an uninterrupted run, also from previous.pt when last.pt is corrupted.
"""
import datetime
import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from fastadv import models
from fastadv.data import IndexedDataset
from fastadv.train import AdversarialTrainer
from fastadv.train import distributed as fdist
from fastadv.train.distributed import ShardedSampler

WORLD = 2
N = 256


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) * 37).long() % 10   # learnable labels
    return x, y


def _run(rank, method, epochs, ckpt_dir, resume=True):
    torch.manual_seed(0)
    model = models.SmallCNN(width=4, input_size=8)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    tr = AdversarialTrainer(ddp, opt, method=method, eps=0.1, seed=100 + rank)
    x, y = _data()
    ds = IndexedDataset(TensorDataset(x, y))
    loader = DataLoader(ds, batch_size=32, sampler=ShardedSampler(ds, seed=1))
    val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32,
                     sampler=ShardedSampler(TensorDataset(x[:64], y[:64]), shuffle=False))
    hist = tr.fit(loader, epochs=epochs, val_loader=val, guard_size=16, guard_steps=2,
                  checkpoint_dir=ckpt_dir, resume=resume, verbose=False)
    return tr, model, hist, loader


def _worker(rank, init_file, out_dir, method):
    torch.set_num_threads(1)
    # a bounded wait: a rank that fails leaves the other one failing, not hanging for 30 min
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        tr, model, hist, loader = _run(rank, method, 2, os.path.join(out_dir, "full"))
        out = {"state": model.state_dict(), "hist": [dict(r) for r in hist],
               "shard": loader.sampler.shard.clone()}
        if method == "atta":
            out["cache"] = tr._method.cache.clone()
        # a second run stopped after one epoch, then resumed by fresh objects to two epochs
        part = os.path.join(out_dir, "part")
        _run(rank, method, 1, part)
        dist.barrier()
        _, model2, hist2, _ = _run(rank, method, 2, part)
        out["resumed"] = model2.state_dict()
        out["resumed_hist"] = [dict(r) for r in hist2]
        out["files"] = sorted(os.listdir(part))
        # a corrupted index: every rank falls back to previous.pt and its still-kept parts
        dist.barrier()
        if rank == 0:
            with open(os.path.join(part, "last.pt"), "r+b") as f:
                f.seek(100)
                byte = f.read(1)
                f.seek(100)
                f.write(bytes([byte[0] ^ 0xFF]))
        dist.barrier()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, model3, hist3, _ = _run(rank, method, 2, part)
        out["fallback"] = model3.state_dict()
        out["fallback_warnings"] = [str(w.message) for w in caught if "previous good" in str(w.message)]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        fdist.shutdown()  # every rank done before any tears down
        # Python's own finalization after a gloo group aborted a rank now and then under CI
        # load (SIGABRT, "terminate called without an active exception", twice in ~8 full
        # runs). The cause (a gloo thread freeing a collective's Python-made tensors during
        # finalization) is fixed in fastadv.train.distributed.collective; the rank still
        # leaves without finalizing, since what this test checks is saved by now and other
        # gloo teardown races are not this test's subject.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    finally:
        if dist.is_initialized():  # a rank that failed: leave without waiting for the others
            dist.destroy_process_group()


@pytest.mark.parametrize("method", ["atta", "trades", "yopo"])
def test_ddp_two_gloo_ranks(tmp_path, method):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), method), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # identical weights on both ranks, and they moved
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    torch.manual_seed(0)
    init = models.SmallCNN(width=4, input_size=8).state_dict()
    assert not torch.equal(init["features.0.weight"], r0["state"]["features.0.weight"])
    # metrics reduced over ranks: the same record everywhere
    keys = ("train_loss", "train_adv_acc", "val_clean_acc", "robust_acc", "guard_clean_acc", "step")
    for a, b in zip(r0["hist"], r1["hist"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert r0["hist"][-1]["step"] == 2 * 4   # 128 samples a rank, batches of 32
    # disjoint shards covering the data set
    s0, s1 = set(r0["shard"].tolist()), set(r1["shard"].tolist())
    assert not (s0 & s1) and len(s0 | s1) == N
    if method == "atta":
        # each rank refined exactly the cache rows of its own shard: a refined row has many
        # entries on the ball's faces (±eps after a projected step), a row still at its
        # uniform random start has none
        for r, s in ((r0, s0), (r1, s1)):
            cache = r["cache"]
            assert cache.shape == (N, 1, 8, 8)
            assert cache.abs().max() <= 0.1 + 1e-6
            on_face = ((cache.abs() - 0.1).abs() < 1e-6).flatten(1).float().mean(1)
            mine = torch.tensor(sorted(s))
            other = torch.tensor(sorted(set(range(N)) - s))
            assert on_face[mine].min() > 0.05
            assert on_face[other].max() == 0.0
    # resume under DDP: same weights as the uninterrupted run, per-rank parts on disk
    for r in (r0, r1):
        for k, v in r["state"].items():
            assert torch.equal(v, r["resumed"][k]), f"resumed weights differ at {k}"
        for k, v in r["state"].items():
            assert torch.equal(v, r["fallback"][k]), f"weights after the fallback differ at {k}"
    assert len(r0["fallback_warnings"]) == 1 and "last.pt: checksum mismatch" in r0["fallback_warnings"][0]
    assert r1["fallback_warnings"] == []          # said once, by rank 0
    # last.pt (step 8), previous.pt (step 4) and each rank's parts of both
    assert {"last.pt", "previous.pt", "last.rank0.s4.pt", "last.rank0.s8.pt", "last.rank1.s4.pt",
            "last.rank1.s8.pt"} <= set(r0["files"])
    assert not [f for f in r0["files"] if f.startswith("last.rank") and f.split(".")[2] not in ("s4", "s8")]
