"""stream_eval: the source models (zero-shot and each learned prompt, no adaptation) on a
corruption stream of the target style's test images; error per corruption in stream order."""

from __future__ import annotations

import csv
from collections import defaultdict
from typing import Any

import torch

from vpt_robust.config import Params
from vpt_robust.corruptions import CorruptionStream
from vpt_robust.corruptions.streams import GeneratedSource
from vpt_robust.data.embedded import load_embedded
from vpt_robust.metrics import as_float_images, mean_std
from vpt_robust.stages.build import backbone_for
from vpt_robust.stages.common import Layout, eval_split, load_splits, setup_runtime, write_json
from vpt_robust.stages.evaluate import evaluation_models
from vpt_robust.tracking import StageRun
from vpt_robust.utils import progress


def build_stream(
    params: Params, images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> CorruptionStream:
    cfg = params.stream
    kwargs: dict[str, Any] = {}
    if cfg.corruptions:
        kwargs["corruptions"] = cfg.corruptions
    return CorruptionStream(
        GeneratedSource(as_float_images(images), labels, device=device),
        cfg.protocol,
        severity=cfg.severity,
        n_per_segment=cfg.n_per_segment,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        n_orders=cfg.n_orders,
        **kwargs,
    )


@torch.no_grad()
def stream_errors(
    stream: CorruptionStream, models: dict[str, torch.nn.Module]
) -> dict[str, list[dict[str, Any]]]:
    """Per model, one row per (run, segment, corruption, severity) in stream order: error, n."""
    counts: dict[str, dict[tuple, list[int]]] = {m: defaultdict(lambda: [0, 0]) for m in models}
    order: list[tuple] = []
    for model in models.values():
        model.eval()
    for batch in progress(stream, desc="corruption stream", total=len(stream)):
        names = batch.corruptions or (batch.corruption,) * len(batch.labels)
        keys = [(batch.run, batch.segment, c, batch.severity) for c in names]
        for key in dict.fromkeys(keys):
            if key not in counts[next(iter(models))]:
                order.append(key)
        for name, model in models.items():
            wrong = (model(batch.images).argmax(-1) != batch.labels).cpu().tolist()
            for key, w in zip(keys, wrong, strict=True):
                counts[name][key][0] += int(w)
                counts[name][key][1] += 1
    seen = list(dict.fromkeys(order))
    return {
        name: [
            {
                "run": k[0],
                "segment": k[1],
                "corruption": k[2],
                "severity": k[3],
                "error": c[k][0] / c[k][1],
                "n": c[k][1],
            }
            for k in seen
        ]
        for name, c in counts.items()
    }


def _figure(rows_by_model: dict[str, list[dict[str, Any]]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, rows in rows_by_model.items():
        ax.plot(range(len(rows)), [100 * r["error"] for r in rows], marker=".", label=name)
    first = next(iter(rows_by_model.values()))
    ax.set_xticks(range(len(first)))
    ax.set_xticklabels(
        [f"{r['corruption']}:{r['severity']}" for r in first], rotation=80, fontsize=6
    )
    ax.set_ylabel("error (%)")
    ax.set_title("source models on the corruption stream")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    device = setup_runtime(params)
    data = load_embedded(layout.data)
    splits = load_splits(layout)
    backbone = backbone_for(params, device)
    split, classes, offset = eval_split(params, list(data.class_names), params.stream.split)
    idx = splits[split]
    stream = build_stream(params, data.images[idx], data.labels[idx] - offset, device)
    description = stream.describe()
    run.log_params({"stream": params.stream.model_dump()})
    run.log_dict(description, "stream.json")
    per_seed: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    for seed in params.train.seeds:
        models = evaluation_models(
            backbone, classes, params, seed, novel=params.stream.split == "test_novel"
        )
        for name, rows in stream_errors(stream, models).items():
            per_seed[name].append(rows)
    results: dict[str, Any] = {}
    curve_rows = []
    for name, runs in per_seed.items():
        table = []
        for i, row in enumerate(runs[0]):
            errors = [r[i]["error"] for r in runs]
            mean, std = mean_std(errors)
            table.append({**row, "error": mean, "error_std": std, "errors": errors})
            curve_rows.append(
                {
                    "model": name,
                    "position": i,
                    "domain": f"{row['corruption']}:{row['severity']}",
                    "error": mean,
                }
            )
        overall = [sum(r["error"] for r in rows) / len(rows) for rows in runs]
        m, s = mean_std(overall)
        results[name] = {"mean_error": {"mean": m, "std": s, "values": overall}, "stream": table}
        run.log_metrics({f"{name}.mean_error": m})
        run.log_table(table, f"stream_{name}.json")
    plot = layout.metrics / "stream_curve.csv"
    plot.parent.mkdir(parents=True, exist_ok=True)
    with plot.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["model", "position", "domain", "error"])
        writer.writeheader()
        writer.writerows(curve_rows)
    run.log_artifact(plot)
    run.log_figure(_figure({n: r["stream"] for n, r in results.items()}), "stream_error.png")
    out = {"stream": description, "seeds": params.train.seeds, "results": results}
    write_json(layout.metrics_file("stream_eval"), out)
    return out
