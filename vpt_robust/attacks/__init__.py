"""Adversarial attacks on any `model(images in [0,1]) -> logits`: PGD (L-inf, L2), robust
accuracy with per-sample flags, AutoAttack through pyautoattack, and loud sanity checks."""

from vpt_robust.attacks.autoattack import autoattack
from vpt_robust.attacks.checks import (
    EpsNotMonotoneError,
    GradientMaskingError,
    RobustAboveCleanError,
    RobustnessCheckError,
    StochasticModelError,
    check_deterministic,
    check_eps_monotone,
    check_gradients,
    check_robust_not_above_clean,
)
from vpt_robust.attacks.pgd import (
    RobustResult,
    default_alpha,
    eval_mode,
    per_sample_delta,
    pgd,
    robust_accuracy,
)

__all__ = [
    "EpsNotMonotoneError",
    "GradientMaskingError",
    "RobustAboveCleanError",
    "RobustResult",
    "RobustnessCheckError",
    "StochasticModelError",
    "autoattack",
    "check_deterministic",
    "check_eps_monotone",
    "check_gradients",
    "check_robust_not_above_clean",
    "default_alpha",
    "eval_mode",
    "per_sample_delta",
    "pgd",
    "robust_accuracy",
]
