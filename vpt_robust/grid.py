"""The evaluation grid as independent cells: (model, split, seed) x (PGD or AutoAttack at one
eps | one corruption at one severity). Each cell is a plain function of the params and the cell,
so any map can run them: a loop here (``run_serial``), Prefect tasks on a Dask cluster in
``flows/grid.py``. A cell calls the evaluate and stream_eval stages' own functions
(``evaluate_model``, ``make_stream``, ``stream_errors``) on the pipeline's saved files, so a
cell's numbers and per-sample flags are the ones the evaluate stage computes for the same model,
seed and eps; ``merge`` puts them back into the evaluate stage's row and flag order."""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vpt_robust.attacks import check_eps_monotone
from vpt_robust.config import Params, validate
from vpt_robust.corruptions.streams import GeneratedSource
from vpt_robust.metrics import as_float_images
from vpt_robust.stages.build import (
    backbone_for,
    classifier,
    families,
    family_name,
    load_family,
    transfers_to_new_classes,
)
from vpt_robust.stages.common import Layout, eval_split, load_splits, setup_runtime, write_json
from vpt_robust.stages.evaluate import (
    FLAG_FIELDS,
    ZERO_SHOT,
    autoattack_subset,
    autoattacked,
    eps_label,
    evaluate_model,
)
from vpt_robust.stages.stream_eval import make_stream, stream_errors

Kind = Literal["pgd", "autoattack", "corruption"]


@dataclass(frozen=True)
class Cell:
    """One independent unit of the grid. ``eps`` is set for pgd/autoattack cells,
    ``corruption`` and ``severity`` for corruption cells."""

    kind: Kind
    model: str
    split: Literal["base", "novel"]
    seed: int
    eps: float | None = None
    corruption: str | None = None
    severity: int | None = None

    @property
    def key(self) -> str:
        """A readable, unique name (Prefect task-run names, error messages)."""
        what = (
            f"{self.corruption}:{self.severity}"
            if self.kind == "corruption"
            else f"{eps_label(float(self.eps or 0), 'Linf')}"
        )
        return f"{self.model}/{self.split}/seed{self.seed}/{self.kind}/{what}"


def grid_models(params: Params, split: str) -> list[str]:
    """The zero-shot model and every family (only those that transfer, on novel classes),
    restricted to ``grid.models`` when it names some; an unknown name is an error."""
    names = [ZERO_SHOT] + [
        family_name(params, f)
        for f in families(params)
        if split == "base" or transfers_to_new_classes(params, f)
    ]
    wanted = params.grid.models
    if wanted is None:
        return names
    known = [ZERO_SHOT] + [family_name(params, f) for f in families(params)]
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise ValueError(f"grid.models: {unknown} are not among {known}")
    return [m for m in names if m in wanted]


def grid_corruptions(params: Params) -> list[str]:
    """``grid.corruptions``; null: the stream stage's corruptions (all 15 when that is null)."""
    from vpt_robust.corruptions import CORRUPTIONS

    if params.grid.corruptions is not None:
        return list(params.grid.corruptions)
    return list(params.stream.corruptions or CORRUPTIONS)


def enumerate_cells(params: Params) -> list[Cell]:
    """Every cell of the grid in a fixed order: per (split, seed, model), PGD at each
    ``evaluate.attack.eps``, AutoAttack at each ``evaluate.autoattack.eps`` (first seed,
    ``autoattack.splits`` and ``autoattack.models`` only, as the evaluate stage does), then each
    corruption x severity."""
    cfg = params.grid
    seeds = cfg.seeds or params.train.seeds
    aa = params.evaluate.autoattack
    cells: list[Cell] = []
    for split in cfg.splits:
        for seed in seeds:
            for model in grid_models(params, split):
                if cfg.attacks:
                    cells += [
                        Cell("pgd", model, split, seed, eps=e) for e in params.evaluate.attack.eps
                    ]
                    if seed == params.train.seeds[0] and autoattacked(params, model, split):
                        cells += [Cell("autoattack", model, split, seed, eps=e) for e in aa.eps]
                for corruption in grid_corruptions(params):
                    cells += [
                        Cell("corruption", model, split, seed, corruption=corruption, severity=s)
                        for s in cfg.severities
                    ]
    return cells


@dataclass
class _Context:
    """What every cell of one worker process shares: device, data, splits, backbone."""

    device: torch.device
    images: torch.Tensor
    labels: torch.Tensor
    splits: dict[str, torch.Tensor]
    class_names: list[str]
    backbone: Any


@functools.lru_cache(maxsize=2)
def _context(params_json: str) -> _Context:
    from vpt_robust.data.embedded import load_embedded

    params = validate(json.loads(params_json))
    layout = Layout.of(params)
    device = setup_runtime(params)
    data = load_embedded(layout.data)
    return _Context(
        device,
        data.images,
        data.labels,
        load_splits(layout),
        list(data.class_names),
        backbone_for(params, device),
    )


def _model(params: Params, ctx: _Context, name: str, classes: list[str], seed: int) -> Any:
    if name == ZERO_SHOT:
        return classifier(ctx.backbone, classes, params, prompted=False)
    return load_family(ctx.backbone, classes, params, name, seed)


def evaluate_cell(params: Params, cell: Cell) -> dict[str, Any]:
    """Evaluate one cell on the pipeline's files (paths.data, paths.outputs); a plain dict of
    floats and flag rows, so it travels between processes. The backbone and data are loaded once
    per process (cached by the params)."""
    ctx = _context(params.model_dump_json())
    split_name, classes, offset = eval_split(params, ctx.class_names, cell.split)
    idx = ctx.splits[split_name]
    images, labels = ctx.images[idx], ctx.labels[idx] - offset
    model = _model(params, ctx, cell.model, classes, cell.seed)
    if cell.kind == "corruption":
        return _corruption_cell(params, cell, model, images, labels, ctx.device)
    return _attack_cell(params, cell, model, images, labels, idx, ctx.device)


def _attack_cell(
    params: Params,
    cell: Cell,
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """A PGD cell: ``evaluate_model`` with the sweep cut to this eps (PGD's per-sample result
    does not depend on the other eps nor on the batch). An AutoAttack cell: ``evaluate_model``
    on the AutoAttack subset alone, so it runs PGD on those samples (the `pgd_subset` column)
    and AutoAttack on exactly the samples, order and seed of the evaluate stage."""
    ev = params.evaluate
    attack = ev.attack.model_copy(update={"eps": [cell.eps]})
    if cell.kind == "pgd":
        aa = ev.autoattack.model_copy(update={"enabled": False})
    else:
        subset = autoattack_subset(len(labels), params)
        images, labels, idx = images[subset], labels[subset], idx[subset]
        aa = ev.autoattack.model_copy(update={"eps": [cell.eps], "n_samples": len(subset)})
    cut = params.model_copy(
        update={"evaluate": ev.model_copy(update={"attack": attack, "autoattack": aa})}
    )
    metrics, flags = evaluate_model(
        model,
        images,
        labels,
        idx,
        cut,
        device=device,
        seed=cell.seed,
        run_autoattack=cell.kind == "autoattack",
    )
    if cell.kind == "autoattack":
        metrics = {k: v for k, v in metrics.items() if k.startswith(("pgd_subset_", "autoattack_"))}
        in_sweep = any(abs(e - cell.eps) <= 1e-9 for e in ev.attack.eps)
        if in_sweep:  # the PGD cell of this eps already holds these samples' PGD flags
            flags = [f for f in flags if f["attack"] != "pgd"]
    return {"cell": asdict(cell), "metrics": metrics, "flags": flags}


def _corruption_cell(
    params: Params,
    cell: Cell,
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """One corruption at one severity over the split's images: the stream builder and error
    counter of stream_eval, on a one-segment stream with the ``stream`` block's other
    settings (n_per_segment, batch size, shuffle, seed)."""
    settings = params.stream.model_copy(
        update={"corruptions": [cell.corruption], "severity": cell.severity}
    )
    source = GeneratedSource(as_float_images(images), labels, device=device)
    stream = make_stream(source, settings, protocol="continual", seed=settings.seed)
    (row,) = stream_errors(stream, {cell.model: model})[cell.model]
    return {"cell": asdict(cell), "metrics": {"error": row["error"], "n": row["n"]}, "flags": []}


def run_serial(params: Params, cells: Iterable[Cell]) -> list[dict[str, Any]]:
    """The reference order of evaluation: one cell after the other in this process."""
    return [evaluate_cell(params, c) for c in cells]


def merge(params: Params, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Cell results (any order) -> the evaluate stage's shapes: per model/split/seed the metric
    row (keys in ``metric_names`` order) and the flag rows in the stage's order (PGD per eps,
    then AutoAttack), plus corruption errors per model/split/seed/"corruption:severity"."""
    order = {Cell(**r["cell"]): r for r in results}
    cells = [c for c in enumerate_cells(params) if c in order]
    if len(cells) != len(results):
        extra = [r["cell"] for r in results if Cell(**r["cell"]) not in set(cells)]
        raise ValueError(f"results: cells {extra} are not in this params' grid")
    rows: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    flags: list[dict[str, Any]] = []
    corruption: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for cell in cells:
        res = order[cell]
        per_seed = str(cell.seed)
        if cell.kind == "corruption":
            slot = corruption.setdefault(cell.model, {}).setdefault(cell.split, {})
            slot.setdefault(per_seed, {})[f"{cell.corruption}:{cell.severity}"] = res["metrics"]
            continue
        row = rows.setdefault(cell.model, {}).setdefault(cell.split, {}).setdefault(per_seed, {})
        row.update(res["metrics"])
        base = {"model": cell.model, "split": cell.split, "seed": cell.seed}
        flags += [{**base, **f} for f in res["flags"]]
    norm = params.evaluate.attack.norm
    keys = {e: f"pgd_{norm}_{eps_label(e, norm)}" for e in params.evaluate.attack.eps}
    for row in (
        r for by_split in rows.values() for by_seed in by_split.values() for r in by_seed.values()
    ):
        # as the evaluate stage checks its sweep
        check_eps_monotone({e: row[k] for e, k in keys.items() if k in row})
    return {"attack": rows, "flags": flags, "corruption": corruption, "n_cells": len(cells)}


def write_grid(params: Params, merged: dict[str, Any]) -> list[Path]:
    """``metrics/grid.json`` (metrics of every cell) and ``outputs/grid/flags.csv``."""
    layout = Layout.of(params)
    flag_file = layout.outputs / "grid" / "flags.csv"
    flag_file.parent.mkdir(parents=True, exist_ok=True)
    with flag_file.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FLAG_FIELDS)
        writer.writeheader()
        writer.writerows(merged["flags"])
    summary = {k: v for k, v in merged.items() if k != "flags"}
    return [write_json(layout.metrics_file("grid"), summary), flag_file]


def run_grid(
    params: Params, mapper: Callable[[Params, list[Cell]], list[dict[str, Any]]] = run_serial
) -> dict[str, Any]:
    """Enumerate, evaluate with ``mapper`` (serial by default), merge and write the grid."""
    merged = merge(params, mapper(params, enumerate_cells(params)))
    write_grid(params, merged)
    return merged
