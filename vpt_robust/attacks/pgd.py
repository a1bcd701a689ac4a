"""Projected gradient descent (Madry et al.) in L-inf and L2, and robust accuracy built on it.

Every attack here sees a model as `model(images in [0,1]) -> logits`; normalisation lives inside
the model, so the eps-ball and the [0,1] box are both in pixel space. The step loop issues no
host synchronisation (no `.item()`, no boolean indexing), so on CUDA it queues work as fast as
the device takes it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpt_robust.attacks import checks
from vpt_robust.utils import progress, resolve_device

NORMS = ("Linf", "L2")
STEP_SCHEDULES = ("constant", "cosine", "linear")

# Slack when checking that inputs lie in [0,1]: images decoded or resized in float32 can
# overshoot by a few ulps, which is not a normalisation bug.
_RANGE_SLACK = 1e-5


def default_alpha(eps: float, steps: int) -> float:
    """Step size 2.5 * eps / steps (Madry et al.): enough to cross the ball from the centre."""
    return 2.5 * eps / max(steps, 1)


def step_sizes(alpha: float, steps: int, schedule: str) -> list[float]:
    """Per-step sizes for a schedule: constant, cosine (alpha -> 0) or linear (alpha -> 0)."""
    if schedule not in STEP_SCHEDULES:
        raise ValueError(f"step_schedule: {schedule!r} is not one of {STEP_SCHEDULES}")
    if schedule == "constant":
        return [alpha] * steps
    if schedule == "cosine":
        return [alpha * 0.5 * (1.0 + math.cos(math.pi * t / steps)) for t in range(steps)]
    return [alpha * (1.0 - t / steps) for t in range(steps)]


def _autocast(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the duration, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


def _check_norm_eps(norm: str, eps: float) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {NORMS}")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: {eps!r} must be a finite number >= 0")


def _check_batch(images: torch.Tensor, labels: torch.Tensor, *, check_range: bool = True) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"images: expected a (B, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor in [0,1], got dtype {images.dtype}")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.ndim != 1
        or labels.shape[0] != images.shape[0]
    ):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
        raise ValueError(
            f"labels: expected shape ({images.shape[0]},) to match images, got {shape}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    if check_range and images.numel():
        lo, hi = torch.aminmax(images.detach())
        if lo.item() < -_RANGE_SLACK or hi.item() > 1 + _RANGE_SLACK:
            raise ValueError(
                f"images: values span [{lo.item():.4g}, {hi.item():.4g}] but attacks expect [0,1] "
                "pixels; normalisation belongs inside the model"
            )


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def random_delta(
    shape: torch.Size | tuple[int, ...],
    eps: float,
    norm: str,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random start for a whole batch: uniform in the L-inf box, or a Gaussian direction with a
    radius drawn uniformly in [0, eps] for L2 (the convention of torchattacks' PGDL2)."""
    _check_norm_eps(norm, eps)
    if norm == "Linf":
        delta = torch.empty(shape, device=device).uniform_(-eps, eps, generator=generator)
        return delta
    delta = torch.empty(shape, device=device).normal_(generator=generator)
    radius = torch.empty(shape[0], device=device).uniform_(0, 1, generator=generator) * eps
    norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return delta * (radius / norms).view(-1, *([1] * (len(shape) - 1)))


def sample_seed(seed: int, restart: int, index: int) -> int:
    """A 63-bit seed for one sample's random start, mixed from (seed, restart, global index) so
    that a sample's noise never depends on which batch it landed in."""
    state = np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFF, int(restart), int(index)]
    ).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def per_sample_delta(
    sample_shape: torch.Size | tuple[int, ...],
    indices: Iterable[int],
    eps: float,
    norm: str,
    *,
    seed: int,
    restart: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random starts for the samples with these global indices, each drawn from its own generator
    seeded by `sample_seed(seed, restart, index)`: results do not depend on the batch size."""
    _check_norm_eps(norm, eps)
    device = torch.device(device)
    indices = [int(i) for i in indices]
    out = torch.empty((len(indices), *sample_shape), device=device)
    radius = torch.empty(len(indices), device=device)
    gen = torch.Generator(device=device)
    for k, idx in enumerate(indices):
        gen.manual_seed(sample_seed(seed, restart, idx))
        if norm == "Linf":
            out[k].uniform_(-eps, eps, generator=gen)
        else:
            out[k].normal_(generator=gen)
            radius[k : k + 1].uniform_(0, 1, generator=gen)
    if norm == "L2" and indices:
        norms = out.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        out *= (radius * eps / norms).view(-1, *([1] * len(sample_shape)))
    return out


def input_gradient(
    model: nn.Module | Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    eot_iter: int = 1,
) -> torch.Tensor:
    """Gradient of the summed cross-entropy w.r.t. the input images (fp32 loss, optional autocast
    for the forward). With eot_iter > 1 the gradients of that many forwards are summed (EoT)."""
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        total = None
        for _ in range(eot_iter):
            with _autocast(x.device, amp_dtype):
                logits = model(x)
            # Summed, not averaged: a mean would shrink each sample's gradient by 1/B and can
            # underflow in low precision; the sign and the L2 direction are unchanged.
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            total = grad if total is None else total + grad
    return total


def pgd(
    model: nn.Module | Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "Linf",
    random_start: bool = True,
    targeted: bool = False,
    target_labels: torch.Tensor | None = None,
    step_schedule: str = "constant",
    amp_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    init_delta: torch.Tensor | None = None,
    eot_iter: int = 1,
    check_inputs: bool = True,
) -> torch.Tensor:
    """PGD adversarial images for `model(images in [0,1]) -> logits`.

    Untargeted: ascend the cross-entropy of `labels`; targeted: descend the cross-entropy of
    `target_labels`. L-inf steps are `alpha * sign(grad)`, L2 steps `alpha * grad / ||grad||_2`;
    after each step the perturbation is projected onto the eps-ball and the image clamped to
    [0,1]. `init_delta` (e.g. from `per_sample_delta`) replaces the random start when given;
    otherwise the start is drawn with `generator`. `eot_iter` > 1 averages gradients over that
    many forwards (Expectation over Transformation) for stochastic models. `check_inputs=False`
    skips the [0,1] range check, the one host sync of a call. The model's train/eval mode is
    left as it is. Returns detached adversarial images of the input dtype.
    """
    _check_norm_eps(norm, eps)
    _check_batch(images, labels, check_range=check_inputs)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: {steps!r} must be an int >= 0")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha: {alpha!r} must be a finite number >= 0")
    if not isinstance(eot_iter, int) or eot_iter < 1:
        raise ValueError(f"eot_iter: {eot_iter!r} must be an int >= 1")
    if targeted:
        if target_labels is None:
            raise ValueError("target_labels: required when targeted=True")
        _check_batch(images, target_labels, check_range=False)
        objective = target_labels.to(images.device)
    else:
        objective = labels.to(images.device)
    sizes = step_sizes(float(alpha), steps, step_schedule)

    x0 = images.detach()
    if x0.is_inference():
        x0 = x0.clone()
    if init_delta is not None:
        if init_delta.shape != x0.shape:
            raise ValueError(
                f"init_delta: shape {tuple(init_delta.shape)} does not match images {tuple(x0.shape)}"
            )
        delta = _project(init_delta.to(device=x0.device, dtype=x0.dtype), eps, norm)
    elif random_start and eps > 0:
        delta = random_delta(x0.shape, eps, norm, device=x0.device, generator=generator).to(
            x0.dtype
        )
    else:
        delta = torch.zeros_like(x0)
    adv = (x0 + delta).clamp_(0.0, 1.0)

    direction = -1.0 if targeted else 1.0
    for size in sizes:
        grad = input_gradient(model, adv, objective, amp_dtype=amp_dtype, eot_iter=eot_iter)
        with torch.no_grad():
            if norm == "Linf":
                step = grad.sign()
            else:
                gnorm = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
                step = grad / gnorm.view(-1, *([1] * (grad.ndim - 1)))
            adv = adv + (direction * size) * step.to(adv.dtype)
            adv = (x0 + _project(adv - x0, eps, norm)).clamp_(0.0, 1.0)
    return adv.detach()


@dataclass
class RobustResult:
    """Per-sample outcome of one attack at one eps: which samples were classified correctly on
    the clean image, and which stayed correct under the attack (worst case over its restarts or
    sub-attacks). `indices` are the samples' global positions in the evaluated set."""

    attack: str
    norm: str
    eps: float
    clean_correct: torch.Tensor
    robust_correct: torch.Tensor
    indices: torch.Tensor | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.clean_correct = torch.as_tensor(self.clean_correct, dtype=torch.bool).cpu().reshape(-1)
        self.robust_correct = (
            torch.as_tensor(self.robust_correct, dtype=torch.bool).cpu().reshape(-1)
        )
        if self.clean_correct.shape != self.robust_correct.shape:
            raise ValueError(
                f"robust_correct: {self.robust_correct.numel()} flags for "
                f"{self.clean_correct.numel()} clean flags"
            )
        if self.indices is None:
            self.indices = torch.arange(self.clean_correct.numel())
        self.indices = torch.as_tensor(self.indices, dtype=torch.int64).cpu().reshape(-1)
        if self.indices.shape != self.clean_correct.shape:
            raise ValueError(
                f"indices: {self.indices.numel()} entries for {self.clean_correct.numel()} samples"
            )

    @property
    def n(self) -> int:
        return int(self.clean_correct.numel())

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean()) if self.n else float("nan")

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust_correct.float().mean()) if self.n else float("nan")

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per sample: index, clean_correct, robust_correct (for a saved table)."""
        return [
            {"index": int(i), "clean_correct": bool(c), "robust_correct": bool(r)}
            for i, c, r in zip(
                self.indices.tolist(),
                self.clean_correct.tolist(),
                self.robust_correct.tolist(),
                strict=True,
            )
        ]

    def summary(self) -> dict[str, Any]:
        """The scalar part: attack, norm, eps, n, clean and robust accuracy, attack params."""
        return {
            "attack": self.attack,
            "norm": self.norm,
            "eps": float(self.eps),
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "params": dict(self.params),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary plus per-sample flags (lists aligned with `indices`)."""
        d = self.summary()
        d["indices"] = self.indices.tolist()
        d["clean_correct"] = self.clean_correct.tolist()
        d["robust_correct"] = self.robust_correct.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RobustResult:
        """Inverse of `to_dict`."""
        return cls(
            attack=d["attack"],
            norm=d["norm"],
            eps=float(d["eps"]),
            clean_correct=torch.tensor(d["clean_correct"], dtype=torch.bool),
            robust_correct=torch.tensor(d["robust_correct"], dtype=torch.bool),
            indices=torch.tensor(d["indices"], dtype=torch.int64),
            params=dict(d.get("params", {})),
        )


def model_device(model: nn.Module | Any) -> torch.device | None:
    """The device of the model's first parameter or buffer, or None if it has neither."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return None


def resolve_attack_device(
    model: nn.Module | Any, device: str | torch.device | None
) -> torch.device:
    """`device` if given (checked against the model's), else the model's own device, else CPU."""
    own = model_device(model)
    if device is None:
        return own if own is not None else torch.device("cpu")
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if own is not None and own.type != dev.type:
        raise ValueError(f"device: {dev} was requested but the model's parameters are on {own}")
    return dev


def _batches(data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"data: {images.shape[0]} images but {labels.shape[0]} labels")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
        return
    for k, batch in enumerate(data):
        if isinstance(batch, dict):
            batch = (batch["images"], batch["labels"])
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            raise ValueError(
                f"data: batch {k} is a {type(batch).__name__}; expected (images, labels, ...)"
            )
        yield batch[0], batch[1]


def _data_len(data: Any) -> int | None:
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return None
    try:
        return len(data)
    except TypeError:
        return None


def robust_accuracy(
    model: nn.Module | Any,
    data: Any,
    *,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    norm: str = "Linf",
    restarts: int = 1,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
    check: bool = True,
    batch_size: int = 256,
    random_start: bool = True,
    step_schedule: str = "constant",
    eot_iter: int = 1,
    attack_name: str | None = None,
) -> RobustResult:
    """Clean and PGD robust accuracy with per-sample flags.

    `data` is `(images, labels)` tensors or an iterable of `(images, labels, ...)` batches (a
    DataLoader; the running position is the sample's global index, so keep it unshuffled).
    Only clean-correct samples are attacked, gathered into full batches of `batch_size`; after
    each restart the samples already broken are dropped, so cost falls with accuracy. A sample
    counts as robust only if it survives every restart. Each sample's random start comes from
    its own generator seeded by (seed, restart, global index), so the flags do not depend on the
    batch size or the loader's batching. The model runs in eval mode (restored afterwards).

    With `check=True` the first batch is screened for a stochastic model (StochasticModelError,
    unless eot_iter > 1) and for masked input gradients (GradientMaskingError), and the result
    for robust accuracy above clean accuracy (RobustAboveCleanError).
    """
    _check_norm_eps(norm, eps)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: {steps!r} must be an int >= 0")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts: {restarts!r} must be an int >= 1")
    if restarts > 1 and not random_start:
        raise ValueError(
            f"restarts: {restarts} restarts without random_start repeat the same attack; "
            "set random_start=True or restarts=1"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} must be an int >= 1")
    alpha = default_alpha(eps, steps) if alpha is None else alpha
    step_sizes(float(alpha), steps, step_schedule)  # validates the schedule name early
    dev = resolve_attack_device(model, device)

    clean_chunks: list[torch.Tensor] = []
    robust = {}  # global index -> robust flag, for attacked samples
    pending_x: list[torch.Tensor] = []
    pending_y: list[torch.Tensor] = []
    pending_i: list[torch.Tensor] = []
    n_pending = 0
    n_seen = 0
    screened = not check

    def attack_chunk(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        alive = torch.ones(x.shape[0], dtype=torch.bool, device=dev)
        for r in range(restarts):
            sel = alive.nonzero().squeeze(1)
            if sel.numel() == 0:
                break
            xs, ys = x[sel], y[sel]
            ids = idx[sel.cpu()]
            init = None
            if random_start and eps > 0:
                init = per_sample_delta(
                    xs.shape[1:], ids.tolist(), eps, norm, seed=seed, restart=r, device=dev
                )
            adv = pgd(
                model, xs, ys, eps=eps, alpha=alpha, steps=steps, norm=norm,
                random_start=False, init_delta=init, step_schedule=step_schedule,
                amp_dtype=amp_dtype, eot_iter=eot_iter,
            )  # fmt: skip
            with torch.no_grad(), _autocast(dev, amp_dtype):
                still = model(adv).argmax(dim=1) == ys
            alive[sel] = still
        for i, flag in zip(idx.tolist(), alive.cpu().tolist(), strict=True):
            robust[i] = flag

    def flush(final: bool) -> None:
        nonlocal pending_x, pending_y, pending_i, n_pending
        if n_pending == 0:
            return
        x, y, idx = torch.cat(pending_x), torch.cat(pending_y), torch.cat(pending_i)
        start = 0
        while x.shape[0] - start >= batch_size or (final and start < x.shape[0]):
            stop = start + batch_size
            attack_chunk(x[start:stop], y[start:stop], idx[start:stop])
            start = min(stop, x.shape[0])
        pending_x, pending_y, pending_i = [x[start:]], [y[start:]], [idx[start:]]
        n_pending = x.shape[0] - start

    with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
        batches = _batches(data, batch_size)
        for xb, yb in progress(
            batches, desc=attack_name or f"PGD-{steps} {norm}", total=_data_len(data)
        ):
            xb = xb.to(dev, non_blocking=True)
            yb = yb.to(dev, non_blocking=True).long()
            _check_batch(xb, yb)
            with torch.no_grad(), _autocast(dev, amp_dtype):
                logits = model(xb)
            if logits.ndim != 2 or logits.shape[0] != xb.shape[0]:
                raise ValueError(
                    f"model: expected logits of shape ({xb.shape[0]}, n_classes), "
                    f"got {tuple(logits.shape)}"
                )
            correct = logits.argmax(dim=1) == yb
            idx = torch.arange(n_seen, n_seen + xb.shape[0])
            n_seen += xb.shape[0]
            clean_chunks.append(correct.cpu())
            keep = correct.nonzero().squeeze(1)
            if not screened and keep.numel() > 0:
                if eot_iter == 1:
                    checks.check_deterministic(model, xb[:32], amp_dtype=amp_dtype)
                if eps > 0 and steps > 0:
                    sub = keep[:32]
                    checks.check_gradients(model, xb[sub], yb[sub], amp_dtype=amp_dtype)
                screened = True
            if eps == 0 or (steps == 0 and not random_start):
                # Nothing can move the input: the clean prediction is the robust one.
                for i in idx[correct.cpu()].tolist():
                    robust[i] = True
                continue
            pending_x.append(xb[keep])
            pending_y.append(yb[keep])
            pending_i.append(idx[keep.cpu()])
            n_pending += keep.numel()
            if n_pending >= batch_size:
                flush(final=False)
        flush(final=True)

    if n_seen == 0:
        raise ValueError("data: no samples to evaluate")
    clean = torch.cat(clean_chunks)
    robust_flags = torch.zeros(n_seen, dtype=torch.bool)
    for i, flag in robust.items():
        robust_flags[i] = flag
    name = attack_name or f"pgd{steps}"
    result = RobustResult(
        attack=name,
        norm=norm,
        eps=float(eps),
        clean_correct=clean,
        robust_correct=robust_flags,
        params={
            "steps": steps,
            "alpha": float(alpha),
            "restarts": restarts,
            "random_start": random_start,
            "step_schedule": step_schedule,
            "seed": seed,
            "eot_iter": eot_iter,
            "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        },
    )
    if check:
        checks.check_robust_not_above_clean(result)
    return result
