"""What every stage shares: paths of the pipeline's files, the splits, the metrics JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpt_robust.config import Params
from vpt_robust.utils import resolve_device

SPLITS = ("pretrain_train", "pretrain_test", "prompt_train", "test_base", "test_novel")


@dataclass(frozen=True)
class Layout:
    """Where the pipeline's files live (relative to the working directory, as dvc.yaml says)."""

    data: Path
    outputs: Path
    metrics: Path

    @classmethod
    def of(cls, params: Params) -> Layout:
        return cls(Path(params.paths.data), Path(params.paths.outputs), Path(params.paths.metrics))

    @property
    def splits(self) -> Path:
        return self.outputs / "prepare" / "splits.npz"

    @property
    def backbone_dir(self) -> Path:
        return self.outputs / "backbone"

    @property
    def checkpoint(self) -> Path:
        return self.backbone_dir / "tiny_clip.safetensors"

    @property
    def prompts_dir(self) -> Path:
        return self.outputs / "prompts"

    def metrics_file(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON atomically, so a crash never leaves half a metrics file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_splits(layout: Layout) -> dict[str, torch.Tensor]:
    if not layout.splits.is_file():
        raise FileNotFoundError(f"{layout.splits} not found: run the prepare stage first")
    with np.load(layout.splits) as z:
        missing = [s for s in SPLITS if s not in z.files]
        if missing:
            raise ValueError(f"{layout.splits} lacks splits {missing}: re-run the prepare stage")
        return {s: torch.from_numpy(z[s]).long() for s in SPLITS}


def eval_split(params: Params, class_names: list[str], split: str) -> tuple[str, list[str], int]:
    """``base``/``novel`` -> (index set in splits.npz, its class names, label offset)."""
    n_base = params.data.base_classes
    if split in ("base", "test_base"):
        return "test_base", class_names[:n_base], 0
    if split in ("novel", "test_novel"):
        return "test_novel", class_names[n_base:], n_base
    raise ValueError(f"split: {split!r} is not 'base' or 'novel'")


def setup_runtime(params: Params) -> torch.device:
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    return resolve_device(params.runtime.device)


def amp_dtype(params: Params, device: torch.device) -> torch.dtype | None:
    from vpt_robust.methods.optim import autocast_dtype

    return autocast_dtype(params.runtime.precision, device)
