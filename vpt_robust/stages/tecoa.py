"""tecoa: text-guided adversarial prompt tuning (TeCoA) and the zero-shot robustness protocol.

Every method trains on the embedded default's BASE classes in the PRETRAINING styles (images of
``pretrain_train``: the distribution the tiny CLIP is good on, as CLIP is on ImageNet) and is
evaluated, clean, with PGD-``eval_steps`` at every ``eval_eps`` and with AutoAttack on a fixed
seeded subset, on three splits of images the backbone never saw (pretraining styles outside
``pretrain_train``, or held-out styles):

- ``novel``: (a) the novel classes, never trained on, in the pretraining styles;
- ``heldout_styles``: (b) the training classes in the held-out styles (a domain shift);
- ``base``: (c) the training classes in the pretraining styles (new images).

Methods: ``zero_shot`` (the frozen model), ``clean_<v>`` (clean prompt tuning of the first
variant), ``no_text_<v>`` (adversarial tuning of the same prompt through a linear head, then
evaluated zero-shot with the head dropped), ``tecoa_<v>`` per variant, ``tecoa_finetune`` (the
image tower; ``finetune: true``). The splits are derived here from ``splits.npz`` and the data
(seeded by ``tecoa.data_seed``), so the prepare stage's splits stay as they are. With
``tecoa.data`` set (a real backbone's preset), training reads one local data set (an ImageNet
folder, CIFAR-100, ...) and every set of ``tecoa.data.eval`` is a zero-shot split of its own
classes, in place of the three above.

Every evaluated model passes the gradient-masking checks: robust <= clean per sample and no
masked or stochastic gradients (``robust_accuracy``), robust accuracy falling with eps
(``check_eps_monotone``), and AutoAttack <= PGD on the same samples (here). Writes
``metrics/tecoa.json`` (``results.<method>.<split>.<metric> = {mean, std, values}`` over seeds),
``metrics/tecoa_curve.csv`` and the prompts as ``outputs/tecoa/prompts/<method>/seed_<s>``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vpt_robust.attacks.checks import RobustnessCheckError
from vpt_robust.config import (
    AttackConfig,
    AutoAttackConfig,
    DatasetSource,
    EvaluateConfig,
    Params,
    PromptConfig,
    TeCoAData,
    TrainConfig,
)
from vpt_robust.data.embedded import EmbeddedData, load_embedded
from vpt_robust.data.torchvision_sets import LabelledImages, load_dataset
from vpt_robust.methods.objectives import cross_entropy_objective, forward_passes_per_image
from vpt_robust.methods.optim import autocast_dtype
from vpt_robust.methods.supervised import train_prompt
from vpt_robust.methods.tecoa import (
    NoTextATObjective,
    PGDAttack,
    TeCoAObjective,
    finetune_classifier,
    zero_shot_transfer,
)
from vpt_robust.metrics import as_float_images, mean_std
from vpt_robust.models import Backbone
from vpt_robust.models.classifier import PromptedClassifier, build_classifier
from vpt_robust.prompts.io import load_prompted_model, save_prompted_model
from vpt_robust.stages.build import backbone_for, classifier
from vpt_robust.stages.common import Layout, load_splits, setup_runtime, write_json
from vpt_robust.stages.evaluate import eps_label, evaluate_model, metric_names
from vpt_robust.stages.train_prompt import saved_summary
from vpt_robust.tracking import StageRun
from vpt_robust.utils import seed_everything

ZERO_SHOT = "zero_shot"
SPLITS = ("novel", "heldout_styles", "base")


class AutoAttackAbovePGDError(RobustnessCheckError):
    """AutoAttack left more samples robust than PGD on the same samples: an attack failed."""


@dataclass(frozen=True)
class Split:
    """One evaluation split: global sample indices, the classes of its logits, label offset."""

    index: torch.Tensor
    classes: list[str]
    offset: int


@dataclass(frozen=True)
class EvalSet:
    """One evaluation split as the evaluation sees it: uint8 images, labels in ``classes``'
    order, and per-sample ids (they seed the attacks' starts and the AutoAttack subset)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    index: torch.Tensor


@dataclass(frozen=True)
class TeCoASets:
    """The training set (its classes are the base classes) and the evaluation splits."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    splits: dict[str, EvalSet]
    protocol: dict[str, Any]


@dataclass(frozen=True)
class Method:
    """One row of the table: how it trains (``kind``), with which prompt family."""

    name: str
    kind: str  # zero_shot | clean | no_text | tecoa | finetune
    family: PromptConfig | None = None


def _cap(idx: torch.Tensor, limit: int | None, gen: torch.Generator) -> torch.Tensor:
    if limit is None or len(idx) <= limit:
        return idx
    return idx[torch.randperm(len(idx), generator=gen)[:limit]].sort().values


def tecoa_splits(
    params: Params, data: EmbeddedData, splits: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, Split]]:
    """The training images (base classes, pretraining styles, from ``pretrain_train``) and the
    three evaluation splits (see the module docstring); a function of data, splits and params."""
    cfg, n_base = params.tecoa, params.data.base_classes
    gen = torch.Generator().manual_seed(cfg.data_seed)
    ids = {name: i for i, name in enumerate(data.style_names)}
    pre = torch.isin(data.styles, torch.tensor([ids[s] for s in data.pretrain_styles]))
    held = torch.isin(data.styles, torch.tensor([ids[s] for s in data.heldout_styles]))
    base = data.labels < n_base
    seen = torch.zeros(len(data.labels), dtype=torch.bool)
    seen[splits["pretrain_train"]] = True
    all_idx = torch.arange(len(data.labels))
    train = _cap(all_idx[pre & base & seen], cfg.n_train, gen)
    names = list(data.class_names)
    out = {
        "novel": Split(_cap(all_idx[pre & ~base & ~seen], cfg.n_test, gen), names[n_base:], n_base),
        "heldout_styles": Split(_cap(all_idx[held & base], cfg.n_test, gen), names[:n_base], 0),
        "base": Split(_cap(all_idx[pre & base & ~seen], cfg.n_test, gen), names[:n_base], 0),
    }
    for name, split in [("train", Split(train, [], 0)), *out.items()]:
        if len(split.index) == 0:
            raise ValueError(f"tecoa: the {name} split is empty; is the embedded data complete?")
    return train, out


EMBEDDED_PROTOCOL = {
    "train": "base classes, pretraining styles (images of pretrain_train)",
    "splits": {
        "novel": "(a) novel classes, pretraining styles, images outside pretraining",
        "heldout_styles": "(b) base classes in the held-out styles",
        "base": "(c) base classes, pretraining styles, images outside pretraining",
    },
}


def _embedded_sets(params: Params, layout: Layout) -> TeCoASets:
    data = load_embedded(layout.data)
    train, splits = tecoa_splits(params, data, load_splits(layout))
    sets = {
        name: EvalSet(data.images[s.index], data.labels[s.index] - s.offset, s.classes, s.index)
        for name, s in splits.items()
    }
    base = list(data.class_names[: params.data.base_classes])
    return TeCoASets(data.images[train], data.labels[train], base, sets, EMBEDDED_PROTOCOL)


def _read(src: DatasetSource, size: int) -> LabelledImages:
    return load_dataset(
        src.dataset, src.root, src.split, per_class=src.per_class, seed=src.seed,
        image_size=size, class_names=src.class_names,
    )  # fmt: skip


def _real_sets(data: TeCoAData) -> TeCoASets:
    train = _read(data.train, data.image_size)
    sets = {}
    for name, src in data.eval.items():
        part = _read(src, data.image_size)
        ids = torch.arange(len(part.labels))
        sets[name] = EvalSet(part.images, part.labels, list(part.class_names), ids)
    where = lambda s: f"{s.dataset} {s.split} split at {s.root}"  # noqa: E731
    protocol = {
        "train": where(data.train),
        "splits": {name: where(src) for name, src in data.eval.items()},
    }
    return TeCoASets(train.images, train.labels, list(train.class_names), sets, protocol)


def tecoa_sets(params: Params) -> TeCoASets:
    """The training images and evaluation splits: the embedded protocol, or ``tecoa.data``."""
    if params.tecoa.data is None:
        return _embedded_sets(params, Layout.of(params))
    sets = _real_sets(params.tecoa.data)
    gen = torch.Generator().manual_seed(params.tecoa.data_seed)
    keep = _cap(torch.arange(len(sets.labels)), params.tecoa.n_train, gen)
    splits = {}
    for name, s in sets.splits.items():
        k = _cap(torch.arange(len(s.labels)), params.tecoa.n_test, gen)
        splits[name] = EvalSet(s.images[k], s.labels[k], s.classes, s.index[k])
    return TeCoASets(sets.images[keep], sets.labels[keep], sets.classes, splits, sets.protocol)


def methods(params: Params) -> list[Method]:
    """The table's rows in order (see the module docstring)."""
    cfg = params.tecoa
    first = cfg.variants[0]
    v0 = first.family_name("zero_shot")
    rows = [Method(ZERO_SHOT, "zero_shot")]
    if cfg.clean_prompt:
        rows.append(Method(f"clean_{v0}", "clean", first))
    if cfg.no_text:
        rows.append(Method(f"no_text_{v0}", "no_text", first.model_copy(update={"head": "linear"})))
    rows += [Method(f"tecoa_{v.family_name('zero_shot')}", "tecoa", v) for v in cfg.variants]
    if cfg.finetune:
        rows.append(Method("tecoa_finetune", "finetune"))
    assert [m.name for m in rows] == cfg.method_names()
    return rows


def train_attack(params: Params) -> PGDAttack:
    cfg = params.tecoa
    return PGDAttack(
        eps=cfg.train_eps,
        steps=cfg.train_steps,
        alpha=cfg.train_alpha,
        random_start=cfg.random_start,
    )


def eval_params(params: Params) -> Params:
    """``params`` with the evaluate block replaced by the tecoa evaluation, so that the
    evaluate stage's ``evaluate_model`` (with its checks) runs it."""
    cfg = params.tecoa
    aa_on = cfg.autoattack and bool(cfg.autoattack_eps)
    evaluate = EvaluateConfig(
        batch_size=params.evaluate.batch_size,
        attack=AttackConfig(
            norm="Linf", eps=cfg.eval_eps, steps=cfg.eval_steps, alpha_factor=cfg.alpha_factor
        ),
        autoattack=AutoAttackConfig(
            enabled=aa_on,
            version=cfg.autoattack_version,
            eps=cfg.autoattack_eps or cfg.eval_eps[:1],
            n_samples=cfg.autoattack_samples,
            subset_seed=cfg.autoattack_seed,
        ),
        save_flags=False,
    )
    return params.model_copy(update={"evaluate": evaluate})


def method_train_config(params: Params, method: Method) -> TrainConfig:
    base = TrainConfig.model_validate({**params.train.model_dump(), **params.tecoa.train})
    if method.kind == "finetune":
        return TrainConfig.model_validate({**base.model_dump(), **params.tecoa.finetune_train})
    assert method.family is not None
    return method.family.train_config(base)


def prompt_file(layout: Layout, method: str, seed: int) -> Path:
    """``outputs/tecoa/prompts/<method>/seed_<seed>`` (+ ``.safetensors`` / ``.json``)."""
    return layout.outputs / "tecoa" / "prompts" / method / f"seed_{seed}"


def _build(method: Method, backbone: Backbone, classes: list[str], params: Params):
    if method.kind == "finetune":
        return finetune_classifier(backbone, classes, params.head), True
    assert method.family is not None
    return build_classifier(backbone, classes, method.family, params.head), False


def train_method(
    method: Method,
    backbone: Backbone,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    params: Params,
    *,
    seed: int,
    device: torch.device,
    run: StageRun,
) -> tuple[PromptedClassifier, dict[str, Any], bool]:
    """Train one method on one seed; returns the model to evaluate and save (zero-shot head:
    for ``no_text`` the linear head is dropped), its training summary and the finetune flag."""
    layout = Layout.of(params)
    cfg = method_train_config(params, method)
    seed_everything(seed)
    model, finetune = _build(method, backbone, classes, params)
    attack = train_attack(params)
    objective = {
        "clean": cross_entropy_objective,
        "no_text": NoTextATObjective(attack),
        "tecoa": TeCoAObjective(attack),
        "finetune": TeCoAObjective(attack),
    }[method.kind]
    summary = train_prompt(
        model,
        images,
        labels,
        cfg=cfg,
        device=device,
        seed=seed,
        amp_dtype=autocast_dtype(params.runtime.precision, device),
        checkpoint=layout.outputs / "checkpoints" / "tecoa" / method.name / f"seed_{seed}.pt",
        fingerprint={"backbone": backbone.identity, "classes": classes, "spec": model.spec},
        objective=objective,
        finetune=finetune,
        on_step=lambda step, m: run.log_metrics(
            {f"{method.name}.seed{seed}.{k}": v for k, v in m.items()}, step=step
        ),
    )
    summary["seconds_per_epoch"] = summary["seconds"] / max(
        cfg.epochs - summary["resumed_epochs"], 1
    )
    probe = slice(0, min(len(labels), cfg.batch_size))
    summary["forward_passes_per_image"] = forward_passes_per_image(
        objective, model, as_float_images(images[probe]).to(device), labels[probe].to(device)
    )
    if method.kind == "no_text":
        model = zero_shot_transfer(model, classes, params.head)
    summary["learned_values"] = model.num_trainable()
    return model.eval(), summary, finetune


def check_autoattack_not_above_pgd(row: dict[str, float], n: int, context: str) -> None:
    """Raise AutoAttackAbovePGDError if AutoAttack's robust accuracy exceeds PGD's on the same
    subset by more than two samples' worth (AutoAttack contains a stronger APGD-CE)."""
    for key, aa in row.items():
        if not key.startswith("autoattack_"):
            continue
        pgd_acc = row[key.replace("autoattack_", "pgd_subset_", 1)]
        if aa > pgd_acc + max(0.005, 2.0 / max(n, 1)):
            raise AutoAttackAbovePGDError(
                f"{context}: AutoAttack robust accuracy {aa:.4f} is above PGD's {pgd_acc:.4f} on "
                f"the same {n} samples ({key}): an attack is failing (masked gradients?)"
            )


def _summarise(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if key in r]
        mean, std = mean_std(values)
        out[key] = {"mean": mean, "std": std, "values": values}
    return out


def _eval_model(
    name: str, seed: int, backbone: Backbone, split: EvalSet, params: Params
) -> PromptedClassifier:
    if name == ZERO_SHOT:
        return classifier(backbone, split.classes, params, prompted=False)
    path = prompt_file(Layout.of(params), name, seed)
    return load_prompted_model(
        path, backbone.mean.device, backbone=backbone, class_names=split.classes
    )


def _autoattacked(params: Params, method: str, split: str) -> bool:
    chosen = params.tecoa.autoattack_methods
    return split in params.tecoa.autoattack_splits and (chosen is None or method in chosen)


def _evaluate_all(
    names: list[str],
    backbone: Backbone,
    splits: dict[str, EvalSet],
    params: Params,
    device: torch.device,
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Every saved model of every seed (re-loaded from its file) on every split."""
    ev = eval_params(params)
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    for split_name, split in splits.items():
        n_aa = min(params.tecoa.autoattack_samples, len(split.index))
        for i, seed in enumerate(params.tecoa.seeds):
            for name in names:
                model = _eval_model(name, seed, backbone, split, params)
                row, _ = evaluate_model(
                    model, split.images, split.labels, split.index, ev, device=device, seed=seed,
                    run_autoattack=i == 0 and _autoattacked(params, name, split_name),
                )  # fmt: skip
                check_autoattack_not_above_pgd(row, n_aa, f"{name} on {split_name}, seed {seed}")
                raw.setdefault(name, {}).setdefault(split_name, []).append(row)
    return raw


def _curve_rows(results: dict[str, Any], params: Params) -> list[dict[str, Any]]:
    rows = []
    for name, by_split in results.items():
        for split, metrics in by_split.items():
            for eps in [0.0, *params.tecoa.eval_eps]:
                key = "clean" if eps == 0 else f"pgd_Linf_{eps_label(eps, 'Linf')}"
                rows.append(
                    {
                        "method": name,
                        "split": split,
                        "eps": eps,
                        "robust_accuracy": metrics[key]["mean"],
                        "std": metrics[key]["std"],
                    }
                )
    return rows


def _table(results: dict[str, Any], columns: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name, by_split in results.items():
        for split, metrics in by_split.items():
            row: dict[str, Any] = {"method": name, "split": split}
            for col in columns:
                if col in metrics:
                    row[col] = round(metrics[col]["mean"], 4)
                    row[f"{col}_std"] = round(metrics[col]["std"], 4)
            rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| method | split | " + " | ".join(columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 2)]
    for r in rows:
        cells = [
            f"{100 * r[c]:.1f} ± {100 * r[c + '_std']:.1f}" if c in r else "-" for c in columns
        ]
        lines.append(f"| {r['method']} | {r['split']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _train_all(
    rows: list[Method],
    backbone: Backbone,
    sets: TeCoASets,
    params: Params,
    device: torch.device,
    run: StageRun,
) -> dict[str, Any]:
    layout = Layout.of(params)
    training: dict[str, Any] = {}
    wall: dict[str, float] = {}
    for method in rows:
        if method.kind == "zero_shot":
            continue
        per_seed = {}
        for seed in params.tecoa.seeds:
            model, summary, finetune = train_method(
                method, backbone, sets.images, sets.labels, sets.classes, params,
                seed=seed, device=device, run=run,
            )  # fmt: skip
            path = prompt_file(layout, method.name, seed)
            extra = {
                "family": method.name,
                "method": method.kind,
                "seed": seed,
                "train": method_train_config(params, method).model_dump(),
                "train_attack": None if method.kind == "clean" else train_attack(params).identity,
                "summary": saved_summary(summary),
            }
            if method.kind == "no_text":
                extra["note"] = "trained with a linear head (one-hot CE), saved without it"
            save_prompted_model(path, model, extra=extra, finetune=finetune)
            for suffix in (".safetensors", ".json"):
                run.log_artifact(path.with_suffix(suffix), f"tecoa/prompts/{method.name}")
            per_seed[str(seed)] = summary
        first = next(iter(per_seed.values()))
        training[method.name] = {
            "forward_passes_per_image": first["forward_passes_per_image"],
            "train_acc": _summarise([{"a": s["train_acc"]} for s in per_seed.values()])["a"],
            "learned_values": first["learned_values"],
            "finetune": method.kind == "finetune",
        }
        wall[method.name] = mean_std([s["seconds_per_epoch"] for s in per_seed.values()])[0]
    clean = next((k for k in training if k.startswith("clean_")), None)
    for name, entry in training.items():
        entry["cost_vs_clean_prompt"] = (
            entry["forward_passes_per_image"] / training[clean]["forward_passes_per_image"]
            if clean
            else None
        )
        run.log_metrics(  # wall time: MLflow only, dvc outs are functions of the inputs
            {
                f"training.{name}.seconds_per_epoch": wall[name],
                **(
                    {f"training.{name}.wall_vs_clean_prompt": wall[name] / wall[clean]}
                    if clean
                    else {}
                ),
            }
        )
    return training


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    device = setup_runtime(params)
    backbone = backbone_for(params, device)  # seconds; a real data set can take minutes
    sets = tecoa_sets(params)
    rows = methods(params)
    run.log_params(
        {"tecoa": params.tecoa.model_dump(mode="json"), "head": params.head.model_dump()}
    )
    training = _train_all(rows, backbone, sets, params, device, run)
    raw = _evaluate_all([m.name for m in rows], backbone, sets.splits, params, device)
    results = {m: {s: _summarise(r) for s, r in by.items()} for m, by in raw.items()}
    columns = metric_names(eval_params(params))
    table = _table(results, columns)
    curve = _curve_rows(results, params)
    plot = layout.metrics / "tecoa_curve.csv"
    plot.parent.mkdir(parents=True, exist_ok=True)
    with plot.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(curve[0]))
        writer.writeheader()
        writer.writerows(curve)
    for name, by_split in results.items():
        run.log_metrics(
            {f"{name}.{s}.{k}.mean": v["mean"] for s, m in by_split.items() for k, v in m.items()}
        )
    run.log_table(table, "tecoa_table.json")
    run.log_table(curve, "tecoa_eps_curve.json")
    run.log_text(_markdown(table, columns), "tecoa_table.md")
    run.log_artifact(plot)
    out = {
        "protocol": {
            **sets.protocol,
            "sizes": {
                "train": len(sets.labels),
                **{k: len(v.index) for k, v in sets.splits.items()},
            },
        },
        "methods": [m.name for m in rows],
        "metrics": columns,
        "seeds": list(params.tecoa.seeds),
        "train_attack": train_attack(params).identity,
        "eval_attack": eval_params(params).evaluate.model_dump(),
        "checks": [
            "robust <= clean per sample",
            "no masked or stochastic gradients",
            "robust falls with eps",
            "autoattack <= pgd on the same subset",
        ],
        "training": training,
        "results": results,
    }
    write_json(layout.metrics_file("tecoa"), out)
    return out
