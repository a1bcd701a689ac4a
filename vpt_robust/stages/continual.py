"""continual: L2P vs sequential prompt tuning, joint training and zero-shot CLIP over a task
sequence of the embedded data; accuracy and PGD robust-accuracy matrices, average accuracy,
forgetting and robust forgetting per method (``metrics/continual.json``).

The sequence is drawn from the images of the pretraining styles that pretraining never used
(the complement of ``pretrain_train`` in ``splits.npz``; prepare's splits stay untouched), per
class with ``continual.data_seed``: a class-incremental split of the classes into
``continual.tasks`` tasks, or a domain-incremental sequence with one task per style. With
``continual.data`` ``split_cifar100`` / ``five_datasets`` the sequence comes from local files in
torchvision's formats instead (``vpt_robust/data/torchvision_sets.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from vpt_robust.config import HeadConfig, Params, PromptConfig, TrainConfig
from vpt_robust.data.embedded import EmbeddedData, load_embedded
from vpt_robust.data.torchvision_sets import torchvision_sequence
from vpt_robust.methods.continual import (
    EvalSettings,
    MethodSpec,
    SequenceResult,
    TaskSequence,
    class_incremental,
    domain_incremental,
    matched_vpt_length,
    pool_learned_values,
    run_method,
)
from vpt_robust.metrics import mean_std
from vpt_robust.models.classifier import build_classifier
from vpt_robust.stages.build import backbone_for
from vpt_robust.stages.common import Layout, amp_dtype, load_splits, setup_runtime, write_json
from vpt_robust.tracking import StageRun
from vpt_robust.utils import seed_everything

METRICS = ("average_accuracy", "forgetting", "robust_average_accuracy", "robust_forgetting")


def unseen_by_pretraining(data: EmbeddedData, pretrain_train: torch.Tensor) -> torch.Tensor:
    """Indices of pretraining-style images outside ``pretrain_train``."""
    ids = {name: i for i, name in enumerate(data.style_names)}
    pre = torch.isin(data.styles, torch.tensor([ids[s] for s in data.pretrain_styles]))
    pre[pretrain_train] = False
    return pre.nonzero().squeeze(1)


def build_sequence(params: Params, data: EmbeddedData, splits: dict[str, Any]) -> TaskSequence:
    """The task sequence ``params.continual`` names: over the embedded data, or (``data:
    split_cifar100 | five_datasets``) over the local files under ``continual.root``."""
    cfg = params.continual
    kw = {"n_train": cfg.n_train_per_class, "n_test": cfg.n_test_per_class, "seed": cfg.data_seed}
    if cfg.data != "embedded":
        return torchvision_sequence(
            cfg.data, cfg.root, image_size=cfg.image_size, tasks=cfg.tasks, **kw
        )
    if cfg.sequence == "class_incremental":
        if cfg.style == "pretraining":
            candidates = unseen_by_pretraining(data, splits["pretrain_train"])
        else:  # a held-out style: never seen by pretraining at all
            if cfg.style not in data.style_names:
                raise ValueError(f"continual.style: {cfg.style!r} is not in {data.style_names}")
            candidates = (data.styles == data.style_names.index(cfg.style)).nonzero().squeeze(1)
        tasks = class_incremental(data.labels, candidates, cfg.tasks, **kw)
        kind = "class"
    else:
        taken = torch.zeros(len(data.labels), dtype=torch.bool)
        taken[splits["pretrain_train"]] = True
        domains = {
            style: ((data.styles == i) & ~taken).nonzero().squeeze(1)
            for i, style in enumerate(data.style_names)
        }
        tasks = domain_incremental(data.labels, domains, **kw)
        kind = "domain"
    return TaskSequence(data.images, data.labels, tuple(data.class_names), tasks, kind)


def method_specs(params: Params, width: int, key_dim: int) -> dict[str, MethodSpec]:
    """Prompt family, head and aux weight of every method."""
    cfg = params.continual
    linear = HeadConfig(kind=cfg.head, templates=params.head.templates)
    pool = PromptConfig(
        kind="l2p", size=cfg.pool_size, length=cfg.prompt_length, top_n=cfg.top_n,
        batchwise=cfg.batchwise, task_mask=cfg.task_mask,
        readout="prompts" if cfg.head == "linear" else "pool",
    )  # fmt: skip
    length = cfg.sequential_length or matched_vpt_length(
        width, key_dim, cfg.pool_size, cfg.prompt_length
    )
    l2p = MethodSpec(pool, linear, cfg.pull_weight)
    return {
        "l2p": l2p,
        "sequential": MethodSpec(PromptConfig(kind="vpt", length=length), linear),
        "joint": l2p,
        "zero_shot": MethodSpec(
            None, HeadConfig(kind="zero_shot", templates=params.head.templates)
        ),
    }


def task_train_config(params: Params) -> TrainConfig:
    """One task's training: AdamW, constant lr, no weight decay, no warm-up, no checkpoint."""
    cfg = params.continual
    return TrainConfig(
        seeds=list(cfg.seeds), epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer="adamw",
        lr=cfg.lr, weight_decay=0.0, warmup_steps=0, schedule="constant",
        grad_clip=cfg.grad_clip, checkpoint=False, resume=False,
    )  # fmt: skip


def _stats(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": values}


def _rows(matrix: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in matrix.tolist()]


def _table(matrix: torch.Tensor) -> list[dict[str, Any]]:
    n = matrix.shape[0]
    return [
        {"task": j, **{f"after_task{t}": _rows(matrix)[j][t] for t in range(n)}} for j in range(n)
    ]


def _heatmaps(mean: dict[str, dict[str, torch.Tensor]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(mean)
    fig, axes = plt.subplots(2, len(methods), figsize=(3.2 * len(methods), 6), squeeze=False)
    for col, method in enumerate(methods):
        for row, which in enumerate(("accuracy", "robust")):
            ax = axes[row][col]
            m = mean[method][which].numpy()
            ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            for (j, t), v in np.ndenumerate(m):
                if not math.isnan(v):
                    ax.text(t, j, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
            ax.set_title(f"{method}: {which}")
            ax.set_xlabel("after task")
            ax.set_ylabel("task")
    fig.tight_layout()
    return fig


def _usage_figure(usage: list[list[int]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(usage), figsize=(2.6 * len(usage), 2.6), squeeze=False)
    for t, counts in enumerate(usage):
        axes[0][t].bar(range(len(counts)), counts)
        axes[0][t].set_title(f"task {t}")
        axes[0][t].set_xlabel("prompt id")
    fig.tight_layout()
    return fig


def _log(run: StageRun, per_seed: dict[str, list[SequenceResult]], seeds: list[int]) -> None:
    mean: dict[str, dict[str, torch.Tensor]] = {}
    for method, results in per_seed.items():
        for seed, res in zip(seeds, results, strict=True):
            run.log_table(_table(res.acc), f"continual/{method}_seed{seed}_accuracy.json")
            run.log_table(_table(res.robust), f"continual/{method}_seed{seed}_robust.json")
        mean[method] = {
            "accuracy": torch.stack([r.acc for r in results]).mean(0),
            "robust": torch.stack([r.robust for r in results]).mean(0),
        }
    if run.client is None:
        return  # tracking disabled: no figures to draw
    try:
        fig = _heatmaps(mean)
    except ImportError:
        return
    run.log_figure(fig, "continual/matrices.png")
    if "l2p" in per_seed and per_seed["l2p"][0].usage:
        usage = per_seed["l2p"][0].usage
        run.log_table(
            [
                {"task": t, **{f"prompt{m}": c for m, c in enumerate(u)}}
                for t, u in enumerate(usage)
            ],
            "continual/l2p_prompt_usage.json",
        )
        run.log_figure(_usage_figure(usage), "continual/l2p_prompt_usage.png")


def run(params: Params, run: StageRun) -> dict[str, Any]:
    cfg = params.continual
    layout = Layout.of(params)
    device = setup_runtime(params)
    amp = amp_dtype(params, device)
    data = load_embedded(layout.data)
    seq = build_sequence(params, data, load_splits(layout))
    backbone = backbone_for(params, device)
    geo = backbone.token_geometry
    specs = method_specs(params, geo.width, backbone.feature_dim)
    train_cfg = task_train_config(params)
    settings = EvalSettings(
        batch_size=cfg.eval_batch_size, eps=cfg.eps, steps=cfg.attack_steps, seed=cfg.data_seed
    )
    run.log_params({"continual": cfg.model_dump(mode="json")})

    def build(spec: MethodSpec) -> torch.nn.Module:
        return build_classifier(backbone, seq.class_names, spec.prompt, spec.head)

    per_seed: dict[str, list[SequenceResult]] = {m: [] for m in cfg.methods}
    for method in cfg.methods:
        for seed in cfg.seeds:
            seed_everything(seed)
            res = run_method(
                method, seq, build, specs[method], train_cfg, settings, device=device, seed=seed,
                amp_dtype=amp, buffer_per_class=cfg.buffer_per_class,
                on_task=lambda t, row, m=method, s=seed: run.log_metrics(
                    {f"{m}.seed{s}.{k}": v for k, v in row.items()}, step=t
                ),
            )  # fmt: skip
            per_seed[method].append(res)
    results: dict[str, Any] = {}
    for method, runs in per_seed.items():
        metrics = [r.metrics() for r in runs]
        results[method] = {k: _stats([m[k] for m in metrics]) for k in METRICS}
        run.log_metrics({f"{method}.{k}_mean": results[method][k]["mean"] for k in METRICS})
    pool_values = pool_learned_values(
        geo.width, backbone.feature_dim, cfg.pool_size, cfg.prompt_length
    )
    out = {
        "sequence": {
            "kind": seq.kind,
            "tasks": [
                {
                    "name": t.name,
                    "classes": [seq.class_names[c] for c in t.classes],
                    "n_train": len(t.train),
                    "n_test": len(t.test),
                }
                for t in seq.tasks
            ],  # fmt: skip
        },
        "seeds": list(cfg.seeds),
        "learned_prompt_values": {
            "l2p": pool_values,
            "sequential": specs["sequential"].prompt.args["length"] * geo.width,
        },
        "results": results,
        "matrices": {
            m: {"accuracy": [_rows(r.acc) for r in rs], "robust": [_rows(r.robust) for r in rs]}
            for m, rs in per_seed.items()
        },
        "prompt_usage": {m: [r.usage for r in rs] for m, rs in per_seed.items() if rs[0].usage},
    }
    write_json(layout.metrics_file("continual"), out)
    _log(run, per_seed, list(cfg.seeds))
    return out
