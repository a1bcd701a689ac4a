"""Run a test-time adapter over a corruption stream: error per domain in stream order.

``run_stream(adapter, stream)`` feeds the stream's batches to ``adapter(images)`` one at a time
(images only: the adapter never sees a corruption name, severity or label), calls
``adapter.reset()`` on every batch the stream's reset policy marks, and counts errors per
(run, segment, corruption, severity) as ``stream_eval`` does. With ``attack=StreamAttack(...)``
the batches of the chosen segments are first replaced by PGD adversarial images against the
adapter's CURRENT state (``adapter.predict``, before that batch's adaptation step), and the
clean error of the segments after an attacked one says whether the attacker poisoned the
adapted state. A plain function: no tracking, no orchestration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vpt_robust.attacks.pgd import default_alpha, pgd
from vpt_robust.corruptions.streams import CorruptionStream, StreamBatch
from vpt_robust.methods.tta.base import Adapter


@dataclass(frozen=True)
class StreamAttack:
    """PGD on incoming batches: eps / alpha in [0,1] pixel units (alpha None: 2.5 eps / steps),
    ``segments``: the attacked segment indices (None: every segment); a seeded random start per
    batch from ``seed``."""

    eps: float
    steps: int = 10
    alpha: float | None = None
    norm: str = "Linf"
    seed: int = 0
    segments: Sequence[int] | None = None

    def attacks(self, segment: int) -> bool:
        return self.segments is None or segment in set(self.segments)


@dataclass
class StreamResult:
    """Per-domain rows in stream order, their mean, the late error (last third of each run's
    samples, averaged over runs), the error of each batch, and the cost.

    ``cost``: model passes per test image (``forward``, ``backward``) and ``relative`` =
    (forward + 2 backward) per image, a plain forward being 1.0 (deterministic);
    ``seconds_per_batch`` is wall time (not a function of the inputs: keep it out of dvc outs).
    With an attack: ``attacked_error`` (mean error of the attacked rows) and
    ``after_attack_error`` (mean clean error of the rows after an attacked segment in the same
    run; None if there are none).
    """

    rows: list[dict[str, Any]]
    mean_error: float
    late_error: float
    batch_errors: list[float]
    cost: dict[str, float]
    seconds_per_batch: float
    attacked_error: float | None = None
    after_attack_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _late(flags_by_run: dict[int, list[bool]]) -> float:
    lates = []
    for flags in flags_by_run.values():
        start = math.floor(len(flags) * 2 / 3)
        tail = flags[start:] or flags
        lates.append(sum(tail) / len(tail))
    return sum(lates) / len(lates)


def _attack_batch(
    adapter: Adapter, batch: StreamBatch, attack: StreamAttack, k: int
) -> torch.Tensor:
    images = batch.images.to(adapter.device)
    labels = batch.labels.to(adapter.device)
    gen = torch.Generator(device=images.device)
    gen.manual_seed(attack.seed * 1_000_003 + k)
    forward = adapter.counts["forward"]
    alpha = default_alpha(attack.eps, attack.steps) if attack.alpha is None else attack.alpha
    adv = pgd(
        adapter.predict,
        images,
        labels,
        eps=attack.eps,
        alpha=alpha,
        steps=attack.steps,
        norm=attack.norm,
        generator=gen,
    )
    adapter.counts["forward"] = forward  # the attacker's passes are not the method's cost
    return adv


def run_stream(
    adapter: Adapter,
    stream: CorruptionStream,
    *,
    attack: StreamAttack | None = None,
    on_batch: Callable[[int, StreamBatch, torch.Tensor], None] | None = None,
) -> StreamResult:
    """Adapt and predict the whole stream once, in order; see the module doc."""
    counts: dict[tuple, list[int]] = {}
    attacked: set[tuple] = set()
    flags_by_run: dict[int, list[bool]] = {}
    batch_errors: list[float] = []
    start = dict(adapter.counts)
    seconds = 0.0
    for k, batch in enumerate(stream):
        if batch.reset:
            adapter.reset()
        images = batch.images
        hit = attack is not None and attack.attacks(batch.segment)
        if hit:
            assert attack is not None
            images = _attack_batch(adapter, batch, attack, k)
        t0 = time.perf_counter()
        logits = adapter(images)
        wrong = (logits.argmax(-1) != batch.labels.to(logits.device)).cpu().tolist()
        seconds += time.perf_counter() - t0
        if on_batch is not None:
            on_batch(k, batch, logits)
        names = batch.corruptions or (batch.corruption,) * len(wrong)
        for name, w in zip(names, wrong, strict=True):
            key = (batch.run, batch.segment, name, batch.severity)
            c = counts.setdefault(key, [0, 0])
            c[0] += int(w)
            c[1] += 1
            if hit:
                attacked.add(key)
        flags_by_run.setdefault(batch.run, []).extend(bool(w) for w in wrong)
        batch_errors.append(sum(wrong) / len(wrong))
    if not counts:
        raise ValueError("stream: no batches")
    rows = []
    first_attacked: dict[int, int] = {}
    for key in counts:
        if key in attacked:
            first_attacked.setdefault(key[0], key[1])
    for key, (w, n) in counts.items():
        run, segment, corruption, severity = key
        after = key not in attacked and run in first_attacked and segment > first_attacked[run]
        rows.append(
            {
                "run": run,
                "segment": segment,
                "corruption": corruption,
                "severity": severity,
                "error": w / n,
                "n": n,
                "attacked": key in attacked,
                "after_attack": after,
            }
        )
    n_img = adapter.counts["images"] - start["images"]
    fwd = (adapter.counts["forward"] - start["forward"]) / n_img
    bwd = (adapter.counts["backward"] - start["backward"]) / n_img
    return StreamResult(
        rows=rows,
        mean_error=sum(r["error"] for r in rows) / len(rows),
        late_error=_late(flags_by_run),
        batch_errors=batch_errors,
        cost={"forward": fwd, "backward": bwd, "relative": fwd + 2 * bwd},
        seconds_per_batch=seconds / len(batch_errors),
        attacked_error=_mean([r["error"] for r in rows if r["attacked"]]) if attack else None,
        after_attack_error=_mean([r["error"] for r in rows if r["after_attack"]])
        if attack
        else None,
    )
