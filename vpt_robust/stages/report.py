"""report: the headline table (clean and robust accuracy, mean +/- std over seeds) and a plot."""

from __future__ import annotations

import json
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
    aa = evaluation["autoattack"]
    aa_note = (
        f"@subset columns: AutoAttack ({aa['version']}"
        f"{', fast torchattacks mode' if aa['fast'] else ''}) and, beside it, PGD on the same "
        f"fixed subset of {aa['n_samples']} samples of the {'/'.join(aa['splits'])} classes, "
        "first seed only (compare AutoAttack with that PGD column, not with PGD on all samples)."
        if aa["enabled"]
        else "AutoAttack disabled."
    )
    zs = pretrain["zero_shot"]
    text = "\n".join(
        [
            "# vpt-robust report",
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
    out_dir = layout.outputs / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    fig = _plot(evaluation, out_dir / "robustness.png")
    run.log_text(text, "report.md")
    run.log_figure(fig, "robustness.png")
    summary = {
        "table": table,
        "zero_shot": zs,
        "stream_mean_error": {m: r["mean_error"] for m, r in stream["results"].items()},
    }
    write_json(layout.metrics_file("report"), summary)
    return summary
