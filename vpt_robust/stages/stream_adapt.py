"""stream_adapt: continual test-time adaptation on corruption streams, every method on the same
stream objects.

Per protocol of ``adapt.protocols`` and per seed of ``adapt.seeds`` one ``CorruptionStream`` is
built (``stream_eval.make_stream``) over the ``adapt.split`` images (default ``pretrain_test``:
the pretraining styles, where the source model is good) or over CIFAR-10-C files; every method of
``adapt.methods`` (``vpt_robust.methods.tta`` adapters) runs over that very object through
``run_stream``, and the stage checks that each saw the same batches (a digest of indices, labels
and images). The source model is the frozen backbone's zero-shot classifier over the split's
classes (``head.templates``), or the backbone itself when it is a plain classifier (a robustbench
model); TPT gets a CoOp-context head initialised from the first template's text, untrained, so
that before tuning it predicts as the zero-shot head.

``metrics/stream_adapt.json``: ``results.<method>`` (the first protocol) with ``mean_error`` and
``late_error`` (the last third of the stream) as ``{mean, std, values}`` over seeds, ``stream``
(error per domain in stream order, mean/std/per seed) and ``cost`` (model passes per image, a
plain forward = 1.0, deterministic); ``protocols.<protocol>`` the same per protocol; with
``adapt.attack.enabled`` ``adversarial.<method>``: error on the attacked segments and clean error
after them, against the same segments' error on the clean stream. No wall-clock time is in the
file (seconds per batch go to MLflow only), so it is a function of the inputs.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpt_robust.config import AdaptMethodConfig, Params, PromptConfig
from vpt_robust.corruptions import CorruptionStream
from vpt_robust.corruptions.streams import CorruptionSource, GeneratedSource, StreamBatch
from vpt_robust.data.embedded import load_embedded
from vpt_robust.methods.stream_runner import StreamAttack, StreamResult, run_stream
from vpt_robust.methods.tta import ADAPTERS, build_adapter
from vpt_robust.metrics import as_float_images, mean_std
from vpt_robust.models import Backbone
from vpt_robust.models.classifier import build_classifier
from vpt_robust.stages.build import backbone_for, classifier
from vpt_robust.stages.common import Layout, eval_split, load_splits, setup_runtime, write_json
from vpt_robust.stages.stream_eval import _figure, aggregate_stream, make_stream
from vpt_robust.tracking import StageRun
from vpt_robust.utils import progress_bar

CURVE_FIELDS = ["model", "position", "domain", "error"]


# --------------------------------------------------------------------------- inputs


def base_indices(params: Params, split: torch.Tensor) -> torch.Tensor:
    """The split's samples the streams use: all of them, or with ``n_per_segment`` a random
    subset of that size (seeded by ``data.seed``, the same for every stream seed), in the
    split's order. The splits are stored style by style and class by class, and a stream takes
    the first ``n_per_segment`` base samples: without the subset a short stream would hold a
    few classes of one style."""
    n = params.adapt.n_per_segment
    if n is None or n >= len(split):
        return split
    gen = torch.Generator().manual_seed(params.data.seed)
    return split[torch.randperm(len(split), generator=gen)[:n]].sort().values


def stream_source(
    params: Params, device: torch.device
) -> tuple[CorruptionSource, list[str] | None, list[int] | None]:
    """The clean base set the streams corrupt, its class names (None: the model's own classes,
    for a plain classifier on CIFAR-C files) and its indices into the embedded data."""
    cfg = params.adapt
    layout = Layout.of(params)
    if cfg.data == "cifar_c_files":
        from vpt_robust.data.corrupted_files import CifarCSource

        assert cfg.files_root is not None  # the config requires it
        return CifarCSource(cfg.files_root, device=device), cfg.class_names, None
    data = load_embedded(layout.data)
    splits = load_splits(layout)
    names = list(data.class_names)
    if cfg.split == "pretrain_test":
        split, offset = "pretrain_test", 0
    else:
        split, names, offset = eval_split(params, names, cfg.split)
    idx = base_indices(params, splits[split])
    images = as_float_images(data.images[idx])
    source = GeneratedSource(images, data.labels[idx] - offset, device=device)
    return source, names, idx.tolist()


def check_models(params: Params, backbone: Backbone, class_names: list[str] | None) -> None:
    """Refuse, before anything runs, a method the backbone cannot serve."""
    if backbone.has_text and class_names is None:
        raise ValueError(
            "adapt.class_names: a CLIP backbone classifies by class names; give them for "
            f"adapt.data {params.adapt.data!r}"
        )
    if not backbone.has_text and backbone.kind != "classifier":
        raise ValueError(
            f"backbone.source {params.backbone.source!r} has neither a text tower (zero-shot "
            "head) nor logits of its own: stream_adapt needs a CLIP or a classifier backbone"
        )
    tpt = [m.label for m in params.adapt.methods if m.method == "tpt"]
    if tpt and not backbone.has_text:
        raise ValueError(
            f"adapt.methods: {tpt} tune CLIP's text context; backbone.source "
            f"{params.backbone.source!r} has no text tower"
        )
    norm = [m.label for m in params.adapt.methods if m.method == "norm"]
    if norm and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.model.modules()
    ):
        raise ValueError(
            f"adapt.methods: {norm} normalise with test-batch BatchNorm statistics; backbone.source "
            f"{params.backbone.source!r} has no BatchNorm layer (norm is the source model there)"
        )


def source_model(
    backbone: Backbone, class_names: list[str] | None, params: Params, method: str
) -> nn.Module:
    """A fresh source model for ``method``: the zero-shot classifier (TPT: with an untrained
    CoOp context from the first template's text), or the plain classifier backbone."""
    if not backbone.has_text:
        return backbone.model
    assert class_names is not None
    if method == "tpt":
        init = params.head.templates[0].replace("{}", "").strip(" .")
        return build_classifier(
            backbone, class_names, PromptConfig(kind="coop", init=init), params.head
        )
    return classifier(backbone, class_names, params, prompted=False)


def method_args(entry: AdaptMethodConfig, seed: int) -> dict[str, Any]:
    """The entry's arguments; a method with a ``seed`` argument gets the run's seed unless set."""
    args = entry.args
    if "seed" in ADAPTERS[entry.method].args_model.model_fields:
        args.setdefault("seed", seed)
    return args


# --------------------------------------------------------------------------- running


class StreamDigest:
    """A running SHA-256 of the batches a method saw (indices, labels, images, in order)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def __call__(self, k: int, batch: StreamBatch, logits: torch.Tensor) -> None:
        for t in (batch.indices, batch.labels, batch.images):
            self._h.update(t.detach().cpu().contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def run_method(
    params: Params,
    backbone: Backbone,
    class_names: list[str] | None,
    entry: AdaptMethodConfig,
    stream: CorruptionStream,
    seed: int,
    attack: StreamAttack | None = None,
) -> tuple[StreamResult, str]:
    """One method over one stream from a fresh source model: its result and stream digest."""
    torch.manual_seed(seed)
    model = source_model(backbone, class_names, params, entry.method)
    adapter = build_adapter(entry.method, model, **method_args(entry, seed))
    digest = StreamDigest()
    return run_stream(adapter, stream, attack=attack, on_batch=digest), digest.hexdigest()


def run_protocol(
    params: Params,
    backbone: Backbone,
    class_names: list[str] | None,
    source: CorruptionSource,
    protocol: str,
    *,
    attack_for: Callable[[int], StreamAttack] | None = None,
) -> tuple[dict[str, list[StreamResult]], list[str], dict[str, Any]]:
    """Every method on the protocol's stream, per seed (one stream object per seed, shared by
    all methods): results per method (one per seed), the stream digest per seed, and the
    seed-0 stream plan. ``attack_for(seed)``: run the attacked methods under that attack."""
    cfg = params.adapt
    entries = cfg.methods
    if attack_for is not None and cfg.attack.methods is not None:
        entries = [m for m in entries if m.label in cfg.attack.methods]
    results: dict[str, list[StreamResult]] = defaultdict(list)
    digests: list[str] = []
    plan: dict[str, Any] = {}
    what = f"stream_adapt {protocol}" + (" (attacked)" if attack_for is not None else "")
    bar = progress_bar(what, total=len(cfg.seeds) * len(entries), unit="run")
    for seed in cfg.seeds:
        stream = make_stream(source, cfg, protocol=protocol, seed=seed)
        if not plan:
            plan = stream.describe()
        seen: dict[str, str] = {}
        for entry in entries:
            attack = attack_for(seed) if attack_for is not None else None
            res, digest = run_method(params, backbone, class_names, entry, stream, seed, attack)
            results[entry.label].append(res)
            seen[entry.label] = digest
            bar.update(1)
            bar.set_postfix_str(f"seed {seed} {entry.label} error {res.mean_error:.3f}")
        if len(set(seen.values())) != 1:
            raise RuntimeError(
                f"stream_adapt: the methods saw different {protocol!r} streams for seed {seed} "
                f"({seen}); every method must run on the same stream"
            )
        digests.append(next(iter(seen.values())))
    bar.close()
    return dict(results), digests, plan


# --------------------------------------------------------------------------- summaries


def _stats(values: list[float]) -> dict[str, Any]:
    m, s = mean_std(values)
    return {"mean": m, "std": s, "values": values}


def _cost(runs: list[StreamResult], source: list[StreamResult] | None) -> dict[str, float]:
    """Model passes per image (mean over seeds), and the ratio to the source model's."""
    out = {k: sum(r.cost[k] for r in runs) / len(runs) for k in ("forward", "backward", "relative")}
    base = sum(r.cost["relative"] for r in source) / len(source) if source else 1.0
    out["ratio_to_source"] = out["relative"] / base
    return out


def _domain(row: dict[str, Any]) -> tuple[str, int]:
    return row["corruption"], row["severity"]


def summarise(
    results: dict[str, list[StreamResult]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per method: mean/late error over seeds, the per-domain table in stream order (one row per
    domain when the protocol draws its order per seed: mixed, random orders), the cost; and the
    curve rows of ``aggregate_stream``."""
    rows = {n: [r.rows for r in runs] for n, runs in results.items()}
    orders = {
        tuple((r["run"], r["segment"]) + _domain(r) for r in seed)
        for v in rows.values()
        for seed in v
    }
    table, curve = aggregate_stream(rows, by_domain=len(orders) > 1)
    out: dict[str, Any] = {}
    for name, runs in results.items():
        out[name] = {
            "mean_error": _stats([r.mean_error for r in runs]),
            "late_error": _stats([r.late_error for r in runs]),
            "stream": table[name]["stream"],
            "cost": _cost(runs, results.get("source")),
        }
    return out, curve


def _mean_at(rows: list[dict[str, Any]], idx: list[int]) -> float:
    return sum(rows[i]["error"] for i in idx) / len(idx)


def adversarial_summary(
    attacked: dict[str, list[StreamResult]], clean: dict[str, list[StreamResult]]
) -> dict[str, Any]:
    """Per attacked method: error on the attacked segments and clean error on the segments after
    them (is the adapted state poisoned?), each beside the same segments' error on the clean
    stream of the same seed (``*_clean_stream``), over seeds; and seed 0's rows."""
    out: dict[str, Any] = {}
    for name, runs in attacked.items():
        stats: dict[str, list[float]] = defaultdict(list)
        for adv, ref in zip(runs, clean[name], strict=True):
            keys = [(r["run"], r["segment"], r["corruption"]) for r in adv.rows]
            if keys != [(r["run"], r["segment"], r["corruption"]) for r in ref.rows]:
                raise RuntimeError(f"stream_adapt: {name}'s attacked and clean streams differ")
            for flag in ("attacked", "after_attack"):
                idx = [i for i, r in enumerate(adv.rows) if r[flag]]
                if idx:
                    stats[f"{flag}_error"].append(_mean_at(adv.rows, idx))
                    stats[f"{flag}_error_clean_stream"].append(_mean_at(ref.rows, idx))
            stats["mean_error"].append(adv.mean_error)
        out[name] = {k: _stats(v) for k, v in stats.items()}
        fields = ("run", "segment", "corruption", "severity", "error", "attacked", "after_attack")
        out[name]["stream"] = [{k: r[k] for k in fields} for r in runs[0].rows]
    return out


def write_curve(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in CURVE_FIELDS} for r in rows)
    return path


def _log_protocol(
    run: StageRun, protocol: str, summary: dict[str, Any], raw: dict[str, list[StreamResult]]
) -> None:
    for name, res in summary.items():
        wall = sum(r.seconds_per_batch for r in raw[name]) / len(raw[name])
        run.log_metrics(
            {
                f"{protocol}.{name}.mean_error": res["mean_error"]["mean"],
                f"{protocol}.{name}.late_error": res["late_error"]["mean"],
                f"{protocol}.{name}.passes_per_image": res["cost"]["relative"],
                f"{protocol}.{name}.seconds_per_batch": wall,  # MLflow only: not an input's function
            }
        )
        run.log_table(res["stream"], f"stream_adapt_{protocol}_{name}.json")


def _attack(params: Params) -> Callable[[int], StreamAttack] | None:
    a = params.adapt.attack
    if not a.enabled:
        return None
    return lambda seed: StreamAttack(
        eps=a.eps,
        steps=a.steps,
        alpha=a.alpha,
        norm=a.norm,
        seed=a.seed * 1_000_003 + seed,
        segments=a.segments,
    )


def run(params: Params, run: StageRun) -> dict[str, Any]:
    cfg = params.adapt
    layout = Layout.of(params)
    device = setup_runtime(params)
    source, class_names, indices = stream_source(params, device)
    backbone = backbone_for(params, device)
    check_models(params, backbone, class_names)
    run.log_params({"adapt": cfg.model_dump(mode="json")})
    protocols: dict[str, Any] = {}
    raw_default: dict[str, list[StreamResult]] = {}
    curve: list[dict[str, Any]] = []
    for k, protocol in enumerate(cfg.protocols):
        raw, digests, plan = run_protocol(params, backbone, class_names, source, protocol)
        summary, rows = summarise(raw)
        run.log_dict(plan, f"stream_{protocol}.json")
        _log_protocol(run, protocol, summary, raw)
        plan.pop("segments")
        protocols[protocol] = {"stream": plan, "stream_digests": digests, "results": summary}
        if k == 0:
            raw_default, curve = raw, rows
    default = cfg.protocols[0]
    out: dict[str, Any] = {
        "protocol": default,
        "stream": protocols[default]["stream"],
        "seeds": cfg.seeds,
        "base_indices": indices,
        "methods": {m.label: {"method": m.method, "args": m.args} for m in cfg.methods},
        "results": protocols[default]["results"],
        "protocols": protocols,
        "adversarial": None,
    }
    attack_for = _attack(params)
    if attack_for is not None:
        attacked, _, _ = run_protocol(
            params, backbone, class_names, source, default, attack_for=attack_for
        )
        out["adversarial"] = {
            "protocol": default,
            "attack": cfg.attack.model_dump(mode="json"),
            "results": adversarial_summary(attacked, raw_default),
        }
        for name, res in out["adversarial"]["results"].items():
            run.log_metrics(
                {f"adversarial.{name}.{k}": v["mean"] for k, v in res.items() if k != "stream"}
            )
    plot = write_curve(layout.metrics / "stream_adapt_curve.csv", curve)
    run.log_artifact(plot)
    try:
        fig = _figure({n: r["stream"] for n, r in out["results"].items()})
    except ImportError:
        fig = None
    if fig is not None:
        import matplotlib.pyplot as plt

        fig.axes[0].set_title(f"test-time adaptation on the {default} stream")
        run.log_figure(fig, "stream_adapt_error.png")
        plt.close(fig)
    write_json(layout.metrics_file("stream_adapt"), out)
    return out
