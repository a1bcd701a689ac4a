"""Adapt on one arriving stream folder and keep the result as a new version.

``process_folder(path, params)`` is the whole job, as plain functions (the Prefect flow and
``vpt-robust stream`` call it): validate and hash the folder; under the store's lock, return
the existing version if this content was adapted before; else load the parent state (the
latest version, or ``from_version``; the source model's start state when there is none), adapt
with the configured adapter batch by batch (a resumable checkpoint every
``streams.checkpoint_every`` batches: a run killed and started again ends with the state an
uninterrupted run ends with), evaluate (error when labels exist, confidence and entropy always,
PGD robust accuracy on a fixed subset, the source model beside the adapted one), log to MLflow
and save the new version atomically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpt_robust import tracking
from vpt_robust.config import Params
from vpt_robust.methods.tta import Adapter, build_adapter
from vpt_robust.methods.tta.base import entropy
from vpt_robust.streams.inbox import StreamFolder, read_stream, validate_folder
from vpt_robust.streams.registry import Registry, VersionError

DATA_HASH_TAG = "vpt_robust.stream.data_hash"
PARENT_TAG = "vpt_robust.stream.parent_version"
VERSION_TAG = "vpt_robust.stream.version"


@dataclass
class StreamModel:
    """The source model a stream adapts: [0,1] images -> logits over ``class_names``."""

    model: nn.Module
    class_names: list[str]
    image_size: int
    identity: dict[str, Any]


def store_root(params: Params) -> Path:
    """``streams.store``, or ``<paths.outputs>/streams``."""
    return Path(params.streams.store or Path(params.paths.outputs) / "streams")


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_source_model(params: Params, device: torch.device) -> StreamModel:
    """The pipeline's trained model: the backbone (the embedded tiny CLIP checkpoint under
    ``paths.outputs``, or ``backbone.pretrained``) with the saved prompt ``streams.prompt``
    (default ``<outputs>/prompts/<family>/seed_0`` when it exists), else the zero-shot
    classifier; a classifier backbone without a text tower is used as it is."""
    from vpt_robust.data.embedded import CLASS_NAMES
    from vpt_robust.prompts.io import load_prompted_model
    from vpt_robust.stages.build import backbone_for, classifier
    from vpt_robust.stages.common import Layout

    cfg = params.streams
    backbone = backbone_for(params, device)
    identity: dict[str, Any] = {"backbone": backbone.identity, "prompt": None}
    if not backbone.has_text:
        if cfg.class_names is None:
            raise ValueError("streams.class_names: required for a backbone without a text tower")
        model, names = backbone.model, list(cfg.class_names)
    else:
        prompt = Path(cfg.prompt) if cfg.prompt else None
        default = Layout.of(params).prompts_dir / cfg.family / "seed_0"
        if prompt is None and default.with_suffix(".json").is_file():
            prompt = default
        if prompt is not None:
            prompt = (
                prompt.with_suffix("") if prompt.suffix in (".json", ".safetensors") else prompt
            )
            model = load_prompted_model(
                prompt, device, backbone=backbone, class_names=cfg.class_names
            )
            names = list(model.class_names)
            identity["prompt"] = _file_hash(prompt.with_suffix(".safetensors"))
        else:
            names = list(cfg.class_names or CLASS_NAMES)
            model = classifier(backbone, names, params, prompted=False)
    identity["class_names"] = names
    return StreamModel(model.eval(), names, backbone.image_size, identity)


# --------------------------------------------------------------------------- adapting


def _batch_stats(logits: torch.Tensor, labels: torch.Tensor | None, prefix: str) -> dict:
    logits = logits.detach().float()
    out = {
        f"{prefix}confidence": float(logits.softmax(-1).amax(-1).mean()),
        f"{prefix}entropy": float(entropy(logits).mean()),
    }
    if labels is not None:
        out[f"{prefix}error"] = float((logits.argmax(-1).cpu() != labels).float().mean())
    return out


def _state_to(obj: Any, device: torch.device, key: str = "") -> Any:
    """A saved state on ``device``: float tensors move, generator states (uint8) and optimiser
    step counters stay on the CPU where torch expects them."""
    if isinstance(obj, dict):
        return {k: _state_to(v, device, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_state_to(v, device, key) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.is_floating_point() and key != "step":
        return obj.to(device)
    return obj


def _cpu(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu(v) for v in obj)
    return obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj


def stream_order(n: int, shuffle: bool, seed: int) -> torch.Tensor:
    """The order the stream's images are fed in (a seeded permutation, or as listed)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def run_adaptation(
    adapter: Adapter,
    source: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    params: Params,
    registry: Registry,
    key: dict[str, Any],
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Feed the stream batch by batch to ``adapter`` (the source model predicts each batch
    beside it); a checkpoint of everything that decides later outputs every
    ``checkpoint_every`` batches, and a matching checkpoint is resumed from. Returns one
    record per batch; ``on_batch(k)`` is called after batch k (a test's kill switch)."""
    cfg = params.streams
    order = stream_order(len(images), cfg.shuffle, cfg.seed)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    records: list[dict[str, Any]] = []
    start = 0
    torch.manual_seed(cfg.seed)
    ckpt = registry.read_checkpoint(key["data_hash"])
    if ckpt is not None and ckpt["key"] == key:
        adapter.load_state_dict(_state_to(ckpt["adapter"], adapter.device))
        records, start = list(ckpt["records"]), int(ckpt["next_batch"])
        torch.set_rng_state(ckpt["rng"])
    for k in range(start, len(batches)):
        idx = batches[k]
        x = images[idx].to(adapter.device)
        y = labels[idx] if labels is not None else None
        logits = adapter(x)
        with torch.no_grad():
            src = source(x)
        rec = {
            "batch": k,
            "n": len(idx),
            **_batch_stats(logits, y, ""),
            **_batch_stats(src, y, "source_"),
        }
        rec["agreement"] = float((logits.argmax(-1) == src.argmax(-1)).float().mean())
        records.append(rec)
        done = k + 1
        if done % cfg.checkpoint_every == 0 and done < len(batches):
            registry.write_checkpoint(
                key["data_hash"],
                {
                    "key": key,
                    "next_batch": done,
                    "records": records,
                    "adapter": _cpu(adapter.state_dict()),
                    "rng": torch.get_rng_state(),
                },
            )
        if on_batch is not None:
            on_batch(k)
    return records


# --------------------------------------------------------------------------- evaluating


def _weighted(records: list[dict[str, Any]], name: str) -> float | None:
    if name not in records[0]:
        return None
    total = sum(r["n"] for r in records)
    return sum(r[name] * r["n"] for r in records) / total


def robust_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    params: Params,
    device: torch.device,
) -> float:
    """PGD L-inf accuracy on the fixed subset: against the labels, or without labels against
    the model's own clean predictions (the share of predictions the attack cannot move)."""
    from vpt_robust.attacks.pgd import default_alpha, pgd

    a = params.streams.attack
    gen = torch.Generator().manual_seed(a.seed)
    subset = torch.randperm(len(images), generator=gen)[: a.n_samples].sort().values
    hits = 0
    bs = params.streams.batch_size
    for i in range(0, len(subset), bs):
        idx = subset[i : i + bs]
        x = images[idx].to(device)
        with torch.no_grad():
            clean = predict(x).argmax(-1)
        y = labels[idx].to(device) if labels is not None else clean
        g = torch.Generator(device=device).manual_seed(a.seed * 1_000_003 + i)
        adv = pgd(
            predict, x, y, eps=a.eps, alpha=default_alpha(a.eps, a.steps), steps=a.steps,
            generator=g,
        )  # fmt: skip
        with torch.no_grad():
            hits += int((predict(adv).argmax(-1) == y).sum())
    return hits / len(subset)


def evaluate(
    records: list[dict[str, Any]],
    adapter: Adapter,
    source: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    params: Params,
) -> dict[str, Any]:
    """The stream's summary: adapted and source model side by side."""
    counts = dict(adapter.counts)
    robust = {
        "adapted": robust_accuracy(adapter.predict, images, labels, params, adapter.device),
        "source": robust_accuracy(source, images, labels, params, adapter.device),
    }
    adapter.counts = counts  # the attacker's passes are not the method's cost
    robust_name = "robust_accuracy" if labels is not None else "robust_consistency"
    out: dict[str, Any] = {"n_images": len(images), "labelled": labels is not None}
    for model, prefix in (("adapted", ""), ("source", "source_")):
        row = {k: _weighted(records, prefix + k) for k in ("error", "confidence", "entropy")}
        out[model] = {k: v for k, v in row.items() if v is not None}
        out[model][robust_name] = robust[model]
    out["agreement"] = _weighted(records, "agreement")
    a = params.streams.attack
    out["attack"] = {"eps": a.eps, "steps": a.steps, "n_samples": min(a.n_samples, len(images))}
    return out


# --------------------------------------------------------------------------- one folder


def _parent(registry: Registry, from_version: int | None) -> int | None:
    if from_version is None:
        return registry.latest()
    registry.record(from_version)  # a clear error when it does not exist
    return from_version


def _build(params: Params, sm: StreamModel, registry: Registry, parent: int | None) -> Adapter:
    entry = params.streams.method
    adapter = build_adapter(entry.method, sm.model, **entry.args)
    if parent is None:
        return adapter
    rec = registry.record(parent)
    if rec["source"] != sm.identity:
        raise VersionError(
            f"version {parent} was adapted from another source model ({rec['source']}); this "
            f"one is {sm.identity}. Adapt from a matching version (--from-version) or start a "
            "new streams.store"
        )
    if rec["method"] != entry.method or rec["method_args"] != entry.args:
        raise VersionError(
            f"version {parent} was adapted with {rec['method']} {rec['method_args']}; "
            f"streams.method is {entry.method} {entry.args}"
        )
    adapter.load_state_dict(_state_to(registry.load_state(parent), adapter.device))
    return adapter


def _log(run: tracking.StageRun, records: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    for rec in records:
        run.log_metrics(
            {f"batch.{k}": v for k, v in rec.items() if k not in ("batch", "n")}, step=rec["batch"]
        )
    flat = {f"{m}.{k}": v for m in ("adapted", "source") for k, v in metrics[m].items()}
    run.log_metrics(flat)
    run.log_table(records, "stream_batches.json")
    run.log_dict(metrics, "stream_metrics.json")


def process_folder(
    path: str | Path,
    params: Params,
    *,
    from_version: int | None = None,
    pipeline_id: str | None = None,
    model_fn: Callable[[Params, torch.device], StreamModel] = load_source_model,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Validate, version, adapt, evaluate, log and save one stream folder (module doc).
    Returns ``status`` (``adapted`` or ``known``), ``version``, ``data_hash``, ``parent``,
    ``metrics`` and ``mlflow_run_id``."""
    from vpt_robust.utils import resolve_device

    cfg = params.streams
    folder = validate_folder(path, min_size=cfg.min_image_size, max_images=cfg.max_images)
    registry = Registry(store_root(params))
    with registry.lock():
        known = registry.find_hash(folder.data_hash)
        if known is not None:
            return {**_summary(known), "status": "known", "folder": str(folder.root)}
        parent = _parent(registry, from_version)
        device = resolve_device(params.runtime.device)
        sm = model_fn(params, device)
        images, labels = read_stream(folder, sm.image_size, sm.class_names)
        adapter = _build(params, sm, registry, parent)
        return _adapt_and_save(
            folder, params, registry, sm, adapter, parent, images, labels, pipeline_id, on_batch
        )


def _adapt_and_save(
    folder: StreamFolder,
    params: Params,
    registry: Registry,
    sm: StreamModel,
    adapter: Adapter,
    parent: int | None,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    pipeline_id: str | None,
    on_batch: Callable[[int], None] | None,
) -> dict[str, Any]:
    cfg = params.streams
    key = {
        "data_hash": folder.data_hash,
        "parent": parent,
        "method": cfg.method.method,
        "args": cfg.method.args,
        "batch_size": cfg.batch_size,
        "shuffle": cfg.shuffle,
        "seed": cfg.seed,
        "n": len(images),
        "source": sm.identity,
    }
    pid = pipeline_id or tracking.new_pipeline_id("stream")
    logged = {
        "streams": cfg.model_dump(mode="json"),
        "backbone": params.backbone.model_dump(mode="json"),
    }
    with tracking.stage_run(params.tracking, "stream", logged, pid=pid) as run:
        run.set_tags(
            {
                DATA_HASH_TAG: folder.data_hash,
                PARENT_TAG: str(parent),
                "vpt_robust.stream.folder": folder.root.name,
            }
        )
        records = run_adaptation(adapter, sm.model, images, labels, params, registry, key, on_batch)
        state = _cpu(adapter.state_dict())  # before the attack: evaluation never enters it
        metrics = evaluate(records, adapter, sm.model, images, labels, params)
        _log(run, records, metrics)
        record = {
            "data_hash": folder.data_hash,
            "parent": parent,
            "folder": folder.root.name,
            "n_images": len(images),
            "label_source": folder.label_source,
            "method": cfg.method.method,
            "method_args": cfg.method.args,
            "source": sm.identity,
            "metrics": metrics,
            "mlflow_run_id": run.run_id or None,
        }
        version = registry.save(state, record, folder.dvc_record())
        run.set_tags({VERSION_TAG: str(version)})
        run.log_artifact(registry.versions_dir / str(version))
    registry.drop_checkpoint(folder.data_hash)
    return {
        **_summary({**record, "version": version}),
        "status": "adapted",
        "folder": str(folder.root),
    }


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("version", "data_hash", "parent", "metrics", "mlflow_run_id", "method")
    return {k: rec.get(k) for k in keys}


def list_versions(params: Params) -> list[dict[str, Any]]:
    """Every version's record, oldest first, with ``latest`` marked."""
    registry = Registry(store_root(params))
    latest = registry.latest()
    return [{**r, "latest": r["version"] == latest} for r in registry.versions()]
