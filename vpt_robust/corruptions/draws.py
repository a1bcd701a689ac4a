"""Random draws for whole batches, spread over all CPU cores.

torch's CPU generator fills a tensor on one core. On CPU a batch therefore draws in groups of
whole images, each group from its own generator seeded from the corruption's generator, in one
thread per core. The groups depend on the image size only, so the same generator state gives
the same draws whatever the thread count. Other devices draw from the generator directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# Values per image group on CPU (about 1 MiB of float32).
CPU_DRAW_VALUES = 1 << 18

_POOLS: dict[int, ThreadPoolExecutor] = {}
# A forked child (DataLoader workers) inherits the pools but not their threads: start afresh.
os.register_at_fork(after_in_child=_POOLS.clear)


def draw_groups(batch: int, values_per_image: int) -> list[tuple[int, int]]:
    """The (start, stop) image ranges that draw from one generator each on CPU."""
    per = max(1, CPU_DRAW_VALUES // max(1, values_per_image))
    return [(start, min(start + per, batch)) for start in range(0, batch, per)]


def parallel_draws(
    out: torch.Tensor,
    gen: torch.Generator,
    fill: Callable[[slice, torch.Generator], None],
) -> torch.Tensor:
    """Fill `out` (B, ...) with random draws: fill(rows, generator) writes out[rows].

    Off CPU: one call with `gen` itself. On CPU: one generator per image group
    (`draw_groups`), seeded with consecutive values after one 32-bit draw from `gen`, filled
    in torch.get_num_threads() threads.
    """
    if out.device.type != "cpu" or out.shape[0] == 0:
        fill(slice(None), gen)
        return out
    groups = draw_groups(out.shape[0], out[0].numel())
    base = int(torch.randint(0, 2**32, (1,), generator=gen))
    gens = [torch.Generator().manual_seed((base + i) % 2**32) for i in range(len(groups))]
    workers = min(len(groups), max(1, torch.get_num_threads()))
    if workers == 1:
        for (start, stop), g in zip(groups, gens, strict=True):
            fill(slice(start, stop), g)
        return out
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS.setdefault(workers, ThreadPoolExecutor(workers, "vpt-robust-draws"))
    jobs = [
        pool.submit(fill, slice(start, stop), g)
        for (start, stop), g in zip(groups, gens, strict=True)
    ]
    for job in jobs:
        job.result()
    return out


def _sample(
    shape: Sequence[int], gen: torch.Generator, device: torch.device, dtype: torch.dtype, law: str
) -> torch.Tensor:
    out = torch.empty(tuple(shape), device=device, dtype=dtype)

    def fill(rows: slice, g: torch.Generator) -> None:
        if law == "normal":
            out[rows].normal_(generator=g)
        else:
            out[rows].uniform_(generator=g)

    return parallel_draws(out, gen, fill)


def rand(
    shape: Sequence[int],
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """U[0, 1) draws of `shape` (batch first), as `parallel_draws` spreads them."""
    return _sample(shape, gen, device, dtype, "uniform")


def randn(
    shape: Sequence[int],
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N(0, 1) draws of `shape` (batch first), as `parallel_draws` spreads them."""
    return _sample(shape, gen, device, dtype, "normal")
