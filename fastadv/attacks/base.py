"""The Attack base class: input checks, model-state preservation, targets, the loss/gradient call.

Every attack in fastadv derives from ``Attack`` and implements ``_attack(x, y, target)``
returning an ``AttackResult``. The base guarantees what DESIGN.md promises users:
the model comes back exactly as found (mode, buffers, parameters, ``.grad``,
``requires_grad``) and the global RNG is neither consumed nor reseeded.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import math
import numbers
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import losses as _losses
from . import _loss_scale
from ._groups import (channels_last, finite_rows, forward_rows, layout_like, lp_norm, returned_nonfinite,
                      warn_nonfinite)
from ._groups import norm_name as _norm_name
from ._workers import held_mode, split_count, split_rows

_AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16,
        "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AttackResult:
    """What an attack returns from ``run``.

    x_adv    the adversarial batch (per sample the iterate the attack keeps), like the input
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
def module_of(model) -> Optional[nn.Module]:
    """The ``nn.Module`` behind ``model``: the model itself, the module a bound method
    belongs to (``net.forward``), or the one a ``functools.partial`` wraps; None for any
    other callable (whose state the attack cannot see)."""
    for _ in range(8):  # partials of partials, bounded
        if isinstance(model, nn.Module):
            return model
        owner = getattr(model, "__self__", None)
        if isinstance(owner, nn.Module):
            return owner
        if not isinstance(model, functools.partial):
            return None
        model = model.func
    return None


# model modes: "eval", "train", "keep", and train mode with BatchNorm and/or dropout held in
# eval (torchattacks' set_model_training_mode(model_training=True, batchnorm_training=...,
# dropout_training=...))
# train modes -> (BatchNorm held in eval, dropout held in eval)
_TRAIN_MODES = {"train": (False, False), "train_bn_eval": (True, False),
                "train_dropout_eval": (False, True), "train_bn_dropout_eval": (True, True)}
MODEL_MODES = ("eval", "keep") + tuple(_TRAIN_MODES)


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase) or "BatchNorm" in type(m).__name__


def _is_dropout(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) or "Dropout" in type(m).__name__


def check_model_mode(mode) -> str:
    if mode not in MODEL_MODES:
        raise ValueError(f"model_mode: expected one of {', '.join(repr(m) for m in MODEL_MODES)}, got {mode!r}")
    return mode


def _set_model_mode(model: nn.Module, mode: str) -> None:
    if mode == "eval":
        model.eval()
    elif mode == "keep":
        return
    else:
        model.train()
        bn_eval, dropout_eval = _TRAIN_MODES[mode]
        if bn_eval or dropout_eval:
            for m in model.modules():
                if (bn_eval and _is_batchnorm(m)) or (dropout_eval and _is_dropout(m)):
                    m.eval()


def _cuda_indices(devices: Sequence[torch.device]) -> list:
    return sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})


def model_context(model, mode: str, device: torch.device):
    """``preserved_model`` for an ``nn.Module`` (or a bound method or partial of one); for
    any other callable, at least the global RNG is forked (its own state is out of reach)."""
    module = module_of(model)
    if module is not None:
        return preserved_model(module, mode, devices=(device,))
    return torch.random.fork_rng(devices=_cuda_indices((device,)), enabled=True)


@contextlib.contextmanager
def preserved_model(model: nn.Module, mode: str = "eval", freeze_params: bool = True,
                    devices: Sequence[torch.device] = ()) -> Iterator[nn.Module]:
    """Run ``model`` in ``mode`` (one of ``MODEL_MODES``) and give it back exactly as found.

    Restores every module's training flag, its parameter and buffer entries (a forward
    that reassigns a buffer, ``self.n = self.n + 1``, gets the original object back) and
    their values (BatchNorm running stats), every parameter's ``requires_grad`` and
    ``.grad``, and the global CPU and CUDA RNG states (dropout in train mode would
    otherwise consume them)."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    entries = [(m, dict(m._parameters), dict(m._buffers)) for m in modules]
    params = list(model.parameters())
    if freeze_params and any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
        raise ValueError("model: has uninitialized lazy parameters (nn.LazyLinear, ...): run one "
                         "forward pass on a batch before attacking it (an attack must not change "
                         "the model, and the first forward would)")
    req = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    values = {}
    for _, _, bufs in entries:
        for b in bufs.values():
            if b is not None and id(b) not in values:
                values[id(b)] = (b, b.detach().clone())
    cuda = set(_cuda_indices(devices))
    cuda.update(_cuda_indices([p.device for p in params[:1]]))
    try:
        with torch.random.fork_rng(devices=sorted(cuda), enabled=True):
            _set_model_mode(model, check_model_mode(mode))
            if freeze_params:
                for p in params:
                    p.requires_grad_(False)
            with held_mode(model, mode == "eval"):
                yield model
    finally:
        for m, t in zip(modules, training):
            m.training = t
        for m, ps, bs in entries:
            for live, saved in ((m._parameters, ps), (m._buffers, bs)):
                if live.keys() != saved.keys() or any(live[k] is not v for k, v in saved.items()):
                    live.clear()
                    live.update(saved)
        for p, r, g in zip(params, req, grads):
            p.requires_grad_(r)
            p.grad = g
        with torch.no_grad():
            for b, saved in values.values():
                if b.shape == saved.shape and b.dtype == saved.dtype:
                    b.copy_(saved)
                else:  # resized or recast in place: put the original back, same object
                    b.data = saved


def model_input_dtype(model) -> Optional[torch.dtype]:
    """The dtype a model's floating parameters (else buffers) are in, when it is not
    float32: attacks feed such a model inputs of that dtype. None for float32, for a
    model without floating tensors and for a callable that is not a module."""
    module = module_of(model)
    if module is None:
        return None
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return None if t.dtype == torch.float32 else t.dtype
    return None


_SEEN_CALLABLES: "weakref.WeakSet" = weakref.WeakSet()


def _first_sight(model) -> bool:
    """True the first time a given callable model is handed to an attack (so that its
    warning is said once, not for every attack AutoAttack builds on it)."""
    try:
        if model in _SEEN_CALLABLES:
            return False
        _SEEN_CALLABLES.add(model)
    except TypeError:  # not weakly referenceable: say it every time
        pass
    return True


def _output_error(out) -> TypeError:
    kind = type(out).__name__
    hint = ""
    if isinstance(out, (tuple, list)):
        hint = " (a model returning several outputs needs a wrapper that returns the logits)"
    elif isinstance(out, dict):
        hint = f" with keys {list(out)[:5]} (wrap the model so that it returns the logits)"
    return TypeError(f"model: expected its output to be a logits tensor [B, classes], got a {kind}{hint}")


class InputIndependentError(ValueError):
    """The model's output has no gradient path to its input x: a gradient attack cannot move
    it (a ``ValueError``, so ``except ValueError`` still catches it)."""


class NonFiniteLogitsError(ValueError):
    """The model returned non-finite logits (NaN or inf) on the clean input: no attack can
    say anything about such a point (a ``ValueError``, so ``except ValueError`` still
    catches it)."""


def int_arg(name: str, v, lo: float = 1) -> int:
    """``v`` as an int >= ``lo``: any integer type (numpy's too); a bool, float or string is
    refused (TypeError), never converted; a smaller value is a ValueError."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return int(v)


def number_arg(name: str, v) -> float:
    """``v`` as a float: a real number or a one-element (non-bool) tensor; a bool or a
    string is refused (TypeError), never converted."""
    if isinstance(v, Tensor) and v.numel() == 1 and v.dtype != torch.bool:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__} {v!r}")
    return float(v)


def nonneg_numbers(name: str, values) -> list:
    """``values`` (a sequence, not a string) as a list of finite floats >= 0."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__} {values!r}")
    out = [number_arg(name, v) for v in values]
    bad = [v for v in out if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"{name}: expected finite numbers >= 0, got {bad[0]}")
    return out


def mean_std(mean, std, dtype: torch.dtype = torch.float32, prefix: str = "") -> Tuple[Tensor, Tensor]:
    """Per-channel normalization statistics as two flat tensors of ``dtype``, checked: as
    many stds as means (at least one), finite means, finite positive stds. ``prefix``
    goes before the argument names in the messages."""
    m = torch.as_tensor(mean, dtype=dtype).flatten()
    s = torch.as_tensor(std, dtype=dtype).flatten()
    if m.numel() == 0:
        raise ValueError(f"{prefix}mean: expected one value per channel, got none")
    if m.shape != s.shape:
        raise ValueError(f"{prefix}std: expected {m.numel()} values like mean, got {s.numel()}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{prefix}mean: expected finite values")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"{prefix}std: expected finite positive values")
    return m, s


def check_channels(x: Tensor, c: int) -> None:
    """``x`` has the ``c`` channels (dim 1) of per-channel statistics (one value: any)."""
    if c > 1 and (x.dim() < 2 or x.shape[1] != c):
        raise ValueError(f"x: expected {c} channels (dim 1) to match the normalization's "
                         f"mean/std, got shape {tuple(x.shape)}")


def _model_device(model) -> Optional[torch.device]:
    """The device of the model's first parameter (else buffer); None for a model without
    either and for a callable that is not a module."""
    module = module_of(model)
    if module is None:
        return None
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if first is None else first.device


def global_rng_seed(device: torch.device) -> int:
    """A 63-bit seed read from the global RNG's state (the CPU one, plus the CUDA device's
    for a CUDA device), without drawing from it: after ``torch.manual_seed(s)`` it is the
    same every time, and anything that draws from the global RNG changes it."""
    h = hashlib.blake2b(digest_size=8)
    h.update(torch.get_rng_state().numpy().tobytes())
    if device.type == "cuda":
        h.update(torch.cuda.get_rng_state(device).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


# torchattacks' names for the target modes (``attack_mode`` / ``get_mode()``)
_MODE_NAMES = {"default": "default", "by_label": "targeted(label)", "by_function": "targeted(custom)",
               "random": "targeted(random)", "least_likely": "targeted(least-likely)"}
# constructor options a repr leaves out: said by another field, or not a value worth printing
_REPR_SKIP = {"name", "model", "targeted", "normalization", "generator"}


# ---------------------------------------------------------------- the base
class Attack:
    """Base of every fastadv attack (torchattacks-compatible call and target modes).

    Subclasses implement ``_attack(x, y, target, gen) -> AttackResult`` where ``x`` is
    validated, float32, in the attack's layout, ``y`` int64 true labels, ``target``
    int64 targets or None (untargeted), ``gen`` the attack's own generator, and call
    ``self.loss_and_grad`` / ``self.logits`` for the model. During ``_attack``,
    ``self.clean_logits`` holds the float32 logits of the clean batch (computed once
    by ``run`` for the input checks), so an attack need not recompute them.

    Dtypes: the iterate is float32 whatever the dtypes of ``x`` and of the model (the
    fused ops' dtype; a float64 iterate would buy nothing an eps-ball can see). A model
    whose weights are float64, bfloat16 or float16 is fed its own dtype and its logits are
    taken back as float32 (``logits``). A result returned in a dtype other than float32 is
    fitted back into the ball and the box in that dtype, and its success flags are those
    of the tensor returned (``_result_to_user``).
    """

    # Whether the target modes apply (torchattacks' ``supported_mode``); DeepFool says no.
    targets_supported = True

    def __init_subclass__(cls, **kwargs):
        """Each subclass's own ``__init__`` is wrapped so that the eps budget is checked
        (``_check_budget``) once the outermost constructor has returned: subclasses set
        ``norm`` after the base's ``__init__``, so the base cannot check it there. The
        wrapper keeps the signature (``functools.wraps``)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_checks_budget", False):
            return

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            outer = "_constructing" not in self.__dict__
            if outer:
                self.__dict__["_constructing"] = True
            try:
                init(self, *args, **kw)
            finally:
                if outer:
                    del self.__dict__["_constructing"]
            if outer:
                self._check_budget()

        __init__._checks_budget = True
        cls.__init__ = __init__

    def __init__(self, name: str, model: nn.Module, *, eps: float = 0.0, lower: float = 0.0,
                 upper: float = 1.0, loss: str = "ce", targeted: bool = False, amp=None,
                 channels_last: Union[str, bool] = "auto", backend: Optional[str] = None,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 model_mode: str = "eval", check_inputs: bool = True, allow_large_eps: bool = False):
        if not isinstance(model, nn.Module) and not callable(model):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if module_of(model) is None and _first_sight(model):
            warnings.warn("fastadv: the model is a plain callable, not an nn.Module: the attack "
                          "cannot set its mode (model_mode) nor put its BatchNorm buffers back "
                          "afterwards (it still leaves the global RNG as found). Pass the "
                          "nn.Module itself to have it given back exactly as found.",
                          RuntimeWarning, stacklevel=3)
        self.attack = name
        self.model = model
        self.eps = self._nonneg("eps", eps)
        self.lower, self.upper = self._real("lower", lower), self._real("upper", upper)
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
        self.seed = None if seed is None else int_arg("seed", seed, -math.inf)
        self.model_mode = check_model_mode(model_mode)
        self.check_inputs = self._flag("check_inputs", check_inputs)
        self.allow_large_eps = self._flag("allow_large_eps", allow_large_eps)
        self._mean: Optional[Tensor] = None
        self._std: Optional[Tensor] = None
        self._io_normalized = False
        if normalization is not None:
            if not isinstance(normalization, (tuple, list)) or len(normalization) != 2:
                raise TypeError("normalization: expected a pair (mean, std)")
            self._set_model_normalization(*normalization)
        # torchattacks-style targeting
        self.supported_mode = ["default", "targeted"] if self.targets_supported else ["default"]
        self.targeted = self._flag("targeted", targeted)
        if self.targeted and not self.targets_supported:
            raise ValueError(f"targeted: {name} is untargeted (Targeted mode is not supported.)")
        self._target_mode = "by_label" if targeted else "default"
        self._target_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None
        self._kth_min = 1
        self.clean_logits: Optional[Tensor] = None
        # torchattacks' device: where the model's parameters are; inputs are moved there
        self.device: Optional[torch.device] = _model_device(model)

    # ------------------------------------------------------------- helpers
    @staticmethod
    def _real(name: str, v) -> float:
        """``v`` as a float; a bool, a string or a tensor is refused, never converted
        (``number_arg`` without its one-element tensors)."""
        if isinstance(v, Tensor):
            raise TypeError(f"{name}: expected a number, got {type(v).__name__} {v!r}")
        return number_arg(name, v)

    @staticmethod
    def _nonneg(name: str, v) -> float:
        v = Attack._real(name, v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite value >= 0, got {v}")
        return v

    @staticmethod
    def _flag(name: str, v) -> bool:
        """A bool option (0 and 1 pass too); a string such as "no" is refused."""
        if isinstance(v, bool):
            return v
        if isinstance(v, numbers.Integral) and v in (0, 1):
            return bool(v)
        raise TypeError(f"{name}: expected True or False, got {type(v).__name__} {v!r}")

    # ------------------------------------------------------ torchattacks' surface
    @property
    def model_name(self) -> str:
        """The model's class name (torchattacks' ``model_name``)."""
        return type(self.model).__name__

    @property
    def attack_mode(self) -> str:
        """torchattacks' name of the target mode: "default", "targeted(label)",
        "targeted(custom)", "targeted(random)" or "targeted(least-likely)"."""
        return _MODE_NAMES[self._target_mode]

    def get_mode(self) -> str:
        """torchattacks' ``get_mode()``: ``attack_mode``."""
        return self.attack_mode

    def set_device(self, device) -> None:
        """torchattacks' ``set_device``: inputs on another device are moved to ``device``
        before the attack (the result is on it too); None: attack where the input is."""
        self.device = None if device is None else torch.device(device)

    def set_model(self, model) -> None:
        """torchattacks' ``set_model``: attack ``model`` from now on (``device`` is kept, as
        there)."""
        if not isinstance(model, nn.Module) and not callable(model):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        for key in ("_saved_bytes", "_graph_rows", "_in_dtype"):  # facts about the old model
            self.__dict__.pop(key, None)
        if self.__dict__.get("_graphs"):
            self._graphs.clear()

    @classmethod
    def _options(cls) -> Dict[str, Tuple[object, bool]]:
        """The constructor options of this class and its bases: name -> (default, whether it
        is a positional argument of the class's own constructor, i.e. a torchattacks one)."""
        out: Dict[str, Tuple[object, bool]] = {}
        own = True
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name == "self" or p.name in out or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                out[p.name] = (p.default, own and p.kind == p.POSITIONAL_OR_KEYWORD)
            own = False
        return out

    def _option_default(self, name: str, default):
        """The value an option takes when not given (a subclass resolving a None default says
        what it resolves to, so that the repr leaves it out)."""
        return default

    def __repr__(self) -> str:
        """torchattacks' fields, formatted as there (``model_name``, ``device``,
        ``attack_mode``, ``targeted``, ``normalization_used``, then the attack's own
        positional arguments), then fastadv's keyword options that differ from their
        defaults, as Python literals."""
        fields = [f"model_name={self.model_name}", f"device={self.device}",
                  f"attack_mode={self.attack_mode}", f"targeted={self.targeted}",
                  f"normalization_used={self._mean is not None}"]
        extra = []
        for name, (default, positional) in self._options().items():
            if name in _REPR_SKIP or name not in self.__dict__:
                continue
            value = self.__dict__[name]
            if positional:
                if isinstance(default, int) and not isinstance(default, bool) and \
                        isinstance(value, float) and value == int(value):
                    value = int(value)   # torchattacks prints the int default as given
                fields.append(f"{name}={value}")
                continue
            if default is inspect.Parameter.empty:
                continue   # a base's argument that the subclass fixes (FGSM's alpha)
            try:
                same = bool(value == self._option_default(name, default))
            except Exception:  # a value that does not compare to a plain default
                same = False
            if not same:
                extra.append(f"{name}={value!r}")
        return f"{self.attack}({', '.join(fields + extra)})"

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
        self._mean, self._std = mean_std(mean, std)
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
            m, s = (t.to(x.device, x.dtype).reshape(shape) for t in (self._mean, self._std))
            if m.is_inference():  # the attack was built under torch.inference_mode()
                m, s = m.clone(), s.clone()
            cached = (m, s)
            self._norm_cache[key] = cached
        return cached

    def _check_channels(self, x: Tensor) -> None:
        check_channels(x, self._mean.numel())

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

    # ----------------------------------------------------------- model mode
    def set_model_training_mode(self, model_training: bool = False, batchnorm_training: bool = False,
                                dropout_training: bool = False) -> "Attack":
        """torchattacks' switch: attack the model in eval mode (the default), or in training
        mode with its BatchNorm and dropout layers each in training mode or held in eval.
        Sets ``model_mode``; the model is given back as found either way."""
        model_training = self._flag("model_training", model_training)
        bn = self._flag("batchnorm_training", batchnorm_training)
        do = self._flag("dropout_training", dropout_training)
        if not model_training:
            self.model_mode = "eval"
        else:
            self.model_mode = next(m for m, held in _TRAIN_MODES.items() if held == (not bn, not do))
        return self

    # -------------------------------------------------------- target modes
    # As in torchattacks: the setters print what they did (unless ``quiet``) and return None;
    # an untargeted attack refuses the targeted ones.
    def set_mode_default(self) -> None:
        """Untargeted (torchattacks prints the message below whatever the mode was)."""
        self.targeted, self._target_mode, self._target_fn = False, "default", None
        print("Attack mode is changed to 'default.'")

    def _set_mode_targeted(self, mode: str, quiet) -> None:
        if not self.targets_supported:
            raise ValueError("Targeted mode is not supported.")
        quiet = self._flag("quiet", quiet)
        self.targeted, self._target_mode = True, mode
        if not quiet:
            print(f"Attack mode is changed to '{_MODE_NAMES[mode]}'.")

    def set_mode_targeted_by_label(self, quiet: bool = False) -> None:
        """Labels passed to the call are the targets (torchattacks semantics)."""
        self._set_mode_targeted("by_label", quiet)

    def set_mode_targeted_by_function(self, target_map_function: Callable, quiet: bool = False) -> None:
        """Targets are ``target_map_function(images, labels)``."""
        if not callable(target_map_function):
            raise TypeError(f"target_map_function: expected a callable (images, labels) -> targets, "
                            f"got {type(target_map_function).__name__}")
        self._set_mode_targeted("by_function", quiet)
        self._target_fn = target_map_function

    def set_mode_targeted_random(self, quiet: bool = False) -> None:
        """Targets drawn uniformly from the classes other than the label (the attack's own
        generator: see ``make_generator``)."""
        self._set_mode_targeted("random", quiet)

    def set_mode_targeted_least_likely(self, kth_min: int = 1, quiet: bool = False) -> None:
        """Targets: the class of the ``kth_min``-th smallest clean logit (model in eval mode)
        among the classes other than the label."""
        if isinstance(kth_min, bool) or not isinstance(kth_min, numbers.Integral) or kth_min < 1:
            raise ValueError(f"kth_min: expected an int >= 1, got {kth_min!r}")
        self._set_mode_targeted("least_likely", quiet)
        self._kth_min = int(kth_min)

    def get_target_label(self, inputs: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """torchattacks' ``get_target_label``: the targets the current mode gives for
        ``inputs`` (as you pass them to the attack) and their true ``labels``."""
        mode = self._target_mode
        if mode == "default":
            raise ValueError("target_map_function is not initialized by set_mode_targeted.")
        if mode == "by_label":
            return labels
        if mode == "by_function":
            return self._target_fn(inputs, labels)
        if mode == "random":
            return self.get_random_target_label(inputs, labels)
        return self.get_least_likely_label(inputs, labels)

    def get_least_likely_label(self, inputs: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The ``kth_min``-th least likely class of each input other than its label (the
        prediction when ``labels`` is None), from the model in eval mode."""
        z = self.get_output_with_eval_nograd(inputs).float()
        y = z.argmax(1) if labels is None else self._label_tensor(labels, z.argmax(1), "labels")
        return self._least_likely(z, y)

    def get_random_target_label(self, inputs: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """A class drawn uniformly from those other than each input's label (the prediction
        when ``labels`` is None), from the attack's own generator."""
        z = self.get_output_with_eval_nograd(inputs).float()
        y = z.argmax(1) if labels is None else self._label_tensor(labels, z.argmax(1), "labels")
        return self._random_targets(z.shape[1], y, self.make_generator(y.device))

    def _least_likely(self, z: Tensor, y: Tensor) -> Tensor:
        n = z.shape[1]
        if self._kth_min > n - 1:
            raise ValueError(f"kth_min: expected at most the number of classes other than the "
                             f"label ({n - 1}), got {self._kth_min}")
        # the true class is never a target (it would ask the attack to keep the label)
        others = z.float().scatter(1, y[:, None], math.inf)
        return others.topk(self._kth_min, dim=1, largest=False).indices[:, -1]

    @staticmethod
    def _random_targets(n: int, y: Tensor, gen: torch.Generator) -> Tensor:
        if n < 2:
            raise ValueError(f"set_mode_targeted_random: needs a model with at least 2 classes, "
                             f"got {n}")
        r = torch.randint(0, n - 1, y.shape, generator=gen, device=gen.device).to(y.device)
        return r + (r >= y).long()  # uniform over classes other than y

    # ---------------------------------------------------- torchattacks' model I/O
    def get_logits(self, inputs: Tensor, labels: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        """torchattacks' ``get_logits``: the model's output for ``inputs`` as you pass them to
        the attack (normalized ones under ``set_normalization_used``; pixel-space ones,
        normalized here, with ``normalization=``). Differentiable; the model's mode is left
        as it is."""
        if self._mean is not None and not self._io_normalized:
            inputs = self._normalize(inputs)
        return self.model(inputs)

    def get_output_with_eval_nograd(self, inputs: Tensor) -> Tensor:
        """``get_logits`` with the model in eval mode and no grad; the model comes back as found."""
        with torch.no_grad(), model_context(self.model, "eval", inputs.device):
            return self.get_logits(inputs)

    @property
    def normalization_used(self) -> Optional[Dict[str, Tensor]]:
        """torchattacks' ``normalization_used``: ``{"mean", "std"}`` shaped [1, C, 1, 1], or None."""
        if self._mean is None:
            return None
        c = self._mean.numel()
        return {"mean": self._mean.reshape(1, c, 1, 1), "std": self._std.reshape(1, c, 1, 1)}

    def _stats_for(self, name: str, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self._mean is None:
            raise ValueError(f"{name}: no normalization is set (set_normalization_used(mean, std) "
                             f"or normalization=(mean, std))")
        self._check_channels(x)
        return self._channel_stats(x)

    def normalize(self, inputs: Tensor) -> Tensor:
        """torchattacks' ``normalize``: ``(inputs - mean) / std``."""
        m, s = self._stats_for("normalize", inputs)
        return (inputs - m) / s

    def inverse_normalize(self, inputs: Tensor) -> Tensor:
        """torchattacks' ``inverse_normalize``: ``inputs * std + mean``."""
        m, s = self._stats_for("inverse_normalize", inputs)
        return inputs * s + m

    @staticmethod
    def to_type(inputs: Tensor, type: str) -> Tensor:  # noqa: A002 (torchattacks' name)
        """torchattacks' ``to_type``: float in [0, 1] -> uint8 (``"int"``: ×255, truncated, as
        there) or uint8 -> float (``"float"``: ÷255); other dtypes come back as they are."""
        if type == "int":
            return (inputs * 255).to(torch.uint8) if inputs.dtype == torch.float32 else inputs
        if type == "float":
            return inputs.float() / 255 if inputs.dtype == torch.uint8 else inputs
        raise ValueError(f"type: expected 'float' or 'int', got {type!r}")

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

    def _input_dtype(self) -> Optional[torch.dtype]:
        """The dtype the model is fed in when it is not float32 (set once per run by
        ``_prepare``; looked up here for calls made outside a run)."""
        d = self.__dict__
        if "_in_dtype" not in d:
            d["_in_dtype"] = model_input_dtype(self.model)
        return d["_in_dtype"]

    def logits(self, x: Tensor, *, fp32: bool = False) -> Tensor:
        """The model's logits on ``x`` (normalization applied, under autocast if amp,
        unless ``fp32``).

        A model whose weights are float64, bfloat16 or float16 gets its input in that
        dtype and its logits come back as float32: the iterate stays float32 (the fused
        ops' dtype) and the loss and gradients are float32 whatever the model's dtype.
        Without grad mode and without amp, a large CPU batch runs as row blocks on worker
        threads (``_workers``)."""
        if not torch.is_grad_enabled() and (fp32 or self.amp is None):
            k = split_count(x, module_of(self.model))
            if k > 1:
                return torch.cat(split_rows(lambda s: self._logits_once(x[s], fp32), x.shape[0], k))
        return self._logits_once(x, fp32)

    def _logits_once(self, x: Tensor, fp32: bool) -> Tensor:
        dt = None if fp32 else _AMP[self.amp]
        x = self._normalize(self._model_layout(x))
        cast = self._input_dtype()
        if cast is not None:
            x = x.to(cast)
        if dt is not None:
            # No weight-cast cache: each call is its own autocast region anyway, and a
            # cache would break CUDA graph capture.
            with torch.autocast(device_type=x.device.type, dtype=dt, cache_enabled=False):
                out = self.model(x)
        else:
            out = self.model(x)
        if not isinstance(out, Tensor):
            raise _output_error(out)
        if cast is not None and out.is_floating_point():
            out = out.float()
        return out

    def exact_logits(self, x: Tensor, y: Optional[Tensor] = None, rows: Optional[int] = None) -> Tensor:
        """Float32 logits (no autocast, no grad expected), ``rows`` rows at a time. Without
        ``rows`` but with the labels ``y``: the cache-sized row chunks the attack's own passes
        use on a CPU (a 256-row forward of a small CNN costs ~2.5x the same rows in chunks
        there); otherwise the whole batch."""
        if rows is None and y is not None:
            rows = forward_rows(self, x, y, None)
        if rows is None or x.shape[0] <= rows:
            return self.logits(x, fp32=True).float()
        return torch.cat([self.logits(x[i:i + rows], fp32=True).float() for i in range(0, x.shape[0], rows)])

    def attack_loss(self, logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        return _losses.attack_loss(self.loss, logits, y, targeted=target is not None, target=target)

    def loss_and_grad(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None,
                      loss_fn: Optional[Callable] = None, *,
                      grad_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-sample loss, logits and the input gradient of the summed loss.

        Input-only gradient (``torch.autograd.grad``; parameters' ``.grad`` untouched),
        no host sync (but see fp16 on a CPU). A row whose logits are not finite (NaN or inf)
        gets a NaN loss (never a best iterate) and an all-zero gradient: it moves nothing.
        Under amp a row whose gradient has a non-finite entry gets an all-zero gradient too.

        Under fp16 the gradient is loss-scaled per sample (``_loss_scale``): the logit
        gradient is taken in float32 and each row is brought to its scale target before
        the fp16 backward, so confident samples do not underflow. ``grad_scale`` (float32
        ``[B]``, from ``_loss_scale.new_state``) holds those targets across the passes of a
        loop and is updated in place; without it the attack keeps one running target per
        device. On a CPU a row that overflowed or underflowed is redone at once at another
        scale (a host sync costs nothing there). A large CPU batch runs as row blocks on
        worker threads (``_workers``); the loss must be per row, as every loss here is."""
        shared = None
        if grad_scale is None and _AMP[self.amp] is torch.float16:
            # callers that keep no per-row state (APGD, FAB, DeepFool) share a running target
            shared = self.__dict__.setdefault("_fp16_scale", {}).get(x.device)
            if shared is None:
                shared = self._fp16_scale[x.device] = _loss_scale.new_state(1, x.device)
            grad_scale = _loss_scale.rows_of(shared, x.shape[0])
        # not under amp: oneDNN's bf16 kernels use both cores well, and row blocks on one
        # thread each were slower (PGD-10, cnn32 x256, 2 cores: 0.63 s split vs 0.33-0.35 s not)
        k = split_count(x, module_of(self.model)) if self.amp is None else 1
        if k > 1:
            def block(s):
                return self._loss_and_grad_once(x[s], y[s], None if target is None else target[s], loss_fn,
                                                None if grad_scale is None else grad_scale[s])
            parts = split_rows(block, x.shape[0], k)
            out = tuple(torch.cat([p[i] for p in parts]) for i in range(3))
        else:
            out = self._loss_and_grad_once(x, y, target, loss_fn, grad_scale)
        if shared is not None:
            _loss_scale.fold_rows(shared, grad_scale)
        return out

    def _rows_independent(self) -> bool:
        """Whether no module couples the rows of a batch (all in eval mode): fp16 loss scaling
        may then scale each row on its own. A plain callable is taken as coupled."""
        module = module_of(self.model)
        return module is not None and not any(m.training for m in module.modules())

    def _loss_and_grad_once(self, x: Tensor, y: Tensor, target: Optional[Tensor], loss_fn: Optional[Callable],
                            grad_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        x = self._model_layout(x.detach()).requires_grad_(True)
        fp16 = _AMP[self.amp] is torch.float16
        with torch.enable_grad():
            z = self.logits(x)
            zf = z.float() if fp16 else z
            loss = (loss_fn or self.attack_loss)(zf, y, target)
            if not loss.requires_grad:
                raise InputIndependentError("model: its output does not depend on the input x "
                                            "(no gradient path from the logits to x)")
            if fp16:
                g = _loss_scale.scaled_input_grad(
                    z, zf, loss, x, grad_scale, independent=self._rows_independent(),
                    retries=3 if x.device.type == "cpu" else 0)
            else:
                (g,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
        if g is None:
            raise InputIndependentError("model: its output does not depend on the input x "
                                        "(the input gradient is empty)")
        shape = (-1,) + (1,) * (g.dim() - 1)
        z = z.detach().float()
        finite = finite_rows(z)
        loss = torch.where(finite, loss.detach().float(), float("nan"))
        if self.amp is not None:  # a non-finite entry: the low-precision pass overflowed
            finite = finite & torch.isfinite(g).flatten(1).all(1)
        g = torch.where(finite.view(shape), g, 0.0)
        return loss, z, g

    # ----------------------------------------------------------- validation
    @staticmethod
    def _refuse_inference_mode() -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("attack: called under torch.inference_mode(), where autograd is off "
                               "and the input gradients an attack needs cannot exist; call it "
                               "outside torch.inference_mode() (inside torch.no_grad() is fine)")

    def _prepare(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        self._refuse_inference_mode()
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
        self._check_budget(math.prod(x.shape[1:]))
        if self._mean is not None:
            self._check_channels(x)
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
        if xf.is_inference():  # made under inference_mode: autograd may not save it
            xf = xf.clone()
        y = y.long()
        if y.is_inference():
            y = y.clone()
        self._in_dtype = model_input_dtype(self.model)  # once per run: the model may have been cast
        self._nhwc = self._use_channels_last(xf)
        if self._nhwc:
            xf = channels_last(xf)  # NHWC strides even for one channel (see _groups.channels_last)
        return xf, y

    def _use_channels_last(self, x: Tensor) -> bool:
        if x.dim() != 4:
            return False
        if self.channels_last is True:
            return True
        if self.channels_last is False:
            return False
        module = module_of(self.model)
        return module is not None and any(isinstance(m, nn.Conv2d) for m in module.modules())

    def _check_logits(self, z: Tensor, y: Tensor, target: Optional[Tensor]) -> None:
        if z.dim() != 2 or z.shape[0] != y.shape[0]:
            raise ValueError(f"model: expected logits of shape [B, classes] = [{y.shape[0]}, C], "
                             f"got {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteLogitsError("model: returned non-finite logits (NaN or inf) on the clean input")
        n = z.shape[1]
        n_classes = getattr(self, "n_classes", None)
        if n_classes is not None and n_classes != n:
            # torchattacks' signatures carry n_classes=10 by default: code written for them
            # still runs, and the model's own class count is what the attack uses
            warnings.warn(f"n_classes={n_classes!r} given, but the model returns logits for {n} "
                          f"classes: attacking with {n}", RuntimeWarning, stacklevel=4)
        if self.check_inputs and y.numel():
            if int(y.min()) < 0 or int(y.max()) >= n:
                raise ValueError(f"y: expected labels in [0, {n - 1}] for a model with {n} classes, "
                                 f"got range [{int(y.min())}, {int(y.max())}]")
            if target is not None and (int(target.min()) < 0 or int(target.max()) >= n):
                raise ValueError(f"target: expected labels in [0, {n - 1}], got range "
                                 f"[{int(target.min())}, {int(target.max())}]")

    def _check_depends_on_x(self, x: Tensor) -> None:
        """Once per run, for attacks that follow gradients: refuse a model whose output has no
        autograd path to its input (detached, constant, made with ``torch.no_grad`` inside).
        One forward and backward on two rows, with the global RNG forked so that the run's
        dropout masks are the same with or without this check."""
        if not self.uses_gradients or x.shape[0] == 0:
            return
        xs = x[:2].detach().clone().requires_grad_(True)
        try:
            with torch.random.fork_rng(devices=_cuda_indices((x.device,)), enabled=True), \
                    torch.enable_grad():
                z = self.logits(xs, fp32=True)
                g = None
                if z.requires_grad:
                    (g,) = torch.autograd.grad(z.float().sum(), xs, allow_unused=True)
        except (RuntimeError, ValueError):  # e.g. a model that only runs at its batch size:
            # the run's own passes will tell (an error of the model itself surfaces there)
            return
        if g is None:
            raise InputIndependentError(
                "model: its output does not depend on the input x (no gradient path from the "
                "logits to x): a gradient-based attack cannot move it; use Square for a model "
                "without gradients")

    def make_generator(self, device: torch.device) -> torch.Generator:
        """The attack's own RNG; the global one is never drawn from nor reseeded.

        ``generator=`` given: that one (it advances across calls). ``seed=s``: a fresh one
        seeded with s each call — the numbers torchattacks draws after ``torch.manual_seed(s)``
        (the same generator type, seeded alike). Neither: a fresh one seeded from the global
        RNG's *state* (``global_rng_seed``), so that after ``torch.manual_seed(s)`` a run is
        reproducible while the global RNG stays where it was; a second call with the global
        RNG unmoved draws the same numbers again. A ``MultiAttack`` lends its attacks one
        shared generator for a call (``_shared_generator``), as they all draw from torch's
        global RNG in torchattacks."""
        shared = self.__dict__.get("_shared_generator")
        if shared is not None and shared.device.type == device.type:
            return shared
        if self.generator is not None:
            if self.generator.device.type != device.type:
                raise ValueError(f"generator: expected one on {device.type}, got {self.generator.device}")
            return self.generator
        g = torch.Generator(device=device)
        g.manual_seed(int(self.seed) if self.seed is not None else global_rng_seed(device))
        return g

    def _seeded_from_global(self, device: torch.device) -> bool:
        """Whether ``make_generator`` seeds from the global RNG's state for this call."""
        shared = self.__dict__.get("_shared_generator")
        return self.generator is None and self.seed is None and (
            shared is None or shared.device.type != device.type)

    def _note_repeat(self, gen: torch.Generator, start: Tuple[Tensor, int], xf: Tensor, y: Tensor) -> None:
        """Warn (once per attack) when a call drew the very random numbers of the previous
        call on the same inputs: the global RNG did not move in between, so the run repeated
        (a loop of calls meant as restarts would add nothing)."""
        if torch.equal(gen.get_state(), start[0]):
            return   # nothing random was drawn: a repeat is expected
        key = (start[1], tuple(xf.shape), str(xf.device),
               float(xf.double().sum()) if xf.numel() else 0.0, int(y.sum()) if y.numel() else 0)
        if self.__dict__.get("_last_draw") == key and not self.__dict__.get("_repeat_warned"):
            self._repeat_warned = True
            warnings.warn(
                f"fastadv: {self.attack} drew the same random numbers as its previous call on these "
                f"inputs, so it returned the same result: without seed= or generator=, an attack "
                f"seeds its own generator from the global RNG's state and never advances the "
                f"global RNG (after torch.manual_seed(s) a run repeats). For new random starts "
                f"use restarts=R, or pass generator=torch.Generator().manual_seed(s), which "
                f"advances across calls.", RuntimeWarning, stacklevel=3)
        self._last_draw = key

    @staticmethod
    def _label_tensor(t, y: Tensor, name: str) -> Tensor:
        """``t`` checked like ``y`` (an integer tensor [B], not bool) and made int64 on y's device."""
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor of integer class labels of shape "
                            f"[{y.shape[0]}], got {type(t).__name__}")
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name}: expected integer class labels, got dtype {t.dtype}")
        if t.shape != y.shape:
            raise ValueError(f"{name}: expected shape [{y.shape[0]}] (one target per sample of x), "
                             f"got {tuple(t.shape)}")
        t = t.detach().to(y.device).long()
        return t.clone() if t.is_inference() else t

    def _targets(self, x: Tensor, y: Tensor, z_clean: Tensor, target: Optional[Tensor],
                 gen: torch.Generator) -> Optional[Tensor]:
        if target is not None:
            return self._label_tensor(target, y, "target")
        if not self.targeted:
            return None
        mode = self._target_mode
        n = z_clean.shape[1]
        if mode == "by_label":
            return y
        if mode == "by_function":
            return self._label_tensor(self._target_fn(x, y), y,
                                      "target (returned by the target_map_function)")
        if mode == "random":
            return self._random_targets(n, y, gen)
        if mode == "least_likely":
            if self.model_mode != "eval" and module_of(self.model) is not None:
                # torchattacks ranks the classes with the model in eval mode (no dropout noise)
                with torch.no_grad(), model_context(self.model, "eval", x.device):
                    z_clean = self.exact_logits(x, y)
            return self._least_likely(z_clean, y)
        raise RuntimeError(f"unknown target mode {mode!r}")

    # ----------------------------------------------------------------- call
    def run(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None) -> AttackResult:
        """Attack ``(x, y)`` and return an ``AttackResult`` (x_adv like x: dtype, layout)."""
        self._refuse_inference_mode()
        x, y = self._to_device(x, y)
        x_user = x
        x = self._from_user(x)
        xf, y = self._prepare(x, y)
        dev = xf.device
        with model_context(self.model, self.model_mode, dev):
            from_global = self._seeded_from_global(dev)
            gen = self.make_generator(dev)
            start_state = (gen.get_state(), global_rng_seed(dev)) if from_global else None
            z = self._clean_logits(xf, y, target)
            # "by_label": the labels given are the targets; the true labels are the prediction
            if self.targeted and self._target_mode == "by_label" and target is None:
                self._check_logits(z, y, y)
                target, y = y, z.argmax(1)
            else:
                self._check_logits(z, y, None)
                target = self._targets(xf, y, z, target, gen)
                if target is not None:
                    self._check_logits(z, y, target)
            self._check_depends_on_x(xf)
            self.clean_logits = z
            try:
                res = self._attack(xf, y, target, gen)
            finally:
                self.clean_logits = None
            if start_state is not None:
                self._note_repeat(gen, start_state, xf, y)
            if not isinstance(res.extra, dict):
                res.extra = {}
            if "nonfinite" not in res.extra and res.x_adv.numel():
                # an attack that reports nothing of non-finite logits (``returned_nonfinite``
                # from its last forward, where it makes one): check the points it returns
                # (one forward), so that NaN there is never silent
                with torch.no_grad():
                    z_ret = self.exact_logits(res.x_adv, y)
                res.extra.update(returned_nonfinite(z_ret))
            res.x_adv = self._result_to_user(res, xf, x_user, y, target)
        warn_nonfinite(self, res)
        return res

    def _to_device(self, x, y):
        """``x`` and ``y`` on ``self.device`` when one is set (torchattacks moves its inputs
        to the model's device; the result is returned there)."""
        dev = self.device
        if dev is not None:
            if isinstance(x, Tensor) and x.device != dev:
                x = x.to(dev)
            if isinstance(y, Tensor) and y.device != dev:
                y = y.to(dev)
        return x, y

    def _clean_logits(self, xf: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        """The float32 logits of the clean batch, whatever amp says: the input checks and
        the clean predictions are exact. (An attack whose first pass is a gradient pass at
        x can take them from that pass instead.)"""
        with torch.no_grad():
            return self.exact_logits(xf, y)

    def __call__(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return self.run(x, y, target).x_adv

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # torchattacks name
        return self(x, y)

    # ------------------------------------------------- torchattacks' save/load
    def save(self, data_loader, save_path: Optional[str] = None, verbose: bool = True,
             return_verbose: bool = False, save_predictions: bool = False,
             save_clean_inputs: bool = False, save_type: str = "float"):
        """torchattacks' ``save``: attack every ``(inputs, labels, ...)`` batch of
        ``data_loader``; print (``verbose``) and return (``return_verbose``: ``(robust
        accuracy %, mean L2, seconds of the last batch)``) the robust accuracy — points the
        model, in eval mode, still classifies as their label — and the mean L2 size
        (pixel space) of the perturbations of the points it misclassifies; with
        ``save_path``, write ``{"adv_inputs", "labels"[, "preds"][, "clean_inputs"],
        "save_type"}`` (inputs in pixel space; ``save_type="int"``: uint8, rounded) as
        ``torch.save`` does — the file torchattacks' and fastadv's ``load`` read. Batches
        go to the model's device first. The file is written once, atomically, at the end."""
        import os
        import time
        if save_type not in ("float", "int"):
            raise ValueError(f"save_type: expected 'float' or 'int', got {save_type!r}")
        for name, v in (("verbose", verbose), ("return_verbose", return_verbose),
                        ("save_predictions", save_predictions), ("save_clean_inputs", save_clean_inputs)):
            self._flag(name, v)
        if save_path is not None and not isinstance(save_path, (str, os.PathLike)):
            raise TypeError(f"save_path: expected a path or None, got {type(save_path).__name__}")
        module = module_of(self.model)
        first = next(itertools.chain(module.parameters(), module.buffers()), None) if module is not None else None
        dev = None if first is None else first.device
        try:
            n_batches = len(data_loader)
        except TypeError:
            n_batches = None
        kept = {"adv_inputs": [], "labels": [], "preds": [], "clean_inputs": []}
        correct = total = 0
        l2_sum, l2_n = 0.0, 0
        rob = l2 = elapsed = 0.0
        for step, batch in enumerate(data_loader):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(f"data_loader: expected batches (inputs, labels, ...), got "
                                f"{type(batch).__name__}")
            inputs, labels = batch[0], batch[1]
            if dev is not None and isinstance(inputs, Tensor):
                inputs, labels = inputs.to(dev), labels.to(dev)
            start = time.time()
            adv = self(inputs, labels)
            px_adv, px = self._from_user(adv).float(), self._from_user(inputs).float()
            with torch.no_grad(), model_context(self.model, "eval", px_adv.device):
                pred = self.exact_logits(px_adv).argmax(1)
            right = pred == labels
            correct += int(right.sum())
            total += labels.shape[0]
            d = (px_adv - px).flatten(1).norm(dim=1)[~right]
            l2_sum, l2_n = l2_sum + float(d.sum()), l2_n + d.numel()
            rob = 100.0 * correct / max(total, 1)
            l2 = l2_sum / l2_n if l2_n else 0.0
            elapsed = time.time() - start
            if verbose:
                progress = f"{100.0 * (step + 1) / n_batches:.2f} %" if n_batches else f"batch {step + 1}"
                print(self._save_line(progress, rob, l2, elapsed), end="\r")
            if save_path is not None:
                kept["adv_inputs"].append(px_adv.detach().cpu())
                kept["labels"].append(labels.detach().cpu())
                if save_predictions:
                    kept["preds"].append(pred.cpu())
                if save_clean_inputs:
                    kept["clean_inputs"].append(px.detach().cpu())
        if verbose:
            print()
        if save_path is not None:
            def pack(ts):
                t = torch.cat(ts) if ts else torch.empty(0)
                return (t * 255).round().clamp(0, 255).to(torch.uint8) if save_type == "int" else t
            out = {"adv_inputs": pack(kept["adv_inputs"]), "labels": torch.cat(kept["labels"]) if kept["labels"]
                   else torch.empty(0, dtype=torch.long), "save_type": save_type}
            if save_predictions:
                out["preds"] = torch.cat(kept["preds"]) if kept["preds"] else torch.empty(0, dtype=torch.long)
            if save_clean_inputs:
                out["clean_inputs"] = pack(kept["clean_inputs"])
            tmp = f"{os.fspath(save_path)}.tmp{os.getpid()}"
            torch.save(out, tmp)
            os.replace(tmp, save_path)
        if return_verbose:
            return rob, l2, elapsed
        return None

    def _save_line(self, progress: str, rob: float, l2: float, elapsed: float) -> str:
        """``save``'s progress line."""
        return f"- Save progress: {progress} / Robust accuracy: {rob:.2f} % / L2: {l2:.5f} ({elapsed:.3f} s/batch)"

    @staticmethod
    def load(load_path: str, batch_size: int = 128, shuffle: bool = False, normalize=None,
             load_predictions: bool = False, load_clean_inputs: bool = False):
        """torchattacks' ``load``: a DataLoader over a file ``save`` wrote (read with
        ``weights_only=True``): batches ``(adv_inputs, labels[, preds][, clean_inputs])``,
        inputs as floats in [0, 1], normalized by ``normalize={"mean": ..., "std": ...}``
        if given."""
        from torch.utils.data import DataLoader, TensorDataset
        batch_size = int_arg("batch_size", batch_size)
        d = torch.load(load_path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or "adv_inputs" not in d or "labels" not in d:
            raise ValueError(f"load_path: {load_path!r} is not a file written by save() "
                             f"(no 'adv_inputs'/'labels')")
        keys = ["adv_inputs", "labels"] + (["preds"] if load_predictions else []) + \
            (["clean_inputs"] if load_clean_inputs else [])
        for k in keys:
            if k not in d:
                raise ValueError(f"load_path: {load_path!r} holds no {k!r} (saved without it)")
        tensors = []
        for k in keys:
            t = d[k]
            if k in ("adv_inputs", "clean_inputs"):
                if t.dtype == torch.uint8:
                    t = t.float() / 255
                if normalize is not None:
                    mean, std = mean_std(normalize["mean"], normalize["std"], t.dtype, prefix="normalize: ")
                    shape = (1, -1) + (1,) * (t.dim() - 2)
                    t = (t - mean.reshape(shape)) / std.reshape(shape)
            tensors.append(t)
        return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=bool(shuffle))

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor],
                gen: torch.Generator) -> AttackResult:
        raise NotImplementedError

    # ------------------------------------------------------ the result
    # Attacks that follow input gradients (Square overrides: it only queries).
    uses_gradients = True
    # Whether ``success`` of an untargeted run means "misclassified at x_adv" and nothing
    # more (MultiAttack then takes it as it is instead of a forward of its own).
    _success_is_misclassified = False
    # Whether x_adv is held to the eps-ball of ``self.norm`` (False: CW and DeepFool, whose
    # eps, if any, only decides success).
    eps_ball = True

    def _budget(self) -> Optional[Tuple[str, float]]:
        """(norm, eps) of the threat model, checked against the box by ``_check_budget``, or
        None when the attack's eps is no budget. By default the ball of ``eps_ball``
        attacks, L∞ when the attack has no ``norm``; a norm other than L∞/L2/L1 (L0) is
        not checked."""
        if not self.eps_ball:
            return None
        norm = getattr(self, "norm", None)
        try:
            return ("Linf" if norm is None else _norm_name(norm)), self.eps
        except ValueError:
            return None

    def _check_budget(self, dim: Optional[int] = None) -> None:
        """A ValueError when ``eps`` covers the whole box ``[lower, upper]`` (``dim``: values
        per input, needed for L2/L1) and ``allow_large_eps`` is not set."""
        budget = self._budget()
        if budget is None or self.__dict__.get("allow_large_eps", False):
            return
        from ..budget import check_eps_budget
        norm, eps = budget
        check_eps_budget(eps, norm, self.lower, self.upper, dim, name="eps",
                         allow_name=f"allow_large_eps=True to {self.attack}")

    def _ball(self) -> Optional[Tuple[str, float]]:
        """(norm, eps) of the ball x_adv lies in, or None for the box alone."""
        norm = getattr(self, "norm", None)
        if not self.eps_ball or norm is None:
            return None
        return _norm_name(norm), self.eps

    def _result_to_user(self, res: AttackResult, xf: Tensor, x_user: Tensor, y: Tensor,
                        target: Optional[Tensor], bs: Optional[int] = None) -> Tensor:
        """``res.x_adv`` (float32, pixel space) in the user's space, dtype and layout.

        float32 comes back as it is. Another dtype rounds, and rounding can step outside
        the ball or the box: such elements are moved back towards x (see ``fit_to_ball``),
        and the success flags are taken again from one forward on the tensor returned
        (``bs`` rows at a time when given)."""
        x_adv = self._to_user(res.x_adv, x_user).to(dtype=x_user.dtype)
        if x_user.dtype != torch.float32 and x_adv.numel():
            stats = None
            if getattr(self, "_io_normalized", False):
                shape = (1, -1) + (1,) * (x_user.dim() - 2)
                stats = (self._mean.to(x_user.device, torch.float64).reshape(shape),
                         self._std.to(x_user.device, torch.float64).reshape(shape))
            x_adv = fit_to_ball(x_adv, x_user.detach(), self._ball(), self.lower, self.upper, stats)
            self._rescore(res, self._from_user(x_adv), xf, y, target, bs)
        return layout_like(x_adv, x_user).detach()

    def _rescore(self, res: AttackResult, x_adv: Tensor, xf: Tensor, y: Tensor,
                 target: Optional[Tensor], bs: Optional[int] = None) -> None:
        """Success (and what else an attack reports per point) of ``x_adv``, the pixel-space
        result as returned to the user, from one float32-exact forward (``bs`` rows at a
        time when given). The model sees it in its own dtype where that is not float32,
        else in float32."""
        x_in = x_adv.to(self._input_dtype() or torch.float32)
        with torch.no_grad():
            z = self.exact_logits(x_in, None, bs)
        res.success = self._success_of(z, y, target, res, x_adv, xf)

    def _success_of(self, z: Tensor, y: Tensor, target: Optional[Tensor], res: AttackResult,
                    x_adv: Tensor, xf: Tensor) -> Tensor:
        """What ``success`` means for this attack, given the logits ``z`` at ``x_adv``."""
        return self.is_success(z, y, target)

    # -------------------------------------------------------- success test
    @staticmethod
    def is_success(z: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        """Misclassified (untargeted) or classified as ``target``; never for a row whose
        logits are not finite (the argmax of a NaN row says nothing about the model)."""
        pred = z.argmax(1)
        return (pred == target if target is not None else pred != y) & finite_rows(z)


# ------------------------------------------------------------ dtype rounding
def fit_to_ball(x_adv: Tensor, x: Tensor, ball: Optional[Tuple[str, float]], lower: float,
                upper: float, stats: Optional[Tuple[Tensor, Tensor]] = None,
                rounds: int = 16) -> Tensor:
    """``x_adv`` (in ``x``'s dtype) moved back into the ball around ``x`` and the box
    ``[lower, upper]``, as checked in float64, where rounding to that dtype pushed it out.

    The attack's float32 result lies inside; rounding to bf16/fp16 moves an element by at
    most half a unit in the last place, so one step (``torch.nextafter``) towards ``x`` puts
    it back: L∞ moves the elements outside, L2/L1 every changed element of a row outside.
    float64 is first projected in float64 (its x is not the float32 x the attack used).
    ``stats``: float64 (mean, std) when the tensors are normalized (the ball and the box
    live in pixel space, ``v·std + mean``). At most ``rounds`` steps."""
    norm, eps = ball if ball is not None else (None, math.inf)

    def pixels(t: Tensor) -> Tensor:
        t = t.double()
        return t if stats is None else t * stats[1] + stats[0]

    def projected(p: Tensor) -> Tensor:
        q = _project64(p, x64, norm, eps).clamp_(lower, upper)
        return q if stats is None else (q - stats[0]) / stats[1]

    x64 = pixels(x)
    projected_once = x_adv.dtype == torch.float64
    if projected_once:
        x_adv = projected(pixels(x_adv))
    for _ in range(rounds):
        p = pixels(x_adv)
        bad = (p < lower) | (p > upper)
        d = p - x64
        if norm == "Linf":
            bad |= d.abs() > eps
        elif norm is not None:
            rows = lp_norm(d, norm, torch.float64) > eps
            bad |= rows.view((-1,) + (1,) * (d.dim() - 1)) & (x_adv != x)
        if not bool(bad.any()):
            break
        step = _nextafter(x_adv, x)
        if not projected_once:
            # Normalized tensors: an element near 0 has a tiny unit in the last place while
            # the overshoot it must undo comes from the float32 std and mean (~1e-9 in pixel
            # space), so steps of one unit would not get back in; the rounded projection does
            # (or lands within a unit of the ball, which the steps then close).
            q = projected(p).to(x_adv.dtype)
            step = torch.where(q != x_adv, q, step)
            projected_once = True
        x_adv = torch.where(bad, step, x_adv)
    return x_adv


def _nextafter(a: Tensor, b: Tensor) -> Tensor:
    """``torch.nextafter``; through the CPU where a device lacks it for the dtype (CUDA
    float16 before torch 2.6). Once per run, and only where rounding left the ball."""
    try:
        return torch.nextafter(a, b)
    except (RuntimeError, NotImplementedError):
        if a.device.type == "cpu":
            raise
        return torch.nextafter(a.cpu(), b.cpu()).to(a.device)


def _project64(p: Tensor, x64: Tensor, norm: Optional[str], eps: float) -> Tensor:
    """``p`` projected (float64) into the ``norm`` ball of radius ``eps`` around ``x64``:
    clamped for L∞, scaled towards x64 for L2 and L1 (the overshoot is a rounding error)."""
    if norm is None or not math.isfinite(eps):
        return p
    if norm == "Linf":
        return torch.minimum(torch.maximum(p, x64 - eps), x64 + eps)
    d = p - x64
    n = lp_norm(d, norm, torch.float64)
    scale = torch.where(n > eps, eps / n.clamp_min(1e-300), torch.ones_like(n))
    return x64 + d * scale.view((-1,) + (1,) * (d.dim() - 1))
