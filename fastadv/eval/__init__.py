"""Robustness evaluation: metrics, certified robustness, gradient-masking self-checks, reports.

``metrics``    clean/robust accuracy (per attack, worst case, per class), eps curves,
               calibration under attack, transfer robustness
``smoothing``  randomized-smoothing certification (Cohen et al. 2019)
``masking``    the gradient-masking self-checks
``report``     ``evaluate`` + ``write_report`` (Markdown, JSON, PNG; resumable)
``sharded``    AutoAttack over the ranks of a ``torchrun`` process group
"""
from . import masking, metrics, smoothing
from .masking import GradientMaskingWarning, MaskingCheck, check_gradient_masking, run_model_checks
from .metrics import (accuracy_summary, autoattack_summary, calibration_under_attack, expected_calibration_error,
                      per_class_accuracy, robust_accuracy_curve, transfer_robustness, worst_case)
from .smoothing import certified_accuracy, certify, predict


def __getattr__(name):
    # the report pulls in matplotlib lazily: import it on first use
    if name in ("sharded", "run_standard_evaluation_sharded"):
        import importlib
        _sharded = importlib.import_module(__name__ + ".sharded")
        return _sharded if name == "sharded" else _sharded.run_standard_evaluation_sharded
    if name in ("report", "evaluate", "write_report"):
        import importlib
        _report = importlib.import_module(__name__ + ".report")
        return _report if name == "report" else getattr(_report, name)
    raise AttributeError(f"module 'fastadv.eval' has no attribute {name!r}")


__all__ = ["masking", "metrics", "smoothing", "report", "evaluate", "write_report", "sharded",
           "run_standard_evaluation_sharded",
           "GradientMaskingWarning", "MaskingCheck", "check_gradient_masking", "run_model_checks",
           "accuracy_summary", "autoattack_summary", "calibration_under_attack", "expected_calibration_error",
           "per_class_accuracy", "robust_accuracy_curve", "transfer_robustness", "worst_case",
           "certified_accuracy", "certify", "predict"]
