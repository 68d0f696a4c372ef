"""AdversarialTrainer: adversarial training by reuse, as a whole loop (``fit``) or one step.

    trainer = AdversarialTrainer(model, optimizer, method="fgsm_rs", eps=8/255)
    history = trainer.fit(train_loader, epochs=15, val_loader=val_loader)
    loss = trainer.step(x, y)          # or inside your own loop

``fit`` adds what long runs need: a catastrophic-overfitting guard (PGD accuracy on
a held-out batch each epoch; a collapse is reported and the best weights kept),
LR schedules, per-epoch records, progress bars, atomic checkpoints that a run
killed mid-epoch resumes from exactly, and DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import glob
import math
import os
import random
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..attacks import _loss_scale
from ..attacks._groups import finite_rows
from ..attacks.base import Attack, NonFiniteLogitsError, int_arg, preserved_model
from . import checkpoint as _ckpt
from . import distributed as _dist
from .augment import RandomCropFlip
from .methods import METHODS, Method, get_method
from .schedules import Schedule, get_schedule

__all__ = ["AdversarialTrainer", "History", "pgd_robust_mask"]

_AMP = {None: None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16}
_FORMAT = "fastadv.train/1"
_LAST, _PREVIOUS = "last.pt", "previous.pt"


class History(list):
    """Per-epoch records (dicts), plus the best epoch and the epochs where robustness collapsed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.best_epoch: Optional[int] = None
        self.best_robust_acc: Optional[float] = None
        self.collapsed_epochs: List[int] = []

    @property
    def collapsed(self) -> bool:
        return bool(self.collapsed_epochs)


# ------------------------------------------------------------------ evaluation
def _correct(z: Tensor, y: Tensor) -> Tensor:
    """[B] bool: classified as ``y``; never a row whose logits are not finite (an all-NaN
    row's argmax is class 0: no prediction)."""
    return (z.argmax(1) == y) & finite_rows(z)


def pgd_robust_mask(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 10,
                    alpha: Optional[float] = None, restarts: int = 1, lower: float = 0.0,
                    upper: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """[B] bool: still correctly classified after L∞ PGD (CE, random start, ``restarts``),
    counting every iterate. The model is evaluated in eval mode and given back as found.
    Non-finite logits decide nothing: on the clean input the point is not correct (so not
    robust); at an iterate they do not count as fooled (and their gradient moves nothing)."""
    alpha = 2.5 * eps / steps if alpha is None else alpha
    with preserved_model(model, "eval", devices=(x.device,)):
        with torch.no_grad():
            robust = _correct(model(x), y)
        for _ in range(restarts):
            x_adv = ops.random_init(x, eps, "linf", lower, upper, generator=generator,
                                    _check_values=False)
            for _ in range(steps):
                xa = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    z = model(xa)
                    (g,) = torch.autograd.grad(F.cross_entropy(z.float(), y, reduction="sum"), xa)
                robust &= ~Attack.is_success(z.detach(), y, None)
                ops.linf_step_(x_adv, x, g, alpha, eps, lower, upper, _check_values=False)
            with torch.no_grad():
                robust &= ~Attack.is_success(model(x_adv), y, None)
    return robust


def _library_pgd_mask(model, x, y, eps, steps, lower, upper, seed) -> Optional[Tensor]:
    """fastadv.PGD's verdict when that attack is installed, else None."""
    try:
        from ..attacks.pgd import PGD  # written separately; absent in early builds
    except ImportError:
        return None
    try:
        atk = PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True,
                  lower=lower, upper=upper, seed=seed, keep="best")  # every iterate counts
    except TypeError:
        return None
    return ~atk.run(x, y).success


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except Exception:
        return float("nan")


# ------------------------------------------------------------------ the trainer
class AdversarialTrainer:
    """Adversarial training with one of the methods of ``fastadv.train.methods.METHODS``.

    model      an ``nn.Module`` taking inputs in [lower, upper] (or a DDP wrapper of one)
    optimizer  any torch optimizer over the model's parameters; its LR is the peak LR
    method     "pgd" | "trades" | "mart" | "fgsm_rs" | "n_fgsm" | "gradalign" | "free" |
               "yopo" | "atta" | "standard"
    eps        L∞ radius (> 0); ``alpha``/``steps`` default to the method's published rule
    amp        None | "bf16" | "fp16" (fp16 with a GradScaler); attack iterates stay fp32
    attack_amp precision of the attack's forward/backward: "same" (as ``amp``), "fp32",
               "bf16" or "fp16". An L∞ step needs only the gradient's signs, so a bf16
               attack beside fp32 training is the cheap setting on CPUs with bf16 units
    scheduler  None | "cyclic" | "one_cycle" | "piecewise" | "constant" | a
               ``fastadv.train.schedules.Schedule`` | a torch LR scheduler (stepped every
               optimizer step, or by ``fit`` every epoch with ``scheduler_interval="epoch"``;
               a loop of its own that calls only ``step`` steps an epoch scheduler itself)
    attack_bn  BatchNorm while attacking: "train" (batch statistics) or "eval"; None
               takes the method's published choice (eval for TRADES/MART, else train)
    augment    None or ``RandomCropFlip`` applied by the trainer (ATTA maps its cache through it)
    **method_options   beta (trades, mart, atta), replays (free), outer / first_layer
               (yopo), noise / clip (n_fgsm), lam (gradalign), loss / cache_device /
               cache_dtype / dataset_size (atta), random_start (pgd)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, method: str = "fgsm_rs",
                 eps: float = 8 / 255, alpha: Optional[float] = None, steps: Optional[int] = None,
                 amp: Optional[str] = None, scheduler=None, *, attack_amp="same",
                 attack_bn: Optional[str] = None,
                 lower: float = 0.0, upper: float = 1.0, channels_last="auto",
                 augment: Optional[RandomCropFlip] = None, seed: Optional[int] = None,
                 grad_clip: Optional[float] = None, scheduler_interval: str = "step",
                 **method_options):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.module = _dist.unwrap(model)
        params = list(self.module.parameters())
        if not params:
            raise ValueError("model: it has no parameters to train")
        mine = {id(p) for p in params}
        if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("optimizer: none of its parameters belong to the model")
        self.optimizer = optimizer
        self.device = params[0].device
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(float(eps)):
            raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
        if eps <= 0:
            raise ValueError(f"eps: expected a value > 0, got {eps!r}")
        for name, v in (("lower", lower), ("upper", upper)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
        if not lower < upper:
            raise ValueError(f"lower/upper: expected lower < upper, got {lower} >= {upper}")
        self.lower, self.upper = float(lower), float(upper)
        if eps >= self.upper - self.lower:
            raise ValueError(f"eps: {eps} covers the whole input range [{lower}, {upper}]")
        self.eps = float(eps)
        if method not in METHODS:
            raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
        self._method: Method = get_method(method, self.eps, alpha, steps, **method_options)
        self.method = method
        self.alpha, self.steps = self._method.alpha, self._method.steps
        if amp not in _AMP:
            raise ValueError(f"amp: expected None, 'bf16' or 'fp16', got {amp!r}")
        self.amp = amp
        self._amp_dtype = _AMP[amp]
        self._scaler = None
        if self._amp_dtype is torch.float16:
            self._scaler = torch.amp.GradScaler(self.device.type)
        if attack_amp == "same":
            attack_amp = amp
        if attack_amp not in _AMP and attack_amp != "fp32":
            raise ValueError(f"attack_amp: expected 'same', 'fp32', 'bf16' or 'fp16', got {attack_amp!r}")
        self.attack_amp = attack_amp
        self._attack_dtype = _AMP.get(attack_amp)
        # fp16 input gradients underflow unscaled: the attack path scales each sample's loss
        # dynamically (fastadv.attacks._loss_scale), from one running target per device
        self._attack_fp16_scale: Dict[torch.device, Tensor] = {}
        if attack_bn not in (None, "eval", "train"):
            raise ValueError(f"attack_bn: expected None, 'eval' or 'train', got {attack_bn!r}")
        self._attack_bn = attack_bn
        if channels_last not in ("auto", True, False):
            raise ValueError(f"channels_last: expected 'auto', True or False, got {channels_last!r}")
        has_conv = any(isinstance(m, nn.Conv2d) for m in self.module.modules())
        self.channels_last = bool(has_conv and (channels_last is True or (
            channels_last == "auto" and self.device.type == "cuda")))
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)
        if augment is not None and not isinstance(augment, RandomCropFlip):
            raise TypeError("augment: expected None or a fastadv.train.RandomCropFlip "
                            "(augmentations the trainer can invert)")
        self.augment = augment
        self.augment_params = None
        if grad_clip is not None and (isinstance(grad_clip, bool) or not grad_clip > 0):
            raise ValueError(f"grad_clip: expected None or a value > 0, got {grad_clip!r}")
        self.grad_clip = grad_clip
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval: expected 'step' or 'epoch', got {scheduler_interval!r}")
        self.scheduler_interval = scheduler_interval
        self.schedule: Optional[Schedule] = None
        self.torch_scheduler = None
        if scheduler is not None and hasattr(scheduler, "step") and hasattr(scheduler, "state_dict") \
                and not isinstance(scheduler, Schedule):
            self.torch_scheduler = scheduler
        else:
            self.schedule = get_schedule(scheduler)
        self._base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        gen_seed = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(gen_seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        if method == "yopo" and method_options.get("first_layer") is None and not any(
                list(m.parameters(recurse=False)) for m in self.module.modules() if m is not self.module):
            raise ValueError("yopo: no identifiable first layer: the model holds its weights itself, "
                             "in no submodule; pass first_layer=<module> or use another method")
        self.eps_scale = 1.0          # eps warm-up: the methods attack with eps·eps_scale
        self.global_step = 0
        self.epoch = 0                # completed epochs
        self.history = History()
        self.dataset_size: Optional[int] = None
        self._best_state: Optional[Dict[str, Tensor]] = None
        # the checkpoint files this run wrote or resumed from: {"dir", "last", "previous"}
        # (their tags), so that only this run's own last.pt ever becomes previous.pt
        self._ckpt_files: Optional[Dict[str, Optional[str]]] = None
        self._prepared = False
        self._num_classes: Optional[int] = None
        self._sample_shape: Optional[Tuple[int, ...]] = None

    def __repr__(self) -> str:
        return (f"AdversarialTrainer(method={self.method!r}, eps={self.eps:.4g}, alpha={self.alpha:.4g}, "
                f"steps={self.steps}, amp={self.amp!r})")

    # ------------------------------------------------------------ engine calls
    def attack_bn(self, method: Method) -> str:
        return self._attack_bn or method.attack_bn

    def autocast(self, attack: bool = False):
        dt = self._attack_dtype if attack else self._amp_dtype
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dt)

    def forward(self, x: Tensor, model: Optional[nn.Module] = None, attack: bool = False) -> Tensor:
        with self.autocast(attack):
            return (model if model is not None else self.model)(x)

    def input_grad(self, x_adv: Tensor, loss_fn: Callable[[Tensor], Tensor],
                   model: Optional[nn.Module] = None, create_graph: bool = False):
        """The gradient of ``loss_fn(logits)`` w.r.t. the input only (weights' .grad untouched),
        at the attack's precision; with ``create_graph`` (a regulariser on it) at the training's."""
        xa = x_adv.detach().requires_grad_(True)
        attack = not create_graph
        net = model if model is not None else self.module
        with torch.enable_grad():
            z = self.forward(xa, net, attack=attack)
            if attack and self._attack_dtype is torch.float16:
                return self._fp16_input_grad(xa, z, loss_fn, net), z
            loss = loss_fn(z)
            if not attack and self._amp_dtype is torch.float16:
                loss = loss * 1024.0
            (g,) = torch.autograd.grad(loss, xa, create_graph=create_graph)
        return g, z

    def _fp16_input_grad(self, xa: Tensor, z: Tensor, loss_fn: Callable[[Tensor], Tensor],
                         net: nn.Module) -> Tensor:
        """The attack path's input gradient under fp16, loss-scaled per sample from a running
        target (``fastadv.attacks._loss_scale``; rows share one scale while BatchNorm is in
        training mode). Rows that overflow move nothing this step; on a CPU they are redone."""
        shared = self._attack_fp16_scale.get(xa.device)
        if shared is None:
            shared = self._attack_fp16_scale[xa.device] = _loss_scale.new_state(1, xa.device)
        rows = _loss_scale.rows_of(shared, xa.shape[0])
        zf = z.float()
        g = _loss_scale.scaled_input_grad(
            z, zf, loss_fn(zf), xa, rows, independent=not any(m.training for m in net.modules()),
            retries=3 if xa.device.type == "cpu" else 0)
        # row blocks on CPU workers each fold their rows in: either write is a valid target
        _loss_scale.fold_rows(shared, rows)
        if g is None:
            raise ValueError("model: its output does not depend on the input x")
        return g

    @contextlib.contextmanager
    def attacking(self, bn: str):
        """BatchNorm (and dropout) in eval mode while attacking if ``bn == "eval"``; every
        module's own mode comes back afterwards (a BatchNorm the user froze stays frozen)."""
        if bn == "eval" and self.module.training:
            flags = [(m, m.training) for m in self.module.modules()]
            self.module.eval()
            try:
                yield
            finally:
                for m, f in flags:
                    m.training = f
        else:
            yield

    def random_start(self, x: Tensor, radius: float) -> Tensor:
        return ops.random_init(x, radius, "linf", self.lower, self.upper, generator=self.generator,
                               _check_values=False)

    def normal_start(self, x: Tensor, sigma: float, eps: float) -> Tensor:
        x_adv = torch.empty_like(x).normal_(0.0, sigma, generator=self.generator).add_(x)
        return ops.linf_project_(x_adv, x, eps, self.lower, self.upper, _check_values=False)

    def linf_step_(self, x_adv: Tensor, x: Tensor, g: Tensor, alpha, eps) -> Tensor:
        return ops.linf_step_(x_adv, x, g, alpha, eps, self.lower, self.upper, _check_values=False)

    def linf_project_(self, x_adv: Tensor, x: Tensor, eps) -> Tensor:
        return ops.linf_project_(x_adv, x, eps, self.lower, self.upper, _check_values=False)

    def no_sync(self, skip: bool):
        if skip and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler is not None else loss).backward()

    def optimizer_step(self) -> None:
        if self.schedule is not None:
            f = self.schedule(self.global_step + 1)
            for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                group["lr"] = base * f
        if self.grad_clip is not None:
            if self._scaler is not None:
                self._scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.global_step += 1
        if self.torch_scheduler is not None and self.scheduler_interval == "step":
            self.torch_scheduler.step()

    def update(self, loss: Tensor) -> None:
        """zero_grad, backward (scaled under fp16), optimizer step, LR schedule."""
        self.zero_grad()
        self.backward(loss)
        self.optimizer_step()

    # ------------------------------------------------------------ input checks
    def _unpack(self, batch):
        if isinstance(batch, dict):
            keys = [k for k in ("x", "input", "image", "img") if k in batch]
            ykeys = [k for k in ("y", "label", "target") if k in batch]
            if not keys or not ykeys:
                raise ValueError(f"loader: a dict batch needs an input and a label key, got {sorted(batch)}")
            return batch[keys[0]], batch[ykeys[0]], batch.get("index", batch.get("idx"))
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            got = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) \
                else type(batch).__name__
            raise ValueError(f"loader: expected batches (x, y) or (x, y, index), got {got}")
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)

    def _check_batch(self, x, y, idx) -> None:
        """Shape and type checks on every batch; value checks where they cost no device sync."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            what = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x: expected a floating-point tensor [B, ...], got {what}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x: expected a non-empty batch [B, ...], got shape {tuple(x.shape)}")
        if not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            what = f"dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
            raise TypeError(f"y: expected integer class labels, got {what}")
        if y.shape != x.shape[:1]:
            raise ValueError(f"y: expected shape [{x.shape[0]}] (one label per sample), got {tuple(y.shape)}")
        if self._sample_shape is not None and tuple(x.shape[1:]) != self._sample_shape:
            raise ValueError(f"x: expected samples of shape {self._sample_shape} like the first batch, "
                             f"got {tuple(x.shape[1:])}")
        if idx is not None:
            if not isinstance(idx, Tensor) or idx.is_floating_point() or idx.shape != y.shape:
                raise ValueError(f"index: expected integer sample indices of shape [{x.shape[0]}]")
        elif self._method.needs_indices:
            raise ValueError(f"{self.method}: the loader must yield (x, y, index) so each sample's "
                             f"perturbation can be cached; use fastadv.data.make_loader(..., "
                             f"indexed=True) or fastadv.data.IndexedDataset")
        on_host = x.device.type == "cpu"
        if on_host or not self._prepared:
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("x: expected finite values, got NaN or inf")
            tol = 1e-6 * (self.upper - self.lower)
            if lo < self.lower - tol or hi > self.upper + tol:
                raise ValueError(f"x: expected values in [lower, upper] = [{self.lower}, {self.upper}], "
                                 f"got [{lo:.4g}, {hi:.4g}] (normalize inside the model, or set lower/upper)")
        if y.device.type == "cpu" or not self._prepared:
            ymin, ymax = (int(v) for v in torch.aminmax(y))
            n = self._num_classes
            if ymin < 0 or (n is not None and ymax >= n):
                raise ValueError(f"y: expected labels in [0, {n - 1 if n else 'classes-1'}], "
                                 f"got range [{ymin}, {ymax}]")
            if idx is not None and idx.numel():
                imin, imax = (int(v) for v in torch.aminmax(idx))
                if imin < 0 or (self.dataset_size is not None and imax >= self.dataset_size):
                    where = (f"in [0, {self.dataset_size})" if self.dataset_size is not None
                             else "that are non-negative")
                    raise ValueError(f"index: expected sample indices {where}, got range [{imin}, {imax}]")

    def _prepare(self, x: Tensor, y: Tensor, idx: Optional[Tensor]) -> None:
        """First batch: the model's output shape and label range, then the method's set-up."""
        with torch.no_grad(), preserved_model(self.module, "eval", devices=(self.device,)):
            z = self.module(x[:2])
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != min(2, x.shape[0]):
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"model: expected logits [B, classes], got {shape}")
        self._num_classes = int(z.shape[1])
        self._sample_shape = tuple(x.shape[1:])
        ymax = int(y.max())
        if ymax >= self._num_classes:
            raise ValueError(f"y: expected labels in [0, {self._num_classes - 1}] for a model with "
                             f"{self._num_classes} outputs, got a label {ymax}")
        self._method.prepare(self, x, y, idx)
        self._prepared = True

    def _to_device(self, x: Tensor, y: Tensor, idx: Optional[Tensor]):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True).long(), idx

    # ------------------------------------------------------------ one step
    def _train_batch(self, x, y, idx) -> Tuple[Tensor, Tensor, Tensor]:
        self._check_batch(x, y, idx)
        x, y, idx = self._to_device(x, y, idx)
        if not self._prepared:
            self._check_batch(x, y, idx)
            self._prepare(x, y, idx)
        if self.augment is not None:
            self.augment_params = self.augment.sample(x.shape[0], self.generator, x.device)
            x = self.augment.apply(x, self.augment_params, fill=self.lower)
        # a model in train mode is used as it is (submodules the user put in eval mode stay
        # so); a model in eval mode trains in train mode and gets every module's mode back
        flags = None if self.model.training else [(m, m.training) for m in self.model.modules()]
        if flags is not None:
            self.model.train()
        try:
            loss, z = self._method.train_batch(self, x, y, idx)
        finally:
            if flags is not None:
                for m, f in flags:
                    m.training = f
            self.augment_params = None
        return loss, z, y

    def step(self, x: Tensor, y: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """Train on one batch: the method's attack, the update(s) and the LR schedule.

        Returns the (detached) training loss as a tensor on the model's device: nothing
        here waits for the device. The model runs in train mode and gets its mode back;
        parameters' ``.grad`` end as the last optimizer step left them."""
        loss, _, _ = self._train_batch(x, y, idx)
        return loss

    # ------------------------------------------------------------ evaluation
    def robust_mask(self, x: Tensor, y: Tensor, eps: Optional[float] = None, steps: int = 10,
                    restarts: int = 1, seed: int = 0) -> Tensor:
        """[B] bool: correct under L∞ PGD-``steps`` (fastadv.PGD when installed). A point
        whose clean logits are not finite is not correct, so not robust; non-finite logits
        at an iterate do not count as fooled."""
        steps, restarts = int_arg("steps", steps), int_arg("restarts", restarts)
        eps = self.eps if eps is None else eps
        x, y, _ = self._to_device(x, y, None)
        if restarts == 1:
            try:
                mask = _library_pgd_mask(self.module, x, y, eps, steps, self.lower, self.upper, seed)
            except NonFiniteLogitsError:
                # fastadv.PGD refuses non-finite clean logits (no extra forward when there are
                # none): such points are not robust, the others are attacked
                with torch.no_grad(), preserved_model(self.module, "eval", devices=(self.device,)):
                    fin = finite_rows(self.module(x))
                mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
                if bool(fin.any()):
                    mask[fin] = self.robust_mask(x[fin], y[fin], eps, steps, restarts, seed)
            if mask is not None:
                return mask.to(x.device)
        g = torch.Generator(device=self.device).manual_seed(seed)
        return pgd_robust_mask(self.module, x, y, eps, steps, restarts=restarts, lower=self.lower,
                               upper=self.upper, generator=g)

    def evaluate(self, loader, eps: Optional[float] = None, steps: int = 10, restarts: int = 1,
                 max_samples: Optional[int] = None, attack: bool = True, seed: int = 0) -> Dict[str, float]:
        """Clean and PGD accuracy over ``loader`` (counts reduced over DDP ranks)."""
        if attack:
            steps, restarts = int_arg("steps", steps), int_arg("restarts", restarts)
        counts = torch.zeros(3, dtype=torch.float64)
        seen = 0
        for batch in loader:
            x, y, _ = self._unpack(batch)
            if max_samples is not None:
                if seen >= max_samples:
                    break
                x, y = x[: max_samples - seen], y[: max_samples - seen]
            seen += x.shape[0]
            xd, yd, _ = self._to_device(x, y, None)
            with torch.no_grad(), preserved_model(self.module, "eval", devices=(self.device,)):
                clean = _correct(self.module(xd), yd).sum()
            rob = self.robust_mask(xd, yd, eps, steps, restarts, seed=seed + seen).sum() if attack \
                else torch.zeros(())
            counts += torch.stack([clean.double().cpu(), rob.double().cpu(),
                                   torch.tensor(float(x.shape[0]), dtype=torch.float64)])
        _dist.all_reduce_sum_(counts)
        n = max(counts[2].item(), 1.0)
        out = {"clean_acc": counts[0].item() / n, "n": int(counts[2].item())}
        if attack:
            out["robust_acc"] = counts[1].item() / n
        return out

    # ------------------------------------------------------------ state
    def _rng_state(self) -> Dict[str, object]:
        st = {"torch": torch.get_rng_state(), "trainer": self.generator.get_state(),
              "python": _py_state_to_tensor(random.getstate()),
              "numpy": _np_state_to_tensor(np.random.get_state())}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def _set_rng_state(self, st: Dict[str, object]) -> None:
        torch.set_rng_state(st["torch"])
        self.generator.set_state(st["trainer"])
        if "python" in st:
            random.setstate(_tensor_to_py_state(st["python"]))
        if "numpy" in st:
            np.random.set_state(_tensor_to_np_state(st["numpy"]))
        if "cuda" in st and self.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda"], self.device)

    def config(self) -> Dict[str, object]:
        return {**self._method.config(), "amp": self.amp, "attack_amp": self.attack_amp,
                "lower": self.lower, "upper": self.upper}

    def state_dict(self) -> Dict[str, object]:
        """Everything a resumed run needs (loads with ``torch.load(weights_only=True)``)."""
        sched = None
        if self.torch_scheduler is not None:
            sched = self.torch_scheduler.state_dict()
        elif self.schedule is not None:
            sched = self.schedule.config()
        return {"format": _FORMAT, "config": self.config(), "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": sched,
                "scaler": self._scaler.state_dict() if self._scaler is not None else None,
                "global_step": self.global_step, "epoch": self.epoch,
                "history": [dict(r) for r in self.history],
                "best": {"epoch": self.history.best_epoch, "robust_acc": self.history.best_robust_acc,
                         "collapsed": list(self.history.collapsed_epochs)}}

    def rank_state_dict(self) -> Dict[str, object]:
        """What differs between DDP ranks: the method's state (Free's δ, ATTA's cache) and RNGs."""
        return {"method": self._method.state_dict(), "rng": self._rng_state(),
                "prepared": self._prepared, "num_classes": self._num_classes,
                "sample_shape": list(self._sample_shape) if self._sample_shape else None}

    def load_state_dict(self, state: Dict[str, object], rank_state: Optional[Dict[str, object]] = None) -> None:
        if state.get("format") != _FORMAT:
            raise ValueError(f"checkpoint: not a fastadv trainer checkpoint (format {state.get('format')!r})")
        self._check_config(state)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.torch_scheduler is not None and isinstance(state.get("scheduler"), dict) \
                and "kind" not in state["scheduler"]:
            self.torch_scheduler.load_state_dict(state["scheduler"])
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.history = History(dict(r) for r in state["history"])
        best = state.get("best") or {}
        self.history.best_epoch = best.get("epoch")
        self.history.best_robust_acc = best.get("robust_acc")
        self.history.collapsed_epochs = list(best.get("collapsed") or [])
        if rank_state is not None:
            self._method.load_state_dict(rank_state.get("method") or {})
            if rank_state.get("rng"):
                self._set_rng_state(rank_state["rng"])
            if rank_state.get("num_classes"):
                self._num_classes = int(rank_state["num_classes"])
            if rank_state.get("sample_shape"):
                self._sample_shape = tuple(rank_state["sample_shape"])

    # ------------------------------------------------------------ checkpoints
    def _own_files(self, directory: str) -> Dict[str, Optional[str]]:
        known = self._ckpt_files
        if known is None or known["dir"] != os.path.abspath(directory):
            return {"dir": os.path.abspath(directory), "last": None, "previous": None}
        return known

    def save_checkpoint(self, directory: str, extra: Optional[Dict[str, object]] = None) -> str:
        """Write ``directory/last.pt`` atomically, with a checksum (per-rank parts next to it
        under DDP). The last.pt this run wrote before becomes ``previous.pt``, the good
        checkpoint a resume falls back to if last.pt is ever found corrupted."""
        r, world = _dist.rank(), _dist.world_size()
        state = self.state_dict()
        rank_state = self.rank_state_dict()
        if extra:
            rank_state.update(extra)
        path = os.path.join(directory, _LAST)
        prev = os.path.join(directory, _PREVIOUS)
        tag = f"s{self.global_step}"
        known = self._own_files(directory)
        # another run's last.pt must never become a fallback for this one, nor its previous.pt
        rotate = known["last"] is not None
        kept_previous = known["last"] if rotate else known["previous"]
        stale_previous = not rotate and known["previous"] is None
        if world == 1:
            state["rank"] = rank_state
            if stale_previous:
                _remove(prev)
            _ckpt.save_checkpoint(state, path, keep_previous=prev if rotate else None)
        else:
            # every rank's part first, then rank 0's index that names them: a kill in between
            # leaves the previous index pointing at the previous, still present, parts
            _ckpt.save_checkpoint(rank_state, os.path.join(directory, f"last.rank{r}.{tag}.pt"))
            _dist.barrier()
            if r == 0:
                state["rank_files"] = {"world_size": world, "tag": tag}
                if stale_previous:
                    _remove(prev)
                _ckpt.save_checkpoint(state, path, keep_previous=prev if rotate else None)
            _dist.barrier()
            keep = {f".{tag}.pt", f".{kept_previous}.pt"}
            for old in glob.glob(os.path.join(directory, f"last.rank{r}.s*.pt")):
                if not any(old.endswith(k) for k in keep):
                    _remove(old)
        self._ckpt_files = {"dir": known["dir"], "last": tag, "previous": kept_previous}
        return path

    def _read_checkpoint(self, path: str) -> Tuple[Dict[str, object], Dict[str, object]]:
        """(state, this rank's part) of the checkpoint ``path``, verified; CheckpointError
        (one line naming the file) for anything wrong with the files, ValueError for a
        checkpoint of another configuration."""
        state = _ckpt.load_checkpoint(path, map_location=self.device)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise _ckpt.CheckpointError(f"{path}: not a fastadv trainer checkpoint (format {fmt!r})")
        for key, kind in (("config", dict), ("model", dict), ("optimizer", dict), ("global_step", int),
                          ("epoch", int), ("history", list)):
            if not isinstance(state.get(key), kind):
                raise _ckpt.CheckpointError(f"{path}: incomplete or damaged: {key!r} is missing or "
                                            f"not a {kind.__name__}")
        self._check_config(state)
        if isinstance(state.get("rank"), dict):
            rank_state = state.pop("rank")
        else:
            info = state.get("rank_files")
            if not isinstance(info, dict) or "tag" not in info:
                raise _ckpt.CheckpointError(f"{path}: incomplete or damaged: it has no rank part")
            if info.get("world_size") != _dist.world_size():
                raise ValueError(f"checkpoint: {path} was written by {info.get('world_size')} ranks, "
                                 f"resuming with {_dist.world_size()}")
            part = os.path.join(os.path.dirname(path), f"last.rank{_dist.rank()}.{info['tag']}.pt")
            rank_state = _ckpt.load_checkpoint(part, map_location="cpu")
            if not isinstance(rank_state, dict):
                raise _ckpt.CheckpointError(f"{part}: not a fastadv rank checkpoint")
        return state, _cpu_rng(rank_state)

    def _check_config(self, state: Dict[str, object]) -> None:
        mine, theirs = self.config(), state["config"]
        for k in ("method", "eps", "alpha", "steps"):
            if k in theirs and theirs[k] != mine.get(k):
                raise ValueError(f"checkpoint: it was written with {k}={theirs[k]!r}, this trainer has "
                                 f"{k}={mine.get(k)!r}")

    def _choose_checkpoint(self, directory: str):
        """The newest checkpoint in ``directory`` that every rank can read: (path, state,
        rank part, problems with newer ones), or None when there is none at all."""
        candidates = [os.path.join(directory, n) for n in (_LAST, _PREVIOUS)]
        if not any(os.path.exists(p) for p in candidates):
            return None
        problems = []
        for path in candidates:
            got, problem = None, None
            if os.path.exists(path):
                try:
                    got = self._read_checkpoint(path)
                except _ckpt.CheckpointError as exc:
                    problem = str(exc)
            else:
                problem = f"{path}: missing"
            ok = torch.tensor([1.0 if got is not None else 0.0], dtype=torch.float64)
            if _dist.all_reduce_sum_(ok).item() == _dist.world_size():
                return path, got[0], got[1], problems
            if problem is None and got is not None:
                problem = f"{path}: unreadable on another rank"
            problems.append(problem)
        raise _ckpt.CheckpointError("; ".join(problems) + "; there is no previous good checkpoint to "
                                    "resume from (remove these files or pass resume=False to start over)")

    def _apply_checkpoint(self, path: str, state, rank_state) -> Dict[str, object]:
        self.load_state_dict(state, rank_state)
        tag = (state.get("rank_files") or {}).get("tag") or f"s{self.global_step}"
        directory = os.path.dirname(os.path.abspath(path))
        is_last = os.path.basename(path) == _LAST
        self._ckpt_files = {"dir": directory, "last": tag if is_last else None,
                            "previous": None if is_last else tag}
        return rank_state

    def load_checkpoint(self, directory_or_file: str) -> Dict[str, object]:
        """Restore from ``save_checkpoint``'s files (verified, weights_only loads). Returns the
        rank part. Given a directory: its ``last.pt``, or, if that is missing or corrupted,
        ``previous.pt`` (with a one-line warning saying why)."""
        path = directory_or_file
        if not os.path.isdir(path):
            state, rank_state = self._read_checkpoint(path)
            return self._apply_checkpoint(path, state, rank_state)
        chosen = self._choose_checkpoint(path)
        if chosen is None:
            raise _ckpt.CheckpointError(f"{os.path.join(path, _LAST)}: no such file")
        path, state, rank_state, problems = chosen
        if problems and _dist.is_main():
            warnings.warn(f"fastadv: {problems[0]}; resuming from the previous good checkpoint {path}",
                          RuntimeWarning, stacklevel=2)
        return self._apply_checkpoint(path, state, rank_state)

    def _load_best(self, directory: str) -> None:
        """The best weights kept on disk, if they are those of the best epoch the history names
        (a kill between writing best.pt and last.pt leaves a newer best.pt behind)."""
        self._best_state = None
        best_epoch = self.history.best_epoch
        if best_epoch is None:
            return
        for name in ("best.pt", "best.safetensors"):
            p = os.path.join(directory, name)
            if not os.path.exists(p):
                continue
            try:
                weights, meta = _ckpt.load_weights_and_metadata(p, map_location=self.device)
            except _ckpt.CheckpointError as exc:
                if _dist.is_main():
                    warnings.warn(f"fastadv: {exc}; the best weights (epoch {best_epoch}) cannot be "
                                  "restored unless a later epoch improves on them", RuntimeWarning, stacklevel=3)
                continue
            if str(meta.get("epoch")) == str(best_epoch):
                self._best_state = weights
                return

    # ------------------------------------------------------------ the loop
    def fit(self, train_loader, epochs: int, val_loader=None, *, checkpoint_dir: Optional[str] = None,
            resume: bool = True, checkpoint_every: Optional[int] = None, guard: bool = True,
            guard_size: int = 512, guard_steps: int = 10, co_drop: float = 0.2,
            restore_best="on_collapse", stop_on_collapse: bool = False, best_format: str = "pt",
            eps_warmup: float = 0.0,
            progress: Optional[bool] = None, verbose: bool = True,
            on_batch_end: Optional[Callable] = None) -> History:
        """Train until ``epochs`` passes over ``train_loader`` are done (counting those of an
        earlier ``fit`` or of the checkpoint resumed from); returns the per-epoch History.

        Each record: epoch, lr, train_loss, train_adv_acc (accuracy on the trained
        inputs), val_clean_acc (whole ``val_loader``), robust_acc / guard_clean_acc (PGD
        on the held-out guard batch: the first ``guard_size`` samples of ``val_loader``,
        else of the first training batch), time (training seconds, wall), cpu_time (the
        process's CPU seconds over the same span, all threads), eval_time,
        peak_mem_mb, collapse, best.

        Catastrophic-overfitting guard: an epoch whose guard PGD accuracy falls more than
        ``co_drop`` below the best so far is reported as a collapse (warning + record);
        the best weights are kept (``checkpoint_dir/best.pt`` or ``.safetensors``) and,
        with ``restore_best="on_collapse"`` (default) or True, put back at the end. An
        epoch where the guard's PGD cannot attack the model at all (its input gradient is
        zero, its logits are not finite) is a collapse too: robust_acc is NaN and
        guard_error says why. Training goes on, or stops with ``stop_on_collapse``.

        ``checkpoint_dir`` (checked writable at the start): ``last.pt`` is written
        atomically, with a checksum, every epoch and every ``checkpoint_every`` batches;
        the one before it is kept as ``previous.pt``. With ``resume`` a run finds it and
        continues exactly where it was saved, at an epoch's end or mid-epoch (same data
        order, same noise, same weights bit for bit); a corrupted or truncated last.pt is
        named in a one-line warning and previous.pt is used, or, without a good one, a
        ``CheckpointError`` (a ValueError) says so.

        ``eps_warmup``: ramp the attack radius linearly from 0 to eps over this many epochs
        (the guard always attacks at the full eps)."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs: expected an int >= 1, got {epochs!r}")
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or
                                             not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every: expected None or an int >= 1, got {checkpoint_every!r}")
        if restore_best not in (True, False, "on_collapse"):
            raise ValueError(f"restore_best: expected True, False or 'on_collapse', got {restore_best!r}")
        if best_format not in ("pt", "safetensors"):
            raise ValueError(f"best_format: expected 'pt' or 'safetensors', got {best_format!r}")
        if isinstance(eps_warmup, bool) or not isinstance(eps_warmup, (int, float)) or eps_warmup < 0:
            raise ValueError(f"eps_warmup: expected a number of epochs >= 0, got {eps_warmup!r}")
        if not 0 < co_drop <= 1:
            raise ValueError(f"co_drop: expected 0 < co_drop <= 1, got {co_drop!r}")
        guard_size = int_arg("guard_size", guard_size)
        guard_steps = int_arg("guard_steps", guard_steps)
        if checkpoint_dir is not None:
            checkpoint_dir = _ckpt.check_writable_dir(checkpoint_dir, "checkpoint_dir")
        try:
            n_batches = len(train_loader)
        except TypeError:
            n_batches = None
        if n_batches == 0:
            raise ValueError("train_loader: it yields no batches")
        if eps_warmup and n_batches is None:
            raise ValueError("eps_warmup: needs len(train_loader)")
        ds = getattr(train_loader, "dataset", None)
        try:
            self.dataset_size = len(ds) if ds is not None else None
        except TypeError:
            self.dataset_size = None
        main = _dist.is_main()
        log = (lambda msg: print(msg, flush=True)) if (verbose and main) else (lambda msg: None)

        # resume
        skip_batches, rank_state = 0, None
        guard_batch = None
        chosen = self._choose_checkpoint(checkpoint_dir) if checkpoint_dir is not None and resume else None
        if chosen is not None:
            path, state, rank_state, problems = chosen
            if problems:
                msg = f"fastadv: {problems[0]}; resuming from the previous good checkpoint {path}"
                if main:
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log(msg)
            rank_state = self._apply_checkpoint(path, state, rank_state)
            del state
            skip_batches = int(rank_state.get("batch", 0))
            if rank_state.get("guard_x") is not None:
                guard_batch = (rank_state["guard_x"], rank_state["guard_y"])
            self._load_best(checkpoint_dir)
            if skip_batches == 0 and "epoch_torch_rng" not in rank_state and _loader_generators(train_loader) \
                    and main:
                warnings.warn(f"fastadv: {path} predates saving the data order at the end of an epoch: "
                              "this run's data order will differ from an uninterrupted run's",
                              RuntimeWarning, stacklevel=2)
            log(f"fastadv: resumed from {path} at epoch {self.epoch + 1}, "
                f"batch {skip_batches}, step {self.global_step}")
        start_epoch = self.epoch   # ``epochs`` is the run's total: a second fit() continues
        if self.schedule is not None:
            if n_batches is None:
                raise ValueError("scheduler: a schedule needs len(train_loader) to know the total steps")
            self.schedule.set_total_steps(epochs * n_batches * self._method.optimizer_steps_per_batch)

        if guard and val_loader is not None and guard_batch is None:
            guard_batch = _first_samples(val_loader, guard_size, self._unpack)
        use_tqdm = progress if progress is not None else (main and sys.stderr.isatty())
        if use_tqdm:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                use_tqdm = False

        stopped = False
        for epoch in range(start_epoch, epochs):
            _dist.set_sampler_epoch(train_loader, epoch)
            resuming = rank_state is not None and epoch == start_epoch and skip_batches > 0
            if rank_state is not None and epoch == start_epoch:
                # the data order (the loader's generator, the global RNG) as it was at the start
                # of this epoch: saved mid-epoch, and at the end of the one before (batch 0)
                _set_epoch_start_rng(train_loader, rank_state)
            epoch_rng = _epoch_start_rng(train_loader)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            # loss·B and correct on the device (no sync per batch), the count on the host
            sums = torch.zeros(2, device=self.device, dtype=torch.float64)
            count = 0
            if resuming and "sums" in rank_state:
                saved = rank_state["sums"]
                sums += saved[:2].to(self.device)
                count = int(saved[2].item())
            train_time = float(rank_state.get("train_time", 0.0)) if resuming else 0.0
            cpu_time = float(rank_state.get("cpu_time", 0.0)) if resuming else 0.0
            it = iter(train_loader)
            for _ in range(skip_batches if resuming else 0):
                next(it)
            if resuming:
                self._set_rng_state(rank_state["rng"])   # the noise stream as it was at the save
            bar = tqdm(total=n_batches, initial=skip_batches if resuming else 0,
                       desc=f"{self.method} {epoch + 1}/{epochs}", leave=False) if use_tqdm else None
            b = skip_batches if resuming else 0
            t0, c0 = time.perf_counter(), time.process_time()
            for batch in it:
                x, y, idx = self._unpack(batch)
                if guard and guard_batch is None:
                    guard_batch = (x[:guard_size].clone(), y[:guard_size].clone())
                if eps_warmup:
                    self.eps_scale = min(1.0, (epoch + (b + 1) / n_batches) / eps_warmup)
                loss, z, yd = self._train_batch(x, y, idx)
                sums[0] += loss.double() * yd.shape[0]
                sums[1] += _correct(z, yd).sum()
                count += yd.shape[0]
                b += 1
                if bar is not None:
                    bar.update(1)
                    if b % 20 == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}")
                if on_batch_end is not None:
                    on_batch_end(self, epoch, b)
                if checkpoint_dir is not None and checkpoint_every and b % checkpoint_every == 0 \
                        and (n_batches is None or b < n_batches):
                    _sync(self.device)
                    extra = {"batch": b, "sums": _with_count(sums, count), **epoch_rng,
                             "train_time": train_time + time.perf_counter() - t0,
                             "cpu_time": cpu_time + time.process_time() - c0}
                    if guard_batch is not None:
                        extra.update(guard_x=guard_batch[0], guard_y=guard_batch[1])
                    self.save_checkpoint(checkpoint_dir, extra)
            _sync(self.device)
            train_time += time.perf_counter() - t0
            cpu_time += time.process_time() - c0
            if bar is not None:
                bar.close()
            rank_state = None
            if self.torch_scheduler is not None and self.scheduler_interval == "epoch":
                self.torch_scheduler.step()
            self.epoch = epoch + 1

            # -- end of epoch: metrics, evaluation, the guard, checkpoints
            sums = _dist.all_reduce_sum_(_with_count(sums, count))
            t1 = time.perf_counter()
            rec = {"epoch": epoch + 1, "method": self.method, "step": self.global_step,
                   "lr": float(self.optimizer.param_groups[0]["lr"]),
                   "train_loss": sums[0].item() / max(sums[2].item(), 1),
                   "train_adv_acc": sums[1].item() / max(sums[2].item(), 1)}
            if val_loader is not None:
                rec["val_clean_acc"] = self.evaluate(val_loader, attack=False)["clean_acc"]
            if guard and guard_batch is not None:
                gx, gy, _ = self._to_device(*guard_batch, None)
                with torch.no_grad(), preserved_model(self.module, "eval", devices=(self.device,)):
                    gclean = _correct(self.module(gx), gy).sum()
                try:
                    grob = self.robust_mask(gx, gy, steps=guard_steps, seed=1000 + epoch).sum()
                except ValueError as exc:
                    # the guard batch was checked when it was taken: an error that blames the
                    # model now (its input gradient is zero, its logits are not finite) is the
                    # training's collapse, for the guard to report, not a reason to end fit()
                    if not str(exc).startswith("model:"):
                        raise
                    grob, guard_error = None, str(exc)
                else:
                    guard_error = None
                # [clean, robust, count, ranks whose attack failed]: every rank learns of a failure
                cnt = _dist.all_reduce_sum_(torch.stack([
                    gclean.double().cpu(), (grob if grob is not None else gclean).double().cpu(),
                    torch.tensor(float(gx.shape[0]), dtype=torch.float64),
                    torch.tensor(1.0 if grob is None else 0.0, dtype=torch.float64)]))
                rec["guard_clean_acc"] = cnt[0].item() / cnt[2].item()
                if cnt[3].item() > 0:
                    rec["robust_acc"] = float("nan")
                    rec["guard_error"] = guard_error or "the guard's attack failed on another rank"
                else:
                    rec["robust_acc"] = cnt[1].item() / cnt[2].item()
            rec["time"] = train_time
            rec["cpu_time"] = cpu_time
            rec["eval_time"] = time.perf_counter() - t1
            rec["peak_mem_mb"] = _peak_memory_mb(self.device)
            rec["collapse"] = False
            rec["best"] = False
            rob = rec.get("robust_acc")
            hist = self.history
            if "guard_error" in rec:
                # no robust accuracy to compare: the model stopped being attackable by gradients
                rec["collapse"] = True
                ongoing = bool(hist) and hist[-1].get("collapse")
                hist.collapsed_epochs.append(epoch + 1)
                best = (f"; the best weights (epoch {hist.best_epoch}) are kept" if hist.best_epoch is not None
                        else "")
                msg = (f"fastadv: catastrophic overfitting at epoch {epoch + 1}: the guard's PGD cannot "
                       f"attack the model any more ({rec['guard_error']}){best}")
                if main and not ongoing:
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log(msg)
            elif rob is not None:
                if hist.best_robust_acc is not None and rob < hist.best_robust_acc - co_drop:
                    rec["collapse"] = True
                    ongoing = bool(hist) and hist[-1].get("collapse")
                    hist.collapsed_epochs.append(epoch + 1)
                    msg = (f"fastadv: catastrophic overfitting at epoch {epoch + 1}: PGD accuracy on the "
                           f"held-out batch fell to {rob:.1%} from {hist.best_robust_acc:.1%} "
                           f"(epoch {hist.best_epoch}); the best weights are kept")
                    if main and not ongoing:   # once per collapse, not every epoch it lasts
                        warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    log(msg)
                if hist.best_robust_acc is None or rob >= hist.best_robust_acc:
                    hist.best_robust_acc, hist.best_epoch = rob, epoch + 1
                    rec["best"] = True
                    self._best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
                    if checkpoint_dir is not None and main:
                        name = "best.safetensors" if best_format == "safetensors" else "best.pt"
                        _ckpt.save_weights(self._best_state, os.path.join(checkpoint_dir, name),
                                           {"epoch": epoch + 1, "robust_acc": rob, **{
                                               k: v for k, v in self.config().items() if v is not None}})
            hist.append(rec)
            log(_format_record(rec))
            if checkpoint_dir is not None:
                # the next epoch starts from the RNG states as they are now: save them as its start
                extra = {"batch": 0, **_epoch_start_rng(train_loader)}
                if guard_batch is not None:
                    extra.update(guard_x=guard_batch[0], guard_y=guard_batch[1])
                self.save_checkpoint(checkpoint_dir, extra)
            if rec["collapse"] and stop_on_collapse:
                stopped = True
                break
        self.eps_scale = 1.0
        if (restore_best is True or (restore_best == "on_collapse" and self.history.collapsed)) \
                and self._best_state is not None:
            self.module.load_state_dict(self._best_state)
            log(f"fastadv: restored the best weights (epoch {self.history.best_epoch}, "
                f"PGD accuracy {self.history.best_robust_acc:.1%} on the held-out batch)")
        if stopped:
            log("fastadv: stopped after the collapse (stop_on_collapse=True)")
        return self.history


# ------------------------------------------------------------------ helpers
def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:   # gone already, or (checked writable at the start) removed by someone else
        pass


def _with_count(sums: Tensor, count: int) -> Tensor:
    """[loss·B, correct, count] as a CPU float64 tensor (the checkpointed/reduced form)."""
    return torch.cat([sums.cpu(), torch.tensor([float(count)], dtype=torch.float64)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_samples(loader, n: int, unpack) -> Optional[Tuple[Tensor, Tensor]]:
    xs, ys, have = [], [], 0
    for batch in loader:
        x, y, _ = unpack(batch)
        xs.append(x[: n - have])
        ys.append(y[: n - have])
        have += xs[-1].shape[0]
        if have >= n:
            break
    if not xs:
        return None
    return torch.cat(xs), torch.cat(ys)


def _loader_generators(loader) -> List[torch.Generator]:
    """The generators that decide the loader's order: its own, its sampler's, its batch
    sampler's sampler's (each once)."""
    sampler = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    out: List[torch.Generator] = []
    for holder in (loader, sampler, inner):
        g = getattr(holder, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


def _epoch_start_rng(loader) -> Dict[str, object]:
    """The RNG states that decide an epoch's data order (the loader's and the global one)."""
    st: Dict[str, object] = {"epoch_torch_rng": torch.get_rng_state()}
    gens = _loader_generators(loader)
    if gens:
        st["epoch_loader_rngs"] = [g.get_state() for g in gens]
    return st


def _set_epoch_start_rng(loader, st) -> None:
    if "epoch_torch_rng" in st:
        torch.set_rng_state(st["epoch_torch_rng"])
    states = st.get("epoch_loader_rngs")
    if states is None and "epoch_loader_rng" in st:   # checkpoints that kept one generator
        states = [st["epoch_loader_rng"]]
    gens = _loader_generators(loader)
    if states is not None and len(states) == len(gens):
        for g, state in zip(gens, states):
            g.set_state(state.cpu())


def _cpu_rng(state):
    """RNG state tensors must be CPU ByteTensors whatever map_location did."""
    if isinstance(state, dict):
        return {k: (v.cpu() if isinstance(v, Tensor) and ("rng" in k or k in (
            "torch", "trainer", "python", "numpy", "cuda")) else _cpu_rng(v)) for k, v in state.items()}
    return state


def _py_state_to_tensor(st) -> Tensor:
    version, internal, gauss = st
    return torch.tensor([version, -1 if gauss is None else 1, *internal], dtype=torch.int64)


def _tensor_to_py_state(t: Tensor):
    v = t.tolist()
    return (v[0], tuple(v[2:]), None)


def _np_state_to_tensor(st) -> Tensor:
    _, keys, pos, has_gauss, cached = st
    return torch.tensor([*keys.astype(np.int64).tolist(), pos, has_gauss,
                         int(np.float64(cached).view(np.int64))], dtype=torch.int64)


def _tensor_to_np_state(t: Tensor):
    v = t.tolist()
    keys = np.array(v[:624], dtype=np.int64).astype(np.uint32)
    cached = float(np.int64(v[626]).view(np.float64))
    return ("MT19937", keys, v[624], v[625], cached)


def _format_record(r: Dict[str, object]) -> str:
    # standard training trains on clean inputs: its training accuracy is not "adversarial"
    # (the label `fastadv demo` prints for it too)
    acc = "train-clean" if r.get("method") == "standard" else "train-adv"
    parts = [f"epoch {r['epoch']:3d}", f"loss {r['train_loss']:.4f}", f"{acc} {r['train_adv_acc']:.1%}"]
    if "val_clean_acc" in r:
        parts.append(f"val-clean {r['val_clean_acc']:.1%}")
    if "guard_error" in r:
        parts.append("PGD failed")
    elif "robust_acc" in r:
        parts.append(f"PGD {r['robust_acc']:.1%}")
    parts += [f"lr {r['lr']:.3g}", f"{r['time']:.1f}s"]
    if r.get("collapse"):
        parts.append("COLLAPSE")
    return " | ".join(parts)
