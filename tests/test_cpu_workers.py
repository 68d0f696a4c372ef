"""Row-parallel model passes on a multi-core CPU (fastadv.attacks._workers): the same
numbers as one pass, the thread counts left as found, and no splitting where rows are
coupled or the model could not take it."""
import threading

import pytest
import torch
from torch import nn

import zoo
from fastadv.attacks import APGD, PGD, InputIndependentError
from fastadv.attacks import _workers


@pytest.fixture
def two_threads(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.delenv("FASTADV_CPU_WORKERS", raising=False)
    yield
    torch.set_num_threads(n)


class ThreadLog(nn.Module):
    """A model that notes the thread names its forward ran on and the rows each got."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []
        self._lock = threading.Lock()

    def forward(self, x):
        with self._lock:
            self.calls.append((threading.current_thread().name, x.shape[0], torch.get_num_threads()))
        return self.inner(x)


def _data(n=160):
    _, (x, y) = zoo.mnist_split()
    return x[:n].contiguous(), y[:n]


def test_split_passes_run_on_workers_with_one_thread_each(two_threads):
    model = ThreadLog(zoo.mnist_cnn()).eval()
    x, y = _data(100)
    atk = PGD(model, eps=0.1, alpha=0.02, steps=2, random_start=False)
    with torch.no_grad():
        z = atk.logits(x)
    assert not z.requires_grad
    workers = [c for c in model.calls if c[0].startswith("fastadv-cpu")]
    assert [c[1] for c in workers] == [50, 50]
    assert all(c[2] == 1 for c in workers)  # one intra-op thread per worker
    model.calls.clear()
    loss, z2, g = atk.loss_and_grad(x, y)
    assert sorted(c[1] for c in model.calls) == [50, 50]
    assert all(c[0].startswith("fastadv-cpu") for c in model.calls)
    assert g.shape == x.shape and loss.shape == (100,)
    # the caller's and new threads' intra-op counts are as they were
    assert torch.get_num_threads() == 2
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [2]


def test_split_matches_one_pass(two_threads, monkeypatch):
    model = zoo.mnist_cnn()
    x, y = _data(96)
    atk = APGD(model, eps=0.1, steps=2, seed=0)
    split = atk.loss_and_grad(x, y)
    with torch.no_grad():
        zs = atk.logits(x)
    monkeypatch.setenv("FASTADV_CPU_WORKERS", "1")
    assert _workers.split_count(x, model) == 1
    whole = atk.loss_and_grad(x, y)
    with torch.no_grad():
        zw = atk.logits(x)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zs, zw, rtol=1e-5, atol=1e-6)


def test_attack_result_same_with_and_without_workers(two_threads, monkeypatch):
    model = zoo.mnist_cnn()
    x, y = _data(128)
    a = APGD(model, eps=0.1, steps=10, seed=0).run(x, y)
    monkeypatch.setenv("FASTADV_CPU_WORKERS", "1")
    b = APGD(model, eps=0.1, steps=10, seed=0).run(x, y)
    # per-row math is the same; allow a flipped borderline row from float rounding
    assert (a.success != b.success).sum() <= 1
    assert (a.x_adv - b.x_adv).abs().amax() <= 0.1 * 2 + 1e-6


def test_amp_passes_are_not_split(two_threads):
    """Under amp the model runs as one pass on both intra-op threads (row blocks on one
    thread each made bf16 PGD slower than fp32 on the 2-core CPU); the fp32 re-check of an
    amp attack still splits."""
    model = ThreadLog(zoo.mnist_cnn()).eval()
    x, y = _data(100)
    atk = PGD(model, eps=0.1, alpha=0.02, steps=2, random_start=False, amp="bf16")
    atk.loss_and_grad(x, y)
    with torch.no_grad():
        atk.logits(x)
    assert [(c[0].startswith("fastadv-cpu"), c[1]) for c in model.calls] == [(False, 100), (False, 100)]
    model.calls.clear()
    with torch.no_grad():
        atk.logits(x, fp32=True)
    assert sorted(c[1] for c in model.calls) == [50, 50]


def test_no_split_for_coupled_rows_or_small_batches(two_threads):
    x, _ = _data(200)
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    bn(x[:2])
    assert _workers.split_count(x, bn.eval()) == 2
    assert _workers.split_count(x, bn.train()) == 1   # batch statistics couple the rows
    bn.eval()
    assert _workers.split_count(x[:63], bn) == 1      # under 32 rows per worker
    assert _workers.split_count(x, None) == 1         # a plain callable: state unknown
    assert _workers.split_count(x, nn.DataParallel(bn)) == 1
    torch.set_num_threads(1)
    assert _workers.split_count(x, bn) == 1


def test_train_mode_attack_runs_in_one_pass(two_threads):
    model = ThreadLog(zoo.mnist_cnn()).eval()
    x, y = _data(100)
    model.train()
    PGD(model, eps=0.1, alpha=0.02, steps=1, random_start=False, model_mode="train")(x, y)
    assert model.calls and not any(c[0].startswith("fastadv-cpu") for c in model.calls)
    assert model.training


def test_worker_error_reaches_the_caller(two_threads):
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return self.w.expand(x.shape[0], 10) * 1.0

    x, y = _data(100)
    atk = PGD(Const(), eps=0.1, alpha=0.02, steps=1)
    with pytest.raises(InputIndependentError):
        atk.loss_and_grad(x, y)


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_worker_count_is_named(two_threads, monkeypatch, bad):
    monkeypatch.setenv("FASTADV_CPU_WORKERS", bad)
    with pytest.raises(ValueError, match="FASTADV_CPU_WORKERS"):
        _workers.worker_count()


def test_callers_autocast_reaches_the_workers(two_threads):
    model = zoo.mnist_cnn()
    x, _ = _data(100)
    atk = PGD(model, eps=0.1, alpha=0.02, steps=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = atk.logits(x)
    assert z.dtype == torch.bfloat16


def test_inner_train_mode_inside_an_eval_hold_is_not_split(two_threads):
    from fastadv.attacks import preserved_model
    model = ThreadLog(zoo.mnist_cnn()).eval()
    x, y = _data(100)
    with preserved_model(model, "eval"):
        assert _workers.split_count(x, model) == 2
        # an attack run in train mode inside: batch statistics would couple the rows
        PGD(model, eps=0.1, alpha=0.02, steps=1, random_start=False, model_mode="train")(x, y)
        assert model.calls and not any(c[0].startswith("fastadv-cpu") for c in model.calls)
        assert _workers.split_count(x, model) == 2
    assert not _workers._held


def test_no_threads_to_be_had_falls_back_to_the_caller(two_threads, monkeypatch):
    import concurrent.futures

    def refuse(self, *a, **k):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_workers, "_pool", None)
    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", refuse)
    model = ThreadLog(zoo.mnist_cnn()).eval()
    x, y = _data(100)
    atk = PGD(model, eps=0.1, alpha=0.02, steps=1)
    with pytest.warns(RuntimeWarning, match="CPU worker threads"):
        with torch.no_grad():
            z = atk.logits(x)
    assert z.shape == (100, 10)
    assert [c[1] for c in model.calls] == [50, 50]
    assert not any(c[0].startswith("fastadv-cpu") for c in model.calls)
    assert torch.get_num_threads() == 2
    monkeypatch.undo()  # the pool from before this test comes back


def _train_step(method, workers, monkeypatch):
    from fastadv import AdversarialTrainer
    if workers is not None:
        monkeypatch.setenv("FASTADV_CPU_WORKERS", workers)
    else:
        monkeypatch.delenv("FASTADV_CPU_WORKERS", raising=False)
    torch.manual_seed(0)
    model = ThreadLog(zoo.mnist_cnn().train())
    model.inner.load_state_dict(zoo.mnist_cnn().state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw = {"dataset_size": 96} if method == "atta" else {}
    # the attack runs in eval mode only where asked (the methods' default is train mode,
    # where nothing is split: a module's training-mode forward may couple the rows)
    tr = AdversarialTrainer(model, opt, method=method, eps=0.1, seed=0, attack_bn="eval", **kw)
    x, y = _data(96)
    if method == "atta":
        tr.step(x, y, torch.arange(96))
    else:
        tr.step(x, y)
    return model


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs", "atta"])
def test_trainer_attack_steps_run_on_workers(two_threads, monkeypatch, method):
    model = _train_step(method, None, monkeypatch)
    attack = [c for c in model.calls if c[0].startswith("fastadv-cpu")]
    assert attack and all(c[1] == 48 and c[2] == 1 for c in attack)
    # the weight update itself runs on the caller's thread, on the whole batch
    assert any(c[1] == 96 and not c[0].startswith("fastadv-cpu") for c in model.calls)
    assert model.training
    # the same update as without workers (per-row math; float rounding aside)
    ref = _train_step(method, "1", monkeypatch)
    assert not any(c[0].startswith("fastadv-cpu") for c in ref.calls)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_trainer_attack_in_train_mode_bn_is_not_split(two_threads, monkeypatch):
    from fastadv import AdversarialTrainer
    monkeypatch.delenv("FASTADV_CPU_WORKERS", raising=False)
    model = ThreadLog(zoo.mnist_cnn().train())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tr = AdversarialTrainer(model, opt, method="pgd", eps=0.1, steps=2, seed=0, attack_bn="train")
    x, y = _data(96)
    tr.step(x, y)
    assert model.calls and not any(c[0].startswith("fastadv-cpu") for c in model.calls)
