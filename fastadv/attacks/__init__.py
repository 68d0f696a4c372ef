"""Adversarial attacks: torchattacks/AutoAttack-compatible classes on the fused ops."""
from .base import Attack, AttackResult, InputIndependentError, NonFiniteLogitsError, preserved_model
from .fgsm import FGSM, fgsm
from .pgd import PGD, PGDL2, pgd, pgd_l2
from .apgd import APGD, APGDT
from .fab import FAB, FABT
from .square import Square
from .autoattack import AutoAttack
from .cw import CW
from .deepfool import DeepFool
from .ifgsm import BIM, RFGSM, FFGSM, EOTPGD, UPGD, TPGD, Jitter
from .transfer import MIFGSM, NIFGSM, SINIFGSM, VMIFGSM, VNIFGSM, DIFGSM, TIFGSM
from .pgdrs import PGDRS, PGDRSL2, PGDL2RS
from .noise import GN, VANILA
from .sparsefool import SparseFool
from .onepixel import OnePixel
from .pixle import Pixle
from .spsa import SPSA
from .ead import EADL1, EADEN
from .fmn import FMN
from .jsma import JSMA
from .multi import MultiAttack

__all__ = ["Attack", "AttackResult", "InputIndependentError", "NonFiniteLogitsError", "preserved_model", "FGSM", "PGD", "PGDL2", "fgsm", "pgd", "pgd_l2",
           "APGD", "APGDT", "FAB", "FABT", "Square", "AutoAttack", "CW",
           "DeepFool", "MultiAttack",
           "BIM", "RFGSM", "FFGSM", "EOTPGD", "UPGD", "TPGD", "Jitter",
           "MIFGSM", "NIFGSM", "SINIFGSM", "VMIFGSM", "VNIFGSM", "DIFGSM", "TIFGSM",
           "PGDRS", "PGDRSL2", "PGDL2RS", "GN", "VANILA",
           "SparseFool", "OnePixel", "Pixle", "SPSA", "EADL1", "EADEN", "JSMA", "FMN"]
