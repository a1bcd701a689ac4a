"""prepare: check the raw data and split it into pretraining, prompt-training and test sets."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vpt_robust.config import Params
from vpt_robust.data.embedded import load_embedded
from vpt_robust.stages.common import Layout, write_json
from vpt_robust.tracking import StageRun


def _split(
    idx: torch.Tensor, test_fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    perm = idx[torch.randperm(len(idx), generator=gen)]
    n_test = max(1, round(len(perm) * test_fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def make_splits(params: Params) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Index sets of the embedded data; prompts train on a style held out of pretraining."""
    cfg = params.data
    data = load_embedded(Layout.of(params).data)
    if data.images.shape[-1] != cfg.image_size:
        raise ValueError(
            f"data.image_size: params say {cfg.image_size} but {Layout.of(params).data} holds "
            f"{data.images.shape[-1]} px images; rebuild them with `vpt-robust data --force` "
            f"(then `dvc add {Layout.of(params).data}` and commit its .dvc file)"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    style_ids = {name: i for i, name in enumerate(data.style_names)}
    pre = torch.isin(data.styles, torch.tensor([style_ids[s] for s in data.pretrain_styles]))
    if cfg.target_style not in data.heldout_styles:
        raise ValueError(
            f"data.target_style: {cfg.target_style!r} is not a held-out style of "
            f"{Layout.of(params).data} ({list(data.heldout_styles)})"
        )
    target = data.styles == style_ids[cfg.target_style]
    base = data.labels < cfg.base_classes
    all_idx = torch.arange(len(data.labels))
    pretrain_train, pretrain_test = _split(all_idx[pre], cfg.test_fraction, gen)
    prompt_train, test_base = _split(all_idx[target & base], cfg.test_fraction, gen)
    _, test_novel = _split(all_idx[target & ~base], cfg.test_fraction, gen)

    def cap(idx: torch.Tensor, limit: int | None) -> torch.Tensor:
        if limit is None or len(idx) <= limit:
            return idx
        return idx[torch.randperm(len(idx), generator=gen)[:limit]].sort().values

    splits = {
        "pretrain_train": pretrain_train,
        "pretrain_test": cap(pretrain_test, cfg.max_test),
        "prompt_train": cap(prompt_train, cfg.max_prompt_train),
        "test_base": cap(test_base, cfg.max_test),
        "test_novel": cap(test_novel, cfg.max_test),
    }
    info = {
        "images": len(data.labels),
        "classes": len(data.class_names),
        "base_classes": list(data.class_names[: cfg.base_classes]),
        "novel_classes": list(data.class_names[cfg.base_classes :]),
        "pretrain_styles": list(data.pretrain_styles),
        "target_style": cfg.target_style,
        "sizes": {k: len(v) for k, v in splits.items()},
    }
    return splits, info


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    splits, info = make_splits(params)
    layout.splits.parent.mkdir(parents=True, exist_ok=True)
    tmp = layout.splits.with_name("splits.tmp.npz")
    np.savez(tmp, **{k: v.numpy() for k, v in splits.items()})
    tmp.replace(layout.splits)
    run.log_params({"data": params.data.model_dump()})
    run.log_metrics({f"size_{k}": v for k, v in info["sizes"].items()})
    write_json(layout.metrics_file("prepare"), info)
    return info
