"""The Attack base class: input checks, model-state preservation, targets, the loss/gradient call.

Every attack in fastadv derives from ``Attack`` and implements ``_attack(x, y, target)``
returning an ``AttackResult``. The base guarantees what DESIGN.md promises users:
the model comes back exactly as found (mode, buffers, parameters, ``.grad``,
``requires_grad``) and the global RNG is neither consumed nor reseeded.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import losses as _losses
from ._groups import channels_last, layout_like

_AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16,
        "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AttackResult:
    """What an attack returns from ``run``.

    x_adv    the adversarial batch (the best iterate per sample), like the input
    success  [B] bool: misclassified (untargeted) or classified as the target
    loss     [B] float32: the attack loss at x_adv
    steps    [B] int64: gradient steps spent on each sample
    extra    attack-specific fields (restart index, queries, ...)
    """
    x_adv: Tensor
    success: Tensor
    loss: Tensor
    steps: Tensor
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples the attack did not fool (for untargeted attacks)."""
        return 1.0 - self.success.float().mean().item()


# ------------------------------------------------------------ model state
def model_context(model, mode: str, device: torch.device):
    """``preserved_model(model, mode)`` for an ``nn.Module``; nothing for a plain callable
    (which has no state to restore)."""
    if isinstance(model, nn.Module):
        return preserved_model(model, mode, devices=(device,))
    return contextlib.nullcontext()


@contextlib.contextmanager
def preserved_model(model: nn.Module, mode: str = "eval", freeze_params: bool = True,
                    devices: Sequence[torch.device] = ()) -> Iterator[nn.Module]:
    """Run ``model`` in ``mode`` ("eval" | "train" | "keep") and give it back exactly as found.

    Restores every module's training flag, every buffer's values (BatchNorm running
    stats), every parameter's ``requires_grad`` and ``.grad``, and the global CPU and
    CUDA RNG states (dropout in train mode would otherwise consume them)."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    req = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda_devices = sorted({d.index if d.index is not None else torch.cuda.current_device()
                           for d in devices if d.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda_devices, enabled=True):
            if mode == "eval":
                model.eval()
            elif mode == "train":
                model.train()
            elif mode != "keep":
                raise ValueError(f"model_mode: expected 'eval', 'train' or 'keep', got {mode!r}")
            if freeze_params:
                for p in params:
                    p.requires_grad_(False)
            yield model
    finally:
        for m, t in zip(modules, training):
            m.training = t
        for p, r, g in zip(params, req, grads):
            p.requires_grad_(r)
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


# ---------------------------------------------------------------- the base
class Attack:
    """Base of every fastadv attack (torchattacks-compatible call and target modes).

    Subclasses implement ``_attack(x, y, target, gen) -> AttackResult`` where ``x`` is
    validated, float32, in the attack's layout, ``y`` int64 true labels, ``target``
    int64 targets or None (untargeted), ``gen`` the attack's own generator, and call
    ``self.loss_and_grad`` / ``self.logits`` for the model. During ``_attack``,
    ``self.clean_logits`` holds the float32 logits of the clean batch (computed once
    by ``run`` for the input checks), so an attack need not recompute them.
    """

    def __init__(self, name: str, model: nn.Module, *, eps: float = 0.0, lower: float = 0.0,
                 upper: float = 1.0, loss: str = "ce", targeted: bool = False, amp=None,
                 channels_last: Union[str, bool] = "auto", backend: Optional[str] = None,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 model_mode: str = "eval", check_inputs: bool = True):
        if not isinstance(model, nn.Module) and not callable(model):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.attack = name
        self.model = model
        self.eps = self._nonneg("eps", eps)
        if isinstance(lower, bool) or isinstance(upper, bool):
            raise TypeError("lower/upper: expected floats")
        self.lower, self.upper = float(lower), float(upper)
        if not self.lower <= self.upper:
            raise ValueError(f"lower/upper: expected lower <= upper, got {lower} > {upper}")
        if loss not in ("ce", "cw", "dlr"):
            raise ValueError(f"loss: expected 'ce', 'cw' or 'dlr', got {loss!r}")
        self.loss = loss
        if amp not in _AMP:
            raise ValueError(f"amp: expected None, 'bf16' or 'fp16', got {amp!r}")
        self.amp = amp
        if channels_last not in ("auto", True, False):
            raise ValueError(f"channels_last: expected 'auto', True or False, got {channels_last!r}")
        self.channels_last = channels_last
        from ..ops import BACKEND_NAMES
        if backend is not None and backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected None or one of {BACKEND_NAMES}, got {backend!r}")
        self.backend = backend
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        self.seed = seed
        if model_mode not in ("eval", "train", "keep"):
            raise ValueError(f"model_mode: expected 'eval', 'train' or 'keep', got {model_mode!r}")
        self.model_mode = model_mode
        self.check_inputs = check_inputs
        self._mean: Optional[Tensor] = None
        self._std: Optional[Tensor] = None
        self._io_normalized = False
        if normalization is not None:
            if not isinstance(normalization, (tuple, list)) or len(normalization) != 2:
                raise TypeError("normalization: expected a pair (mean, std)")
            self._set_model_normalization(*normalization)
        # torchattacks-style targeting
        self.targeted = bool(targeted)
        self._target_mode = "by_label" if targeted else "default"
        self._target_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None
        self._kth_min = 1
        self.clean_logits: Optional[Tensor] = None

    # ------------------------------------------------------------- helpers
    @staticmethod
    def _nonneg(name: str, v) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
        if not math.isfinite(float(v)) or v < 0:
            raise ValueError(f"{name}: expected a finite value >= 0, got {v}")
        return float(v)

    def __repr__(self) -> str:
        keys = ("eps", "loss", "amp", "backend", "model_mode")
        inner = ", ".join(f"{k}={getattr(self, k)!r}" for k in keys if hasattr(self, k))
        return f"{type(self).__name__}({inner}, mode={self._target_mode})"

    # -------------------------------------------------------- normalization
    def set_normalization_used(self, mean: Sequence[float], std: Sequence[float]) -> "Attack":
        """torchattacks 3.5 semantics, for a drop-in swap: the model expects normalized
        input, and so do you — ``atk(x, y)`` takes *normalized* ``x`` and returns a
        *normalized* ``x_adv``. Inside, the attack works in pixel space: ``eps``, ``alpha``
        and the box ``[lower, upper]`` are pixel-space quantities, exactly as in
        torchattacks. To hand over and get back pixel-space tensors instead, pass
        ``normalization=(mean, std)`` to the constructor."""
        self._set_model_normalization(mean, std)
        self._io_normalized = True
        return self

    def _set_model_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The model sees ``(x - mean) / std`` per channel; inputs stay in pixel space."""
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() == 0:
            raise ValueError("mean: expected one value per channel, got none")
        if m.shape != s.shape:
            raise ValueError(f"std: expected {m.numel()} values like mean, got {s.numel()}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError("mean: expected finite values")
        if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError("std: expected finite positive values")
        self._mean, self._std = m, s
        self._io_normalized = False
        self._norm_cache = {}
        # captured CUDA graphs read the old mean/std tensors (just freed): drop them
        graphs = self.__dict__.get("_graphs")
        if graphs:
            graphs.clear()

    def _channel_stats(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """mean/std shaped to broadcast against ``x`` (channel dim 1), on its device and
        dtype; cached, since a per-step copy would sync (and break graph capture)."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        key = (x.device, x.dtype, len(shape))
        cached = self.__dict__.setdefault("_norm_cache", {}).get(key)
        if cached is None:
            cached = (self._mean.to(x.device, x.dtype).reshape(shape),
                      self._std.to(x.device, x.dtype).reshape(shape))
            self._norm_cache[key] = cached
        return cached

    def _check_channels(self, x: Tensor) -> None:
        c = self._mean.numel()
        if c > 1 and (x.dim() < 2 or x.shape[1] != c):
            raise ValueError(f"x: expected {c} channels (dim 1) to match the normalization's "
                             f"mean/std, got shape {tuple(x.shape)}")

    def _from_user(self, x: Tensor) -> Tensor:
        """Normalized user input -> pixel space (only under set_normalization_used)."""
        if not getattr(self, "_io_normalized", False) or not isinstance(x, Tensor) \
                or not x.is_floating_point():
            return x
        self._check_channels(x)
        xf = x.detach().float()
        m, s = self._channel_stats(xf)
        return xf * s + m

    def _to_user(self, x_adv: Tensor, like: Tensor) -> Tensor:
        """Pixel-space x_adv -> the user's normalized space, in ``like``'s dtype."""
        if not getattr(self, "_io_normalized", False):
            return x_adv
        m, s = self._channel_stats(x_adv.float())
        return ((x_adv.float() - m) / s).to(like.dtype)

    # -------------------------------------------------------- target modes
    def set_mode_default(self) -> "Attack":
        self.targeted, self._target_mode, self._target_fn = False, "default", None
        return self

    def set_mode_targeted_by_label(self, quiet: bool = True) -> "Attack":
        """Labels passed to the call are the targets (torchattacks semantics)."""
        self.targeted, self._target_mode = True, "by_label"
        return self

    def set_mode_targeted_by_function(self, target_map_function: Callable, quiet: bool = True) -> "Attack":
        self.targeted, self._target_mode, self._target_fn = True, "by_function", target_map_function
        return self

    def set_mode_targeted_random(self, quiet: bool = True) -> "Attack":
        self.targeted, self._target_mode = True, "random"
        return self

    def set_mode_targeted_least_likely(self, kth_min: int = 1, quiet: bool = True) -> "Attack":
        if not isinstance(kth_min, int) or kth_min < 1:
            raise ValueError(f"kth_min: expected an int >= 1, got {kth_min!r}")
        self.targeted, self._target_mode, self._kth_min = True, "least_likely", kth_min
        return self

    # ------------------------------------------------------------- model I/O
    def _normalize(self, x: Tensor) -> Tensor:
        if self._mean is None:
            return x
        m, s = self._channel_stats(x)
        return (x - m) / s

    def _model_layout(self, x: Tensor) -> Tensor:
        """``x`` with NHWC strides when this run attacks in channels_last. Batches built
        by arithmetic on a one-channel NHWC batch come back with NCHW strides (both
        layouts are "contiguous" then), which sends the convolutions, and worse the
        pooling, down their NCHW paths; for one channel the fix is a free view."""
        if self.__dict__.get("_nhwc") and x.dim() == 4 and x.stride(1) != 1:
            return channels_last(x)
        return x

    def logits(self, x: Tensor, *, fp32: bool = False) -> Tensor:
        """The model's logits on ``x`` (normalization applied, under autocast if amp,
        unless ``fp32``)."""
        dt = None if fp32 else _AMP[self.amp]
        x = self._model_layout(x)
        if dt is not None:
            # No weight-cast cache: each call is its own autocast region anyway, and a
            # cache would break CUDA graph capture.
            with torch.autocast(device_type=x.device.type, dtype=dt, cache_enabled=False):
                return self.model(self._normalize(x))
        return self.model(self._normalize(x))

    def attack_loss(self, logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        return _losses.attack_loss(self.loss, logits, y, targeted=target is not None, target=target)

    def loss_and_grad(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None,
                      loss_fn: Optional[Callable] = None, *,
                      grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-sample loss, logits and the input gradient of the summed loss.

        Input-only gradient (``torch.autograd.grad``; parameters' ``.grad`` untouched),
        no host sync. Under amp a sample whose gradient has a non-finite entry gets an
        all-zero gradient, so it moves nothing this step. Under fp16 the loss is scaled
        per sample by ``grad_scale`` (float32 ``[B]``, default 1024); when given, it is
        updated in place: halved for every sample whose scaled gradient overflowed."""
        x = self._model_layout(x.detach()).requires_grad_(True)
        fp16 = _AMP[self.amp] is torch.float16
        with torch.enable_grad():
            z = self.logits(x)
            loss = (loss_fn or self.attack_loss)(z, y, target)
            if not loss.requires_grad:
                raise ValueError("model: its output does not depend on the input x "
                                 "(no gradient path from the logits to x)")
            scale = None
            if fp16:
                scale = grad_scale if grad_scale is not None else torch.full(
                    loss.shape, 1024.0, dtype=torch.float32, device=loss.device)
                total = (loss.float() * scale).sum()
            else:
                total = loss.sum()
            (g,) = torch.autograd.grad(total, x, allow_unused=True)
        if g is None:
            raise ValueError("model: its output does not depend on the input x "
                             "(the input gradient is empty)")
        if self.amp is not None:
            ok = torch.isfinite(g).flatten(1).all(1)
            shape = (-1,) + (1,) * (g.dim() - 1)
            if scale is not None:
                g = g * scale.reciprocal().view(shape)
                if grad_scale is not None:
                    grad_scale.mul_(torch.where(ok, 1.0, 0.5))
            g = torch.where(ok.view(shape), g, 0.0)
        return loss.detach().float(), z.detach().float(), g

    # ----------------------------------------------------------- validation
    def _prepare(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating tensor, got dtype {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"x: expected a batch [B, ...], got shape {tuple(x.shape)}")
        if not isinstance(y, Tensor):
            raise TypeError(f"y: expected a torch.Tensor of labels, got {type(y).__name__}")
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"y: expected integer class labels, got dtype {y.dtype}")
        if y.shape != x.shape[:1]:
            raise ValueError(f"y: expected shape [{x.shape[0]}] (one label per sample of x), "
                             f"got {tuple(y.shape)}")
        if y.device != x.device:
            y = y.to(x.device)
        if self.check_inputs and x.numel():
            lo, hi = x.min().item(), x.max().item()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("x: expected finite values, got NaN or inf")
            if lo < self.lower or hi > self.upper:
                raise ValueError(f"x: expected values in [lower, upper] = [{self.lower}, {self.upper}], "
                                 f"got [{lo:.4g}, {hi:.4g}] (set lower/upper, or use "
                                 f"normalization=(mean, std) for a model that expects normalized input, or "
                                 f"set_normalization_used(mean, std) if x itself is normalized)")
        xf = x.detach().to(torch.float32)
        self._nhwc = self._use_channels_last(xf)
        if self._nhwc:
            xf = channels_last(xf)  # NHWC strides even for one channel (see _groups.channels_last)
        return xf, y.long()

    def _use_channels_last(self, x: Tensor) -> bool:
        if x.dim() != 4:
            return False
        if self.channels_last is True:
            return True
        if self.channels_last is False:
            return False
        return isinstance(self.model, nn.Module) and any(
            isinstance(m, nn.Conv2d) for m in self.model.modules())

    def _check_logits(self, z: Tensor, y: Tensor, target: Optional[Tensor]) -> None:
        if z.dim() != 2 or z.shape[0] != y.shape[0]:
            raise ValueError(f"model: expected logits of shape [B, classes] = [{y.shape[0]}, C], "
                             f"got {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("model: returned non-finite logits (NaN or inf) on the clean input")
        n = z.shape[1]
        if self.check_inputs and y.numel():
            if int(y.min()) < 0 or int(y.max()) >= n:
                raise ValueError(f"y: expected labels in [0, {n - 1}] for a model with {n} classes, "
                                 f"got range [{int(y.min())}, {int(y.max())}]")
            if target is not None and (int(target.min()) < 0 or int(target.max()) >= n):
                raise ValueError(f"target: expected labels in [0, {n - 1}], got range "
                                 f"[{int(target.min())}, {int(target.max())}]")

    def make_generator(self, device: torch.device) -> torch.Generator:
        """The attack's own RNG (the global one is never touched)."""
        if self.generator is not None:
            if self.generator.device.type != device.type:
                raise ValueError(f"generator: expected one on {device.type}, got {self.generator.device}")
            return self.generator
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(int(self.seed))
        else:
            g.seed()
        return g

    def _targets(self, x: Tensor, y: Tensor, z_clean: Tensor, target: Optional[Tensor],
                 gen: torch.Generator) -> Optional[Tensor]:
        if target is not None:
            if not isinstance(target, Tensor) or target.shape != y.shape:
                raise ValueError(f"target: expected a label tensor of shape [{y.shape[0]}]")
            return target.to(y.device).long()
        if not self.targeted:
            return None
        mode = self._target_mode
        n = z_clean.shape[1]
        if mode == "by_label":
            return y
        if mode == "by_function":
            return self._target_fn(x, y).to(y.device).long()
        if mode == "random":
            r = torch.randint(0, n - 1, y.shape, generator=gen, device=gen.device).to(y.device)
            return r + (r >= y).long()  # uniform over classes other than y
        if mode == "least_likely":
            return z_clean.topk(self._kth_min, dim=1, largest=False).indices[:, -1]
        raise RuntimeError(f"unknown target mode {mode!r}")

    # ----------------------------------------------------------------- call
    def run(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None) -> AttackResult:
        """Attack ``(x, y)`` and return an ``AttackResult`` (x_adv like x: dtype, layout)."""
        x_user = x
        x = self._from_user(x)
        xf, y = self._prepare(x, y)
        dev = xf.device
        with model_context(self.model, self.model_mode, dev):
            gen = self.make_generator(dev)
            with torch.no_grad():
                # fp32 whatever amp says: the checks and the clean predictions are exact
                z = self.logits(xf, fp32=True).float()
            # "by_label": the labels given are the targets; the true labels are the prediction
            if self.targeted and self._target_mode == "by_label" and target is None:
                self._check_logits(z, y, y)
                target, y = y, z.argmax(1)
            else:
                self._check_logits(z, y, None)
                target = self._targets(xf, y, z, target, gen)
                if target is not None:
                    self._check_logits(z, y, target)
            self.clean_logits = z
            try:
                res = self._attack(xf, y, target, gen)
            finally:
                self.clean_logits = None
        res.x_adv = layout_like(self._to_user(res.x_adv, x_user).to(dtype=x_user.dtype), x_user).detach()
        return res

    def __call__(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return self.run(x, y, target).x_adv

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # torchattacks name
        return self(x, y)

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor],
                gen: torch.Generator) -> AttackResult:
        raise NotImplementedError

    # -------------------------------------------------------- success test
    @staticmethod
    def is_success(z: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        pred = z.argmax(1)
        return pred == target if target is not None else pred != y
