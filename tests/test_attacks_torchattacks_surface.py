"""torchattacks 3.5's own calls, run on both libraries side by side: the ``Attack`` base surface
(device, model_name, target modes, their messages and return values, get_logits,
get_target_label, repr), PGD/FGSM returning torchattacks' last iterate, seeded and
global-seed reproducibility, and MultiAttack."""
import pytest
import torch

import fastadv
import zoo

ta = pytest.importorskip("torchattacks")

N = 128


@pytest.fixture(scope="module")
def mnist():
    model, x, y = zoo.mnist_cnn_and_points(N)
    return model, x.clone(), y.clone()


def _pred(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def _rows_within(a, b, tol=1e-6):
    return ((a - b).abs().flatten(1).amax(1) <= tol).float().mean().item()


# ------------------------------------------------------------ the base surface
_BUILD = {"PGD": {}, "PGDL2": {}, "FGSM": {}, "CW": {}, "DeepFool": {},
          "PGD-kw": dict(eps=0.1, alpha=0.01, steps=3, random_start=False)}


@pytest.mark.parametrize("name", sorted(_BUILD))
def test_attributes_and_repr_are_torchattacks(mnist, name):
    model = mnist[0]
    cls, kw = name.split("-")[0], _BUILD[name]
    theirs, ours = getattr(ta, cls)(model, **kw), getattr(fastadv, cls)(model, **kw)
    for attr in ("device", "model_name", "attack_mode", "supported_mode", "targeted", "attack"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.get_mode() == theirs.get_mode() == "default"
    assert repr(ours) == repr(theirs)
    theirs.set_normalization_used([0.5], [0.25])
    ours.set_normalization_used([0.5], [0.25])
    assert repr(ours) == repr(theirs)
    for k in ("mean", "std"):
        assert torch.equal(ours.normalization_used[k], theirs.normalization_used[k])
    if "targeted" in theirs.supported_mode:
        theirs.set_mode_targeted_least_likely(2, quiet=True)
        ours.set_mode_targeted_least_likely(2, quiet=True)
        assert repr(ours) == repr(theirs) and ours.targeted and ours.get_mode() == theirs.get_mode()
    theirs.set_device("cpu")
    ours.set_device("cpu")
    assert repr(ours) == repr(theirs)
    # fastadv's own options follow, as Python literals, only when not at their defaults
    assert repr(fastadv.PGD(model, restarts=2, keep="best")).endswith(
        "random_start=True, restarts=2, keep='best')")
    assert repr(fastadv.PGD(model, early_stop=True)).endswith("early_stop=True)")  # keep: implied


_SETTERS = [("set_mode_targeted_by_label", ()), ("set_mode_targeted_random", ()),
            ("set_mode_targeted_least_likely", (2,)),
            ("set_mode_targeted_by_function", (lambda x, y: (y + 1) % 10,)), ("set_mode_default", ())]


@pytest.mark.parametrize("cls", ["PGD", "FGSM", "PGDL2", "CW"])
def test_target_mode_setters_print_and_return_as_torchattacks(mnist, cls, capsys):
    model = mnist[0]
    theirs, ours = getattr(ta, cls)(model), getattr(fastadv, cls)(model)
    for setter, args in _SETTERS:
        a = getattr(theirs, setter)(*args)
        said = capsys.readouterr().out
        b = getattr(ours, setter)(*args)
        assert capsys.readouterr().out == said and said.startswith("Attack mode is changed to '")
        assert a is None and b is None
        assert (ours.attack_mode, ours.targeted) == (theirs.attack_mode, theirs.targeted)
        if setter != "set_mode_default":
            getattr(theirs, setter)(*args, quiet=True)
            getattr(ours, setter)(*args, quiet=True)
            assert capsys.readouterr().out == ""
    with pytest.raises(TypeError, match="quiet"):
        ours.set_mode_targeted_random(quiet="no")


def test_untargeted_attacks_refuse_target_modes_as_torchattacks(mnist):
    model = mnist[0]
    for theirs, ours in ((ta.DeepFool(model), fastadv.DeepFool(model)),
                         (ta.MultiAttack([ta.FGSM(model), ta.FGSM(model)]),
                          fastadv.MultiAttack([fastadv.FGSM(model), fastadv.FGSM(model)]))):
        assert ours.supported_mode == theirs.supported_mode == ["default"]
        for setter, args in _SETTERS[:-1]:
            for atk in (theirs, ours):
                with pytest.raises(ValueError, match=r"^Targeted mode is not supported\.$"):
                    getattr(atk, setter)(*args)
            assert ours.attack_mode == "default" and not ours.targeted
    with pytest.raises(ValueError, match="targeted: DeepFool is untargeted"):
        fastadv.DeepFool(model, targeted=True)


def test_get_target_label_as_torchattacks(mnist):
    model, x, y = mnist
    x, y = x[:64], y[:64]
    theirs, ours = ta.PGD(model), fastadv.PGD(model)
    for atk in (theirs, ours):
        with pytest.raises(ValueError, match="target_map_function is not initialized by set_mode_targeted"):
            atk.get_target_label(x, y)
    for atk in (theirs, ours):
        atk.set_mode_targeted_by_label(quiet=True)
    assert ours.get_target_label(x, y) is y
    fn = lambda a, b: (b + 3) % 10  # noqa: E731
    for atk in (theirs, ours):
        atk.set_mode_targeted_by_function(fn, quiet=True)
    assert torch.equal(ours.get_target_label(x, y), theirs.get_target_label(x, y))
    for k in (1, 3):
        for atk in (theirs, ours):
            atk.set_mode_targeted_least_likely(k, quiet=True)
        assert torch.equal(ours.get_target_label(x, y), theirs.get_target_label(x, y))
        assert torch.equal(ours.get_least_likely_label(x), theirs.get_least_likely_label(x))
    ours.set_mode_targeted_random(quiet=True)
    t = ours.get_target_label(x, y)
    assert t.dtype == torch.long and bool((t != y).all()) and 0 <= int(t.min()) and int(t.max()) <= 9
    assert torch.equal(ours.get_random_target_label(x, y), t)   # its own generator, as a run's


def test_least_likely_target_is_never_the_true_label():
    """Points whose true label is the model's least likely class: torchattacks skips the label,
    and so does fastadv, in get_target_label and in a run."""
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    model = zoo.LinearModel(w, torch.zeros(10)).eval()
    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = model(x)
    y = z.argmin(1)                          # every label is the least likely class
    theirs, ours = ta.PGD(model, eps=0.1, steps=2), fastadv.PGD(model, eps=0.1, steps=2)
    for atk in (theirs, ours):
        atk.set_mode_targeted_least_likely(quiet=True)
    t = ours.get_target_label(x, y)
    assert bool((t != y).all())
    assert torch.equal(t, theirs.get_target_label(x, y))
    assert torch.equal(t, z.topk(2, dim=1, largest=False).indices[:, 1])
    assert torch.equal(ours.run(x, y).extra["target"], t)


def test_get_logits_as_torchattacks(mnist):
    model, x, y = mnist
    x = x[:16]
    theirs, ours = ta.PGD(model), fastadv.PGD(model)
    assert torch.equal(ours.get_logits(x), theirs.get_logits(x))
    xn = (x - 0.5) / 0.25
    theirs.set_normalization_used([0.5], [0.25])
    ours.set_normalization_used([0.5], [0.25])
    # outside a call torchattacks reads normalized inputs as they are, and so does fastadv
    assert torch.equal(ours.get_logits(xn), theirs.get_logits(xn))
    torch.testing.assert_close(ours.normalize(x), theirs.normalize(x))
    torch.testing.assert_close(ours.inverse_normalize(xn), theirs.inverse_normalize(xn))
    # normalization=(mean, std) keeps the user in pixel space: get_logits normalizes
    wrapped = torch.nn.Sequential(_Denormalize(0.5, 0.25), model).eval()
    pix = fastadv.PGD(wrapped, normalization=([0.5], [0.25]))
    torch.testing.assert_close(pix.get_logits(x), model(x))
    xg = x.clone().requires_grad_(True)
    pix.get_logits(xg).sum().backward()                 # differentiable, as torchattacks'
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="normalize: no normalization"):
        fastadv.PGD(model).normalize(x)
    assert torch.equal(fastadv.PGD.to_type(x, "int"), ta.PGD.to_type(x, "int"))
    u8 = ta.PGD.to_type(x, "int")
    assert torch.equal(fastadv.PGD.to_type(u8, "float"), ta.PGD.to_type(u8, "float"))


class _Denormalize(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, z):
        return z * self.std + self.mean


def test_device_and_set_device(mnist):
    model, x, y = mnist
    atk = fastadv.PGD(model, eps=0.1, steps=1)
    assert atk.device == torch.device("cpu") == ta.PGD(model).device
    atk.set_device(None)          # attack where the input is
    assert atk.device is None and atk(x[:4], y[:4]).device == x.device
    atk.set_device("cpu")
    assert atk.device == torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="plain callable"):
        assert fastadv.PGD(lambda t: model(t)).device is None
    other = zoo.mnist_cnn()
    atk.set_model(other)
    assert atk.model is other and atk.model_name == "SmallCNN"


@pytest.mark.gpu
def test_inputs_move_to_the_models_device():
    model, x, y = zoo.mnist_cnn_and_points(32)
    model = model.cuda()
    for atk in (fastadv.PGD(model, eps=0.1, steps=2), ta.PGD(model, eps=0.1, steps=2)):
        assert torch.device(atk.device).type == "cuda"
        out = atk(x, y)                       # CPU tensors, as torchattacks takes them
        assert out.device.type == "cuda"


# ------------------------------------------- results: torchattacks' last iterate
@pytest.mark.parametrize("cls,kw,peer_kw", [
    ("PGD", dict(eps=0.1, alpha=0.025, steps=10), {}),
    # torchattacks adds eps_for_division to the norm of the batch-*mean* gradient, which
    # shortens its steps by ~1e-10·B/|grad| (see the README): with 0 the algorithms agree
    ("PGDL2", dict(eps=1.5, alpha=0.375, steps=10), dict(eps_for_division=0.0)),
    ("FGSM", dict(eps=0.1), {}),
])
def test_default_result_is_torchattacks_last_iterate(mnist, cls, kw, peer_kw):
    model, x, y = mnist
    start = {} if cls == "FGSM" else dict(random_start=False)
    theirs = getattr(ta, cls)(model, **kw, **start, **peer_kw)(x, y)
    exact = getattr(fastadv, cls)(model, **kw, **start, channels_last=False)(x, y)
    # the same arithmetic up to float rounding: one step differs by <= 6e-8 (the cpp L2
    # kernel sums the norm in another order than torch); ten steps through the model
    # amplify that (max measured 1.7e-6 for PGDL2, 2.4e-7 with backend="torch")
    assert (exact - theirs).abs().max().item() <= 1e-5
    # fastadv's default NHWC layout rounds the convolutions differently; where two max-pool
    # inputs are that close the gradient takes the other branch, so a few pixels step the
    # other way (measured on 128-256 points: 99.5-99.9% of pixels equal, every prediction
    # the same)
    default = getattr(fastadv, cls)(model, **kw, **start)(x, y)
    assert ((default - theirs).abs() <= 1e-6).float().mean().item() >= 0.99
    assert (_pred(model, default) == _pred(model, theirs)).float().mean().item() >= 0.98


@pytest.mark.parametrize("cls,kw", [("PGD", dict(eps=0.1, alpha=0.025)),
                                    ("PGDL2", dict(eps=1.5, alpha=0.375, eps_for_division=0.0))])
def test_seed_gives_torchattacks_random_start(mnist, cls, kw):
    """fastadv's seed=s draws what torchattacks draws after torch.manual_seed(s)."""
    model, x, y = mnist

    def theirs(steps):
        with torch.random.fork_rng():
            torch.manual_seed(5)
            return getattr(ta, cls)(model, steps=steps, **kw)(x, y)

    def ours(steps):
        ours_kw = {k: v for k, v in kw.items() if k != "eps_for_division"}
        return getattr(fastadv, cls)(model, steps=steps, seed=5, channels_last=False, **ours_kw)(x, y)

    assert torch.equal(ours(0), theirs(0))                       # the start itself, bit for bit
    assert (ours(1) - theirs(1)).abs().max().item() <= 1e-6
    a, b = ours(10), theirs(10)
    assert _rows_within(a, b, 1e-5) >= 0.95                      # measured 97-99%
    assert (_pred(model, a) == _pred(model, b)).float().mean().item() >= 0.98


def test_keep_best_is_opt_in_and_never_weaker(mnist):
    model, x, y = mnist
    kw = dict(eps=0.1, alpha=0.05, steps=10, random_start=False)   # big steps oscillate
    last = fastadv.PGD(model, **kw).run(x, y)
    best = fastadv.PGD(model, keep="best", **kw).run(x, y)
    assert last.x_adv.equal(fastadv.PGD(model, keep="last", **kw)(x, y))
    assert bool((best.success | ~last.success).all())
    assert fastadv.PGD(model, early_stop=True).keep == "best"
    with pytest.raises(ValueError, match="early_stop: needs keep='best'"):
        fastadv.PGD(model, early_stop=True, keep="last")
    with pytest.raises(ValueError, match="keep: expected 'best', 'last' or None"):
        fastadv.PGD(model, keep="first")


# ------------------------------------------------------------- reproducibility
@pytest.mark.filterwarnings("ignore:fastadv. PGD drew the same random numbers")  # meant here
def test_manual_seed_reproduces_without_touching_the_global_rng(mnist):
    model, x, y = mnist
    x, y = x[:64], y[:64]
    atk = fastadv.PGD(model, eps=0.1, steps=2)
    runs = {}
    with torch.random.fork_rng():
        for s in (1, 1, 2):
            torch.manual_seed(s)
            before = torch.get_rng_state()
            runs.setdefault(s, []).append(atk(x, y))
            assert torch.equal(torch.get_rng_state(), before)       # neither drawn nor reseeded
        assert torch.equal(runs[1][0], runs[1][1])
        assert not torch.equal(runs[1][0], runs[2][0])
        # random targets too
        tgt = fastadv.PGD(model, eps=0.1, steps=1)
        tgt.set_mode_targeted_random(quiet=True)
        torch.manual_seed(3)
        t1 = tgt.run(x, y).extra["target"]
        torch.manual_seed(3)
        assert torch.equal(tgt.run(x, y).extra["target"], t1)
        # drawing from the global RNG in between gives another start
        torch.manual_seed(1)
        torch.rand(1)
        assert not torch.equal(atk(x, y), runs[1][0])


def test_a_repeated_draw_warns_once(mnist, recwarn):
    model, x, y = mnist
    x, y = x[:32], y[:32]
    def repeats():
        return [w for w in recwarn if "drew the same random numbers as its previous call" in str(w.message)]

    atk = fastadv.PGD(model, eps=0.1, steps=1)
    a = atk(x, y)
    assert not repeats()
    b = atk(x, y)
    assert torch.equal(a, b)
    assert len(repeats()) == 1 and repeats()[0].category is RuntimeWarning
    atk(x, y)
    atk(x[:16], y[:16])
    assert len(repeats()) == 1                                  # once per attack
    # nothing random drawn, a fixed seed, a generator that advances: no warning
    for quiet in (fastadv.PGD(model, eps=0.1, steps=1, random_start=False),
                  fastadv.PGD(model, eps=0.1, steps=1, seed=0)):
        quiet(x, y)
        quiet(x, y)
    g = fastadv.PGD(model, eps=0.1, steps=1, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(g(x, y), g(x, y))
    assert len(repeats()) == 1


# ------------------------------------------------------------------ MultiAttack
def _multi_pair(model, steps=5, **kw):
    """The same three attacks from each library (fastadv's in NCHW, for float agreement)."""
    return ([ta.PGD(model, eps=0.05, alpha=0.01, steps=steps, **kw),
             ta.PGD(model, eps=0.08, alpha=0.02, steps=steps, **kw), ta.FGSM(model, eps=0.1)],
            [fastadv.PGD(model, eps=0.05, alpha=0.01, steps=steps, channels_last=False, **kw),
             fastadv.PGD(model, eps=0.08, alpha=0.02, steps=steps, channels_last=False, **kw),
             fastadv.FGSM(model, eps=0.1, channels_last=False)])


def test_multiattack_matches_torchattacks(mnist, capsys):
    model, x, y = mnist
    theirs_atks, ours_atks = _multi_pair(model)
    theirs = ta.MultiAttack(theirs_atks, verbose=True)
    ours = fastadv.MultiAttack(ours_atks, verbose=True, seed=9)   # the attacks draw from it in turn
    plain = fastadv.MultiAttack([fastadv.PGD(model, eps=0.05, alpha=0.01, steps=5), fastadv.PGD(
        model, eps=0.08, alpha=0.02, steps=5), fastadv.FGSM(model, eps=0.1)], verbose=True)
    assert repr(plain) == repr(theirs)
    with torch.random.fork_rng():
        torch.manual_seed(9)
        a = theirs(x, y)
    said = capsys.readouterr().out
    res = ours.run(x, y)
    assert capsys.readouterr().out == said and said.startswith("Attack success rate: ")
    assert (res.x_adv - a).abs().max().item() <= 1e-6               # measured 7e-9
    assert torch.equal(res.success, _pred(model, res.x_adv) != y)
    recs = res.extra["records"]
    assert recs[0] == N and recs == sorted(recs, reverse=True) and recs[-1] < recs[1] < N
    # fooled points keep the output of the attack that fooled them; the others come back as given
    robust = ~res.success
    assert torch.equal(res.x_adv[robust], x[robust]) and bool((res.extra["attack"][robust] == -1).all())


def test_multiattack_fooled_points_leave(mnist):
    model, x, y = mnist
    seen, outs = [], []

    class Spy(fastadv.PGD):
        def run(self, xs, ys, target=None):
            seen.append(xs.shape[0])
            res = super().run(xs, ys, target)
            outs.append(res.x_adv)
            return res

    first = Spy(model, eps=0.1, alpha=0.025, steps=5)
    second = Spy(model, eps=0.1, alpha=0.025, steps=5)
    res = fastadv.MultiAttack([first, second]).run(x, y)
    assert seen[0] == N and seen[1] == res.extra["records"][1] < N
    assert int(res.success.sum()) == N - res.extra["records"][-1]
    # two identical random-start PGDs are two restarts (different starts), as in torchattacks:
    # on the points left to it, the second one's iterates are not the first one's
    again = outs[0][res.extra["attack"] != 0]
    assert again.shape == outs[1].shape
    assert bool(((again - outs[1]).flatten(1).abs().amax(1) > 0).all())
    outs.clear()
    # every point is fooled already: the second attack never runs
    seen.clear()
    huge = Spy(model, eps=1.0, alpha=0.5, steps=2, allow_large_eps=True)
    res = fastadv.MultiAttack([huge, Spy(model, eps=0.1, steps=1)]).run(x, y)
    assert seen == [N] and res.extra["records"] == [N, 0] and bool(res.success.all())


def test_multiattack_settings_reach_its_attacks(mnist):
    model, x, y = mnist
    atks = [fastadv.PGD(model, eps=0.1, steps=2), fastadv.FGSM(model, eps=0.1)]
    multi = fastadv.MultiAttack(atks)
    multi.set_normalization_used([0.5], [0.25])
    multi.set_model_training_mode(True)
    multi.set_device("cpu")
    for atk in atks:
        assert atk.normalization_used is not None and atk.model_mode == "train_bn_dropout_eval"
        assert atk.device == torch.device("cpu")
    # normalized in and out, as torchattacks' MultiAttack after set_normalization_used
    wrapped = torch.nn.Sequential(_Denormalize(0.5, 0.25), model).eval()
    multi = fastadv.MultiAttack([fastadv.PGD(wrapped, eps=0.1, steps=3), fastadv.FGSM(wrapped, eps=0.1)])
    multi.set_normalization_used([0.5], [0.25])
    res = multi.run((x - 0.5) / 0.25, y)
    assert (res.x_adv * 0.25 + 0.5 - x).abs().max().item() <= 0.1 + 1e-5
    assert torch.equal(res.success, _pred(wrapped, res.x_adv) != y) and bool(res.success.any())
    # a torchattacks attack among them runs as it is, judged by a forward
    mixed = fastadv.MultiAttack([ta.PGD(model, eps=0.05, steps=3), fastadv.FGSM(model, eps=0.1)]).run(x, y)
    assert torch.equal(mixed.success, _pred(model, mixed.x_adv) != y)
    assert mixed.extra["records"][1] < N and bool((mixed.steps[mixed.extra["attack"] == 0] == 0).all())
    with pytest.raises(ValueError, match="attacks: expected at least two attacks, got 1"):
        fastadv.MultiAttack(atks[:1])
    with pytest.raises(ValueError, match="references a different model"):
        fastadv.MultiAttack([atks[0], fastadv.FGSM(zoo.mnist_cnn())])
    with pytest.raises(TypeError, match=r"attacks\[1\]: expected an attack"):
        fastadv.MultiAttack([atks[0], "PGD"])
    with pytest.raises(ValueError, match="target: MultiAttack is untargeted"):
        fastadv.MultiAttack(atks).run(x, y, target=y)


def test_multiattack_save_returns_rates_as_torchattacks(mnist, capsys):
    model, x, y = mnist
    loader = [(x[:64], y[:64]), (x[64:], y[64:])]
    theirs_atks, ours_atks = _multi_pair(model, steps=3, random_start=False)
    rob_t, sr_t, l2_t, _ = ta.MultiAttack(theirs_atks).save(loader, verbose=False, return_verbose=True)
    out = fastadv.MultiAttack(ours_atks).save(loader, verbose=True, return_verbose=True)
    line = capsys.readouterr().out
    assert "Attack success rate: " in line and "Robust accuracy" in line
    rob, sr, l2, _ = out
    assert rob == pytest.approx(rob_t) and sr == pytest.approx(sr_t)
    assert l2 == pytest.approx(l2_t, rel=1e-4)


# ---------------------------------------------------- label range on every path
@pytest.mark.parametrize("make", [
    lambda m, loss: fastadv.FGSM(m, eps=0.1, loss=loss),
    lambda m, loss: fastadv.PGD(m, eps=0.1, steps=2, random_start=False, loss=loss),
    lambda m, loss: fastadv.PGDL2(m, eps=1.0, steps=2, random_start=False, loss=loss),
    lambda m, loss: fastadv.PGD(m, eps=0.1, steps=2, loss=loss),
])
@pytest.mark.parametrize("loss", ["ce", "cw", "dlr"])
@pytest.mark.parametrize("bad", [10, -1])
def test_labels_out_of_range_get_the_clear_error(mnist, make, loss, bad):
    model, x, y = mnist
    y = y[:8].clone()
    y[3] = bad
    lo, hi = int(y.min()), int(y.max())
    with pytest.raises(ValueError, match=rf"y: expected labels in \[0, 9\] for a model with 10 "
                                         rf"classes, got range \[{lo}, {hi}\]"):
        make(model, loss).run(x[:8], y)
