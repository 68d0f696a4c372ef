"""``distributed.collective`` returns only once the backend's threads have let go of the
tensors (see its docstring: otherwise gloo may free them during interpreter shutdown and
abort the process). A fake collective that hands the tensors to a thread stands in for
gloo's worker thread; the real thing runs in tests/test_eval_sharded.py."""
import threading
import time

import pytest
import torch

from fastadv.eval import sharded
from fastadv.train import distributed as fdist


class _LateWorker:
    """Holds C++ references to the tensors it is given and drops them ``delay`` seconds
    after the collective returned, on its own thread (as gloo's worker does). A view holds
    a C++ reference to its base (which ``Tensor._use_count`` counts); a plain Python
    reference would not be one."""

    def __init__(self, delay):
        self.delay = delay
        self.released_at = None
        self.threads = []

    def take(self, tensors):
        keep = [t.view(-1) for t in tensors]

        def run():
            time.sleep(self.delay)
            keep.clear()
            self.released_at = time.monotonic()
        th = threading.Thread(target=run)
        th.start()
        self.threads.append(th)


def _use_counts(ts):
    return [t._use_count() for t in ts]


@pytest.fixture
def fake_group(monkeypatch):
    monkeypatch.setattr(fdist, "is_initialized", lambda: True)
    monkeypatch.setattr(fdist, "world_size", lambda: 2)
    monkeypatch.setattr(fdist, "comm_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(fdist, "_backend", lambda: "gloo")


def test_collective_waits_for_the_worker_to_let_go(fake_group):
    if not hasattr(torch.Tensor, "_use_count"):
        pytest.skip("this torch has no Tensor._use_count")
    worker = _LateWorker(0.2)
    a, b = torch.zeros(3), torch.ones(4)
    before = _use_counts([a, b])

    def run():
        worker.take([a, b])
        assert [c - 1 for c in _use_counts([a, b])] == before   # held past the call

    t0 = time.monotonic()
    fdist.collective(run, [a, b])
    assert worker.released_at is not None and worker.released_at <= time.monotonic()
    assert time.monotonic() - t0 >= 0.2
    assert _use_counts([a, b]) == before
    for th in worker.threads:
        th.join()


def test_collective_does_not_wait_under_nccl(fake_group, monkeypatch):
    # NCCL's watchdog releases works late by design; waiting would cost every collective
    monkeypatch.setattr(fdist, "_backend", lambda: "nccl")
    worker = _LateWorker(0.5)
    a = torch.zeros(3)
    t0 = time.monotonic()
    fdist.collective(lambda: worker.take([a]), [a])
    assert time.monotonic() - t0 < 0.4 and worker.released_at is None
    for th in worker.threads:
        th.join()


def test_collective_gives_up_with_a_warning(fake_group, monkeypatch):
    if not hasattr(torch.Tensor, "_use_count"):
        pytest.skip("this torch has no Tensor._use_count")
    monkeypatch.setattr(fdist, "RELEASE_TIMEOUT_S", 0.05)
    monkeypatch.setattr(fdist, "_release_warned", False)
    a = torch.zeros(3)
    forever = []
    with pytest.warns(RuntimeWarning, match="still hold a collective's tensors"):
        fdist.collective(lambda: forever.append(a.view(-1)), [a])
    # once per process
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fdist.collective(lambda: forever.append(a.view(-1)), [a])


def test_gathers_and_reduce_go_through_collective(fake_group, monkeypatch):
    seen = []
    real = fdist.collective

    def spy(run, tensors):
        seen.append(len(tensors))
        real(run, tensors)
    monkeypatch.setattr(fdist, "collective", spy)

    def fake_all_gather(parts, t):
        for p in parts:
            p.copy_(t)
    monkeypatch.setattr(sharded.dist, "all_gather", fake_all_gather)
    monkeypatch.setattr(fdist.dist, "all_reduce", lambda t, op=None: t.mul_(2))
    out = sharded.all_gather_rows(torch.arange(6.).reshape(3, 2), [3, 2])
    assert out.shape == (5, 2)
    assert torch.equal(out[:3], torch.arange(6.).reshape(3, 2)) and torch.equal(out[3:], out[:2])
    assert torch.equal(sharded._gather_floats([1.0, 2.0]), torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64))
    t = torch.ones(2)
    assert torch.equal(fdist.all_reduce_sum_(t), torch.full((2,), 2.0))
    assert seen == [3, 3, 1]
