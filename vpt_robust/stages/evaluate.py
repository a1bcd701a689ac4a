"""evaluate: clean and PGD robust accuracy of the zero-shot model and of the learned prompts,
on the target style's base (trained) classes and novel (held-out) classes, over all seeds."""

from __future__ import annotations

import csv
from typing import Any

import torch

from vpt_robust.attacks import robust_accuracy
from vpt_robust.config import AttackConfig, Params
from vpt_robust.data.embedded import load_embedded
from vpt_robust.metrics import as_float_images, mean_std
from vpt_robust.stages.build import backbone_for, classifier, load_prompted
from vpt_robust.stages.common import Layout, amp_dtype, load_splits, setup_runtime, write_json
from vpt_robust.tracking import StageRun

ZERO_SHOT = "zero_shot"


def eps_label(eps: float, norm: str) -> str:
    """``4/255`` style for L-inf budgets that are multiples of 1/255, plain numbers otherwise."""
    k = eps * 255
    return f"{round(k)}/255" if norm == "Linf" and abs(k - round(k)) < 1e-6 else f"{eps:g}"


def evaluate_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: AttackConfig,
    *,
    batch_size: int,
    device: torch.device,
    seed: int,
    amp: torch.dtype | None,
) -> dict[str, float]:
    """Clean accuracy and robust accuracy at each eps, on the same samples."""
    out: dict[str, float] = {}
    x = as_float_images(images)
    for eps in attack.eps:
        result = robust_accuracy(
            model,
            (x, labels),
            eps=eps,
            alpha=attack.alpha_factor * eps / attack.steps,
            steps=attack.steps,
            norm=attack.norm,
            restarts=attack.restarts,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp,
            seed=seed,
        )
        out["clean"] = result.clean_accuracy
        out[f"pgd_{attack.norm}_{eps_label(eps, attack.norm)}"] = result.robust_accuracy
    return out


def _summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in per_seed[0]:
        values = [r[key] for r in per_seed]
        mean, std = mean_std(values)
        out[key] = {"mean": mean, "std": std, "values": values}
    return out


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    device = setup_runtime(params)
    amp = amp_dtype(params, device)
    data = load_embedded(layout.data)
    splits = load_splits(layout)
    backbone = backbone_for(params, device)
    n_base = params.data.base_classes
    names = list(data.class_names)
    attack = params.evaluate.attack
    run.log_params({"evaluate": params.evaluate.model_dump()})
    split_specs = {
        "base": ("test_base", names[:n_base], 0),
        "novel": ("test_novel", names[n_base:], n_base),
    }
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    for split, (split_name, classes, offset) in split_specs.items():
        idx = splits[split_name]
        images, labels = data.images[idx], data.labels[idx] - offset
        for seed in params.train.seeds:
            models = {
                ZERO_SHOT: classifier(backbone, classes, params, prompted=False),
                params.prompt.kind: load_prompted(backbone, classes, params, layout.prompt(seed)),
            }
            for name, model in models.items():
                row = evaluate_model(
                    model,
                    images,
                    labels,
                    attack,
                    batch_size=params.evaluate.batch_size,
                    device=device,
                    seed=seed,
                    amp=amp,
                )
                raw.setdefault(name, {}).setdefault(split, []).append(row)
    results = {
        m: {s: _summarise(rows) for s, rows in by_split.items()} for m, by_split in raw.items()
    }
    plot_rows = []
    for model_name, by_split in results.items():
        for split, metrics in by_split.items():
            for key, stats in metrics.items():
                run.log_metrics({f"{model_name}.{split}.{key}.mean": stats["mean"]})
            for eps in [0.0, *attack.eps]:
                key = "clean" if eps == 0 else f"pgd_{attack.norm}_{eps_label(eps, attack.norm)}"
                plot_rows.append(
                    {
                        "model": f"{model_name}/{split}",
                        "eps": eps,
                        "robust_accuracy": metrics[key]["mean"],
                    }
                )
    plot = layout.metrics / "robustness_curve.csv"
    plot.parent.mkdir(parents=True, exist_ok=True)
    with plot.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["model", "eps", "robust_accuracy"])
        writer.writeheader()
        writer.writerows(plot_rows)
    run.log_table(plot_rows, "robustness_curve.json")
    run.log_artifact(plot)
    out = {"attack": attack.model_dump(), "seeds": params.train.seeds, "results": results}
    write_json(layout.metrics_file("evaluate"), out)
    return out
