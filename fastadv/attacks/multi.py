"""MultiAttack: attacks run in turn on one model, each on the points the ones before it left unfooled.

Drop-in for ``torchattacks.MultiAttack``: the same constructor, call, ``verbose`` line and
``save`` (which also returns the per-attack success rates). Each attack runs on fastadv's
engine over the remaining points only, and the points it fools leave the batch.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .base import Attack, AttackResult, model_context

__all__ = ["MultiAttack"]


class MultiAttack(Attack):
    """``MultiAttack(attacks, verbose=False, *, seed=None, generator=None)``.

    ``attacks``: two or more attacks on the same model (fastadv's; torchattacks' work too).
    They run in order; each attacks only the points that all before it left correctly
    classified, and a point takes the output of the attack that fooled it. Points that no
    attack fooled come back as given (their clean input), as in torchattacks. "Fooled":
    misclassified by the model in this attack's mode (eval unless
    ``set_model_training_mode`` says otherwise); for a fastadv attack that is untargeted
    and in the same mode, its own exact success flags say it, without another forward.

    As torchattacks' attacks all draw from torch's global RNG one after the other, the
    fastadv attacks here that have no ``seed``/``generator`` of their own share this
    attack's generator for a call (see ``Attack.make_generator``): two identical random-
    start PGDs are two different restarts. ``set_normalization_used``,
    ``set_model_training_mode``, ``set_device``, ``set_model`` and ``set_mode_default``
    apply to the attacks too; the targeted modes are refused (as there).

    ``run(x, y)`` returns an ``AttackResult`` whose ``extra["attack"]`` is the index of the
    attack that fooled each point (-1: none) and ``extra["records"]`` the points left
    before the first attack and after each one run; ``loss`` is 0 (no single loss)."""

    targets_supported = False

    def __init__(self, attacks, verbose: bool = False, *, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        if isinstance(attacks, (str, bytes)) or not hasattr(attacks, "__iter__"):
            raise TypeError(f"attacks: expected a list of attacks, got {type(attacks).__name__}")
        attacks = list(attacks)
        if len(attacks) < 2:
            raise ValueError(f"attacks: expected at least two attacks, got {len(attacks)}")
        for i, atk in enumerate(attacks):
            if not callable(atk) or not hasattr(atk, "model"):
                raise TypeError(f"attacks[{i}]: expected an attack (called as atk(x, y), with a "
                                f".model), got {type(atk).__name__}")
        if len({id(atk.model) for atk in attacks}) != 1:
            raise ValueError("attacks: expected attacks on one model; at least one of them "
                             "references a different model")
        super().__init__("MultiAttack", attacks[0].model, seed=seed, generator=generator)
        self.attacks = attacks
        self.verbose = self._flag("verbose", verbose)
        self._records: Optional[List[int]] = None   # summed over the batches of save()

    # ------------------------------------------- settings that apply to the attacks too
    def _each(self, method: str, *args) -> None:
        for atk in self.attacks:
            fn = getattr(atk, method, None)
            if fn is not None:
                fn(*args)

    def set_normalization_used(self, mean, std) -> "MultiAttack":
        super().set_normalization_used(mean, std)
        self._each("set_normalization_used", mean, std)
        return self

    def set_model_training_mode(self, model_training: bool = False, batchnorm_training: bool = False,
                                dropout_training: bool = False) -> "MultiAttack":
        super().set_model_training_mode(model_training, batchnorm_training, dropout_training)
        self._each("set_model_training_mode", model_training, batchnorm_training, dropout_training)
        return self

    def set_device(self, device) -> None:
        super().set_device(device)
        self._each("set_device", device)

    def set_model(self, model) -> None:
        super().set_model(model)
        self._each("set_model", model)

    def set_mode_default(self) -> None:
        super().set_mode_default()
        self._each("set_mode_default")

    # ---------------------------------------------------------------- the run
    def run(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None) -> AttackResult:
        """Attack ``(x, y)`` with each attack in turn on the points still unfooled."""
        if target is not None:
            raise ValueError("target: MultiAttack is untargeted (give its attacks their own "
                             "target modes)")
        self._refuse_inference_mode()
        x, y = self._to_device(x, y)
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError(f"x: expected a batch [B, ...], got shape {tuple(x.shape)}")
        y = self._label_tensor(y, torch.empty(x.shape[0], dtype=torch.long, device=x.device), "y")
        b, dev = x.shape[0], x.device
        final = x.detach().clone()
        success = torch.zeros(b, dtype=torch.bool, device=dev)
        which = torch.full((b,), -1, dtype=torch.long, device=dev)
        steps = torch.zeros(b, dtype=torch.long, device=dev)
        left = torch.arange(b, device=dev)
        records = [b]
        gen = self.make_generator(dev)
        for i, atk in enumerate(self.attacks):
            if left.numel() == 0:
                break
            adv, fooled, spent = self._run_one(atk, x[left], y[left], gen)
            took = left[fooled]
            final[took] = adv[fooled].to(device=dev, dtype=final.dtype)
            success[took] = True
            which[took] = i
            if spent is not None:
                steps.index_add_(0, left, spent.to(dev))
            left = left[~fooled]
            records.append(int(left.numel()))
        if self.verbose:
            print(self._rates_line(records))
        if self._records is not None:
            for i, n in enumerate(records):
                self._records[i] += n
        return AttackResult(final, success, torch.zeros(b, device=dev), steps,
                            extra={"attack": which, "records": records})

    def _run_one(self, atk, xs: Tensor, ys: Tensor, gen: torch.Generator
                 ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(adversarial points, fooled [n], steps spent [n] or None) of one attack."""
        spent = None
        if isinstance(atk, Attack):
            lend = atk._seeded_from_global(xs.device)
            if lend:
                atk._shared_generator = gen
            try:
                res = atk.run(xs, ys)
            finally:
                if lend:
                    atk.__dict__.pop("_shared_generator", None)
            adv, spent = res.x_adv, res.steps
            if atk._success_is_misclassified and not atk.targeted and atk.model_mode == self.model_mode:
                return adv, res.success.to(xs.device), spent
        else:
            adv = atk(xs, ys)
        # the attack's own get_logits reads its output in its own space (normalized or not)
        read = getattr(atk, "get_logits", None) or self.get_logits
        with torch.no_grad(), model_context(self.model, self.model_mode, adv.device):
            z = read(adv)
        return adv, (z.argmax(1) != ys.to(z.device)).to(xs.device), spent

    # -------------------------------------------------------------- reporting
    @staticmethod
    def _success_rates(records: List[float]) -> List[float]:
        """Cumulative success rate (%) after each attack run."""
        if not records or records[0] == 0:
            return [0.0] * max(len(records) - 1, 0)
        return [(1 - n / records[0]) * 100 for n in records[1:]]

    def _rates_line(self, records: List[float]) -> str:
        return "Attack success rate: " + " | ".join(f"{r:2.2f} %" for r in self._success_rates(records))

    def _save_line(self, progress: str, rob: float, l2: float, elapsed: float) -> str:
        return (f"- Save progress: {progress} / Robust accuracy: {rob:.2f} % / "
                f"{self._rates_line(self._records or [])} / L2: {l2:.5f} ({elapsed:.3f} s/batch)")

    def save(self, data_loader, save_path: Optional[str] = None, verbose: bool = True,
             return_verbose: bool = False, save_predictions: bool = False,
             save_clean_images: bool = False, save_type: str = "float"):
        """torchattacks' ``MultiAttack.save``: ``Attack.save`` with the per-attack success
        rates over all batches in the progress line; with ``return_verbose``, returns
        ``(robust accuracy %, success rates %, mean L2, seconds of the last batch)``."""
        prev_verbose = self.verbose
        self.verbose = False
        self._records = [0] * (len(self.attacks) + 1)
        try:
            out = super().save(data_loader, save_path, verbose, return_verbose, save_predictions,
                               save_clean_images, save_type)
            rates = self._success_rates(self._records)
        finally:
            self._records = None
            self.verbose = prev_verbose
        if return_verbose:
            rob, l2, elapsed = out
            return rob, rates, l2, elapsed
        return None
