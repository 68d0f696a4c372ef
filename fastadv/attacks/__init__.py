"""Adversarial attacks: torchattacks/AutoAttack-compatible classes on the fused ops."""
from .base import Attack, AttackResult, InputIndependentError, preserved_model
from .fgsm import FGSM, fgsm
from .pgd import PGD, PGDL2, pgd, pgd_l2
from .apgd import APGD, APGDT
from .fab import FAB, FABT
from .square import Square
from .autoattack import AutoAttack
from .cw import CW
from .deepfool import DeepFool
from .multi import MultiAttack

__all__ = ["Attack", "AttackResult", "InputIndependentError", "preserved_model", "FGSM", "PGD", "PGDL2", "fgsm", "pgd", "pgd_l2",
           "APGD", "APGDT", "FAB", "FABT", "Square", "AutoAttack", "CW",
           "DeepFool", "MultiAttack"]
