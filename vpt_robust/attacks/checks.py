"""Loud sanity checks for robustness evaluations.

Each check raises a subclass of `RobustnessCheckError` with a message that says what was seen
and the usual causes, instead of logging a warning nobody reads. A robust accuracy that is
too good is almost always an evaluation bug (masked gradients, a wrong normalisation, a model
left stochastic), not a robust model.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RobustnessCheckError(RuntimeError):
    """Base class: a robustness evaluation produced a result that cannot be trusted."""


class GradientMaskingError(RobustnessCheckError):
    """Input gradients are zero or not finite on most samples: gradient attacks cannot work."""


class StochasticModelError(RobustnessCheckError):
    """Two identical forwards gave different logits: the model is randomised."""


class RobustAboveCleanError(RobustnessCheckError):
    """Robust accuracy exceeds clean accuracy on the same samples."""


class EpsNotMonotoneError(RobustnessCheckError):
    """Robust accuracy rises as eps grows."""


def _autocast(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _accuracies(result: Any) -> tuple[float, float, int]:
    return float(result.clean_accuracy), float(result.robust_accuracy), int(result.n)


def check_robust_not_above_clean(
    result: Any = None,
    *,
    clean_accuracy: float | None = None,
    robust_accuracy: float | None = None,
    tol: float = 0.0,
    context: str = "",
) -> None:
    """Raise RobustAboveCleanError if robust accuracy > clean accuracy + tol.

    Pass a RobustResult (per-sample flags are checked too: no sample may be robust yet
    misclassified clean), or the two accuracies measured on the same samples.
    """
    where = f" ({context})" if context else ""
    if result is not None:
        clean, rob, n = _accuracies(result)
        both = result.robust_correct & ~result.clean_correct
        if int(both.sum()) > 0:
            raise RobustAboveCleanError(
                f"{int(both.sum())} of {n} samples{where} count as robust but were misclassified "
                f"clean ({result.attack}, {result.norm} eps={result.eps:g}): the flags were not "
                "computed on the same model/samples, or the model is stochastic or depends on "
                "the batch (BatchNorm/dropout in train mode)"
            )
        where = f" ({context or result.attack + ' ' + result.norm + f' eps={result.eps:g}'})"
    else:
        if clean_accuracy is None or robust_accuracy is None:
            raise ValueError("check_robust_not_above_clean: pass a result or both accuracies")
        clean, rob = float(clean_accuracy), float(robust_accuracy)
    if rob > clean + tol:
        raise RobustAboveCleanError(
            f"robust accuracy {rob:.4f} is above clean accuracy {clean:.4f}{where}. An attack "
            "cannot make a model more accurate: check that both were measured on the same "
            "samples with the same model in eval mode, that the attack sees [0,1] images with "
            "the normalisation inside the model, and that the gradients are not masked"
        )


def check_eps_monotone(
    results: Iterable[Any] | Mapping[float, float],
    *,
    tol: float | None = None,
) -> None:
    """Raise EpsNotMonotoneError if robust accuracy rises as eps grows.

    `results` are RobustResults (grouped by attack and norm; the largest clean accuracy of a
    group stands at eps 0) or a mapping eps -> robust accuracy. `tol` is the rise allowed
    between two eps values; by default max(0.005, 2/n), since restarts draw different noise
    at different eps and can flip a sample or two.
    """
    groups: dict[tuple[str, str], list[tuple[float, float, int]]] = defaultdict(list)
    if isinstance(results, Mapping):
        for eps, acc in results.items():
            groups[("", "")].append((float(eps), float(acc), 0))
    else:
        for r in results:
            clean, rob, n = _accuracies(r)
            groups[(r.attack, r.norm)].append((float(r.eps), rob, n))
            groups[(r.attack, r.norm)].append((0.0, clean, n))
    for (attack, norm), points in groups.items():
        points.sort(key=lambda p: (p[0], -p[1]))
        # Several clean points (one per result) collapse to the highest one at eps 0.
        dedup: list[tuple[float, float, int]] = []
        for p in points:
            if dedup and dedup[-1][0] == p[0] == 0.0:
                continue
            dedup.append(p)
        for (e0, a0, _), (e1, a1, n1) in zip(dedup, dedup[1:], strict=False):
            allowed = tol if tol is not None else max(0.005, 2.0 / n1 if n1 else 0.0)
            if a1 > a0 + allowed:
                label = f" for {attack} {norm}" if attack else ""
                raise EpsNotMonotoneError(
                    f"robust accuracy rises with eps{label}: {a0:.4f} at eps={e0:g} but "
                    f"{a1:.4f} at eps={e1:g} (allowed rise {allowed:.4f}). A larger ball contains "
                    "the smaller one, so this means the attack is failing: masked or noisy "
                    "gradients, too few steps for the larger eps, or a stochastic model"
                )


def check_gradients(
    model: nn.Module | Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_zero_fraction: float = 0.5,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Raise GradientMaskingError if the cross-entropy's input gradient is exactly zero (or not
    finite) on more than `max_zero_fraction` of the samples. Returns per-sample L1 norms."""
    if images.shape[0] == 0:
        raise ValueError("images: check_gradients needs at least one sample")
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        with _autocast(x.device, amp_dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels.to(x.device).long(), reduction="sum")
        if not loss.requires_grad:
            raise GradientMaskingError(
                "the model's output does not depend differentiably on its input (no autograd "
                "graph from images to logits): gradient attacks cannot work on it. Was it run "
                "under torch.no_grad, or does it detach/quantise the input?"
            )
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    norms = grad.detach().float().flatten(1).abs().sum(dim=1)
    bad = (norms == 0) | ~torch.isfinite(norms)
    frac = float(bad.float().mean())
    if frac > max_zero_fraction:
        raise GradientMaskingError(
            f"input gradient is zero or not finite on {int(bad.sum())} of {bad.numel()} samples "
            f"({frac:.0%} > {max_zero_fraction:.0%}): gradients are masked (quantisation, "
            "argmax/rounding, detach, saturated softmax in low precision). PGD and APGD cannot "
            "attack this model; its robust accuracy would be meaningless"
        )
    return norms.cpu()


def check_deterministic(
    model: nn.Module | Any,
    images: torch.Tensor,
    *,
    rtol: float = 1e-4,
    amp_dtype: torch.dtype | None = None,
    hint: str = "use an EoT attack (robust_accuracy(..., eot_iter=20)) or "
    'autoattack(..., version="rand")',
) -> None:
    """Raise StochasticModelError if two identical forwards give different logits.

    The tolerance is relative to the largest logit magnitude, so that non-deterministic GPU
    reductions (~1e-7 relative) pass while dropout or random input transforms do not.
    """
    if images.shape[0] == 0:
        raise ValueError("images: check_deterministic needs at least one sample")
    with torch.no_grad(), _autocast(images.device, amp_dtype):
        a = model(images).float()
        b = model(images).float()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    diff = float((a - b).abs().max())
    if not math.isfinite(diff) or diff > rtol * scale:
        training = isinstance(model, nn.Module) and any(m.training for m in model.modules())
        why = " Some of its modules are in train mode: call model.eval()." if training else ""
        raise StochasticModelError(
            f"two identical forwards gave logits differing by {diff:.3g} (largest logit "
            f"{scale:.3g}): the model is randomised (dropout, random transforms, noise).{why} "
            f"A deterministic attack overestimates its robustness; {hint}"
        )
