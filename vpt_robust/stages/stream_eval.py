"""stream_eval: the source models (zero-shot and each learned prompt, no adaptation) on a
corruption stream of the target style's test images; error per corruption in stream order."""

from __future__ import annotations

import csv
from collections import defaultdict
from typing import Any

import torch

from vpt_robust.config import AdaptConfig, Params, StreamConfig
from vpt_robust.corruptions import CORRUPTIONS, CorruptionStream
from vpt_robust.corruptions.streams import CorruptionSource, GeneratedSource
from vpt_robust.data.embedded import load_embedded
from vpt_robust.metrics import as_float_images, mean_std
from vpt_robust.stages.build import backbone_for
from vpt_robust.stages.common import Layout, eval_split, load_splits, setup_runtime, write_json
from vpt_robust.stages.evaluate import evaluation_models
from vpt_robust.tracking import StageRun
from vpt_robust.utils import progress


def make_stream(
    source: CorruptionSource,
    settings: StreamConfig | AdaptConfig,
    *,
    protocol: str,
    seed: int,
) -> CorruptionStream:
    """The stream of ``protocol`` and ``seed`` over ``source`` with the shape settings of a
    ``stream`` or ``adapt`` block (severity, corruptions, n_per_segment, batch size, shuffle,
    n_orders, dirichlet): the one builder of stream_eval and stream_adapt."""
    kwargs: dict[str, Any] = {}
    if settings.corruptions:
        kwargs["corruptions"] = settings.corruptions
    return CorruptionStream(
        source,
        protocol,
        severity=settings.severity,
        n_per_segment=settings.n_per_segment,
        batch_size=settings.batch_size,
        seed=seed,
        shuffle=settings.shuffle,
        n_orders=settings.n_orders,
        dirichlet=settings.dirichlet,
        **kwargs,
    )


def build_stream(
    params: Params, images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> CorruptionStream:
    cfg = params.stream
    source = GeneratedSource(as_float_images(images), labels, device=device)
    return make_stream(source, cfg, protocol=cfg.protocol, seed=cfg.seed)


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


def _domain_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (corruption, severity), in order of first appearance, its error pooled
    over the stream's rows of that domain (weighted by their sample counts)."""
    pooled: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        acc = pooled.setdefault((r["corruption"], r["severity"]), [0.0, 0])
        acc[0] += r["error"] * r["n"]
        acc[1] += r["n"]
    return [
        {"corruption": c, "severity": s, "error": w / n, "n": n}
        for (c, s), (w, n) in pooled.items()
    ]


def _standard_order(row: dict[str, Any]) -> tuple[int, str, int]:
    c = row["corruption"]
    return (CORRUPTIONS.index(c) if c in CORRUPTIONS else len(CORRUPTIONS), c, row["severity"])


def aggregate_stream(
    per_seed: dict[str, list[list[dict[str, Any]]]], *, by_domain: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per model, its seeds' per-segment errors (`stream_errors` rows, one list per seed, all
    in the same stream order) -> (results, curve rows).

    results[model] = {"stream": per position the row with `error` = mean over seeds,
    `error_std` and `errors` (one per seed); "mean_error": mean/std/values over seeds of each
    seed's mean error over the stream}; curve rows = (model, position, domain, mean error).
    Seeds whose streams differ (order, corruption, severity) are an error, not averaged; with
    ``by_domain`` (protocols whose order is drawn per seed: mixed, random orders) the table
    has one row per domain instead, pooled within each seed, and the domains must agree."""
    results: dict[str, Any] = {}
    curve_rows = []
    for name, runs in per_seed.items():
        if not runs or not runs[0]:
            raise ValueError(f"per_seed[{name!r}]: no stream rows to aggregate")
        overall = [sum(r["error"] for r in rows) / len(rows) for rows in runs]
        if by_domain:
            runs = [sorted(_domain_rows(rows), key=_standard_order) for rows in runs]
        key = (
            ("corruption", "severity")
            if by_domain
            else ("run", "segment", "corruption", "severity")
        )
        domain = [tuple(r[k] for k in key) for r in runs[0]]
        for k, rows in enumerate(runs[1:], start=1):
            if [tuple(r[k_] for k_ in key) for r in rows] != domain:
                what = (
                    "domains differ from seed 0's; per-domain means need the same domains"
                    if by_domain
                    else "stream order differs from seed 0's; per-position means need the "
                    "same stream for every seed"
                )
                raise ValueError(f"per_seed[{name!r}][{k}]: its {what}")
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
        m, s = mean_std(overall)
        results[name] = {"mean_error": {"mean": m, "std": s, "values": overall}, "stream": table}
    return results, curve_rows


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
    results, curve_rows = aggregate_stream(per_seed)
    for name, res in results.items():
        run.log_metrics({f"{name}.mean_error": res["mean_error"]["mean"]})
        run.log_table(res["stream"], f"stream_{name}.json")
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
