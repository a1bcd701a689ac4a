"""The evaluation grid as Prefect tasks on a Dask task runner (prefect-dask).

Each task evaluates one cell with ``vpt_robust.grid.evaluate_cell``, the plain function a serial
run calls too, on the pipeline's saved files (run the pipeline, or at least prepare, pretrain and
train_prompt, first; on a cluster every worker must see the same paths). ``grid.address`` names a
running Dask scheduler; without one a cluster starts here: ``distributed.LocalCluster`` or, with
``grid.cluster: cuda``, dask-cuda's ``LocalCUDACluster`` (one worker per visible GPU).

python -m flows.grid --preset smoke                       # LocalCluster, 2 worker processes
python -m flows.grid --set grid.address=tcp://host:8786   # a real cluster
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from vpt_robust import grid
from vpt_robust.config import GridConfig, Params, load_params, validate


class DaskCudaMissingError(RuntimeError):
    """``grid.cluster: cuda`` asked for dask-cuda, which is not installed."""


def task_runner_for(cfg: GridConfig) -> DaskTaskRunner:
    """The Dask task runner the grid config asks for: a scheduler address, else a local
    cluster (processes, ``n_workers`` x ``threads_per_worker``), else a LocalCUDACluster."""
    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    if cfg.cluster == "cuda":
        if importlib.util.find_spec("dask_cuda") is None:
            raise DaskCudaMissingError(
                "grid.cluster: 'cuda' needs dask-cuda (one Dask worker per GPU), which is not "
                "installed: `pip install dask-cuda` on a machine with NVIDIA GPUs, or use "
                "grid.cluster: local, or give grid.address of a running scheduler"
            )
        return DaskTaskRunner(
            cluster_class="dask_cuda.LocalCUDACluster",
            cluster_kwargs={"threads_per_worker": cfg.threads_per_worker},
        )
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": cfg.n_workers,
            "threads_per_worker": cfg.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
        },
    )


def match_worker_threads() -> int | None:
    """In a Dask worker, give torch the worker's own thread count (its share of the machine)
    instead of every core: two workers with torch on both cores of a 2-core machine ran the grid
    at 0.49x the serial run (bench/grid.py). ``runtime.threads`` in params still wins (it is
    applied when the cell loads its context). Returns the count set, None outside a worker."""
    import torch
    from distributed import get_worker

    try:
        n = int(get_worker().state.nthreads)
    except ValueError:
        return None
    torch.set_num_threads(n)
    return n


@task(name="grid-cell", retries=0, cache_policy=NO_CACHE)
def grid_cell(params: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any]:
    match_worker_threads()
    return grid.evaluate_cell(validate(params), grid.Cell(**cell))


@flow(name="vpt-robust-grid", log_prints=True)
def evaluation_grid(params: dict[str, Any]) -> dict[str, Any]:
    """Submit every cell, gather, merge into the evaluate stage's shapes, write
    metrics/grid.json and outputs/grid/flags.csv. Use ``run_grid_flow`` to pick the runner."""
    p = validate(params)
    cells = grid.enumerate_cells(p)
    logger = get_run_logger()
    logger.info("grid: %d cells", len(cells))
    futures = [
        grid_cell.with_options(name=f"cell-{c.key}").submit(params, asdict(c)) for c in cells
    ]
    results = [f.result() for f in futures]
    merged = grid.merge(p, results)
    grid.write_grid(p, merged)
    return merged


def run_grid_flow(params: Params) -> dict[str, Any]:
    """The grid flow on the task runner ``params.grid`` asks for."""
    runner = task_runner_for(params.grid)
    return evaluation_grid.with_options(task_runner=runner)(params.model_dump(mode="json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The evaluation grid on Dask through Prefect")
    parser.add_argument("--preset")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. grid.address=tcp://host:8786 (value parsed as JSON if it can be)",
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parsed
    params = load_params(args.params, preset=args.preset, overrides=overrides)
    merged = run_grid_flow(params)
    print(f"{merged['n_cells']} cells -> {params.paths.metrics}/grid.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
