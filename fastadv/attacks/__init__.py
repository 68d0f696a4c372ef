"""Adversarial attacks: torchattacks/AutoAttack-compatible classes on the fused ops."""
from .base import Attack, AttackResult, preserved_model

__all__ = ["Attack", "AttackResult", "preserved_model"]
