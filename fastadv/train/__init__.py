"""Adversarial training by reuse: the AdversarialTrainer, its methods, schedules, checkpoints, DDP."""
from . import checkpoint, distributed, schedules
from .augment import RandomCropFlip
from .methods import METHODS, method_defaults
from .schedules import Constant, Cyclic, OneCycle, Piecewise
from .trainer import AdversarialTrainer, History, pgd_robust_mask

__all__ = ["AdversarialTrainer", "History", "METHODS", "method_defaults", "RandomCropFlip",
           "Constant", "Cyclic", "OneCycle", "Piecewise", "pgd_robust_mask", "checkpoint",
           "distributed", "schedules"]
