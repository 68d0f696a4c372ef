"""The attack engine's pieces (best iterate, active set, restart chunking) and its GPU paths
(CUDA graphs, CUDA amp, no host syncs in the loop), the latter skipped without CUDA."""
import pytest
import torch

import fastadv
from fastadv.attacks import _engine
import zoo


def test_best_iterate_first_success_else_highest_loss():
    x0 = torch.zeros(4, 1, 2, 2)
    best = _engine.BestIterate(x0)
    best.update(torch.full_like(x0, 1.0), torch.tensor([1.0, 5.0, 2.0, float("nan")]),
                torch.tensor([False, True, False, False]))
    best.update(torch.full_like(x0, 2.0), torch.tensor([3.0, 9.0, 1.0, 1.0]),
                torch.tensor([False, True, False, False]))
    best.update(torch.full_like(x0, 3.0), torch.tensor([2.0, 9.0, 0.0, 0.5]),
                torch.tensor([False, False, True, False]))
    # row 0: highest loss (2nd); row 1: first success (1st); row 2: success (3rd);
    # row 3: a NaN loss never wins
    assert best.x[:, 0, 0, 0].tolist() == [2.0, 1.0, 3.0, 2.0]
    assert best.success.tolist() == [False, True, True, False]
    assert best.loss.tolist() == [3.0, 5.0, 0.0, 1.0]
    # on a subset of rows
    best.update(torch.full((2, 1, 2, 2), 7.0), torch.tensor([10.0, 10.0]),
                torch.tensor([False, False]), rows=torch.tensor([0, 1]))
    assert best.x[:, 0, 0, 0].tolist() == [7.0, 1.0, 3.0, 2.0]


def test_active_set_schedule_and_shrink():
    # the GPU schedule (a shrink is a host sync there): every step at first, then sparser
    act = _engine.ActiveSet(10, torch.device("cpu"), every_step=False)
    due = [k for k in range(1, 60) if act.due(k)]
    assert due[:8] == [1, 2, 3, 4, 5, 6, 7, 8] and len(due) < 20
    # on a CPU a sync costs nothing: every step is due
    cpu = _engine.ActiveSet(10, torch.device("cpu"))
    assert all(cpu.due(k) for k in range(1, 60))
    keep = torch.tensor([True, False] * 5)
    pos, gone = act.shrink(keep)
    assert pos.tolist() == [0, 2, 4, 6, 8] and gone.tolist() == [1, 3, 5, 7, 9]
    assert act.idx.tolist() == [0, 2, 4, 6, 8] and len(act) == 5
    pos, gone = act.shrink(torch.tensor([False, True, True, True, True]))
    assert act.idx.tolist() == [2, 4, 6, 8] and gone.tolist() == [0]
    a, b = act.gather(pos, torch.arange(5), None)
    assert a.tolist() == [1, 2, 3, 4] and b is None
    big = _engine.ActiveSet(100, torch.device("cpu"))
    keep = torch.ones(100, dtype=torch.bool)
    keep[0] = False
    assert big.shrink(keep) == (None, None) and len(big) == 100   # not worth the copies


def test_restart_planning_and_reduction():
    assert _engine.restart_blocks(100, 10, 1000) == (10, 100)
    assert _engine.restart_blocks(100, 10, 350) == (3, 100)
    assert _engine.restart_blocks(100, 2, 40) == (1, 34)      # 3 equal chunks, not 40+40+20
    x = torch.arange(6.0).view(6, 1)     # 3 restarts x 2 samples, restart-major
    loss = torch.tensor([1.0, 5.0, 3.0, 2.0, 2.0, 9.0])
    succ = torch.tensor([False, True, False, False, False, False])
    px, pl, ps, r = _engine.pick_restart(x, loss, succ, 3)
    assert px[:, 0].tolist() == [2.0, 1.0] and r.tolist() == [1, 0] and ps.tolist() == [False, True]
    dx, dl, ds = torch.zeros(3, 1), torch.tensor([0.0, 4.0, 1.0]), torch.tensor([False, False, True])
    took = _engine.merge_best(dx, dl, ds, torch.tensor([0, 2]), torch.ones(2, 1),
                              torch.tensor([1.0, 9.0]), torch.tensor([False, False]))
    assert took.tolist() == [True, False] and dx[:, 0].tolist() == [1.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def mnist():
    model = zoo.mnist_cnn()
    (_, _), (xt, yt) = zoo.mnist_split()
    return model, xt[:200].clone(), yt[:200].clone()


def test_chunking_gives_the_same_attack(mnist):
    model, x, y = mnist
    kw = dict(eps=0.1, alpha=0.025, steps=5, random_start=False)
    whole = fastadv.PGD(model, max_batch=len(x), **kw).run(x, y)
    parts = fastadv.PGD(model, max_batch=64, **kw).run(x, y)
    auto = fastadv.PGD(model, **kw).run(x, y)
    assert (whole.x_adv == auto.x_adv).float().mean() > 0.999
    assert (whole.x_adv == parts.x_adv).float().mean() > 0.999
    assert torch.equal(whole.success, parts.success)
    r = fastadv.PGD(model, eps=0.1, steps=3, restarts=5, max_batch=450, seed=0).run(x, y)
    assert bool((r.steps == 15).all()) and r.extra["restart"].max() <= 4


def test_cpu_chunks_fit_the_cache_but_never_split_coupled_batches(mnist, monkeypatch):
    model, x, y = mnist
    atk = fastadv.PGD(model)
    xc = x.contiguous(memory_format=torch.channels_last)
    with fastadv.attacks.preserved_model(model):
        per_row = _engine.saved_bytes_per_row(atk, xc, y, None)
        # conv1 output + relu + pool indices etc.: tens of KB per 28x28 digit, not MBs
        assert 50e3 < per_row < 2e6
        monkeypatch.setattr(_engine, "cpu_cache_bytes", lambda: int(per_row * 100))
        assert _engine.auto_max_rows(atk, xc, y, None, 200) == 100
        monkeypatch.setattr(_engine, "cpu_cache_bytes", lambda: 1)
        assert _engine.auto_max_rows(atk, xc, y, None, 200) == 32      # a floor on chunk size
    bn = zoo.mnist_cnn_bn()
    atk = fastadv.PGD(bn, model_mode="train")
    with fastadv.attacks.preserved_model(bn, "train"):
        assert _engine.auto_max_rows(atk, xc, y, None, 200) == 200      # batch statistics
        assert _engine.auto_max_rows(atk, xc, y, None, 600) == 600


def test_batched_restarts_share_the_first_restart_noise(mnist):
    """On CPU the first restart of a batched run draws the noise of a single run."""
    model, x, y = mnist
    one = fastadv.PGD(model, eps=0.1, steps=3, seed=11).run(x, y)
    many = fastadv.PGD(model, eps=0.1, steps=3, seed=11, restarts=4).run(x, y)
    assert bool((many.success | ~one.success).all())


def test_graphed_body_matches_eager_loop_on_cpu(mnist):
    """The body captured into a CUDA graph, run eagerly on CPU, equals the eager loop."""
    model, x, y = mnist
    atk = fastadv.PGD(model, eps=0.1, alpha=0.025, steps=4, random_start=False,
                      channels_last=False)
    loop = _engine.StepLoop(atk, atk._step, 4)
    g = object.__new__(_engine.GraphedLoop)
    g.loop, g.samples, g.x_nat, g.y, g.target, g.x0 = loop, len(x), x, y, None, x.clone()
    with fastadv.attacks.preserved_model(model):
        eager = loop.run(x, y, None, x.clone(), len(x))
        body, seen = g._body(4)
    assert bool(seen)
    torch.testing.assert_close(body.x, eager.x)
    assert torch.equal(body.success, eager.success) and torch.equal(body.steps, eager.steps)


def test_graph_key_sees_module_modes_and_normalization_drops_graphs():
    """A captured graph is not replayed for another train/eval state of any module, and
    a new normalization (whose mean/std tensors a graph would read) drops the graphs."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3)).eval()
    atk = fastadv.PGD(model, eps=0.1, steps=2, cuda_graph=True, model_mode="keep")
    x = torch.rand(2, 4)
    k_eval = _engine.graph_key(atk, x, None, ())
    model[2].train()
    assert _engine.graph_key(atk, x, None, ()) != k_eval
    model[2].eval()
    assert _engine.graph_key(atk, x, None, ()) == k_eval
    atk._graphs[k_eval] = object()
    atk.set_normalization_used(mean=[0.5], std=[0.25])
    assert atk._graphs == {}


# --------------------------------------------------------------------- GPU
@pytest.fixture
def exact_cuda(monkeypatch):
    """Deterministic cuDNN and no TF32, so the graphed, eager and checking passes pick
    kernels that agree bit for bit (TF32 convolutions are torch's default on Ampere+)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _cuda_setup():
    model = zoo.mnist_cnn().cuda()
    (_, _), (xt, yt) = zoo.mnist_split()
    return model, xt[:256].cuda(), yt[:256].cuda()


@pytest.mark.gpu
def test_cuda_graph_equals_eager_and_replays_new_data(exact_cuda):
    model, x, y = _cuda_setup()
    kw = dict(eps=0.1, alpha=0.025, steps=10, seed=0)
    eager = fastadv.PGD(model, **kw).run(x, y)
    atk = fastadv.PGD(model, cuda_graph=True, **kw)
    graphed = atk.run(x, y)
    assert (graphed.x_adv == eager.x_adv).float().mean() > 0.999
    assert abs(graphed.robust_accuracy - eager.robust_accuracy) <= 2 / 256
    assert len(atk._graphs) == 1
    x2, y2 = x.flip(0).contiguous(), y.flip(0).contiguous()
    again = atk.run(x2, y2)                                   # a replay on new data
    assert len(atk._graphs) == 1
    ref = fastadv.PGD(model, **kw).run(x2, y2)
    assert abs(again.robust_accuracy - ref.robust_accuracy) <= 2 / 256
    assert (again.x_adv - x2).abs().max() <= 0.1 + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_and_graph(amp, exact_cuda):
    model, x, y = _cuda_setup()
    kw = dict(eps=0.1, alpha=0.025, steps=10, seed=0)
    ref = fastadv.PGD(model, **kw).run(x, y).robust_accuracy
    for graph in (False, True):
        res = fastadv.PGD(model, amp=amp, cuda_graph=graph, restarts=2, **kw).run(x, y)
        assert res.robust_accuracy <= ref + 0.03
        assert (res.x_adv - x).abs().max() <= 0.1 + 1e-6
        with torch.no_grad():
            acc = (model(res.x_adv).argmax(1) == y).float().mean().item()
        assert abs(acc - res.robust_accuracy) <= 1 / 256


@pytest.mark.gpu
def test_cuda_loop_has_no_host_sync(monkeypatch):
    model, x, y = _cuda_setup()
    atk = fastadv.PGD(model, eps=0.1, alpha=0.025, steps=5, seed=0)
    loop = _engine.StepLoop(atk, atk._step, 5)
    monkeypatch.setattr(_engine.StepLoop, "_check_grad", staticmethod(lambda seen: None))
    xc = x.contiguous(memory_format=torch.channels_last)
    with fastadv.attacks.preserved_model(model, devices=(x.device,)):
        loop.run(xc, y, None, xc.clone(), len(x))             # warm-up (lazy init may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loop.run(xc, y, None, xc.clone(), len(x))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_state_preserved_and_restarts_batched():
    model, x, y = _cuda_setup()
    snap = [b.clone() for b in model.buffers()]
    rng = torch.cuda.get_rng_state()
    res = fastadv.PGD(model, eps=0.1, steps=5, restarts=10, seed=0).run(x, y)
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), snap))
    one = fastadv.PGD(model, eps=0.1, steps=5, seed=0).run(x, y)
    assert res.robust_accuracy <= one.robust_accuracy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cuda_results_in_the_callers_dtype_stay_in_the_ball(dtype, exact_cuda):
    """Rounding back to fp16/bf16/fp64 on the GPU (``torch.nextafter`` there, or its CPU
    fallback on torch builds without it) keeps the ball, the box and honest flags."""
    model, x, y = _cuda_setup()
    xd = x.to(dtype)
    for atk in (fastadv.PGD(model, eps=0.1, alpha=0.025, steps=5, seed=0),
                fastadv.APGD(model, eps=0.1, steps=5, seed=0)):
        res = atk.run(xd, y)
        assert res.x_adv.dtype == dtype and res.x_adv.is_cuda
        d = (res.x_adv.double() - xd.double()).abs().flatten(1).amax(1)
        assert bool((d <= 0.1).all()) and 0 <= res.x_adv.double().min() and res.x_adv.double().max() <= 1
        with torch.no_grad():
            fooled = model(res.x_adv.float()).argmax(1) != y
        assert torch.equal(res.success, fooled)
