"""report: the headline table (clean and robust accuracy, mean +/- std over seeds) and a plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpt_robust.config import Params
from vpt_robust.stages.build import families, family_name
from vpt_robust.stages.common import Layout, write_json
from vpt_robust.stages.evaluate import eps_label
from vpt_robust.tracking import StageRun


def _read(layout: Layout, stage: str) -> dict[str, Any]:
    path = layout.metrics_file(stage)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the {stage} stage first")
    return json.loads(path.read_text())


def _pct(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def pgd_keys(attack: dict[str, Any]) -> list[str]:
    """Clean, then PGD at each eps in the order the params list them."""
    return ["clean"] + [
        f"pgd_{attack['norm']}_{eps_label(e, attack['norm'])}" for e in attack["eps"]
    ]


def column_title(key: str, evaluation: dict[str, Any]) -> str:
    """A metric key as a reader sees it: `pgd_Linf_4/255` -> `PGD-10 4/255`; AutoAttack and
    PGD on AutoAttack's subset carry `@subset`, so no one compares them with PGD on all."""
    if key == "clean":
        return "clean"
    steps = evaluation.get("attack", {}).get("steps")
    pgd = f"PGD-{steps}" if steps else "PGD"
    for prefix, title in (
        ("pgd_subset_", f"{pgd}@subset"),
        ("autoattack_", "AutoAttack@subset"),
        ("pgd_", pgd),
    ):
        if key.startswith(prefix):
            norm, _, eps = key[len(prefix) :].partition("_")
            return f"{title} {eps}" if norm == "Linf" else f"{title} {norm} {eps}"
    return key


def headline_table(evaluation: dict[str, Any]) -> str:
    """Markdown: one row per (model, class split), one column per metric; AutoAttack's columns
    come in pairs, PGD and AutoAttack on the same subset side by side."""
    results = evaluation["results"]
    columns = evaluation["metrics"]
    titles = [column_title(c, evaluation) for c in columns]
    lines = [
        "| model | classes | " + " | ".join(titles) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for model, by_split in results.items():
        for split, metrics in by_split.items():
            cells = " | ".join(_pct(metrics[c]) if c in metrics else "–" for c in columns)
            lines.append(f"| {model} | {split} | {cells} |")
    return "\n".join(lines)


def stream_table(stream: dict[str, Any]) -> str:
    """Markdown: one row per stream position (the corruption's full name and severity), one
    column per model with its error (%), then the mean over the stream (mean ± std over seeds)."""
    results = stream["results"]
    models = list(results)
    first = results[models[0]]["stream"]
    lines = [
        "| # | domain | severity | " + " | ".join(models) + " |",
        "| ---: | --- | ---: | " + " | ".join("---:" for _ in models) + " |",
    ]
    for i, row in enumerate(first):
        cells = " | ".join(f"{100 * results[m]['stream'][i]['error']:.1f}" for m in models)
        lines.append(f"| {i + 1} | {row['corruption']} | {row['severity']} | {cells} |")
    means = " | ".join(_pct(results[m]["mean_error"]) for m in models)
    lines.append(f"| | **mean** | | {means} |")
    return "\n".join(lines)


def tecoa_table(tecoa: dict[str, Any]) -> str:
    """Markdown: one row per (method, split) of the zero-shot robustness protocol."""
    columns = tecoa["metrics"]
    titles = [
        column_title(c, {"attack": tecoa.get("eval_attack", {}).get("attack", {})}) for c in columns
    ]
    lines = [
        "| method | split | " + " | ".join(titles) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for method, by_split in tecoa["results"].items():
        for split, metrics in by_split.items():
            cells = [_pct(metrics[c]) if c in metrics else "" for c in columns]
            lines.append(f"| {method} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _attack_text(attack: dict[str, Any]) -> str:
    """``{eps, steps, norm, ...}`` -> ``PGD-2 Linf eps 4/255``."""
    norm = attack.get("norm", "Linf")
    return f"PGD-{attack.get('steps')} {norm} eps {eps_label(float(attack.get('eps', 0)), norm)}"


def adapt_table(adapt: dict[str, Any]) -> str:
    """Markdown: one row per test-time adaptation method on the default protocol: mean error,
    error over the last third of the stream, and cost relative to the source model."""
    lines = [
        "| method | mean error | late error (last third) | cost vs source |",
        "| --- | ---: | ---: | ---: |",
    ]
    for method, res in adapt["results"].items():
        cost = res.get("cost", {}).get("ratio_to_source")
        cost_text = f"{cost:.1f}x" if isinstance(cost, int | float) else ""
        lines.append(
            f"| {method} | {_pct(res['mean_error'])} | {_pct(res['late_error'])} | {cost_text} |"
        )
    return "\n".join(lines)


CONTINUAL_METRICS = (
    "average_accuracy",
    "forgetting",
    "robust_average_accuracy",
    "robust_forgetting",
)


def continual_table(continual: dict[str, Any]) -> str:
    """Markdown: one row per continual-learning method, the four sequence metrics (%)."""
    lines = [
        "| method | " + " | ".join(m.replace("_", " ") for m in CONTINUAL_METRICS) + " |",
        "| --- | " + " | ".join("---:" for _ in CONTINUAL_METRICS) + " |",
    ]
    for method, metrics in continual["results"].items():
        cells = [_pct(metrics[m]) for m in CONTINUAL_METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PROTOCOL_EXTRA = ("stream_mean_error", "continual_average_accuracy", "continual_forgetting")


def sortable_key(key: str) -> str:
    """A metric key whose eps sorts by size in MLflow's views: ``pgd_Linf_4/255`` ->
    ``pgd_Linf_004-255`` (no slash, zero-padded numerator); other keys unchanged."""
    head, sep, tail = key.rpartition("_")
    num, slash, den = tail.partition("/")
    if sep and slash and num.isdigit():
        return f"{head}_{int(num):03d}-{den}"
    return key


def protocol_rows(
    evaluation: dict[str, Any],
    stream: dict[str, Any],
    adapt: dict[str, Any],
    tecoa: dict[str, Any],
    continual: dict[str, Any],
) -> list[dict[str, Any]]:
    """The one protocol table: a row per method (evaluate's models on the base classes, TeCoA's
    methods, the test-time adaptation methods, the continual methods), with clean, PGD per eps,
    AutoAttack, stream mean error, continual average accuracy and forgetting, as % (mean over
    seeds; None where a stage does not measure that method). Column names are sortable keys."""
    columns = [sortable_key(c) for c in evaluation["metrics"]]
    rows: dict[str, dict[str, Any]] = {}

    def row(method: str, stage: str) -> dict[str, Any]:
        return rows.setdefault(
            method,
            {"method": method, "stage": stage, **dict.fromkeys(columns + list(PROTOCOL_EXTRA))},
        )

    def pct(stats: dict[str, Any]) -> float:
        return round(100 * float(stats["mean"]), 2)

    for model, by_split in evaluation["results"].items():
        for key, stats in by_split.get("base", {}).items():
            row(model, "evaluate")[sortable_key(key)] = pct(stats)
    for model, res in stream["results"].items():
        row(model, "evaluate")["stream_mean_error"] = pct(res["mean_error"])
    for method, by_split in tecoa["results"].items():
        target = row(f"tecoa/{method}", "tecoa")
        for key, stats in by_split.get("base", next(iter(by_split.values()), {})).items():
            if sortable_key(key) in target:
                target[sortable_key(key)] = pct(stats)
    for method, res in adapt["results"].items():
        row(f"tta/{method}", "stream_adapt")["stream_mean_error"] = pct(res["mean_error"])
    for method, res in continual["results"].items():
        target = row(f"continual/{method}", "continual")
        target["continual_average_accuracy"] = pct(res["average_accuracy"])
        target["continual_forgetting"] = pct(res["forgetting"])
    return list(rows.values())


PROTOCOL_HEADINGS = {
    "stream_mean_error": "stream error",
    "continual_average_accuracy": "continual avg acc",
    "continual_forgetting": "forgetting",
}


def protocol_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The protocol table as markdown: a row per method, % values, ``-`` where a stage does
    not measure that method (e.g. AutoAttack for a test-time adaptation method)."""
    columns = [k for k in rows[0] if k not in ("method", "stage")]
    heads = [PROTOCOL_HEADINGS.get(c, c) for c in columns]
    lines = [
        "| method | stage | " + " | ".join(heads) + " |",
        "|" + " --- |" * (len(columns) + 2),
    ]
    for r in rows:
        cells = ["-" if r[c] is None else f"{r[c]:.1f}" for c in columns]
        lines.append(f"| {r['method']} | {r['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stream_figure(stream: dict[str, Any], adapt: dict[str, Any]) -> Any:
    """Error (%) per stream position, one line per method: the source models (stream_eval)
    and each test-time adaptation method (stream_adapt), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, data, title in (
        (axes[0], stream, "source models (stream_eval)"),
        (axes[1], adapt, "test-time adaptation (stream_adapt)"),
    ):
        for name, res in data["results"].items():
            rows = res["stream"]
            ax.plot(range(len(rows)), [100 * r["error"] for r in rows], marker=".", label=name)
        first = next(iter(data["results"].values()))["stream"]
        ax.set_xticks(range(len(first)))
        ax.set_xticklabels(
            [f"{r['corruption']}:{r['severity']}" for r in first], rotation=80, fontsize=6
        )
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("error (%)")
    fig.tight_layout()
    return fig


def _heatmaps(continual: dict[str, Any]) -> Any:
    """Per continual method, its accuracy matrix (task evaluated x after training task,
    mean over seeds) as a heatmap with the values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrices = continual["matrices"]
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.2), squeeze=False)
    for ax, (method, m) in zip(axes[0], matrices.items(), strict=True):
        acc = np.array(m["accuracy"], dtype=float)  # seeds x tasks x tasks, NaN = not yet seen
        seen = np.isfinite(acc).any(axis=0)  # cells some seed measured (no empty-slice means)
        mean = np.full(acc.shape[1:], np.nan)
        mean[seen] = 100 * np.nanmean(acc[:, seen], axis=0)
        ax.imshow(mean, vmin=0, vmax=100, cmap="viridis")
        for (j, t), v in np.ndenumerate(mean):
            if np.isfinite(v):
                ax.text(t, j, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("after training task")
        ax.set_ylabel("task evaluated")
    fig.suptitle("continual: accuracy (%) matrix", fontsize=9)
    fig.tight_layout()
    return fig


def pixel_prompt_images(params: Params) -> dict[str, Any]:
    """Each learned pixel prompt (first seed) rendered as an image: the prompt applied to a
    zero image (what it adds, in the space it adds in), min-max scaled to [0, 1], as an
    (H, W, 3) float array; families without a pixel prompt or not trained are left out."""
    import numpy as np
    import torch

    from vpt_robust.prompts.io import load_prompt_state
    from vpt_robust.prompts.registry import build_prompt, prompt_place
    from vpt_robust.stages.build import prompt_path

    layout = Layout.of(params)
    images: dict[str, Any] = {}
    for family in families(params):
        name = family_name(params, family)
        path = prompt_path(layout, name, params.train.seeds[0])
        pixel = [(k, a) for k, a in family.parts() if prompt_place(k) == "pixel"]
        if not pixel or not path.with_suffix(".safetensors").is_file():
            continue
        tensors, meta = load_prompt_state(path)
        kind, args = pixel[0]
        size = int(meta["image_size"])
        module = build_prompt(kind, args, size)
        state = {
            k[len("pixel_prompt.") :]: v
            for k, v in tensors.items()
            if k.startswith("pixel_prompt.")
        }
        module.load_state_dict(state)
        with torch.no_grad():
            out = module(torch.zeros(1, 3, size, size))[0].permute(1, 2, 0).float().numpy()
        lo, hi = float(out.min()), float(out.max())
        images[name] = np.clip((out - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return images


def log_browsable(
    run: StageRun,
    params: Params,
    backbone: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
) -> None:
    """What a reader of the MLflow UI sees in the report run without opening a file: tags to
    filter by backbone and method, the protocol table (an MLflow table) and its values as
    metrics ``<method>.<column>``, the eps curves, stream error curves per method, the
    continual accuracy-matrix heatmaps and the learned pixel prompts as images. ``rows``: the
    protocol table (``protocol_rows``)."""
    methods = [r["method"] for r in rows]
    run.set_tags(
        {
            "backbone": str(backbone.get("name")),
            "backbone_source": str(backbone.get("source")),
            "methods": ",".join(methods),
            "families": ",".join(family_name(params, f) for f in families(params)),
            **{f"method.{m}": "true" for m in methods},
        }
    )
    run.log_table(rows, "protocol_table.json")
    run.log_metrics(
        {
            f"{r['method']}.{k}": v
            for r in rows
            for k, v in r.items()
            if k not in ("method", "stage") and v is not None
        }
    )
    run.log_figure(
        _stream_figure(stages["stream_eval"], stages["stream_adapt"]), "stream_error_curves.png"
    )
    run.log_figure(_heatmaps(stages["continual"]), "continual_accuracy_matrices.png")
    for name, image in pixel_prompt_images(params).items():
        run.log_image(image, f"prompt_{name}.png")


def _plot(evaluation: dict[str, Any], path: Path) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attack = evaluation["attack"]
    eps = [0.0, *attack["eps"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for model, by_split in evaluation["results"].items():
        for split, metrics in by_split.items():
            keys = pgd_keys(attack)
            ys = [100 * metrics[k]["mean"] for k in keys]
            errs = [100 * metrics[k]["std"] for k in keys]
            ax.errorbar(
                [e * 255 for e in eps], ys, yerr=errs, marker="o", label=f"{model} / {split}"
            )
    ax.set_xlabel(f"eps ({attack['norm']}, x 1/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"PGD-{attack['steps']} robust accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    prepare = _read(layout, "prepare")
    pretrain = _read(layout, "pretrain")
    evaluation = _read(layout, "evaluate")
    stream = _read(layout, "stream_eval")
    adapt = _read(layout, "stream_adapt")
    tecoa = _read(layout, "tecoa")
    continual = _read(layout, "continual")
    table = headline_table(evaluation)
    zs = pretrain["zero_shot"]
    rows = protocol_rows(evaluation, stream, adapt, tecoa, continual)
    protocol = protocol_markdown(rows)
    stages = {"prepare": prepare, "pretrain": pretrain, "evaluate": evaluation}
    stages.update(stream_eval=stream, stream_adapt=adapt, tecoa=tecoa, continual=continual)
    text = _report_markdown(params, stages, table, protocol)
    out_dir = layout.outputs / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    (out_dir / "protocol_table.md").write_text(protocol + "\n")
    fig = _plot(evaluation, out_dir / "robustness.png")
    run.log_text(text, "report.md")
    run.log_figure(fig, "robustness.png")
    browsed = {k: v for k, v in stages.items() if k not in ("prepare", "pretrain")}
    log_browsable(run, params, pretrain["backbone"], browsed, rows)
    summary = {
        "table": table,
        "zero_shot": zs,
        "stream_mean_error": {m: r["mean_error"] for m, r in stream["results"].items()},
    }
    write_json(layout.metrics_file("report"), summary)
    return summary


def _autoattack_note(aa: dict[str, Any]) -> str:
    """What the @subset columns of the headline table are."""
    if not aa["enabled"]:
        return "AutoAttack disabled."
    return (
        f"@subset columns: AutoAttack ({aa['version']}"
        f"{', fast torchattacks mode' if aa['fast'] else ''}) and, beside it, PGD on the same "
        f"fixed subset of {aa['n_samples']} samples of the {'/'.join(aa['splits'])} classes, "
        f"{'models ' + ', '.join(aa['models']) + ', ' if aa.get('models') else ''}"
        "first seed only (compare AutoAttack with that PGD column, not with PGD on all samples)."
    )


def _report_markdown(
    params: Params, stages: dict[str, dict[str, Any]], table: str, protocol: str
) -> str:
    """report.md: the protocol table, then each stage's own table with what it measured."""
    prepare, pretrain, evaluation = stages["prepare"], stages["pretrain"], stages["evaluate"]
    stream, adapt, tecoa = stages["stream_eval"], stages["stream_adapt"], stages["tecoa"]
    continual = stages["continual"]
    zs = pretrain["zero_shot"]
    aa_note = _autoattack_note(evaluation["autoattack"])
    return "\n".join(
        [
            "# vpt-robust report",
            "",
            "The protocol table: every method of every stage, % (mean over seeds; evaluate's "
            "and TeCoA's accuracies on the base classes, stream error on the corruption stream, "
            "continual average accuracy and forgetting); `-`: not measured by that stage.",
            "",
            protocol,
            "",
            f"Backbone: {pretrain['backbone'].get('name')} ({pretrain['backbone'].get('source')}); "
            f"prompts: {', '.join(family_name(params, f) for f in families(params))}; seeds: {evaluation['seeds']}; "
            f"target style: {prepare['target_style']}.",
            "",
            f"Zero-shot accuracy of the frozen backbone: {100 * zs['pretrain_test']:.1f}% on "
            f"pretraining styles, {100 * zs['test_base']:.1f}% (base classes) and "
            f"{100 * zs['test_novel']:.1f}% (novel classes) on the target style.",
            "",
            "Accuracy (%) on the target style, mean ± std over seeds:",
            "",
            table,
            "",
            aa_note,
            "",
            f"Corruption stream ({stream['stream']['protocol']}, source models, no adaptation): "
            "error (%) per domain in stream order (mean over seeds), and the mean over the "
            "stream (mean ± std over seeds):",
            "",
            stream_table(stream),
            "",
            f"Test-time adaptation on the corruption stream ({adapt['protocol']}, pretraining "
            f"styles, every method on the same stream), error (%), mean ± std over seeds "
            f"{adapt['seeds']}:",
            "",
            adapt_table(adapt),
            "",
            f"Zero-shot adversarial robustness (TeCoA; trained on the base classes in the "
            f"pretraining styles, train attack {_attack_text(tecoa['train_attack'])}), accuracy (%), mean ± std over "
            f"seeds {tecoa['seeds']}:",
            "",
            tecoa_table(tecoa),
            "",
            f"Class-incremental continual learning ({len(continual['sequence']['tasks'])} tasks, "
            f"no task id at test), fractions as %, mean ± std over seeds {continual['seeds']}:",
            "",
            continual_table(continual),
            "",
        ]
    )
