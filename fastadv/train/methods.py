"""The adversarial training methods: each turns a batch into one or more optimizer steps.

Every inner loop runs on the fast attack path: input-only gradients
(``torch.autograd.grad`` w.r.t. the input), the fused in-place ``fastadv.ops``
steps, the trainer's own RNG, no host synchronisation. A method talks to the
trainer only through its engine calls (``forward``, ``input_grad``, ``update``,
``backward``, ``optimizer_step``, ``attacking``, ``random_start``, ``linf_step_``).

  pgd        Madry et al. 2018           K-step PGD from a random start, CE on x_adv
  trades     Zhang et al. 2019 (TRADES)  attack maximises KL(p_nat‖p_adv); CE(nat) + β·KL
  mart       Wang et al. 2020 (MART)     PGD; boosted CE + β·KL·(1 - p_nat,y)
  fgsm_rs    Wong et al. 2020            uniform start, one step of 1.25ε, projected
  n_fgsm     de Jorge et al. 2022        noise U(±2ε), one step of ε, no projection
  gradalign  Andriushchenko & F. 2020    FGSM + λ·(1 - cos(∇ℓ(x), ∇ℓ(x+η)))
  free       Shafahi et al. 2019         replay m times; one backward: weights and δ
  yopo       Zhang et al. 2019 (YOPO)    m full passes, n first-layer-only steps each
  atta       Zheng et al. 2020           per-sample δ cached across epochs, 1 step a batch
  standard   —                           clean training (the baseline)
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses as _losses
from ..attacks._workers import split_count, split_rows
from ..attacks.base import int_arg, number_arg
from . import distributed as _dist

__all__ = ["Method", "METHODS", "get_method", "method_defaults"]


def _ce_sum(y: Tensor):
    return lambda z: F.cross_entropy(z.float(), y, reduction="sum")


def _ce_update(t, x_in: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """The plain training step: CE on ``x_in``, one optimizer update; (loss, logits) detached."""
    z = t.forward(x_in)
    loss = F.cross_entropy(z.float(), y)
    t.update(loss)
    return loss.detach(), z.detach()


def _check_pos(name: str, v, allow_zero: bool = False) -> float:
    v = number_arg(name, v)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a value {'>=' if allow_zero else '>'} 0, got {v!r}")
    return v


class Method:
    """Base class. Subclasses set the class attributes and implement ``train_batch``."""

    name = "base"
    needs_indices = False        # the loader must yield (x, y, index)
    attack_bn = "train"          # BatchNorm mode while attacking, unless the user chooses
    single_step = False          # ``steps`` is fixed at 1
    options: Dict[str, object] = {}  # method options and their defaults

    def __init__(self, eps: float, alpha: Optional[float], steps: Optional[int], **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise TypeError(f"method {self.name!r}: unknown option(s) {unknown}; its options: {known}")
        self.eps = float(eps)
        if steps is not None:
            steps = int_arg("steps", steps)
            if self.single_step and steps != 1:
                raise ValueError(f"steps: method {self.name!r} takes one attack step, got steps={steps}")
        self.steps = steps if steps is not None else self.default_steps()
        self.alpha = _check_pos("alpha", alpha) if alpha is not None else self.default_alpha()
        for k, v in options.items():
            d = self.options[k]
            # a flag takes a bool, a number a number: 'yes' or '4' must not pass for them
            if isinstance(d, bool) and not isinstance(v, bool):
                raise TypeError(f"{k}: method {self.name!r} expects True or False, got {v!r}")
            if isinstance(d, (int, float)) and not isinstance(d, bool) and (
                    isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"{k}: method {self.name!r} expects a number, got {v!r}")
        self.opts = {**self.options, **options}
        self.check_options()

    # -- published defaults, derived from eps
    def default_steps(self) -> int:
        return 1

    def default_alpha(self) -> float:
        return self.eps

    def check_options(self) -> None:
        pass

    def now(self, t):
        """(eps, alpha) for this batch: the trainer's eps warm-up scales both."""
        f = t.eps_scale
        return (self.eps, self.alpha) if f == 1.0 else (self.eps * f, self.alpha * f)

    # -- life cycle
    @property
    def optimizer_steps_per_batch(self) -> int:
        return 1

    def prepare(self, t, x: Tensor, y: Tensor, idx: Optional[Tensor]) -> None:
        """One-time checks and set-up on the first batch, before any update."""

    def train_batch(self, t, x: Tensor, y: Tensor, idx: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """One batch: update the model; return (detached loss, detached logits on the trained input)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, object]:
        return {}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        pass

    def config(self) -> Dict[str, object]:
        return {"method": self.name, "eps": self.eps, "alpha": self.alpha, "steps": self.steps,
                **{k: v for k, v in self.opts.items() if isinstance(v, (int, float, str, bool))}}


# ---------------------------------------------------------------- baseline
class Standard(Method):
    name = "standard"

    def train_batch(self, t, x, y, idx):
        return _ce_update(t, x, y)


# ---------------------------------------------------------------- multi-step
def _pgd(t, x: Tensor, y: Tensor, x_adv: Tensor, steps: int, alpha: float, eps: float,
         bn: str, loss_fn=None) -> Tensor:
    """``steps`` L∞ PGD steps from ``x_adv`` (modified in place) on the unwrapped model.

    With the cross-entropy loss (``loss_fn`` None) on a multi-core CPU, while every module
    is in eval mode, row blocks of the batch take their steps on worker threads at one
    intra-op thread each (``fastadv.attacks._workers``: the same math per row; small nets
    use intra-op threads poorly)."""
    def take_steps(xa: Tensor, xs: Tensor, f) -> None:
        for _ in range(steps):
            g, _ = t.input_grad(xa, f)
            t.linf_step_(xa, xs, g, alpha, eps)

    with t.attacking(bn):
        blocks = split_count(x_adv, t.module) if loss_fn is None and steps > 0 else 1
        if blocks > 1:
            def block(s):
                # a copy per block: views of x_adv share one autograd version counter, so a
                # step in one block would invalidate the other blocks' saved inputs
                xa = x_adv[s].clone(memory_format=torch.preserve_format)
                take_steps(xa, x[s], _ce_sum(y[s]))
                x_adv[s].copy_(xa)
            split_rows(block, x_adv.shape[0], blocks)
        else:
            take_steps(x_adv, x, loss_fn or _ce_sum(y))
    return x_adv


class PGDAT(Method):
    """Madry et al. 2018: min_θ E max_{‖δ‖∞≤ε} CE(x+δ), the max by K-step PGD from a
    uniform random start. K=10, α=2.5ε/K (the rule of Madry et al.'s robustness code)."""

    name = "pgd"
    options = {"random_start": True}

    def default_steps(self):
        return 10

    def default_alpha(self):
        return 2.5 * self.eps / self.steps

    def train_batch(self, t, x, y, idx):
        eps, alpha = self.now(t)
        x0 = t.random_start(x, eps) if self.opts["random_start"] else x.clone()
        x_adv = _pgd(t, x, y, x0, self.steps, alpha, eps, t.attack_bn(self))
        return _ce_update(t, x_adv, y)


class _KLRegularised(Method):
    """What TRADES and MART share: a β-weighted KL term, K=10 PGD steps of α=2.5ε/K (= ε/4),
    the attack in eval mode (their published choice)."""

    attack_bn = "eval"
    options = {"beta": 6.0}

    def default_steps(self):
        return 10

    def default_alpha(self):
        return 2.5 * self.eps / self.steps

    def check_options(self):
        _check_pos("beta", self.opts["beta"], allow_zero=True)


class TRADES(_KLRegularised):
    """Zhang et al. 2019: CE(f(x), y) + β·KL(p(x) ‖ p(x')), x' maximising the KL by PGD
    from x + 0.001·N(0, I). β=6, K=10, α=ε/4; the attack runs in eval mode."""

    name = "trades"

    def adversary(self, t, x, y):
        with torch.no_grad(), t.attacking(t.attack_bn(self)):
            z_nat = t.forward(x, t.module, attack=True).float()
        eps, alpha = self.now(t)
        x_adv = t.normal_start(x, 0.001, eps)
        return _pgd(t, x, y, x_adv, self.steps, alpha, eps, t.attack_bn(self),
                    lambda z: _losses.trades_kl(z, z_nat).sum())

    def objective(self, t, x, x_adv, y):
        # One forward through the (possibly DDP) training model per backward; the other
        # forward runs on the unwrapped module, its gradients join in the same backward.
        z_adv = t.forward(x_adv)
        z_nat = t.forward(x, t.module)
        loss = F.cross_entropy(z_nat.float(), y) + self.opts["beta"] * _losses.trades_kl(
            z_adv, z_nat, "mean")
        return loss, z_adv

    def train_batch(self, t, x, y, idx):
        x_adv = self.adversary(t, x, y)
        loss, z_adv = self.objective(t, x, x_adv, y)
        t.update(loss)
        return loss.detach(), z_adv.detach()


class MART(_KLRegularised):
    """Wang et al. 2020: BCE(f(x'), y) + β·KL(p(x) ‖ p(x'))·(1 - p_y(x)), x' by PGD on CE
    from x + 0.001·N(0, I). β=6, K=10, α=ε/4; the attack runs in eval mode."""

    name = "mart"

    def train_batch(self, t, x, y, idx):
        eps, alpha = self.now(t)
        x_adv = _pgd(t, x, y, t.normal_start(x, 0.001, eps), self.steps, alpha, eps,
                     t.attack_bn(self))
        z_adv = t.forward(x_adv)
        z_nat = t.forward(x, t.module)
        loss = _losses.mart_loss(z_adv, z_nat, y, beta=self.opts["beta"])
        t.update(loss)
        return loss.detach(), z_adv.detach()


# ---------------------------------------------------------------- single step
class FGSMRS(Method):
    """Wong et al. 2020: δ ~ U(-ε, ε), one signed step of α = 1.25ε, projected to the ball."""

    name = "fgsm_rs"
    single_step = True

    def default_alpha(self):
        return 1.25 * self.eps

    def train_batch(self, t, x, y, idx):
        eps, alpha = self.now(t)
        x_adv = _pgd(t, x, y, t.random_start(x, eps), 1, alpha, eps, t.attack_bn(self))
        return _ce_update(t, x_adv, y)


class NFGSM(Method):
    """de Jorge et al. 2022: noise η ~ U(-kε, kε) with k=2, one signed step of α = ε, and
    no projection back to the ε-ball (only to the input range). ``clip`` (a radius)
    restores a projection if wanted."""

    name = "n_fgsm"
    single_step = True
    options = {"noise": 2.0, "clip": None}

    def default_alpha(self):
        return self.eps

    def check_options(self):
        _check_pos("noise", self.opts["noise"], allow_zero=True)
        if self.opts["clip"] is not None:
            _check_pos("clip", self.opts["clip"])

    def train_batch(self, t, x, y, idx):
        eps, alpha = self.now(t)
        k = float(self.opts["noise"])
        x_adv = t.random_start(x, k * eps) if k > 0 else x.clone()
        # a radius no step can reach: the projection is a no-op, only [lower, upper] clamps
        radius = self.opts["clip"] if self.opts["clip"] is not None else k * eps + alpha
        x_adv = _pgd(t, x, y, x_adv, 1, alpha, radius, t.attack_bn(self))
        return _ce_update(t, x_adv, y)


class GradAlign(Method):
    """Andriushchenko & Flammarion 2020: FGSM from x (α = ε) plus
    λ·E[1 - cos(∇ₓℓ(x), ∇ₓℓ(x + η))], η ~ U(-ε, ε); λ = 0.2 (their choice at ε = 8/255).
    The regulariser is differentiated through the input gradients (double backprop)."""

    name = "gradalign"
    single_step = True
    options = {"lam": 0.2}

    def default_alpha(self):
        return self.eps

    def check_options(self):
        _check_pos("lam", self.opts["lam"], allow_zero=True)

    def train_batch(self, t, x, y, idx):
        eps, alpha = self.now(t)
        lam = float(self.opts["lam"])
        loss_fn = _ce_sum(y)
        with t.attacking(t.attack_bn(self)):
            g_x, _ = t.input_grad(x, loss_fn, create_graph=lam > 0)
            if lam > 0:
                g_eta, _ = t.input_grad(t.random_start(x, eps), loss_fn, create_graph=True)
        x_adv = x.clone()
        t.linf_step_(x_adv, x, g_x.detach(), alpha, eps)
        z = t.forward(x_adv)
        loss = F.cross_entropy(z.float(), y)
        if lam > 0:
            cos = F.cosine_similarity(g_x.flatten(1).float(), g_eta.flatten(1).float(), dim=1)
            loss = loss + lam * (1.0 - cos).mean()
        t.update(loss)
        return loss.detach(), z.detach()


# ---------------------------------------------------------------- reuse
class Free(Method):
    """Shafahi et al. 2019: each minibatch is replayed m times; every replay's one
    backward gives the weight gradient (an optimizer step) and the gradient of the
    perturbation δ (δ ← clip(δ + ε·sign(g))). δ carries over to the next minibatch."""

    name = "free"
    options = {"replays": 4}

    def __init__(self, eps, alpha, steps, **options):
        if steps is not None and "replays" not in options:
            options["replays"] = steps  # `steps` reads as the replay count here
            steps = None
        super().__init__(eps, alpha, None, **options)
        self.steps = self.opts["replays"]
        self.delta: Optional[Tensor] = None

    def check_options(self):
        int_arg("replays", self.opts["replays"])

    def default_alpha(self):
        return self.eps

    @property
    def optimizer_steps_per_batch(self):
        return int(self.opts["replays"])

    def train_batch(self, t, x, y, idx):
        eps, alpha = self.now(t)
        b = x.shape[0]
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.shape[0] < b:
            self.delta = torch.zeros_like(x)     # δ starts at 0 once, then carries over
        elif self.delta.device != x.device or self.delta.dtype != x.dtype:
            self.delta = self.delta.to(device=x.device, dtype=x.dtype)
        delta = self.delta[:b]
        total = torch.zeros((), device=x.device)
        x_adv = torch.empty_like(x)
        for _ in range(int(self.opts["replays"])):
            torch.add(x, delta, out=x_adv)
            x_adv.clamp_(t.lower, t.upper)
            xa = x_adv.detach().requires_grad_(True)
            z = t.forward(xa)
            loss = F.cross_entropy(z.float(), y)
            t.update(loss)              # one backward: the weights' .grad and xa.grad
            t.linf_step_(x_adv, x, xa.grad, alpha, eps)
            torch.sub(x_adv, x, out=delta)
            total += loss.detach()
        return total / int(self.opts["replays"]), z.detach()

    def state_dict(self):
        return {"delta": self.delta.detach().cpu()} if self.delta is not None else {}

    def load_state_dict(self, state):
        if "delta" in state:
            self.delta = state["delta"]


class _FirstLayerTap:
    """The model's first layer f₀ and, during a forward/backward, the adjoint p = ∂ℓ/∂f₀(x)
    (YOPO's reuse). f₀ is one module or a chain of consecutive ones (e.g. conv then ReLU).

    The adjoint is caught by a tensor hook registered on f₀'s output as it is produced, so
    it is the gradient w.r.t. that value even when the model then modifies it in place
    (``ReLU(inplace=True)``): ``retain_grad`` would give the gradient w.r.t. the modified
    tensor instead, i.e. w.r.t. the activation's output."""

    def __init__(self, owner: str):
        self.owner = owner
        self.first: Optional[nn.Module] = None     # f₀: the module, or an nn.Sequential chain
        self.params: List[Tensor] = []
        self.p: Optional[Tensor] = None
        self._on = False
        self._handle = None

    def _resolve(self, module: nn.Module, spec) -> nn.Module:
        if isinstance(spec, str):
            try:
                return module.get_submodule(spec)
            except AttributeError as exc:
                raise ValueError(f"{self.owner}: first_layer {spec!r} is not a submodule of the model") from exc
        if isinstance(spec, nn.Module):
            return spec
        raise TypeError(f"{self.owner}: first_layer must be None, a module or its name, or a list "
                        f"of them applied in order, got {type(spec).__name__}")

    def attach(self, module: nn.Module, x: Tensor, y: Tensor, spec=None) -> nn.Module:
        if spec is None:
            chain = [find_first_layer(module, x[:2])]
        elif isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError(f"{self.owner}: first_layer: an empty list")
            chain = [self._resolve(module, s) for s in spec]
        else:
            chain = [self._resolve(module, spec)]
        first = chain[0] if len(chain) == 1 else nn.Sequential(*chain)
        params = [q for q in first.parameters() if q.requires_grad]
        if not params:
            raise ValueError(f"{self.owner}: the first layer ({type(first).__name__}) has no trainable weights")
        check_first_layer(module, first, x[:4], y[:4], tap=chain[-1])
        if self._handle is not None:
            self._handle.remove()
        self.first, self.params = first, params
        self._handle = chain[-1].register_forward_hook(self._keep)
        return first

    def _keep(self, mod, inputs, out):
        if self._on and isinstance(out, Tensor) and out.requires_grad:
            self._on = False                     # the first application only
            out.register_hook(self._catch)

    def _catch(self, g: Tensor) -> None:
        self.p = g

    @contextlib.contextmanager
    def capture(self):
        self._on, self.p = True, None
        try:
            yield self
        finally:
            self._on = False

    def steps(self, t, x_adv: Tensor, x: Tensor, p: Tensor, n: int, alpha, eps) -> None:
        """``n`` L∞ steps on the Hamiltonian ⟨p, f₀(x_adv)⟩: only f₀ runs, p held."""
        for _ in range(n):
            xi = x_adv.detach().requires_grad_(True)
            with torch.enable_grad(), t.autocast(attack=True):
                out = self.first(xi)
            (g,) = torch.autograd.grad(out, xi, grad_outputs=p.to(out.dtype))
            t.linf_step_(x_adv, x, g, alpha, eps)

    def param_grads(self, t, x_adv: Tensor, p: Tensor) -> Tuple[Tensor, ...]:
        """∇_θ₀ ⟨p, f₀(x_adv; θ₀)⟩ for f₀'s weights, at the training precision."""
        with torch.enable_grad(), t.autocast():
            out = self.first(x_adv.detach())
        return torch.autograd.grad(out, self.params, grad_outputs=p.to(out.dtype), allow_unused=True)


class YOPO(Method):
    """Zhang et al. 2019 (YOPO-m-n, their Algorithm 1 and code): per minibatch, η starts
    U(-ε, ε); each of the m outer iterations runs one full forward/backward at x+η^{j,0},
    which gives the weights' gradient and the adjoint p = ∂ℓ/∂f₀ of the first layer's
    output; then n inner steps move η rerunning only the first layer with p held:
    η ← Π(η + α·sign(∇_η ⟨p, f₀(x + η)⟩)), and η^{j+1,0} = η^{j,n}. One optimizer step per
    minibatch with the gradients accumulated over the m iterations:
      the other layers θ̃: Σ_j ∇_θ̃ ℓ(x + η^{j,0})               (the full passes)
      the first layer θ₀: Σ_j ∇_θ₀ ⟨p_j, f₀(x + η^{j,n}; θ₀)⟩   (at the end of each inner
                          loop, p held: the first layer's gradient there by the chain rule)
    both divided by m (the authors sum and divide the learning rate by m instead).
    Published setting YOPO-5-3, α = ε/4 (CIFAR-10, ε = 8/255; their MNIST run is YOPO-5-10
    with α = 0.01 at ε = 0.3 and f₀ = conv + ReLU).

    f₀ is the first leaf module applied to the input, or the ``first_layer`` option: a
    module, its dotted name, or a list of them applied in order (e.g. ``["features.0",
    "features.1", "features.2"]`` for conv, norm, ReLU); the model must use its input
    nowhere else. A linear f₀ (a bare conv) has an η-independent inner gradient, so its n
    inner steps all move the same way (as in the authors' ResNet setting)."""

    name = "yopo"
    options = {"outer": 5, "first_layer": None}

    def __init__(self, eps, alpha, steps, **options):
        super().__init__(eps, alpha, steps, **options)
        self.tap = _FirstLayerTap("yopo")

    @property
    def first(self) -> Optional[nn.Module]:
        return self.tap.first

    def default_steps(self):
        return 3

    def default_alpha(self):
        return self.eps / 4

    def check_options(self):
        int_arg("outer", self.opts["outer"])

    def config(self):
        cfg = super().config()
        fl = self.opts["first_layer"]
        if isinstance(fl, (list, tuple)) and all(isinstance(s, str) for s in fl):
            cfg["first_layer"] = ",".join(fl)
        return cfg

    def prepare(self, t, x, y, idx):
        self.tap.attach(t.module, x, y, self.opts["first_layer"])

    def train_batch(self, t, x, y, idx):
        eps, alpha = self.now(t)
        m, n = int(self.opts["outer"]), self.steps
        tap = self.tap
        x_adv = t.random_start(x, eps)
        t.zero_grad()
        total = torch.zeros((), device=x.device)
        g0 = None
        for j in range(m):
            with tap.capture(), t.no_sync(j < m - 1):
                z = t.forward(x_adv)
                loss = F.cross_entropy(z.float(), y)
                t.backward(loss / m)            # weights' .grad accumulate over the m passes
            p, tap.p = tap.p, None
            if p is None:
                raise RuntimeError("yopo: the first layer's output received no gradient; "
                                   "is the first layer part of the forward pass?")
            p = p.detach()
            total += loss.detach()
            with t.attacking("keep"):
                tap.steps(t, x_adv, x, p, n, alpha, eps)
                # p already carries the 1/m (and a GradScaler's scale) of the backward
                gj = tap.param_grads(t, x_adv, p)
            g0 = list(gj) if g0 is None else [a if b is None else (b if a is None else a + b)
                                              for a, b in zip(g0, gj)]
        # the first layer's gradient is the Hamiltonian's, not the full passes' (at η^{j,0})
        for q, g in zip(tap.params, g0):
            if g is not None and _dist.world_size() > 1:
                g = _dist.all_reduce_sum_(g.contiguous()) / _dist.world_size()
            q.grad = None if g is None else g.to(q.dtype)
        t.optimizer_step()
        return total / m, z.detach()


class ATTA(Method):
    """Zheng et al. 2020: every sample's perturbation is cached across epochs and refined
    by ``steps`` (default 1) PGD steps of α = ε/2 a batch, from where it was left; the
    first visit starts from U(-ε, ε). The objective is PGD-AT's CE (``loss="ce"``) or
    TRADES' (``loss="trades"``, β). The cache lives in input space, one per rank; with the
    trainer's ``augment`` (crop/flip) it is mapped through the augmentation and back.

    ``free_step=True`` (fastadv's addition, Free's reuse inside ATTA): the training
    backward also yields the input gradient at x_adv (of the training loss, at the weights
    before this batch's update), which moves the cached δ one more step of α for the next
    visit, so each visit refines twice for one attack pass. The weights' update is that of
    plain ATTA; the extra cost is the first layer's input gradient in the training
    backward. On MNIST-5k (ε = 0.3, SmallCNN, 15 epochs, CPU) it is 1.3 ± 2.3 points (mean
    ± sd over 5 seeds) behind PGD-10 AT's PGD-40 accuracy at 1.9× standard training's time,
    against 4.1 ± 3.1 points at 1.7× without it (benchmarks/RESULTS_train_cpu.md)."""

    name = "atta"
    needs_indices = True
    options = {"loss": "ce", "beta": 6.0, "cache_device": None, "cache_dtype": "float32",
               "dataset_size": None, "free_step": False}

    def __init__(self, eps, alpha, steps, **options):
        super().__init__(eps, alpha, steps, **options)
        self.cache: Optional[Tensor] = None

    def default_steps(self):
        return 1

    def default_alpha(self):
        return self.eps / 2

    def check_options(self):
        if self.opts["loss"] not in ("ce", "trades"):
            raise ValueError(f"atta: loss must be 'ce' or 'trades', got {self.opts['loss']!r}")
        _check_pos("beta", self.opts["beta"], allow_zero=True)
        if self.opts["cache_dtype"] not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"atta: cache_dtype must be float32, float16 or bfloat16, "
                             f"got {self.opts['cache_dtype']!r}")
        if self.opts["dataset_size"] is not None:
            int_arg("dataset_size", self.opts["dataset_size"])

    @property
    def attack_bn(self):
        return "eval" if self.opts["loss"] == "trades" else "train"

    def prepare(self, t, x, y, idx):
        if idx is None:
            raise ValueError("atta: the loader must yield (x, y, index) so each sample's "
                             "perturbation can be cached; use fastadv.data.make_loader(..., "
                             "indexed=True) or wrap the data set in fastadv.data.IndexedDataset")
        n = self.opts["dataset_size"] or t.dataset_size
        if n is None:
            raise ValueError("atta: the data set's size is unknown (the loader's dataset has no "
                             "len()); pass dataset_size=N")
        dev = torch.device(self.opts["cache_device"]) if self.opts["cache_device"] else x.device
        dtype = getattr(torch, self.opts["cache_dtype"])
        if self.cache is not None and self.cache.shape[0] == n and self.cache.shape[1:] == x.shape[1:]:
            self.cache = self.cache.to(device=dev, dtype=dtype)   # e.g. restored from a checkpoint
            return
        g = torch.Generator(device=dev).manual_seed(int(torch.randint(
            0, 2**62, (1,), generator=t.generator, device=t.generator.device).item()))
        self.cache = torch.empty((n, *x.shape[1:]), dtype=dtype, device=dev).uniform_(
            -self.eps, self.eps, generator=g)

    def train_batch(self, t, x, y, idx):
        eps, alpha = self.now(t)
        cache = self.cache
        ci = idx.to(cache.device, non_blocking=True)
        if ci.numel() and cache.device.type == "cpu" and int(ci.max()) >= cache.shape[0]:
            raise ValueError(f"atta: sample index {int(ci.max())} >= data set size {cache.shape[0]}")
        delta = cache[ci].to(device=x.device, dtype=x.dtype, non_blocking=True)
        aug = t.augment_params
        x_adv = (x + (t.augment.apply(delta, aug) if aug is not None else delta))
        if x_adv.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            x_adv = x_adv.contiguous(memory_format=torch.channels_last)
        t.linf_project_(x_adv, x, eps)
        trades = self.opts["loss"] == "trades"
        bn = t.attack_bn(self)
        if trades:
            with torch.no_grad(), t.attacking(bn):
                z_nat0 = t.forward(x, t.module, attack=True).float()
            loss_fn = lambda z: _losses.trades_kl(z, z_nat0).sum()  # noqa: E731
        else:
            loss_fn = None  # cross-entropy on y
        _pgd(t, x, y, x_adv, self.steps, alpha, eps, bn, loss_fn)
        free = bool(self.opts["free_step"])
        xa = x_adv.detach().requires_grad_(free)
        if trades:
            z = t.forward(xa)
            z_nat = t.forward(x, t.module)
            loss = F.cross_entropy(z_nat.float(), y) + self.opts["beta"] * _losses.trades_kl(
                z, z_nat, "mean")
        else:
            z = t.forward(xa)
            loss = F.cross_entropy(z.float(), y)
        t.update(loss)
        if free:
            # the training backward also gave ∇ₓ of the loss at x_adv: one more step for the
            # cache, at the cost of the first layer's input gradient (Free's reuse, in ATTA)
            t.linf_step_(x_adv, x, xa.grad, alpha, eps)
        new = x_adv - x
        if aug is not None:
            new = t.augment.invert_into(delta, new, aug)
        cache[ci] = new.to(device=cache.device, dtype=cache.dtype)
        return loss.detach(), z.detach()

    def state_dict(self):
        return {"cache": self.cache.detach().cpu()} if self.cache is not None else {}

    def load_state_dict(self, state):
        if "cache" in state:
            c = state["cache"]
            dev = self.opts["cache_device"]
            self.cache = c if dev is None else c.to(dev)


# ---------------------------------------------------------------- first layer
def find_first_layer(model: nn.Module, x: Tensor) -> nn.Module:
    """The first leaf module the forward pass applies to the input tensor itself."""
    seen = []

    def pre_hook(mod, inputs):
        if not seen and inputs and inputs[0] is x_probe:
            seen.append(mod)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_pre_hook(pre_hook) for m in leaves]
    x_probe = x.detach().clone()
    from ..attacks.base import preserved_model
    try:
        with torch.no_grad(), preserved_model(model, "eval"):
            model(x_probe)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("yopo: no identifiable first layer: no submodule is applied to the model's "
                         "input directly (is there arithmetic on x before the first layer?); "
                         "pass first_layer=<module or name> or use another method")
    first = seen[0]
    if not any(p.requires_grad for p in first.parameters(recurse=False)):
        raise ValueError(f"yopo: no identifiable first layer: the first module applied to the input "
                         f"({type(first).__name__}) has no weights; pass first_layer=<module or name>")
    return first


def check_first_layer(model: nn.Module, first: nn.Module, x: Tensor, y: Tensor,
                      tap: Optional[nn.Module] = None) -> None:
    """YOPO is exact only if the input reaches the loss through ``first`` alone: compare the
    full input gradient with the one YOPO's inner steps use, i.e. ``first`` rerun on the
    input with the adjoint p of its output caught in the full pass (``tap``: the module
    whose output is ``first``'s, the last of a chain)."""
    from ..attacks.base import preserved_model
    tap = tap if tap is not None else first
    caught = []

    def keep(m, i, o):
        if not caught and isinstance(o, Tensor) and o.requires_grad:
            caught.append(None)
            o.register_hook(lambda g: caught.__setitem__(0, g))

    h = tap.register_forward_hook(keep)
    try:
        with torch.enable_grad(), preserved_model(model, "eval", freeze_params=True):
            xi = x.detach().clone().requires_grad_(True)
            z = model(xi)
            if not caught:
                raise ValueError(f"yopo: first_layer ({type(tap).__name__}) is not used in the forward pass")
            loss = F.cross_entropy(z.float(), y.long(), reduction="sum")
            (g_full,) = torch.autograd.grad(loss, xi, allow_unused=True)
            p = caught[0]
            if g_full is None or p is None:
                raise ValueError("yopo: the loss does not depend on the input through the first layer")
            xj = x.detach().clone().requires_grad_(True)
            out = first(xj)
            (g_via,) = torch.autograd.grad(out, xj, grad_outputs=p)
    finally:
        h.remove()
    scale = g_full.abs().max().clamp_min(1e-12)
    if float((g_full - g_via).abs().max() / scale) > 1e-3:
        raise ValueError(f"yopo: the model uses its input outside its first layer "
                         f"({type(first).__name__}), so YOPO's first-layer-only inner steps would "
                         f"follow the wrong gradient; pass first_layer=<module or name> or use another method")


METHODS = {cls.name: cls for cls in (Standard, PGDAT, TRADES, MART, FGSMRS, NFGSM, GradAlign,
                                      Free, YOPO, ATTA)}


def get_method(name: str, eps: float, alpha=None, steps=None, **options) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name](eps, alpha, steps, **options)


def method_defaults(name: str, eps: float) -> Dict[str, object]:
    """The published defaults of ``name`` at ``eps`` (alpha, steps and options)."""
    return get_method(name, eps).config()
