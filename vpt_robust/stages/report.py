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


def headline_table(evaluation: dict[str, Any]) -> str:
    """Markdown: one row per (model, class split), one column per metric."""
    results = evaluation["results"]
    columns = evaluation["metrics"]
    lines = [
        "| model | classes | " + " | ".join(columns) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for model, by_split in results.items():
        for split, metrics in by_split.items():
            cells = " | ".join(_pct(metrics[c]) if c in metrics else "–" for c in columns)
            lines.append(f"| {model} | {split} | {cells} |")
    return "\n".join(lines)


def stream_table(stream: dict[str, Any]) -> str:
    """Markdown: one row per model, error (%) per stream position, then the mean."""
    results = stream["results"]
    first = next(iter(results.values()))["stream"]
    heads = [f"{r['corruption'][:8]}:{r['severity']}" for r in first]
    lines = [
        "| model | " + " | ".join(heads) + " | mean |",
        "| --- | " + " | ".join("---:" for _ in heads) + " | ---: |",
    ]
    for model, res in results.items():
        cells = " | ".join(f"{100 * r['error']:.1f}" for r in res["stream"])
        lines.append(f"| {model} | {cells} | {_pct(res['mean_error'])} |")
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
    table = headline_table(evaluation)
    aa = evaluation["autoattack"]
    aa_note = (
        f"AutoAttack ({aa['version']}{', fast torchattacks mode' if aa['fast'] else ''}) ran on a "
        f"fixed subset of {aa['n_samples']} samples of the {'/'.join(aa['splits'])} "
        "classes, for the first seed only."
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
            "error (%) per domain in stream order, mean ± std over seeds:",
            "",
            stream_table(stream),
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
