"""Projected gradient descent (Madry et al.) in L-inf and L2, and robust accuracy built on it.

Every attack here sees a model as `model(images in [0,1]) -> logits`; normalisation lives inside
the model, so the eps-ball and the [0,1] box are both in pixel space. The step loop of `pgd`
issues no host synchronisation (no `.item()`, no boolean indexing), so on CUDA it queues work as
fast as the device takes it. `robust_accuracy`'s early-exit loop syncs once per step (to drop
the samples already fooled and refill their slots): it trades that for doing no work on them.
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


def grad_and_logits(
    model: nn.Module | Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    eot_iter: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient of the summed cross-entropy and the fp32 logits of the same forward(s)
    (averaged over the `eot_iter` forwards): one fwd+bwd tells both where to step and whether
    the current iterate already fools the model."""
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        total = None
        logit_sum = None
        for _ in range(eot_iter):
            with _autocast(x.device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            # Summed, not averaged: a mean would shrink each sample's gradient by 1/B and can
            # underflow in low precision; the sign and the L2 direction are unchanged.
            loss = F.cross_entropy(logits, labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            total = grad if total is None else total + grad
            logit_sum = logits.detach() if logit_sum is None else logit_sum + logits.detach()
    return total, logit_sum / eot_iter


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
    return grad_and_logits(model, images, labels, amp_dtype=amp_dtype, eot_iter=eot_iter)[0]


def pgd_step(
    adv: torch.Tensor,
    x0: torch.Tensor,
    grad: torch.Tensor,
    size: float | torch.Tensor,
    *,
    eps: float,
    norm: str,
    direction: float = 1.0,
) -> torch.Tensor:
    """One PGD update: `size` (a float, or one per sample shaped (B, 1, ..)) times the sign
    (L-inf) or the unit L2 direction of `grad`, then back into the eps-ball and the [0,1] box."""
    with torch.no_grad():
        if norm == "Linf":
            step = grad.sign()
        else:
            gnorm = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            step = grad / gnorm.view(-1, *([1] * (grad.ndim - 1)))
        adv = adv + (direction * size) * step.to(adv.dtype)
        return (x0 + _project(adv - x0, eps, norm)).clamp_(0.0, 1.0)


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
        adv = pgd_step(adv, x0, grad, size, eps=eps, norm=norm, direction=direction)
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
    # Optional (n, C, H, W) images: the fooling iterate of each broken sample, the last iterate
    # of each robust one, the clean image of each clean mistake. Not part of the saved dict.
    adversarial: torch.Tensor | None = field(default=None, repr=False, compare=False)

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


@dataclass
class _AttackSpec:
    """The validated settings of one `robust_accuracy` call, shared by its helpers."""

    eps: float
    alpha: float
    steps: int
    norm: str
    restarts: int
    random_start: bool
    step_schedule: str
    amp_dtype: torch.dtype | None
    eot_iter: int
    seed: int
    batch_size: int

    def delta(self, x0: torch.Tensor, idx: torch.Tensor, restart: int) -> torch.Tensor:
        """The random start of `restart` for samples `idx`, each from its own seeded generator
        (zeros without random start)."""
        if not (self.random_start and self.eps > 0):
            return torch.zeros_like(x0)
        delta = per_sample_delta(
            x0.shape[1:], idx.tolist(), self.eps, self.norm,
            seed=self.seed, restart=restart, device=x0.device,
        )  # fmt: skip
        return delta.to(x0.dtype)

    def start(self, x0: torch.Tensor, idx: torch.Tensor, restart: int) -> torch.Tensor:
        """The first iterate, computed exactly as `pgd` computes it from `init_delta`."""
        delta = _project(self.delta(x0, idx, restart), self.eps, self.norm)
        return (x0 + delta).clamp_(0.0, 1.0)


def _check_robust_args(
    eps: float,
    steps: int,
    norm: str,
    restarts: int,
    random_start: bool,
    batch_size: int,
    alpha: float | None,
    step_schedule: str,
) -> float:
    """Validate `robust_accuracy`'s settings; return alpha (the default when None)."""
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
    return float(alpha)


class _Outcome:
    """Per-sample robust flags (and, if asked, adversarial images) by global index."""

    def __init__(self, keep_adv: bool) -> None:
        self.robust: dict[int, bool] = {}
        self.adv: dict[int, torch.Tensor] | None = {} if keep_adv else None

    def record(self, idx: torch.Tensor, flags: torch.Tensor, adv: torch.Tensor) -> None:
        for i, flag in zip(idx.tolist(), flags.cpu().tolist(), strict=True):
            self.robust[i] = bool(flag)
        if self.adv is not None:
            for i, image in zip(idx.tolist(), adv.detach().cpu(), strict=True):
                self.adv[i] = image


class _Queue:
    """Clean-correct samples waiting to be attacked, in arrival order."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n = 0

    def push(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        if x.shape[0]:
            self.parts.append((x, y, idx))
            self.n += x.shape[0]

    def take(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first `k` waiting samples (fewer if fewer wait), removed from the queue."""
        x, y, idx = (torch.cat(t) for t in zip(*self.parts, strict=True))
        self.parts = [(x[k:], y[k:], idx[k:])] if x.shape[0] > k else []
        self.n = max(x.shape[0] - k, 0)
        return x[:k], y[:k], idx[:k]


class _FullAttack:
    """The reference: every step of every restart on every sample still robust at the restart's
    start; a sample is broken if the LAST iterate of some restart fools the model."""

    def __init__(self, model: Any, spec: _AttackSpec, outcome: _Outcome) -> None:
        self.model, self.spec, self.outcome, self.queue = model, spec, outcome, _Queue()

    def feed(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        self.queue.push(x, y, idx)
        while self.queue.n >= self.spec.batch_size:
            self._chunk(*self.queue.take(self.spec.batch_size))

    def finish(self) -> None:
        while self.queue.n:
            self._chunk(*self.queue.take(self.spec.batch_size))

    def _chunk(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        s = self.spec
        alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        adv_all = x.clone()
        for r in range(s.restarts):
            sel = alive.nonzero().squeeze(1)
            if sel.numel() == 0:
                break
            xs, ys = x[sel], y[sel]
            init = s.delta(xs, idx[sel.cpu()], r)
            adv = pgd(
                self.model, xs, ys, eps=s.eps, alpha=s.alpha, steps=s.steps, norm=s.norm,
                random_start=False, init_delta=init, step_schedule=s.step_schedule,
                amp_dtype=s.amp_dtype, eot_iter=s.eot_iter, check_inputs=False,
            )  # fmt: skip
            with torch.no_grad(), _autocast(x.device, s.amp_dtype):
                alive[sel] = self.model(adv).argmax(dim=1) == ys
            adv_all[sel] = adv
        self.outcome.record(idx, alive, adv_all)


class _EarlyExitAttack:
    """PGD where a sample leaves the batch at the first iterate that fools the model (broken,
    that iterate kept) or after its last restart's last iterate (robust). Freed slots are
    refilled from the queue, so the batch stays full while samples wait. Each slot carries its
    own step and restart counters; trajectories are per sample, so flags equal the any-iterate
    outcome of the full attack whatever the batching."""

    def __init__(self, model: Any, spec: _AttackSpec, outcome: _Outcome) -> None:
        self.model, self.spec, self.outcome, self.queue = model, spec, outcome, _Queue()
        self.slots: dict[str, torch.Tensor] | None = None
        self.sizes: torch.Tensor | None = None
        self.fwd_bwd_images = 0  # images pushed through fwd+bwd: the cost actually paid

    @property
    def n_active(self) -> int:
        return 0 if self.slots is None else int(self.slots["y"].shape[0])

    def feed(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        self.queue.push(x, y, idx)
        while self.n_active + self.queue.n >= self.spec.batch_size:
            self._step()

    def finish(self) -> None:
        while self.n_active + self.queue.n:
            self._step()

    def _refill(self) -> None:
        k = self.spec.batch_size - self.n_active
        if k <= 0 or self.queue.n == 0:
            return
        x0, y, idx = self.queue.take(k)
        zeros = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
        new = {"x0": x0, "y": y, "idx": idx.to(y.device), "t": zeros, "r": zeros.clone()}
        new["adv"] = self.spec.start(x0, idx, 0)
        if self.slots is None:
            self.slots = new
        else:
            self.slots = {k_: torch.cat([self.slots[k_], v]) for k_, v in new.items()}

    def _step(self) -> None:
        self._refill()
        s, a = self.spec, self.slots
        if self.sizes is None:
            sizes = step_sizes(s.alpha, s.steps, s.step_schedule) or [0.0]
            self.sizes = torch.tensor(sizes, dtype=a["adv"].dtype, device=a["adv"].device)
        grad, logits = grad_and_logits(
            self.model, a["adv"], a["y"], amp_dtype=s.amp_dtype, eot_iter=s.eot_iter
        )
        self.fwd_bwd_images += a["y"].shape[0]
        fooled = logits.argmax(dim=1) != a["y"]
        survived = ~fooled & (a["t"] == s.steps)  # this restart's last iterate held
        robust = survived & (a["r"] == s.restarts - 1)
        leave = fooled | robust
        if bool(leave.any()):
            out = leave.nonzero().squeeze(1)
            self.outcome.record(a["idx"][out].cpu(), robust[out], a["adv"][out])
        t_now = a["t"].clamp(max=max(s.steps - 1, 0))
        size = self.sizes[t_now].view(-1, *([1] * (grad.ndim - 1)))
        moved = pgd_step(a["adv"], a["x0"], grad, size, eps=s.eps, norm=s.norm)
        stay = (~leave).nonzero().squeeze(1)
        a = {k: v[stay] for k, v in a.items()}
        moved, again = moved[stay], survived[stay]
        a["adv"] = torch.where(again.view(-1, *([1] * (moved.ndim - 1))), a["adv"], moved)
        a["t"] = torch.where(again, torch.zeros_like(a["t"]), a["t"] + 1)
        a["r"] = a["r"] + again.long()
        if bool(again.any()):  # the next restart starts from its own seeded random start
            sel = again.nonzero().squeeze(1)
            for r in a["r"][sel].unique().tolist():
                rows = sel[a["r"][sel] == r]
                a["adv"][rows] = s.start(a["x0"][rows], a["idx"][rows].cpu(), int(r))
        self.slots = a if a["y"].shape[0] else None


def _clean_pass(
    model: Any,
    data: Any,
    spec: _AttackSpec,
    dev: torch.device,
    attacker: _FullAttack | _EarlyExitAttack,
    *,
    check: bool,
    desc: str,
    keep_clean: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stream the data: clean flags of every sample, clean-correct ones fed to the attacker
    (screened by the loud checks on the first batch). Returns the clean flags and, with
    `keep_clean`, the clean images (CPU) for the adversarial set."""
    clean_chunks: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    n_seen, screened = 0, not check
    for xb, yb in progress(_batches(data, spec.batch_size), desc=desc, total=_data_len(data)):
        xb = xb.to(dev, non_blocking=True)
        yb = yb.to(dev, non_blocking=True).long()
        _check_batch(xb, yb)
        with torch.no_grad(), _autocast(dev, spec.amp_dtype):
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
        if keep_clean:
            images.append(xb.detach().cpu())
        keep = correct.nonzero().squeeze(1)
        if not screened and keep.numel() > 0:
            _screen(model, xb, yb, keep, spec)
            screened = True
        if spec.eps == 0 or (spec.steps == 0 and not spec.random_start):
            # Nothing can move the input: the clean prediction is the robust one.
            attacker.outcome.record(idx[keep.cpu()], torch.ones(keep.numel()), xb[keep])
            continue
        attacker.feed(xb[keep], yb[keep], idx[keep.cpu()])
    attacker.finish()
    if n_seen == 0:
        raise ValueError("data: no samples to evaluate")
    return torch.cat(clean_chunks), images


def _screen(
    model: Any, xb: torch.Tensor, yb: torch.Tensor, keep: torch.Tensor, spec: _AttackSpec
) -> None:
    """The loud checks on the first batch: a stochastic model, masked input gradients."""
    if spec.eot_iter == 1:
        checks.check_deterministic(model, xb[:32], amp_dtype=spec.amp_dtype)
    if spec.eps > 0 and spec.steps > 0:
        sub = keep[:32]
        checks.check_gradients(model, xb[sub], yb[sub], amp_dtype=spec.amp_dtype)


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
    early_exit: bool = True,
    return_adversarial: bool = False,
) -> RobustResult:
    """Clean and PGD robust accuracy with per-sample flags.

    `data` is `(images, labels)` tensors or an iterable of `(images, labels, ...)` batches (a
    DataLoader; the running position is the sample's global index, so keep it unshuffled).
    Only clean-correct samples are attacked, gathered into batches of `batch_size`.

    With `early_exit` (default) a sample counts as broken if ANY iterate of any restart fools
    the model (as AutoAttack counts), and it leaves the batch at that iterate, its place taken
    by the next waiting sample: cost falls with robust accuracy at every step, and the flags are
    never above the full attack's. `early_exit=False` is the full reference: every step on
    every sample alive at the restart's start, judged on the last iterate of each restart. Each
    sample's random start comes from its own generator seeded by (seed, restart, global index),
    so the flags do not depend on the batch size, the loader's batching or the refill order.
    `return_adversarial` fills `result.adversarial` (the fooling iterate of broken samples).
    The model runs in eval mode (restored afterwards).

    With `check=True` the first batch is screened for a stochastic model (StochasticModelError,
    unless eot_iter > 1) and for masked input gradients (GradientMaskingError), and the result
    for robust accuracy above clean accuracy (RobustAboveCleanError).
    """
    alpha = _check_robust_args(
        eps, steps, norm, restarts, random_start, batch_size, alpha, step_schedule
    )
    spec = _AttackSpec(
        float(eps), alpha, steps, norm, restarts, random_start, step_schedule,
        amp_dtype, eot_iter, seed, batch_size,
    )  # fmt: skip
    dev = resolve_attack_device(model, device)
    outcome = _Outcome(return_adversarial)
    runner = _EarlyExitAttack if early_exit else _FullAttack
    attacker = runner(model, spec, outcome)
    with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
        clean, images = _clean_pass(
            model, data, spec, dev, attacker, check=check,
            desc=attack_name or f"PGD-{steps} {norm}", keep_clean=return_adversarial,
        )  # fmt: skip
    result = _result(spec, clean, outcome, images, attack_name, early_exit)
    if check:
        checks.check_robust_not_above_clean(result)
    return result


def _result(
    spec: _AttackSpec,
    clean: torch.Tensor,
    outcome: _Outcome,
    images: list[torch.Tensor],
    attack_name: str | None,
    early_exit: bool,
) -> RobustResult:
    """The RobustResult of a finished run (flags by global index; adversarial set if kept)."""
    n = clean.numel()
    robust_flags = torch.zeros(n, dtype=torch.bool)
    for i, flag in outcome.robust.items():
        robust_flags[i] = flag
    adversarial = None
    if outcome.adv is not None:
        adversarial = torch.cat(images)
        for i, image in outcome.adv.items():
            adversarial[i] = image
    return RobustResult(
        attack=attack_name or f"pgd{spec.steps}",
        norm=spec.norm,
        eps=spec.eps,
        clean_correct=clean,
        robust_correct=robust_flags,
        params={
            "steps": spec.steps,
            "alpha": spec.alpha,
            "restarts": spec.restarts,
            "random_start": spec.random_start,
            "step_schedule": spec.step_schedule,
            "seed": spec.seed,
            "eot_iter": spec.eot_iter,
            "amp_dtype": str(spec.amp_dtype).replace("torch.", "") if spec.amp_dtype else None,
            "early_exit": early_exit,
        },
        adversarial=adversarial,
    )
