"""Sharded evaluation: AutoAttack over 2 CPU processes (gloo), against one process per shard."""
import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastadv.attacks import AutoAttack
from fastadv.eval import report
from fastadv.eval.sharded import run_standard_evaluation_sharded, shard_range
from fastadv.train import distributed as fdist
import zoo

WORLD = 2
N = 41  # uneven: shards of 21 and 20


def _aa(model):
    return AutoAttack(model, eps=0.1, version="custom", attacks_to_run=["apgd-ce", "apgd-t"],
                      steps=5, seed=0, checks=False)


def _points():
    _, (x, y) = zoo.mnist_split()
    return x[:N], y[:N]


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    # a bounded wait: a rank that fails leaves the other one failing, not hanging for 30 min
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        model = zoo.mnist_cnn()
        x, y = _points()
        aa = _aa(model)
        x_adv = run_standard_evaluation_sharded(aa, x, y, bs=16)
        ex = aa.last_result.extra
        rep = report.evaluate(model, x, y, eps=0.1, version="custom", attacks_to_run=["apgd-ce"],
                              steps=3, bs=16, calibration=True, masking_checks=False, progress=False,
                              state_path=os.path.join(out_dir, "state.json"), log=lambda m: None)
        torch.save({"x_adv": x_adv, "robust": ex["robust"], "clean": ex["clean"],
                    "attack_of": ex["attack_of"], "acc": aa.robust_accuracy, "shards": ex["shards"],
                    "summary": [(r["attack"], r["fooled"]) for r in ex["summary"]], "summary_n": ex["summary"].n,
                    "report_keys": sorted(rep), "report_robust": rep["autoattack"]["robust_accuracy"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
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


def test_shard_range_covers_the_points_once():
    for n in (0, 1, 5, 41, 100):
        for world in (1, 2, 3, 7):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 2, 2)


def test_single_process_is_the_plain_call():
    assert not fdist.is_initialized()
    model = zoo.mnist_cnn()
    x, y = _points()
    a = _aa(model)
    b = _aa(model)
    assert torch.equal(run_standard_evaluation_sharded(a, x, y, bs=16), b.run_standard_evaluation(x, y, bs=16))
    assert a.robust_accuracy == b.robust_accuracy


def test_two_gloo_ranks_match_one_process_per_shard(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # every rank holds the whole, identical answer
    for k in ("x_adv", "robust", "clean", "attack_of"):
        assert torch.equal(r0[k], r1[k]), k
    assert r0["x_adv"].shape[0] == N and r0["shards"] == [21, 20]
    # ... which is, shard by shard, what one process gets on that shard alone
    model = zoo.mnist_cnn()
    x, y = _points()
    for rank in range(WORLD):
        a, b = shard_range(N, rank, WORLD)
        aa = _aa(model)
        alone = aa.run_standard_evaluation(x[a:b], y[a:b], bs=16)
        assert torch.equal(r0["x_adv"][a:b], alone)
        assert torch.equal(r0["robust"][a:b], aa.last_result.extra["robust"])
    assert abs(r0["acc"] - r0["robust"].float().mean().item()) < 1e-9
    assert 0 < r0["robust"].sum() < r0["clean"].sum()  # the attack did something, not everything
    # extra["summary"] describes all the points, not the rank's shard
    assert r0["summary_n"] == N and r0["summary"] == r1["summary"]
    assert sum(f for _, f in r0["summary"]) == int((r0["clean"] & ~r0["robust"]).sum())
    # eps within the ball
    assert (r0["x_adv"] - x).abs().flatten(1).amax(1).max() <= 0.1 + 1e-6
    # the report: rank 0 runs every section, the others return the AutoAttack part
    assert "calibration" in r0["report_keys"] and r1["report_keys"] == ["autoattack", "config", "total_s"]
    assert r0["report_robust"] == r1["report_robust"]
    assert (tmp_path / "state.json").exists()


N_NAN = 11   # shards of 6 and 5


def _nan_setup():
    from test_nonfinite_logits import _NaNRegion
    _, (x, y) = zoo.mnist_split()
    x, y = x[:N_NAN], y[:N_NAN]
    poison = torch.arange(N_NAN) % 2 == 0          # NaN logits away from these points
    return _NaNRegion(zoo.mnist_cnn(), x, poison).eval(), x, y, poison


def _aa_small(model):
    return AutoAttack(model, eps=0.15, version="custom", attacks_to_run=["apgd-ce"], steps=4, seed=0,
                      checks=False, verbose=False)


def _nan_worker(rank, init_file, out_dir):
    import warnings
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        model, x, y, _ = _nan_setup()
        aa = _aa_small(model)
        run_standard_evaluation_sharded(aa, x, y, bs=16)
        rep = report.evaluate(model, x, y, eps=0.15, version="custom", attacks_to_run=["apgd-ce"], steps=4,
                              bs=16, calibration=False, masking_checks=False, progress=False, log=lambda m: None)
        torch.save({"nonfinite": aa.last_result.extra["nonfinite"],
                    "report_nonfinite": rep["autoattack"].get("nonfinite")},
                   os.path.join(out_dir, f"nan{rank}.pt"))
        fdist.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)   # see _worker
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_sharded_nonfinite_flags_cover_every_rank(tmp_path):
    """extra["nonfinite"] and the report's count are of all the points, gathered like the
    other per-point fields (they used to be the rank's own shard, or left out of the report)."""
    mp.spawn(_nan_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "nan0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "nan1.pt", weights_only=True)
    model, x, y, poison = _nan_setup()
    alone = []
    for rank in range(WORLD):
        a, b = shard_range(N_NAN, rank, WORLD)
        aa = _aa_small(model)
        with pytest.warns(RuntimeWarning, match="non-finite logits"):
            aa.run_standard_evaluation(x[a:b], y[a:b], bs=16)
        alone.append(aa.last_result.extra["nonfinite"])
    want = torch.cat(alone)
    assert bool(want[:6].any()) and bool(want[6:].any())   # both shards met NaN
    assert not bool((want & ~poison).any())
    for r in (r0, r1):
        assert torch.equal(r["nonfinite"], want)
        assert r["report_nonfinite"] == int(want.sum())
