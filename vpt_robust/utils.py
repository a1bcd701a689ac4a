"""Small shared helpers: device resolution, seeding, progress bars."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a config device string into a torch device; `auto` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} was requested but CUDA is not available here")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm progress bar on stderr, silenced with VPT_ROBUST_NO_PROGRESS=1 (tests, CI logs)."""
    from tqdm.auto import tqdm

    disable = os.environ.get("VPT_ROBUST_NO_PROGRESS", "") not in ("", "0")
    # In a log file (dvc repro, CI) every redraw is a new line: redraw rarely there.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    bar = tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, mininterval=interval)
    return iter(bar)
