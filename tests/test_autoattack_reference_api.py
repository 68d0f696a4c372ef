"""The reference AutoAttack's (fra31/auto-attack) own calls, only the import swapped: its
constructor (names, positions, defaults, ``device``, ``log_path``), its verbose log, the
sub-attack objects and the tweaks people make to them, and a comparison with torchattacks'
AutoAttack on the same model and points."""
import inspect
import re

import pytest
import torch

import zoo
from fastadv import AutoAttack
from fastadv.attacks import APGD, APGDT, FAB, Square

# the reference's AutoAttack.__init__, in order
REFERENCE_SIGNATURE = [("model", inspect.Parameter.empty), ("norm", "Linf"), ("eps", .3), ("seed", None),
                       ("verbose", True), ("attacks_to_run", []), ("version", "standard"),
                       ("is_tf_model", False), ("device", "cuda"), ("log_path", None)]


@pytest.fixture(scope="module")
def mnist():
    return zoo.mnist_cnn_and_points(24, start=200)


def _robust(model, x, y, xa, eps, norm="Linf"):
    d = (xa - x).flatten(1)
    dist = {"Linf": d.abs().amax(1), "L2": d.norm(dim=1), "L1": d.abs().sum(1)}[norm]
    assert dist.max() <= eps + 1e-5 and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        return model(xa).argmax(1) == y


# ---------------------------------------------------------------- constructor
def test_constructor_names_positions_and_defaults_are_the_references():
    params = list(inspect.signature(AutoAttack).parameters.values())
    got = [(p.name, p.default) for p in params[:len(REFERENCE_SIGNATURE)]]
    assert got == REFERENCE_SIGNATURE
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:len(REFERENCE_SIGNATURE)])


def test_defaults_for_a_user_who_passes_nothing(mnist, capsys):
    model, _, _ = mnist
    aa = AutoAttack(model)
    assert (aa.norm, aa.eps, aa.epsilon, aa.seed, aa.verbose, aa.version) == ("Linf", .3, .3, None, True, "standard")
    assert aa.device == "cuda" and aa.log_path is None and aa.is_tf_model is False
    assert "setting parameters for standard version" in capsys.readouterr().out  # verbose by default
    # the reference's budgets
    assert (aa.apgd.n_iter, aa.apgd.n_restarts, aa.apgd_targeted.n_iter, aa.apgd_targeted.n_target_classes) == (
        100, 1, 100, 9)
    assert (aa.fab.n_iter, aa.fab.n_restarts, aa.fab.n_target_classes) == (100, 1, 9)
    assert (aa.square.n_queries, aa.square.p_init, aa.square.rescale_schedule) == (5000, .8, False)
    # fastadv's own preferences stay reachable by argument
    quiet = AutoAttack(model, eps=8 / 255, verbose=False, seed=0, steps=20, n_queries=300)
    assert (quiet.eps, quiet.verbose, quiet.apgd.n_iter, quiet.fab.n_iter, quiet.square.n_queries) == (
        8 / 255, False, 20, 20, 300)
    assert capsys.readouterr().out == ""


def test_seed_is_the_fourth_positional_argument(mnist):
    model, _, _ = mnist
    aa = AutoAttack(model, "L2", 1.5, 7, False)
    assert (aa.norm, aa.eps, aa.seed, aa.verbose) == ("L2", 1.5, 7, False)
    # torchattacks' order (version 4th) gets a clear error, not a silent misreading
    with pytest.raises(TypeError, match=r"seed.*version='standard' by name"):
        AutoAttack(model, "Linf", 8 / 255, "standard")


def test_constructor_rejects_what_it_cannot_do(mnist):
    model, _, _ = mnist
    with pytest.raises(ValueError, match="is_tf_model"):
        AutoAttack(model, is_tf_model=True, verbose=False)
    with pytest.raises(ValueError, match="device"):
        AutoAttack(model, device="gpu", verbose=False)
    with pytest.raises(TypeError, match="device"):
        AutoAttack(model, device=2.5, verbose=False)
    with pytest.raises(TypeError, match="log_path"):
        AutoAttack(model, log_path=3, verbose=False)
    with pytest.raises(ValueError, match="attacks_to_run.*version='custom'"):
        AutoAttack(model, attacks_to_run=["apgd-ce"], verbose=False)


@pytest.mark.parametrize("device", ["cpu", "cuda", torch.device("cpu")])
def test_readme_call_with_device_runs_where_the_model_is(mnist, device):
    # the reference README's call, device included; on a CPU-only machine 'cuda' (the
    # default) runs on the model's device instead of failing
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("the CPU-only fallback is what is tested here")
    model, x, y = mnist
    x, y = x[:8], y[:8]
    adversary = AutoAttack(model, norm='Linf', eps=.3, version='standard', device=device, verbose=False)
    x_adv = adversary.run_standard_evaluation(x, y, bs=8)
    assert x_adv.device == x.device and x_adv.shape == x.shape
    robust = _robust(model, x, y, x_adv, .3)
    assert torch.equal(robust, adversary.last_result.extra["robust"])
    assert robust.sum() == 0   # an undefended MNIST net at eps .3: APGD-CE alone fools every point


# ---------------------------------------------------------------- verbose log
_LINES = [r"using custom version including apgd-ce, square",
          r"settings: norm Linf, eps 0\.05, seed 0, .*apgd-ce: 3 iterations, 1 restart.*square: 40 queries, "
          r"p_init 0\.5.*",
          r"initial accuracy: \d+\.\d\d%"]


def test_verbose_log_has_the_references_lines_and_log_path_gets_them(mnist, tmp_path, capsys):
    model, x, y = mnist
    path = tmp_path / "aa_log.txt"
    adversary = AutoAttack(model, norm="Linf", eps=.05, version="custom", seed=0, log_path=str(path))
    adversary.attacks_to_run = ["apgd-ce", "square"]
    adversary.apgd.n_restarts = 1
    adversary.apgd.n_iter = 3
    adversary.square.n_queries = 40
    adversary.square.p_init = .5
    capsys.readouterr()
    x_adv = adversary.run_standard_evaluation(x, y, bs=10)
    out = capsys.readouterr().out.splitlines()
    logged = path.read_text().splitlines()
    assert logged == out                                    # the same lines go to the file
    for pat, line in zip(_LINES, out):
        assert re.fullmatch(pat, line), (pat, line)
    res = adversary.last_result
    robust = _robust(model, x, y, x_adv, .05)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert out[2] == f"initial accuracy: {clean.float().mean().item():.2%}"
    # per attack and batch: how many points were perturbed, and they add up
    per_batch = [re.fullmatch(r"(apgd-ce|square) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed", line)
                 for line in out]
    per_batch = [m for m in per_batch if m]
    for name in ("apgd-ce", "square"):
        got = [m for m in per_batch if m.group(1) == name]
        assert sum(int(m.group(4)) for m in got) == int(res.extra["per_attack"][name].sum())
        assert [int(m.group(2)) for m in got] == list(range(1, int(got[0].group(3)) + 1)) if got else True
    assert int(per_batch[0].group(3)) == -(-int(clean.sum()) // 10)      # ceil(clean points / bs)
    assert sum(int(m.group(5)) for m in per_batch if m.group(1) == "apgd-ce") == int(clean.sum())
    # robust accuracy after each attack, with its time
    after = [re.fullmatch(r"robust accuracy after (APGD-CE|SQUARE): (\d+\.\d\d)% \(total time \d+\.\d s\)", line)
             for line in out]
    after = [m for m in after if m]
    assert [m.group(1) for m in after] == ["APGD-CE", "SQUARE"]
    after_ce = clean & ~res.extra["per_attack"]["apgd-ce"]
    assert after[0].group(2) == f"{after_ce.float().mean().item() * 100:.2f}"
    # the max perturbation line and the final robust accuracy, of the tensor returned
    d = (x_adv - x).abs().flatten(1).amax(1).max().item()
    assert out[-2] == (f"max Linf perturbation: {d:.5f}, nan in tensor: 0, max: {x_adv.max().item():.5f}, "
                       f"min: {x_adv.min().item():.5f}")
    assert out[-1] == f"robust accuracy: {robust.float().mean().item():.2%}"
    assert adversary.robust_accuracy == robust.float().mean().item()


def test_quiet_run_prints_nothing_and_writes_no_log(mnist, tmp_path, capsys):
    model, x, y = mnist
    path = tmp_path / "quiet.txt"
    aa = AutoAttack(model, eps=.05, verbose=False, version="custom", attacks_to_run=["apgd-ce"], log_path=path,
                    steps=2, seed=0)
    aa.run_standard_evaluation(x[:4], y[:4])
    assert capsys.readouterr().out == "" and not path.exists()


# ---------------------------------------------------------------- sub-attacks and tweaks
def _tiny_eps_run(aa, x, y):
    """A run where nothing can be fooled (eps far below any boundary): every attack spends
    its whole budget on every point, so the work done shows the settings it ran with."""
    aa.run_standard_evaluation(x, y, bs=len(x))
    return aa.last_result.extra["work"]


def test_sub_attack_objects_are_the_references(mnist):
    model, _, _ = mnist
    aa = AutoAttack(model, verbose=False)
    assert isinstance(aa.apgd, APGD) and isinstance(aa.apgd_targeted, APGDT)
    assert isinstance(aa.fab, FAB) and isinstance(aa.square, Square)
    assert callable(aa.get_logits) and callable(aa.set_version) and callable(aa.clean_accuracy)


def test_tweaks_change_what_runs(mnist):
    model, x, y = mnist
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep][:4], y[keep][:4]
    n = len(x)
    aa = AutoAttack(model, norm="Linf", eps=1e-4, version="custom", seed=0, verbose=False, checks=False)
    aa.attacks_to_run = ["apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"]
    aa.apgd.n_restarts, aa.apgd.n_iter = 2, 3
    aa.apgd_targeted.n_target_classes, aa.apgd_targeted.n_iter, aa.apgd_targeted.n_restarts = 3, 2, 1
    aa.fab.n_restarts, aa.fab.n_iter, aa.fab.n_target_classes = 2, 2, 4
    aa.square.n_queries = 7
    work = _tiny_eps_run(aa, x, y)
    assert aa.robust_accuracy == 1.0
    assert work == {"apgd-ce": n * 2 * 3, "apgd-dlr": n * 2 * 3, "apgd-t": n * 3 * 2,
                    "fab": n * 2 * 2,
                    "fab-t": n * 4 * 2,          # FAB-T: one restart whatever fab.n_restarts says
                    "square": n * (1 + 7)}       # the initial query and 7 more
    # a second round of tweaks, on the same object
    aa.attacks_to_run = ["apgd-t", "square"]
    aa.apgd_targeted.n_target_classes = 2
    aa.square.n_queries = 3
    work = _tiny_eps_run(aa, x, y)
    assert work == {"apgd-t": n * 2 * 2, "square": n * 4}
    assert aa.last_result.extra["attacks"] == ["apgd-t", "square"]


def test_square_p_init_tweak_reaches_the_search(mnist, monkeypatch):
    import fastadv.attacks.square as sq
    seen = []
    real = sq.p_selection

    def spy(p_init, it, n_queries, rescale=True):
        seen.append((p_init, rescale))
        return real(p_init, it, n_queries, rescale)
    monkeypatch.setattr(sq, "p_selection", spy)
    model, x, y = mnist
    aa = AutoAttack(model, eps=1e-4, version="custom", attacks_to_run=["square"], verbose=False, checks=False)
    aa.square.n_queries, aa.square.p_init = 5, .3
    aa.run_standard_evaluation(x[:3], y[:3])
    assert seen and set(seen) == {(.3, False)}   # the reference's Square: no schedule rescaling


def test_tweaks_are_checked_by_name(mnist):
    model, x, y = mnist
    aa = AutoAttack(model, eps=.1, verbose=False)
    aa.apgd.n_restarts = 0
    with pytest.raises(ValueError, match=r"apgd\.n_restarts"):
        aa.run_standard_evaluation(x[:2], y[:2])
    aa = AutoAttack(model, eps=.1, verbose=False)
    aa.square.n_queries = 2.5
    with pytest.raises(TypeError, match=r"square\.n_queries"):
        aa.run_standard_evaluation(x[:2], y[:2])
    aa = AutoAttack(model, eps=.1, verbose=False)
    aa.attacks_to_run = ["apgd-ce", "pgd"]
    with pytest.raises(ValueError, match="attacks_to_run.*pgd"):
        aa.run_standard_evaluation(x[:2], y[:2])
    with pytest.raises(TypeError, match="n_iter"):
        aa.apgd.n_iter = "100"


def test_set_version_and_the_seed(mnist):
    model, x, y = mnist
    aa = AutoAttack(model, eps=.1, version="standard", verbose=False)
    aa.set_version("plus")
    assert aa.attacks_to_run == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert (aa.apgd.n_restarts, aa.fab.n_restarts) == (5, 5)
    aa.set_version("rand")
    assert aa.attacks_to_run == ["apgd-ce", "apgd-dlr"] and aa.apgd.eot_iter == 20 and aa.apgd.n_restarts == 1
    with pytest.raises(ValueError, match="version"):
        aa.set_version("fast")
    # the reference's `adversary.seed = 0`: same seed, same result
    a = AutoAttack(model, eps=.1, version="custom", attacks_to_run=["apgd-ce"], verbose=False)
    a.apgd.n_iter, a.apgd.n_restarts = 5, 1
    a.seed = 0
    first = a.run_standard_evaluation(x, y)
    assert torch.equal(first, a.run_standard_evaluation(x, y))


def test_clean_accuracy_get_logits_return_labels_and_individual(mnist, capsys):
    model, x, y = mnist
    aa = AutoAttack(model, eps=.1, version="custom", attacks_to_run=["apgd-ce", "apgd-dlr"], seed=0)
    aa.apgd.n_iter, aa.apgd.n_restarts = 4, 1
    with torch.no_grad():
        logits = model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    capsys.readouterr()
    assert aa.clean_accuracy(x, y, bs=5) == pytest.approx(acc)
    assert capsys.readouterr().out == f"clean accuracy: {acc:.2%}\n"
    assert torch.allclose(aa.get_logits(x), logits, atol=1e-5)
    assert aa.epsilon == .1
    # the reference's example runs under no_grad
    with torch.no_grad():
        x_adv, y_adv = aa.run_standard_evaluation(x, y, bs=10, return_labels=True)
        assert torch.equal(y_adv, model(x_adv).argmax(1))
    assert aa.clean_accuracy == pytest.approx(acc)        # also the last run's figure
    assert aa.clean_accuracy(x_adv, y) == pytest.approx(aa.robust_accuracy)
    capsys.readouterr()
    adv = aa.run_standard_evaluation_individual(x, y, bs=10, return_labels=True)
    out = capsys.readouterr().out
    assert set(adv) == {"apgd-ce", "apgd-dlr"}
    for name, (xa, ya) in adv.items():
        robust = _robust(model, x, y, xa, .1)
        assert torch.equal(ya, model(xa).argmax(1))
        assert re.search(rf"robust accuracy by {name.upper()} \t {robust.float().mean().item():.2%} \t "
                         r"\(time attack: \d+\.\d s\)", out)
    assert "using custom version including apgd-ce, apgd-dlr" in out
    assert aa.attacks_to_run == ["apgd-ce", "apgd-dlr"] and aa.verbose


def test_eval_py_example(mnist, tmp_path):
    # fra31/auto-attack's examples/eval.py, with a small budget for the test
    model, x_test, y_test = mnist
    adversary = AutoAttack(model, norm="Linf", eps=8. / 255., log_path=str(tmp_path / "log_file.txt"),
                           version="custom")
    adversary.attacks_to_run = ['apgd-ce', 'fab']
    adversary.apgd.n_restarts = 2
    adversary.fab.n_restarts = 2
    adversary.apgd.n_iter = adversary.fab.n_iter = 5
    with torch.no_grad():
        adv_complete = adversary.run_standard_evaluation(x_test[:12], y_test[:12], bs=6)
    _robust(model, x_test[:12], y_test[:12], adv_complete, 8 / 255)
    assert adversary.last_result.extra["attacks"] == ["apgd-ce", "fab"]
    assert "robust accuracy: " in (tmp_path / "log_file.txt").read_text()
    with torch.no_grad():
        adv_indiv = adversary.run_standard_evaluation_individual(x_test[:12], y_test[:12], bs=6)
    assert set(adv_indiv) == {"apgd-ce", "fab"}


# ---------------------------------------------------------------- against torchattacks
def test_standard_not_weaker_than_torchattacks_autoattack(mnist):
    """torchattacks' AutoAttack (ports of the reference's attacks; its APGD/FAB run 10
    iterations) and fastadv's, at the same budgets, on the same points."""
    ta = pytest.importorskip("torchattacks")
    model, x, y = mnist
    x, y = x[:12], y[:12]
    eps = .1
    ref = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    ref._autoattack.attacks[-1].n_queries = 100      # Square: a short budget for the test
    ref_robust = _robust(model, x, y, ref(x, y), eps)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, verbose=False)
    aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = 10
    aa.square.n_queries = 100
    robust = _robust(model, x, y, aa.run_standard_evaluation(x, y, bs=12), eps)
    assert torch.equal(robust, aa.last_result.extra["robust"])
    assert robust.sum() <= ref_robust.sum()
    assert robust.sum() < (model(x).argmax(1) == y).sum()


def test_model_and_rng_come_back_as_found_and_the_call_form_works(mnist):
    model, x, y = zoo.mnist_cnn_bn(), *mnist[1:]
    model.train()
    model.features[0].weight.grad = torch.ones_like(model.features[0].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    aa = AutoAttack(model, eps=.1, version="custom", attacks_to_run=["apgd-ce", "square"], seed=0, verbose=False)
    aa.apgd.n_iter, aa.square.n_queries = 3, 10
    with torch.no_grad():
        x_adv = aa.run_standard_evaluation(x[:8], y[:8], bs=4)
    x_call = aa(x[:8], y[:8])                      # torchattacks' call form: the whole batch at once
    assert x_call.shape == x_adv.shape
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(model.features[0].weight.grad, torch.ones_like(model.features[0].weight))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="untargeted"):
        aa.run(x[:2], y[:2], target=y[:2])


def test_a_device_other_than_the_models_is_reported_not_obeyed(mnist, capsys):
    # 'meta' exists on every machine: a device that is there but holds none of the weights
    model, x, y = mnist
    aa = AutoAttack(model, eps=.3, version="custom", attacks_to_run=["apgd-ce"], device="meta", steps=2)
    x_adv = aa.run_standard_evaluation(x[:4], y[:4])
    assert x_adv.device.type == "cpu"
    assert "device: running on cpu, where the model's parameters are (device='meta'" in capsys.readouterr().out


def test_checks_warn_and_are_logged(mnist, tmp_path, capsys):
    # the reference's check on the output: probabilities instead of logits
    from fastadv.eval.masking import GradientMaskingWarning
    model, x, y = mnist
    probs = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    path = tmp_path / "log.txt"
    aa = AutoAttack(probs, eps=.1, version="custom", attacks_to_run=["apgd-ce"], steps=2, log_path=path)
    with pytest.warns(GradientMaskingWarning, match="softmax"):
        aa.run_standard_evaluation(x[:6], y[:6])
    line = [s for s in path.read_text().splitlines() if s.startswith("Warning: [softmax_output]")]
    assert len(line) == 1 and line[0] in capsys.readouterr().out
    quiet = AutoAttack(probs, eps=.1, version="custom", attacks_to_run=["apgd-ce"], steps=2, checks=False,
                       verbose=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        quiet.run_standard_evaluation(x[:6], y[:6])
