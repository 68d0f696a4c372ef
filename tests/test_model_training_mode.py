"""``set_model_training_mode``: torchattacks' switch for the mode the model is attacked in
(eval; or train with BatchNorm and/or dropout held in eval). Checked by recording each
module's flag during the attack's forward passes, against torchattacks' own switch on the
same model, and that the model comes back as found."""
import itertools

import pytest
import torch

import fastadv
import zoo


def _record_modes(model):
    """Hook every module; returns (seen, remove): seen[name] = set of training flags seen."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        def hook(mod, inp, name=name):
            seen.setdefault(name, set()).add(mod.training)
        handles.append(m.register_forward_pre_hook(hook))

    def remove():
        for h in handles:
            h.remove()
    return seen, remove


@pytest.fixture(scope="module")
def data():
    _, (x, y) = zoo.mnist_split()
    return x[:24], y[:24]


@pytest.mark.parametrize("model_training, bn, dropout", list(itertools.product([False, True], repeat=3)))
def test_modes_match_torchattacks(data, model_training, bn, dropout):
    x, y = data
    model = zoo.mnist_cnn_bn().eval()
    model.features[1].train()          # a mixed-mode model, given back as is
    before = {n: m.training for n, m in model.named_modules()}
    atk = fastadv.PGD(model, eps=0.1, alpha=0.05, steps=2, seed=0)
    assert atk.set_model_training_mode(model_training, bn, dropout) is atk
    seen, remove = _record_modes(model)
    try:
        atk(x, y)
    finally:
        remove()
    assert {n: m.training for n, m in model.named_modules()} == before
    ta = pytest.importorskip("torchattacks")
    ref_atk = ta.PGD(model, eps=0.1, alpha=0.05, steps=2)
    ref_atk.set_model_training_mode(model_training, bn, dropout)
    ref_seen, remove = _record_modes(model)
    try:
        with torch.random.fork_rng():
            ref_atk(x, y)
    finally:
        remove()
    model.load_state_dict(zoo.mnist_cnn_bn().state_dict())   # torchattacks updated BN stats
    assert seen == ref_seen
    # and what that means, independently of torchattacks
    for name, m in model.named_modules():
        is_bn = isinstance(m, torch.nn.BatchNorm2d)
        is_do = isinstance(m, torch.nn.Dropout)
        want = model_training and (bn if is_bn else dropout if is_do else True)
        assert seen[name] == {want}, name


def test_train_mode_leaves_bn_stats_alone(data):
    x, y = data
    model = zoo.mnist_cnn_bn().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fastadv.PGD(model, eps=0.1, steps=2).set_model_training_mode(True, True, True)(x, y)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_bad_values_and_model_mode_names():
    model = zoo.mnist_cnn_bn()
    atk = fastadv.PGD(model)
    with pytest.raises(TypeError, match="batchnorm_training"):
        atk.set_model_training_mode(True, "yes")
    with pytest.raises(ValueError, match="model_mode"):
        fastadv.PGD(model, model_mode="training")
    assert fastadv.PGD(model, model_mode="train_bn_eval").model_mode == "train_bn_eval"
    assert atk.set_model_training_mode().model_mode == "eval"


def test_repr_names_a_model_mode_other_than_eval():
    model = zoo.mnist_cnn_bn()
    assert "model_mode" not in repr(fastadv.PGD(model))
    assert "model_mode='train_bn_dropout_eval'" in repr(fastadv.PGD(model).set_model_training_mode(True))
