"""Continual test-time adaptation (CTTA) streams over corrupted data.

A `CorruptionStream` is an explicit, loggable plan (`describe()` is a JSON-able dict: protocol,
corruption order, severities, reset policy, sample indices per segment) plus an iterator of
`StreamBatch`es. It works over any `CorruptionSource`: `GeneratedSource` corrupts a base set of
tensors on the fly; `vpt_robust.data.corrupted_files` provides sources over the distributed
CIFAR-10-C / CIFAR-100-C / ImageNet-C files.

Protocols (CoTTA; mariodoebler/test-time-adaptation, `test_time.py`):
  continual         the corruptions in order (default: the standard 15) at one severity
                    (default 5); the model is reset once, before the first batch.
  reset_each_shift  as continual, but reset before every corruption.
  gradual           per corruption the severities 1,2,3,4,5,4,3,2,1 (so 1 -> 5 -> 1, and two
                    severity-1 segments meet at every change of corruption); reset only at the
                    very start.
  mixed             every (corruption, sample) pair of all corruptions at one severity, shuffled
                    together: consecutive samples come from different corruptions; one reset.
  random_orders     `n_orders` seeded random permutations of the corruptions, each run as a
                    continual stream; reset at the start of each order (each is its own run).
  correlated        as continual, but the labels within each segment are not i.i.d.: every base
                    sample appears once per segment, in a class order drawn from a Dirichlet
                    with concentration `dirichlet` (default 0.1), so consecutive batches hold few
                    classes (the anchor's "correlated" setting, after NOTE, Gong et al. 2022).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from vpt_robust.corruptions.registry import check_images, check_name_severity, corrupt
from vpt_robust.corruptions.tables import CORRUPTIONS

PROTOCOLS = ("continual", "gradual", "mixed", "reset_each_shift", "random_orders", "correlated")
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)
_RESET_POLICY = {
    "continual": "reset once before the first batch of the stream",
    "reset_each_shift": "reset before the first batch of every segment",
    "gradual": "reset once before the first batch of the stream",
    "mixed": "reset once before the first batch of the stream",
    "random_orders": "reset before the first batch of every order (each order is one run)",
    "correlated": "reset once before the first batch of the stream",
}


@runtime_checkable
class CorruptionSource(Protocol):
    """Where stream samples come from: `len()` base samples per (corruption, severity)."""

    def __len__(self) -> int: ...

    def fetch(
        self, corruption: str, severity: int, indices: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (k, 3, H, W) float in [0, 1] and labels (k,) of the given base samples."""
        ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class GeneratedSource:
    """Corruptions generated on the fly from a clean base set given as tensors.

    images: (N, 3, H, W) float in [0, 1]; labels: (N,). Batches are corrupted on `device`
    with `corrupt(..., seed=<per batch seed from the stream>, table=table)`. The images are
    checked once here, not again per batch.
    """

    images: torch.Tensor
    labels: torch.Tensor
    device: str | torch.device = "cpu"
    table: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError("images: expected a (N, 3, H, W) tensor")
        check_images(self.images)
        if (
            not isinstance(self.labels, torch.Tensor)
            or self.labels.shape[:1] != self.images.shape[:1]
        ):
            raise ValueError(
                f"labels: expected shape ({self.images.shape[0]},), got "
                f"{tuple(getattr(self.labels, 'shape', ()))}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fetch(
        self, corruption: str, severity: int, indices: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to(self.images.device)
        x = self.images.index_select(0, idx).to(self.device)
        y = self.labels.index_select(0, idx.to(self.labels.device)).to(self.device)
        out = corrupt(x, corruption, severity, seed=seed, table=self.table, check_values=False)
        return out, y

    def base_labels(self) -> torch.Tensor:
        """The labels of the base samples (what a correlated stream orders by), on the CPU."""
        return self.labels.cpu()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "generated",
            "n_samples": len(self),
            "image_size": list(self.images.shape[-2:]),
            "table": self.table,
        }


@dataclass(frozen=True)
class Segment:
    """A stretch of the stream with one domain: corruption (or "mixed"), severity, reset flag.

    indices are positions in the source's base set; for "mixed" `sample_corruptions` gives
    each sample's corruption.
    """

    index: int
    corruption: str
    severity: int
    reset: bool
    indices: tuple[int, ...]
    run: int = 0
    sample_corruptions: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        idx = list(self.indices)
        contiguous = len(idx) > 0 and idx == list(range(idx[0], idx[0] + len(idx)))
        out: dict[str, Any] = {
            "index": self.index,
            "run": self.run,
            "corruption": self.corruption,
            "severity": self.severity,
            "reset": self.reset,
            "n_samples": len(idx),
            "indices": {"start": idx[0], "stop": idx[-1] + 1} if contiguous else idx,
        }
        if self.sample_corruptions is not None:
            out["sample_corruptions"] = [CORRUPTIONS.index(c) for c in self.sample_corruptions]
            out["sample_corruption_names"] = list(CORRUPTIONS)
        return out


@dataclass
class StreamBatch:
    """One batch of the stream with its domain information.

    reset is True on the batch before which the model must be reset to its source state.
    corruptions / severities are per sample (they differ only in the mixed protocol).
    """

    images: torch.Tensor
    labels: torch.Tensor
    corruption: str
    severity: int
    reset: bool
    segment: int
    run: int
    indices: torch.Tensor
    corruptions: tuple[str, ...] = field(default_factory=tuple)
    severities: torch.Tensor | None = None


def dirichlet_order(
    labels: np.ndarray, concentration: float, rng: np.random.Generator, *, max_tries: int = 100
) -> np.ndarray:
    """A permutation of ``range(len(labels))`` whose classes come in temporally correlated runs.

    The sequence is cut into as many chunks as there are classes; each class's samples (in a
    random order) are split over the chunks by proportions drawn from a symmetric Dirichlet of
    ``concentration`` (small: a class lands in few chunks); a chunk that already holds its share
    N / K takes no more, so chunks stay balanced. Draws repeat (at most ``max_tries``, from the
    same seeded ``rng``) until every chunk holds at least ``min(10, N // (4 K))`` samples, as in
    the anchor's NOTE-style sampler (which bounds the retries by wall time instead). Within a
    chunk the classes come one after another in a random order.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    classes = np.unique(labels)
    k = len(classes)
    min_chunk = min(10, n // (4 * k))
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(k, concentration)) * (sizes < n / k)
            if not np.isfinite(p).all() or p.sum() <= 0:
                p = (sizes == sizes.min()).astype(float)
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(np.int64)[:-1]
            for j, part in enumerate(np.split(idx, cuts)):
                parts[j].append(part)
                sizes[j] += len(part)
        if sizes.min() >= min_chunk:
            break
    else:
        raise ValueError(
            f"dirichlet: no balanced class order with concentration {concentration} after "
            f"{max_tries} draws; use a larger concentration"
        )
    order = [parts[j][i] for j in range(k) for i in rng.permutation(k)]
    return np.concatenate(order)


def _base_labels(source: CorruptionSource, corruption: str, severity: int, n: int) -> np.ndarray:
    """Labels of the first ``n`` base samples: ``source.base_labels()`` where the source has it,
    otherwise read once through ``fetch`` (labels do not depend on the corruption)."""
    if callable(getattr(source, "base_labels", None)):
        labels = source.base_labels()  # type: ignore[attr-defined]
        return np.asarray(torch.as_tensor(labels).cpu().numpy()[:n])
    out = []
    for start in range(0, n, 1024):
        idx = torch.arange(start, min(n, start + 1024))
        out.append(source.fetch(corruption, severity, idx, 0)[1].cpu().numpy())
    return np.concatenate(out)


def _batch_seed(seed: int, segment: int, batch: int) -> int:
    state = np.random.SeedSequence([seed, segment, batch]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 30) ^ int(state[1]))


class CorruptionStream:
    """A CTTA test stream: an explicit list of segments over a `CorruptionSource`.

    n_per_segment: samples per (corruption, severity) segment (default: the whole source,
    e.g. 10,000 for CIFAR-10-C); the same base samples in every segment, in order unless
    shuffle=True (then a seeded permutation per segment). Batches never cross segments.
    dirichlet: the concentration of the correlated protocol's class order (ignored otherwise;
    a fresh seeded draw per segment, and `shuffle` does not apply).
    """

    def __init__(
        self,
        source: CorruptionSource,
        protocol: str = "continual",
        *,
        corruptions: Sequence[str] = CORRUPTIONS,
        severity: int = 5,
        n_per_segment: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        shuffle: bool = False,
        n_orders: int = 10,
        dirichlet: float = 0.1,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if not isinstance(source, CorruptionSource):
            raise TypeError("source: expected a CorruptionSource (__len__, fetch, describe)")
        corruptions = tuple(corruptions)
        if not corruptions:
            raise ValueError("corruptions: expected at least one corruption name")
        for name in corruptions:
            check_name_severity(name, severity)
        if len(set(corruptions)) != len(corruptions):
            raise ValueError(f"corruptions: names repeat in {corruptions}")
        n_total = len(source)
        n = n_total if n_per_segment is None else int(n_per_segment)
        if not 1 <= n <= n_total:
            raise ValueError(f"n_per_segment: expected 1..{n_total} (source size), got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if protocol == "random_orders" and n_orders < 1:
            raise ValueError(f"n_orders: expected >= 1, got {n_orders}")
        if not (isinstance(dirichlet, int | float) and np.isfinite(dirichlet) and dirichlet > 0):
            raise ValueError(f"dirichlet: expected a finite number > 0, got {dirichlet!r}")
        self.source = source
        self.protocol = protocol
        self.corruptions = corruptions
        self.severity = severity
        self.n_per_segment = n
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.n_orders = int(n_orders) if protocol == "random_orders" else 1
        self.dirichlet = float(dirichlet)
        self._labels: np.ndarray | None = None
        self.segments: list[Segment] = self._build()

    # ------------------------------------------------------------------ plan

    def _indices(self, segment: int) -> tuple[int, ...]:
        if self.protocol == "correlated":
            if self._labels is None:
                self._labels = _base_labels(
                    self.source, self.corruptions[0], self.severity, self.n_per_segment
                )
            rng = np.random.default_rng([self.seed, segment, 1])
            return tuple(int(i) for i in dirichlet_order(self._labels, self.dirichlet, rng))
        if not self.shuffle:
            return tuple(range(self.n_per_segment))
        rng = np.random.default_rng([self.seed, segment])
        return tuple(int(i) for i in rng.permutation(self.n_per_segment))

    def orders(self) -> list[tuple[str, ...]]:
        """The corruption order of each run (one run except for random_orders)."""
        if self.protocol != "random_orders":
            return [self.corruptions]
        rng = np.random.default_rng(self.seed)
        return [tuple(self.corruptions[i] for i in rng.permutation(len(self.corruptions)))
                for _ in range(self.n_orders)]  # fmt: skip

    def _build(self) -> list[Segment]:
        segs: list[Segment] = []
        if self.protocol == "mixed":
            n = self.n_per_segment
            pairs = [(c, i) for c in self.corruptions for i in range(n)]
            perm = np.random.default_rng([self.seed, 0]).permutation(len(pairs))
            chosen = [pairs[p] for p in perm]
            return [
                Segment(
                    index=0,
                    corruption="mixed",
                    severity=self.severity,
                    reset=True,
                    indices=tuple(i for _, i in chosen),
                    sample_corruptions=tuple(c for c, _ in chosen),
                )
            ]
        for run, order in enumerate(self.orders()):
            for k, name in enumerate(order):
                sevs = GRADUAL_SEVERITIES if self.protocol == "gradual" else (self.severity,)
                for j, sev in enumerate(sevs):
                    first_of_run = k == 0 and j == 0
                    reset = first_of_run or (self.protocol == "reset_each_shift" and j == 0)
                    index = len(segs)
                    segs.append(Segment(index, name, sev, reset, self._indices(index), run=run))
        return segs

    def describe(self) -> dict[str, Any]:
        """The whole plan as a JSON-able dict (for logging next to the results)."""
        return {
            "protocol": self.protocol,
            "corruptions": list(self.corruptions),
            "orders": [list(o) for o in self.orders()],
            "severity": self.severity,
            "severities": [s.severity for s in self.segments],
            "gradual_severities": list(GRADUAL_SEVERITIES) if self.protocol == "gradual" else None,
            "reset_policy": _RESET_POLICY[self.protocol],
            "n_per_segment": self.n_per_segment,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dirichlet": self.dirichlet if self.protocol == "correlated" else None,
            "n_batches": len(self),
            "n_samples": sum(len(s.indices) for s in self.segments),
            "source": self.source.describe(),
            "segments": [s.to_dict() for s in self.segments],
        }

    def __len__(self) -> int:
        bs = self.batch_size
        return sum((len(s.indices) + bs - 1) // bs for s in self.segments)

    # ------------------------------------------------------------------ data

    def _fetch_mixed(
        self, seg: Segment, idx: torch.Tensor, names: tuple[str, ...], seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images: torch.Tensor | None = None
        labels: torch.Tensor | None = None
        for k, name in enumerate(dict.fromkeys(names)):
            pos = torch.tensor([i for i, c in enumerate(names) if c == name])
            x, y = self.source.fetch(name, seg.severity, idx[pos], seed + k)
            if images is None:
                images = x.new_empty((len(names), *x.shape[1:]))
                labels = y.new_empty((len(names), *y.shape[1:]))
            assert labels is not None
            images[pos.to(x.device)] = x
            labels[pos.to(y.device)] = y
        assert images is not None and labels is not None
        return images, labels

    def __iter__(self) -> Iterator[StreamBatch]:
        bs = self.batch_size
        for seg in self.segments:
            all_idx = torch.tensor(seg.indices, dtype=torch.long)
            for b, start in enumerate(range(0, len(all_idx), bs)):
                idx = all_idx[start : start + bs]
                seed = _batch_seed(self.seed, seg.index, b)
                if seg.sample_corruptions is not None:
                    names = seg.sample_corruptions[start : start + bs]
                    x, y = self._fetch_mixed(seg, idx, names, seed)
                else:
                    names = (seg.corruption,) * len(idx)
                    x, y = self.source.fetch(seg.corruption, seg.severity, idx, seed)
                yield StreamBatch(
                    images=x,
                    labels=y,
                    corruption=seg.corruption,
                    severity=seg.severity,
                    reset=seg.reset and b == 0,
                    segment=seg.index,
                    run=seg.run,
                    indices=idx,
                    corruptions=names,
                    severities=torch.full((len(idx),), seg.severity, dtype=torch.long),
                )
