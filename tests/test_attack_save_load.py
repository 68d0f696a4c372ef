"""torchattacks' ``save``/``load`` on fastadv attacks: the printed and returned figures, the
file's contents (readable by torchattacks' own ``load``), normalization, and bad input."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastadv
import zoo


@pytest.fixture(scope="module")
def mnist():
    model = zoo.mnist_cnn()
    _, (x, y) = zoo.mnist_split()
    return model, x[:40], y[:40]


def test_save_figures_and_file(mnist, tmp_path, capsys):
    model, x, y = mnist
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    atk = fastadv.PGD(model, eps=0.1, alpha=0.02, steps=5, seed=0)
    path = tmp_path / "adv.pt"
    rob, l2, _ = atk.save(loader, save_path=str(path), verbose=True, return_verbose=True,
                          save_predictions=True, save_clean_inputs=True)
    assert "Robust accuracy" in capsys.readouterr().out
    d = torch.load(path, weights_only=True)
    assert d["save_type"] == "float" and torch.equal(d["labels"], y) and torch.equal(d["clean_inputs"], x)
    adv = d["adv_inputs"]
    # each batch attacked as the attack would on its own (same seed per call)
    expect = torch.cat([fastadv.PGD(model, eps=0.1, alpha=0.02, steps=5, seed=0)(x[i:i + 16], y[i:i + 16])
                        for i in range(0, 40, 16)])
    assert torch.equal(adv, expect)
    with torch.no_grad():
        pred = model(adv).argmax(1)
    assert torch.equal(d["preds"], pred)
    right = pred == y
    assert rob == pytest.approx(100.0 * right.float().mean().item())
    assert l2 == pytest.approx((adv - x).flatten(1).norm(dim=1)[~right].mean().item(), rel=1e-5)
    assert 0 < rob < 100


def test_int_save_and_loads(mnist, tmp_path):
    model, x, y = mnist
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    path = tmp_path / "adv_int.pt"
    atk = fastadv.FGSM(model, eps=0.1)
    assert atk.save(loader, save_path=str(path), verbose=False, save_type="int") is None
    d = torch.load(path, weights_only=True)
    assert d["adv_inputs"].dtype == torch.uint8
    x_adv = atk(x, y)
    assert (d["adv_inputs"].float() / 255 - x_adv).abs().max() <= 0.5 / 255 + 1e-6
    back = fastadv.FGSM.load(str(path), batch_size=8)
    xb, yb = next(iter(back))
    assert xb.shape == (8, 1, 28, 28) and torch.equal(yb, y[:8])
    assert torch.allclose(xb, d["adv_inputs"][:8].float() / 255)
    ta = pytest.importorskip("torchattacks")
    xt, yt = next(iter(ta.attack.Attack.load(str(path), batch_size=8)))
    assert torch.allclose(xt, xb) and torch.equal(yt, yb)
    with pytest.raises(ValueError, match="preds"):
        fastadv.FGSM.load(str(path), load_predictions=True)


def test_save_with_normalization_writes_pixel_space(mnist, tmp_path):
    model, x, y = mnist
    mean, std = [0.1307], [0.3081]
    plain = fastadv.PGD(model, eps=0.1, alpha=0.02, steps=3, seed=0)
    plain_px = plain(x, y)
    normed = fastadv.PGD(_normalizing(model, mean, std), eps=0.1, alpha=0.02, steps=3, seed=0)
    normed.set_normalization_used(mean, std)
    xn = (x - mean[0]) / std[0]
    path = tmp_path / "n.pt"
    normed.save(DataLoader(TensorDataset(xn, y), batch_size=40), save_path=str(path), verbose=False,
                save_clean_inputs=True)
    d = torch.load(path, weights_only=True)
    assert torch.allclose(d["clean_inputs"], x, atol=1e-6)
    assert torch.allclose(d["adv_inputs"], plain_px, atol=1e-5)


def _normalizing(model, mean, std):
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, z):          # a model that takes normalized input
            return self.inner(z * std[0] + mean[0])
    return Norm().eval()


def test_save_bad_input(mnist):
    model, x, y = mnist
    atk = fastadv.FGSM(model, eps=0.1)
    with pytest.raises(ValueError, match="save_type"):
        atk.save([(x, y)], save_type="uint8", verbose=False)
    with pytest.raises(TypeError, match="data_loader"):
        atk.save([x], verbose=False)
    with pytest.raises(TypeError, match="save_path"):
        atk.save([(x, y)], save_path=3, verbose=False)
    with pytest.raises(TypeError, match="verbose"):
        atk.save([(x, y)], verbose="yes")


def test_save_leaves_the_model_as_found(mnist):
    _, x, y = mnist
    model = zoo.mnist_cnn_bn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fastadv.PGD(model, eps=0.1, steps=2).save([(x, y)], verbose=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_load_normalizes_with_checked_statistics(mnist, tmp_path):
    model, x, y = mnist
    path = tmp_path / "a.pt"
    fastadv.FGSM(model, eps=0.1).save([(x, y)], save_path=str(path), verbose=False)
    raw = torch.load(path, weights_only=True)["adv_inputs"]
    xb, _ = next(iter(fastadv.FGSM.load(str(path), batch_size=40, normalize={"mean": [0.5], "std": [0.25]})))
    assert torch.allclose(xb, (raw - 0.5) / 0.25)
    with pytest.raises(ValueError, match="normalize: std"):
        fastadv.FGSM.load(str(path), normalize={"mean": [0.5], "std": [0.0]})
