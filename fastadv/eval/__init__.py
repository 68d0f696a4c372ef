"""Robustness evaluation: metrics, certified robustness, gradient-masking self-checks, reports."""
from .masking import GradientMaskingWarning, MaskingCheck, check_gradient_masking, run_model_checks

__all__ = ["GradientMaskingWarning", "MaskingCheck", "check_gradient_masking", "run_model_checks"]
