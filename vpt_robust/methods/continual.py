"""Continual learning of prompts over a task sequence (L2P's protocol), with robust accuracy.

Class-incremental by default (Wang et al., CVPR 2022; JH-LEE-KR/l2p-pytorch): one classifier
over every class of the sequence, trained task after task with no task id at test time and no
rehearsal buffer (an optional one, off by default, keeps ``buffer_per_class`` training images
per class seen). During training the logits of classes outside the current task (and the
buffer's classes) are masked to -inf, so the head rows of other classes receive exactly zero
gradient; the optimiser is built afresh for every task (``train_prompt`` builds one per call).
With ``weight_decay`` 0 (required, checked) a zero gradient leaves a parameter unchanged under
AdamW and SGD alike, so masked classes never train outside their task.

After each task ``t`` every task ``j <= t`` seen so far is evaluated, clean and under PGD
(``vpt_robust.attacks.robust_accuracy``): ``A[j, t]`` and ``R[j, t]``. Evaluation runs over the
classes seen so far (our choice: a class-incremental model knows the classes it was taught, and
untrained head rows of future classes must not take predictions; no task id is used), with
per-sample prompt selection (``prompts/pool.py``), so it does not depend on the batching.

Methods run in one sequence (``METHODS``): ``l2p`` (prompt pool + linear head on the prompt
tokens' mean), ``sequential`` (one VPT prompt with as many learned values as the pool's prompts
and keys, plus a linear head; no pool), ``joint`` (the L2P model trained once on all tasks
together: the upper bound, evaluated once), ``zero_shot`` (CLIP's head over the seen classes, no
training). Metrics are pure functions of the matrices (``average_accuracy``, ``forgetting``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpt_robust.config import HeadConfig, PromptConfig, TrainConfig
from vpt_robust.metrics import as_float_images

__all__ = [
    "METHODS",
    "ContinualObjective",
    "EvalSettings",
    "MethodSpec",
    "SeenClasses",
    "SequenceResult",
    "Task",
    "TaskSequence",
    "average_accuracy",
    "class_incremental",
    "domain_incremental",
    "forgetting",
    "mask_logits",
    "evaluate_cell",
    "prompt_usage",
    "matched_vpt_length",
    "pool_learned_values",
    "run_method",
]

METHODS = ("l2p", "sequential", "joint", "zero_shot")


# --------------------------------------------------------------------------- metrics


def _square(matrix: Any) -> torch.Tensor:
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix: expected a square (T, T) matrix, got {tuple(m.shape)}")
    return m


def average_accuracy(matrix: Any) -> float:
    """Mean of the last column ``A[j, T-1]`` over all tasks ``j`` (``A[task, after_task]``)."""
    m = _square(matrix)
    last = m[:, -1]
    if torch.isnan(last).any():
        raise ValueError("accuracy matrix: the last column must hold every task's accuracy")
    return float(last.mean())


def forgetting(matrix: Any) -> float:
    """Mean over tasks ``j < T-1`` of ``max_t A[j, t] - A[j, T-1]`` (METHODS.md; the max runs
    over every evaluation of task ``j`` that exists, the last one included, as in l2p-pytorch,
    so each term is >= 0). Entries never evaluated are NaN and ignored (``A[j, t]``, ``t < j``;
    a joint model's earlier columns). Needs at least two tasks."""
    m = _square(matrix)
    if m.shape[0] < 2:
        raise ValueError("forgetting needs at least two tasks")
    last = m[:-1, -1]
    if torch.isnan(last).any():
        raise ValueError("accuracy matrix: the last column must hold every task's accuracy")
    best = torch.where(torch.isnan(m[:-1]), torch.full_like(m[:-1], -math.inf), m[:-1]).amax(1)
    return float((best - last).mean())


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One task: its name, the classes it teaches, and index sets into the sequence's images."""

    name: str
    classes: tuple[int, ...]
    train: torch.Tensor
    test: torch.Tensor


@dataclass
class TaskSequence:
    """Images (uint8 N,3,H,W or float in [0,1]), labels over ``class_names`` and the tasks.

    ``kind="class"``: each task brings new classes (masked training, seen-class evaluation);
    ``kind="domain"``: every task has all classes in a new domain (no masking)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    tasks: list[Task]
    kind: str = "class"

    def __post_init__(self) -> None:
        if self.kind not in ("class", "domain"):
            raise ValueError(f"sequence kind: {self.kind!r} is not 'class' or 'domain'")
        if len(self.tasks) < 2:
            raise ValueError(f"a task sequence needs at least 2 tasks, got {len(self.tasks)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        for task in self.tasks:
            for part in ("train", "test"):
                idx = getattr(task, part)
                if len(idx) == 0:
                    raise ValueError(f"task {task.name!r}: empty {part} set")
                bad = set(self.labels[idx].unique().tolist()) - set(task.classes)
                if bad:
                    raise ValueError(f"task {task.name!r}: {part} labels {sorted(bad)} not in it")

    def seen_classes(self, upto: int) -> tuple[int, ...]:
        """Classes of tasks ``0..upto`` in task order (all classes for a domain sequence)."""
        if self.kind == "domain":
            return tuple(range(len(self.class_names)))
        seen: list[int] = []
        for task in self.tasks[: upto + 1]:
            seen.extend(c for c in task.classes if c not in seen)
        return tuple(seen)


def _per_class_draw(
    pool: torch.Tensor, labels: torch.Tensor, n_train: int, n_test: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    train, test = [], []
    for c in labels[pool].unique().tolist():
        idx = pool[labels[pool] == c]
        if len(idx) < n_train + n_test:
            raise ValueError(
                f"class {c}: {len(idx)} images, fewer than n_train {n_train} + n_test {n_test} "
                "(continual.n_train_per_class + n_test_per_class)"
            )
        idx = idx[torch.randperm(len(idx), generator=gen)]
        train.append(idx[:n_train])
        test.append(idx[n_train : n_train + n_test])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def class_incremental(
    labels: torch.Tensor,
    candidates: torch.Tensor,
    n_tasks: int,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
) -> list[Task]:
    """Split the classes of ``labels[candidates]`` into ``n_tasks`` equal tasks (in
    ``class_order``, default ascending), with ``n_train`` / ``n_test`` images per class drawn
    from ``candidates`` by a generator seeded with ``seed``."""
    classes = sorted(labels[candidates].unique().tolist())
    order = list(class_order) if class_order is not None else classes
    if sorted(order) != classes:
        raise ValueError(f"class_order: {order} is not a permutation of the classes {classes}")
    if n_tasks < 2 or len(order) % n_tasks:
        raise ValueError(f"tasks: {len(order)} classes do not split into {n_tasks} equal tasks")
    gen = torch.Generator().manual_seed(seed)
    train, test = _per_class_draw(candidates, labels, n_train, n_test, gen)
    per = len(order) // n_tasks
    tasks = []
    for t in range(n_tasks):
        cls = tuple(order[t * per : (t + 1) * per])
        keep = torch.tensor(cls)
        tasks.append(
            Task(
                f"task{t}",
                cls,
                train[torch.isin(labels[train], keep)],
                test[torch.isin(labels[test], keep)],
            )  # fmt: skip
        )
    return tasks


def domain_incremental(
    labels: torch.Tensor,
    domains: Mapping[str, torch.Tensor],
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
) -> list[Task]:
    """One task per domain (in the mapping's order; values are candidate indices), each over
    every class with ``n_train`` / ``n_test`` images per class."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for name, candidates in domains.items():
        train, test = _per_class_draw(candidates, labels, n_train, n_test, gen)
        tasks.append(Task(name, tuple(sorted(labels[candidates].unique().tolist())), train, test))
    return tasks


# --------------------------------------------------------------------------- training pieces


def mask_logits(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``logits`` with every column outside ``classes`` set to -inf (no gradient flows there)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True)
class ContinualObjective:
    """Cross-entropy on the logits masked to ``classes`` (None: all), plus ``aux_weight`` times
    every auxiliary loss the model reports after its forward (``model.auxiliary_losses()``; L2P's
    ``key_pull``), each also returned as an aux metric. A trainer objective
    (``methods/objectives.py``); the labels must lie in ``classes``."""

    classes: tuple[int, ...] | None = None
    aux_weight: float = 0.0

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(images)
        if self.classes is not None:
            logits = mask_logits(logits, self.classes)
        loss = F.cross_entropy(logits.float(), labels)
        aux: dict[str, torch.Tensor] = {}
        report = getattr(model, "auxiliary_losses", None)
        for name, value in (report() if callable(report) else {}).items():
            loss = loss + self.aux_weight * value.float()
            aux[name] = value.detach()
        return loss, logits, aux


class SeenClasses(nn.Module):
    """``model``'s logits restricted to ``classes`` (in that order): evaluation over the classes
    seen so far. ``labels(y)`` maps global class ids to positions in ``classes``."""

    def __init__(self, model: nn.Module, classes: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("ids", torch.as_tensor(list(classes), dtype=torch.long))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).index_select(1, self.ids)

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        lookup = torch.full((int(self.ids.max()) + 1,), -1, dtype=torch.long)
        lookup[self.ids.cpu()] = torch.arange(len(self.ids))
        out = lookup[y.cpu().long()]
        if (out < 0).any():
            raise ValueError("labels outside the seen classes")
        return out


def pool_learned_values(width: int, key_dim: int, size: int, length: int) -> int:
    """Learned values of an L2P pool: ``size`` prompts of ``length`` x ``width`` + ``size`` keys."""
    return size * length * width + size * key_dim


def matched_vpt_length(width: int, key_dim: int, size: int, length: int) -> int:
    """VPT tokens with at least as many learned values as the pool (prompts and keys)."""
    return -(-pool_learned_values(width, key_dim, size, length) // width)


# --------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class EvalSettings:
    """How each (task, after_task) cell is evaluated: batch size and the PGD attack."""

    batch_size: int = 256
    eps: float = 1 / 255
    steps: int = 5
    alpha: float | None = None
    norm: str = "Linf"
    seed: int = 0


@dataclass
class SequenceResult:
    """``acc[j, t]``, ``robust[j, t]`` (NaN where not evaluated), prompt usage per task
    (``usage[t][m]``: test images of task t that selected prompt m after training task t;
    L2P only) and per-task training summaries."""

    method: str
    acc: torch.Tensor
    robust: torch.Tensor
    usage: list[list[int]] = field(default_factory=list)
    train: list[dict[str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "average_accuracy": average_accuracy(self.acc),
            "forgetting": forgetting(self.acc),
            "robust_average_accuracy": average_accuracy(self.robust),
            "robust_forgetting": forgetting(self.robust),
        }


def evaluate_cell(
    model: nn.Module,
    seq: TaskSequence,
    task: int,
    classes: Sequence[int],
    settings: EvalSettings,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Clean and PGD robust accuracy of ``model`` on task ``task``'s test set over ``classes``."""
    from vpt_robust.attacks import robust_accuracy

    idx = seq.tasks[task].test
    view = SeenClasses(model, classes).to(device).eval()
    images = as_float_images(seq.images[idx])
    labels = view.labels(seq.labels[idx])
    res = robust_accuracy(
        view, (images, labels), eps=settings.eps, steps=settings.steps, alpha=settings.alpha,
        norm=settings.norm, device=device, amp_dtype=amp_dtype, seed=settings.seed,
        batch_size=settings.batch_size,
    )  # fmt: skip
    return float(res.clean_correct.float().mean()), float(res.robust_correct.float().mean())


def prompt_usage(model: nn.Module, images: torch.Tensor, batch_size: int) -> list[int]:
    """How many of ``images`` select each prompt of the model's pool (eval mode, per sample)."""
    pool = model.token_prompt
    counts = torch.zeros(pool.size, dtype=torch.long)
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            q = model.query(as_float_images(images[i : i + batch_size].to(device)))
            counts += torch.bincount(pool.select(q).reshape(-1).cpu(), minlength=pool.size)
    return counts.tolist()


@dataclass(frozen=True)
class MethodSpec:
    """What one method trains: its prompt family and head, and its objective's aux weight."""

    prompt: PromptConfig | None
    head: HeadConfig
    aux_weight: float = 0.0


def _train_on(
    model: nn.Module,
    seq: TaskSequence,
    idx: torch.Tensor,
    classes: tuple[int, ...] | None,
    spec: MethodSpec,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    amp_dtype: torch.dtype | None,
) -> dict[str, float]:
    from vpt_robust.methods.supervised import train_prompt

    objective = ContinualObjective(classes, spec.aux_weight)
    return train_prompt(
        model, seq.images[idx], seq.labels[idx], cfg=cfg, device=device, seed=seed,
        amp_dtype=amp_dtype, objective=objective,
    )  # fmt: skip


def _buffer(
    seq: TaskSequence, idx: torch.Tensor, per_class: int, gen: torch.Generator
) -> torch.Tensor:
    keep = []
    for c in seq.labels[idx].unique().tolist():
        own = idx[seq.labels[idx] == c]
        keep.append(own[torch.randperm(len(own), generator=gen)[:per_class]])
    return torch.cat(keep)


def run_method(
    method: str,
    seq: TaskSequence,
    build: Callable[[MethodSpec], nn.Module],
    spec: MethodSpec,
    cfg: TrainConfig,
    settings: EvalSettings,
    *,
    device: torch.device,
    seed: int,
    amp_dtype: torch.dtype | None = None,
    buffer_per_class: int = 0,
    on_task: Callable[[int, dict[str, float]], None] | None = None,
) -> SequenceResult:
    """Run ``method`` over ``seq`` and fill its accuracy and robust matrices.

    ``build(spec)`` returns a fresh classifier over all of ``seq.class_names``. ``cfg`` trains
    one task (its ``epochs`` are the epochs per task; ``joint`` trains ``cfg.epochs`` over all
    tasks' data at once). ``on_task(t, row)`` is called after each task with its metrics."""
    if method not in METHODS:
        raise ValueError(f"continual method: {method!r} is not one of {list(METHODS)}")
    if cfg.weight_decay:
        raise ValueError(
            "continual: train weight_decay must be 0 (it would move the head rows of masked "
            f"classes outside their task), got {cfg.weight_decay}"
        )
    n = len(seq.tasks)
    acc = torch.full((n, n), float("nan"), dtype=torch.float64)
    robust = acc.clone()
    result = SequenceResult(method, acc, robust)
    model = build(spec).to(device)
    gen = torch.Generator().manual_seed(seed)
    if method == "joint":
        everything = torch.cat([t.train for t in seq.tasks])
        result.train.append(
            _train_on(model, seq, everything, None, spec, cfg, device, seed, amp_dtype)
        )
    buffer = torch.empty(0, dtype=torch.long)
    for t, task in enumerate(seq.tasks):
        pool = getattr(model, "token_prompt", None)
        if method in ("l2p", "sequential"):
            if hasattr(pool, "set_task"):
                pool.set_task(t)
            idx = torch.cat([task.train, buffer]) if len(buffer) else task.train
            classes = None if seq.kind == "domain" else tuple(seq.labels[idx].unique().tolist())
            result.train.append(
                _train_on(model, seq, idx, classes, spec, cfg, device, seed + t, amp_dtype)
            )
            if hasattr(pool, "set_task"):
                pool.set_task(None)
            if buffer_per_class:
                buffer = torch.cat([buffer, _buffer(seq, task.train, buffer_per_class, gen)])
        if method == "joint" and t < n - 1:
            continue  # one model on all tasks: evaluated once, after the last task
        seen = seq.seen_classes(t)
        row: dict[str, float] = {}
        for j in range(t + 1):
            acc[j, t], robust[j, t] = evaluate_cell(
                model, seq, j, seen, settings, device, amp_dtype
            )
            row[f"acc_task{j}"], row[f"robust_task{j}"] = float(acc[j, t]), float(robust[j, t])
        if hasattr(pool, "select"):
            result.usage.append(prompt_usage(model, seq.images[task.test], settings.batch_size))
        if on_task is not None:
            on_task(t, row)
    return result
