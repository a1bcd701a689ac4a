"""evaluate: clean, PGD (eps sweep) and AutoAttack robust accuracy of the zero-shot model and of
the learned prompts, on the target style's base (trained) and novel (held-out) classes, over all
seeds. AutoAttack runs on a fixed subset; PGD is reported on that same subset beside it, so the
two compare. outputs/evaluate always holds the subset's indices and a manifest; per-sample flags
(flags.csv) too when `save_flags`, so runs can be compared sample by sample."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import torch

from vpt_robust.attacks import autoattack, check_eps_monotone, robust_accuracy
from vpt_robust.config import Params
from vpt_robust.data.embedded import load_embedded
from vpt_robust.metrics import as_float_images, mean_std
from vpt_robust.models import Backbone
from vpt_robust.stages.build import (
    backbone_for,
    classifier,
    families,
    family_name,
    load_family,
    transfers_to_new_classes,
)
from vpt_robust.stages.common import (
    Layout,
    amp_dtype,
    eval_split,
    load_splits,
    setup_runtime,
    write_json,
)
from vpt_robust.tracking import StageRun

ZERO_SHOT = "zero_shot"
FLAG_FIELDS = [
    "model",
    "split",
    "seed",
    "attack",
    "eps",
    "index",
    "clean_correct",
    "robust_correct",
]


def eps_label(eps: float, norm: str) -> str:
    """``4/255`` style for L-inf budgets that are multiples of 1/255, plain numbers otherwise."""
    k = eps * 255
    return f"{round(k)}/255" if norm == "Linf" and abs(k - round(k)) < 1e-6 else f"{eps:g}"


def evaluation_models(
    backbone: Backbone, classes: list[str], params: Params, seed: int, *, novel: bool
) -> dict[str, torch.nn.Module]:
    """The zero-shot model and every learned family of one seed, over ``classes``; on novel
    classes only the families whose learned tensors transfer to new classes."""
    models: dict[str, torch.nn.Module] = {
        ZERO_SHOT: classifier(backbone, classes, params, prompted=False)
    }
    for family in families(params):
        if novel and not transfers_to_new_classes(params, family):
            continue
        name = family_name(params, family)
        models[name] = load_family(backbone, classes, params, name, seed)
    return models


def metric_names(params: Params) -> list[str]:
    """The evaluation's columns in order: clean, PGD at each eps (all samples), then per
    AutoAttack eps PGD on the AutoAttack subset and AutoAttack (same samples, side by side)."""
    attack, aa = params.evaluate.attack, params.evaluate.autoattack
    names = ["clean"] + [f"pgd_{attack.norm}_{eps_label(e, attack.norm)}" for e in attack.eps]
    if aa.enabled:
        for e in aa.eps:
            label = f"{attack.norm}_{eps_label(e, attack.norm)}"
            names += [f"pgd_subset_{label}", f"autoattack_{label}"]
    return names


def autoattack_subset(n: int, params: Params) -> torch.Tensor:
    """The fixed subset AutoAttack runs on: a seeded choice of positions within the split."""
    cfg = params.evaluate.autoattack
    gen = torch.Generator().manual_seed(cfg.subset_seed)
    return torch.randperm(n, generator=gen)[: min(n, cfg.n_samples)].sort().values


def _global_subset(split_index: torch.Tensor, params: Params) -> list[int]:
    """The AutoAttack subset of one split as global sample indices (as flags.csv has them)."""
    return split_index[autoattack_subset(len(split_index), params)].tolist()


def evaluate_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    global_index: torch.Tensor,
    params: Params,
    *,
    device: torch.device,
    seed: int,
    run_autoattack: bool,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Scalar metrics and per-sample flag rows of one model on one split."""
    attack, aa = params.evaluate.attack, params.evaluate.autoattack
    amp = amp_dtype(params, device)
    bs = params.evaluate.batch_size
    x = as_float_images(images)
    out: dict[str, float] = {}
    flags: list[dict[str, Any]] = []
    pgd_results = []

    def pgd(eps: float, xs: torch.Tensor, ys: torch.Tensor) -> Any:
        return robust_accuracy(
            model,
            (xs, ys),
            eps=eps,
            alpha=attack.alpha_factor * eps / attack.steps,
            steps=attack.steps,
            norm=attack.norm,
            restarts=attack.restarts,
            batch_size=bs,
            device=device,
            amp_dtype=amp,
            seed=seed,
        )

    for eps in attack.eps:
        result = pgd(eps, x, labels)
        pgd_results.append(result)
        out["clean"] = result.clean_accuracy
        out[f"pgd_{attack.norm}_{eps_label(eps, attack.norm)}"] = result.robust_accuracy
        flags += _flag_rows(result, "pgd", eps, global_index)
    check_eps_monotone(pgd_results)
    if run_autoattack and aa.enabled:
        subset = autoattack_subset(len(labels), params)
        for eps in aa.eps:
            label = f"{attack.norm}_{eps_label(eps, attack.norm)}"
            done = [r for r in pgd_results if abs(r.eps - eps) <= 1e-9]
            if done:
                # PGD's flags do not depend on the batch: the sweep's flags on the subset are
                # exactly what PGD on the subset alone would give.
                pgd_subset = done[0].robust_correct[subset]
            else:
                result = pgd(eps, x[subset], labels[subset])
                pgd_subset = result.robust_correct
                flags += _flag_rows(result, "pgd", eps, global_index[subset])
            out[f"pgd_subset_{label}"] = float(pgd_subset.float().mean())
            result = autoattack(
                model,
                x[subset],
                labels[subset],
                eps=eps,
                norm=attack.norm,
                version=aa.version,
                batch_size=bs,
                device=device,
                fast=aa.fast,
                seed=seed,
                amp_dtype=amp,
            )
            out[f"autoattack_{label}"] = result.robust_accuracy
            flags += _flag_rows(result, result.attack, eps, global_index[subset])
    return out, flags


def _flag_rows(
    result: Any, attack: str, eps: float, global_index: torch.Tensor
) -> list[dict[str, Any]]:
    return [
        {"attack": attack, "eps": eps, **row, "index": int(global_index[row["index"]])}
        for row in result.to_rows()
    ]


def _summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in per_seed[0]:
        values = [r[key] for r in per_seed if key in r]
        mean, std = mean_std(values)
        out[key] = {"mean": mean, "std": std, "values": values}
    return out


def _write_flags(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FLAG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(
    out_dir: Path,
    params: Params,
    subsets: dict[str, list[int]],
    flags: list[dict[str, Any]],
) -> list[Path]:
    """Write the stage's dvc out, whatever `save_flags` says: the AutoAttack subset (global
    sample indices per class split), flags.csv when `save_flags`, and a manifest naming each
    file with its sha256. Content depends on the inputs only (no times), so two runs of the
    same inputs write identical bytes. Returns the files written, manifest last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    aa = params.evaluate.autoattack
    subset_file = write_json(
        out_dir / "autoattack_subset.json",
        {
            "n_samples": aa.n_samples,
            "subset_seed": aa.subset_seed,
            "enabled": aa.enabled,
            "indices": {split: list(map(int, idx)) for split, idx in subsets.items()},
        },
    )
    files = [subset_file]
    flag_file = out_dir / "flags.csv"
    if params.evaluate.save_flags:
        _write_flags(flag_file, flags)
        files.append(flag_file)
    else:
        flag_file.unlink(missing_ok=True)  # a stale one from an earlier run would mislead
    manifest = {
        "save_flags": params.evaluate.save_flags,
        "flag_rows": len(flags) if params.evaluate.save_flags else None,
        "files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
    }
    files.append(write_json(out_dir / "manifest.json", manifest))
    return files


def autoattacked(params: Params, model: str, split: str) -> bool:
    """Whether AutoAttack runs on ``model`` x ``split`` (on the first seed; the evaluate stage
    and the Dask grid share this rule)."""
    aa = params.evaluate.autoattack
    return aa.enabled and split in aa.splits and (aa.models is None or model in aa.models)


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    device = setup_runtime(params)
    data = load_embedded(layout.data)
    splits = load_splits(layout)
    backbone = backbone_for(params, device)
    names = list(data.class_names)
    attack = params.evaluate.attack
    run.log_params({"evaluate": params.evaluate.model_dump()})
    split_specs = {split: eval_split(params, names, split) for split in ("base", "novel")}
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    flags: list[dict[str, Any]] = []
    for split, (split_name, classes, offset) in split_specs.items():
        idx = splits[split_name]
        images, labels = data.images[idx], data.labels[idx] - offset
        for i, seed in enumerate(params.train.seeds):
            models = evaluation_models(backbone, classes, params, seed, novel=split == "novel")
            for name, model in models.items():
                row, rows = evaluate_model(
                    model,
                    images,
                    labels,
                    idx,
                    params,
                    device=device,
                    seed=seed,
                    run_autoattack=i == 0 and autoattacked(params, name, split),
                )
                raw.setdefault(name, {}).setdefault(split, []).append(row)
                flags += [{"model": name, "split": split, "seed": seed, **r} for r in rows]
    results = {m: {s: _summarise(rows) for s, rows in by.items()} for m, by in raw.items()}
    plot_rows = []
    for model_name, by_split in results.items():
        for split, metrics in by_split.items():
            run.log_metrics(
                {f"{model_name}.{split}.{k}.mean": v["mean"] for k, v in metrics.items()}
            )
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
    aa = params.evaluate.autoattack
    subsets = {s: _global_subset(splits[split_specs[s][0]], params) for s in aa.splits}
    for path in write_outputs(layout.outputs / "evaluate", params, subsets, flags):
        run.log_artifact(path)
    out = {
        "attack": attack.model_dump(),
        "autoattack": params.evaluate.autoattack.model_dump(),
        "metrics": metric_names(params),
        "seeds": params.train.seeds,
        "results": results,
    }
    write_json(layout.metrics_file("evaluate"), out)
    return out
