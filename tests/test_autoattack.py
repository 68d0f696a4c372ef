"""AutoAttack: at least as strong as PGD-50, the reference's call shape, versions, resumable runs."""
import os

import pytest
import torch

import zoo
from fastadv.attacks import AutoAttack
from fastadv.attacks.autoattack import ATTACK_NAMES


@pytest.fixture(scope="module")
def mnist():
    model = zoo.mnist_cnn()
    _, (xt, yt) = zoo.mnist_split()
    return model, xt[100:132], yt[100:132]


def _pgd50_robust(model, x, y, eps):
    try:
        from fastadv.attacks import PGD
        res = PGD(model, eps=eps, alpha=2.5 * eps / 50, steps=50, random_start=True, seed=0).run(x, y)
        return res.success.logical_not()
    except ImportError:  # PGD lives in another module; a plain one will do
        g = torch.Generator().manual_seed(0)
        xa = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
        for _ in range(50):
            xa.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(xa), y)
            (gr,) = torch.autograd.grad(loss, xa)
            xa = torch.min(torch.max(xa.detach() + 2.5 * eps / 50 * gr.sign(), x - eps), x + eps).clamp(0, 1)
        with torch.no_grad():
            return model(xa).argmax(1) == y


def _check_adv(model, x, y, xa, eps):
    assert (xa - x).abs().flatten(1).amax(1).max() <= eps + 1e-5
    assert xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        return model(xa).argmax(1) == y  # robust per point


def test_autoattack_not_weaker_than_pgd50(mnist):
    model, x, y = mnist
    eps = 0.1
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, steps=20, n_queries=200)
    xa = aa.run_standard_evaluation(x, y, bs=64)
    robust = _check_adv(model, x, y, xa, eps)
    assert torch.equal(robust, aa.last_result.extra["robust"])
    pgd_robust = _pgd50_robust(model, x, y, eps)
    assert robust.float().mean() <= pgd_robust.float().mean()
    # the worst case is per point: what PGD fools, AutoAttack fools too (one point of slack)
    assert (robust & ~pgd_robust).sum() <= 1
    assert 0.0 < aa.robust_accuracy < aa.clean_accuracy


@pytest.mark.slow
def test_autoattack_standard_defaults_vs_reference(mnist):
    """The published standard AutoAttack (reference port in torchattacks) on the same points:
    fastadv's robust accuracy is not higher."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = mnist
    eps = 0.1
    aa = AutoAttack(model, norm="Linf", eps=eps, seed=0)
    robust = _check_adv(model, x, y, aa.run_standard_evaluation(x, y), eps)
    ref = torchattacks.MultiAttack([
        torchattacks.APGD(model, eps=eps, steps=100, loss="ce", seed=0),
        torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0),
        torchattacks.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10, seed=0),
        torchattacks.Square(model, eps=eps, n_queries=5000, seed=0)])
    ref_robust = _check_adv(model, x, y, ref(x, y), eps)
    assert robust.float().mean() <= ref_robust.float().mean()


def test_versions_and_custom(mnist):
    model, _, _ = mnist
    assert AutoAttack(model).attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert AutoAttack(model, version="plus").attacks_to_run == ["apgd-ce", "apgd-dlr", "fab", "square",
                                                                "apgd-t", "fab-t"]
    assert AutoAttack(model, version="rand").attacks_to_run == ["apgd-ce", "apgd-dlr"]
    # L1: the reference's list without Square (no L1 Square here), APGD-T with 5 targets
    l1 = AutoAttack(model, norm="L1", eps=10.0)
    assert l1.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t"]
    assert l1.build_attack("apgd-t").n_target_classes == 5
    assert AutoAttack(model, version="rand").build_attack("apgd-ce").eot_iter == 20
    assert AutoAttack(model, version="plus").build_attack("apgd-dlr").n_restarts == 5
    t = AutoAttack(model).build_attack("apgd-t")
    assert (t.steps, t.n_target_classes, t.n_restarts) == (100, 9, 1)
    f = AutoAttack(model).build_attack("fab-t")
    assert f.multi_targeted and f.n_target_classes == 9 and f.steps == 100
    assert AutoAttack(model).build_attack("square").n_queries == 5000
    # as in the reference, 'custom' may get its list after construction, but not run without one
    empty = AutoAttack(model, version="custom", verbose=False)
    assert empty.attacks_to_run == []
    with pytest.raises(ValueError, match="attacks_to_run"):
        empty.run_standard_evaluation(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        AutoAttack(model, version="custom", attacks_to_run=["apgd-ce", "cw"])
    with pytest.raises(ValueError):
        AutoAttack(model, version="fast")
    assert set(ATTACK_NAMES) >= {"apgd-ce", "apgd-t", "fab-t", "square"}


def test_custom_individual_and_labels(mnist):
    model, x, y = mnist
    x, y = x[:16], y[:16]
    aa = AutoAttack(model, eps=0.15, version="custom", attacks_to_run=["apgd-ce", "apgd-dlr"],
                    steps=10, seed=0)
    out = aa.run_standard_evaluation_individual(x, y, bs=8)
    assert set(out) == {"apgd-ce", "apgd-dlr"}
    for xa in out.values():
        _check_adv(model, x, y, xa, 0.15)
    assert aa.attacks_to_run == ["apgd-ce", "apgd-dlr"]
    xa, labels = aa.run_standard_evaluation(x, y, bs=8, return_labels=True)
    with torch.no_grad():
        assert torch.equal(labels, model(xa).argmax(1))
    extra = aa.last_result.extra
    # each non-robust point is credited to exactly one attack, clean errors to none
    fooled = sum(v.long() for v in extra["per_attack"].values())
    assert torch.equal(fooled.bool(), extra["clean"] & ~extra["robust"])


def test_resume_from_state_file(mnist, tmp_path):
    model, x, y = mnist
    x, y = x[:24], y[:24]
    path = str(tmp_path / "aa_state.pt")
    seen = []

    def stop_after_first(name, n):
        seen.append(name)
        if name == "apgd-t":
            raise KeyboardInterrupt

    aa = AutoAttack(model, eps=0.1, version="custom", attacks_to_run=["apgd-ce", "apgd-t", "square"],
                    steps=10, n_queries=50, seed=0)
    with pytest.raises(KeyboardInterrupt):
        aa.run_standard_evaluation(x, y, bs=24, state_path=path, progress=stop_after_first)
    assert os.path.exists(path)
    first = torch.load(path, weights_only=True)
    assert first["tried"][0].any() and first["tried"][1].any() and not first["tried"][2].any()
    seen.clear()
    xa = aa.run_standard_evaluation(x, y, bs=24, state_path=path, progress=lambda n, k: seen.append(n))
    assert seen == ["square"] or seen == []  # apgd-ce and apgd-t are not run again
    robust = _check_adv(model, x, y, xa, 0.1)
    assert torch.equal(robust, aa.last_result.extra["robust"])
    # points fooled before the interruption are still fooled, by the same attack
    att = aa.last_result.extra["attack_of"]
    assert torch.equal(att[first["attack_of"] >= 0], first["attack_of"][first["attack_of"] >= 0])
    # another data set does not pick up this state
    with pytest.warns(UserWarning, match="other data"):
        aa.run_standard_evaluation(x.flip(0), y.flip(0), bs=24, state_path=path)


def test_progress_gets_each_attacks_total_and_two_argument_callbacks_still_work(mnist):
    model, x, y = mnist
    kw = dict(eps=0.1, version="custom", attacks_to_run=["apgd-ce", "apgd-t", "square"], steps=3,
              n_queries=20, seed=0)
    calls = []

    def with_total(name, n, total=None):
        calls.append((name, n, total))

    aa = AutoAttack(model, **kw)
    aa.run_standard_evaluation(x, y, bs=8, progress=with_total)
    ex = aa.last_result.extra
    summary = ex["summary"]
    from fastadv.eval import autoattack_summary
    assert summary == autoattack_summary(aa) and summary.n == len(x)
    still = int(ex["clean"].sum())
    assert still > 0
    ran = []
    for row in summary:
        name = row["attack"]
        mine = [c for c in calls if c[0] == name]
        if still == 0:
            assert not mine     # nothing left: the attack does not run
            continue
        ran.append(name)
        # announced first with its total (the points still robust), then chunk by chunk up to it
        assert mine[0] == (name, 0, still), mine
        assert all(t == still for _, _, t in mine) and sum(n for _, n, _ in mine) == still
        assert all(0 < n <= 8 for _, n, _ in mine[1:])
        still -= row["fooled"]
    assert len(ran) >= 2
    # a two-argument callback: chunks only, as before
    two = []
    AutoAttack(model, **kw).run_standard_evaluation(x, y, bs=8, progress=lambda name, n: two.append((name, n)))
    assert two == [(name, n) for name, n, _ in calls if n]
    with pytest.raises(TypeError, match="progress: expected a callable"):
        AutoAttack(model, **kw).run_standard_evaluation(x, y, bs=8, progress=5)


def test_progress_total_after_a_resume_counts_only_what_is_left(mnist, tmp_path):
    model, x, y = mnist
    path = str(tmp_path / "aa_state.pt")
    kw = dict(eps=0.1, version="custom", attacks_to_run=["apgd-ce"], steps=3, seed=0)

    def stop_after_two_chunks(name, n, total):
        if n and sum(1 for c in calls if c[1]) == 1:
            raise KeyboardInterrupt
        calls.append((name, n, total))

    calls = []
    with pytest.raises(KeyboardInterrupt):
        AutoAttack(model, **kw).run_standard_evaluation(x, y, bs=8, state_path=path, progress=stop_after_two_chunks)
    saved = torch.load(path, weights_only=True)
    left = int((saved["robust"] & ~saved["tried"][0]).sum())
    assert int(saved["tried"][0].sum()) == 16 and left > 0    # two chunks of 8 were done
    calls = []
    AutoAttack(model, **kw).run_standard_evaluation(x, y, bs=8, state_path=path,
                                                    progress=lambda name, n, total: calls.append((name, n, total)))
    assert calls[0] == ("apgd-ce", 0, left) and sum(n for _, n, _ in calls) == left
