"""Benchmark: the evaluation grid serially in one process vs on Dask workers through Prefect.

The same cells (``vpt_robust.grid.enumerate_cells`` of the params) run twice in one process:
serially (``grid.run_serial``, torch on ``--serial-threads`` threads: the whole machine for one
process) and as Prefect tasks on a Dask ``LocalCluster`` (``flows.grid.run_grid_flow``,
``--workers`` processes x ``--threads-per-worker``). Both times include loading the backbone
and data (once per process); the Dask time includes starting the cluster, which every grid run
pays. The Prefect flow runs twice and the second run is the one compared: the first also starts
Prefect's temporary API server, a once-per-session cost (reported). The merged results must be
equal (same seeds, same per-sample flags). Needs the pipeline's files (``vpt-robust data``,
``stage prepare``, ``stage pretrain``; prompt families if ``grid.models`` names them). The flow
writes ``metrics/grid.json`` and ``outputs/grid/flags.csv`` as it always does.

    python bench/grid.py                       # 16 PGD cells: 8 eps x base + novel, zero-shot
    python bench/grid.py --workers 2 --set grid.models='[zero_shot, padding]'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vpt_robust import grid  # noqa: E402
from vpt_robust.config import deep_merge, load_params, parse_override  # noqa: E402

DEFAULT_GRID = {
    "grid": {
        "models": ["zero_shot"],
        "splits": ["base", "novel"],
        "seeds": [0],
        "corruptions": [],
        "attacks": True,
    },
    "tracking": {"enabled": False},
    "evaluate": {
        "attack": {"eps": [f"{k}/255" for k in range(1, 9)], "steps": 10},
        "autoattack": {"enabled": False},
        "save_flags": True,
    },
}


def _overrides(items: list[str], workers: int, threads: int) -> dict[str, Any]:
    base = deep_merge(DEFAULT_GRID, {"grid": {"n_workers": workers, "threads_per_worker": threads}})
    for item in items:
        base = deep_merge(base, parse_override(item))
    return base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset")
    ap.add_argument("--set", action="append", default=[], metavar="BLOCK.FIELD=VALUE")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--serial-threads", type=int, default=2)
    args = ap.parse_args(argv)

    params = load_params(
        args.params, args.preset, _overrides(args.set, args.workers, args.threads_per_worker)
    )
    cells = grid.enumerate_cells(params)
    if len(cells) < 8:
        sys.exit(f"bench/grid.py: the grid has {len(cells)} cells; the bench needs >= 8")

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.grid import run_grid_flow

    torch.set_num_threads(args.serial_threads)
    t0 = time.perf_counter()
    serial = grid.merge(params, grid.run_serial(params, cells))
    t_serial = time.perf_counter() - t0
    print(f"serial: {len(cells)} cells in {t_serial:.1f} s", flush=True)

    t0 = time.perf_counter()
    run_grid_flow(params)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    dask = run_grid_flow(params)
    t_dask = time.perf_counter() - t0

    out = {
        "bench": "grid",
        "cells": len(cells),
        "kinds": sorted({c.kind for c in cells}),
        "serial_threads": args.serial_threads,
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
        "serial_s": t_serial,
        "dask_s": t_dask,
        "dask_first_run_s": t_first,
        "speedup": t_serial / t_dask,
        "equal_to_serial": json.dumps(serial, sort_keys=True) == json.dumps(dask, sort_keys=True),
    }
    print(json.dumps(out))
    print(
        f"\n{len(cells)} cells ({', '.join(out['kinds'])}): serial ({args.serial_threads} threads) "
        f"{t_serial:.1f} s, Dask {args.workers} x {args.threads_per_worker} thread(s) "
        f"{t_dask:.1f} s (first run, with Prefect's server start: {t_first:.1f} s) -> "
        f"{out['speedup']:.2f}x; results equal to serial: {out['equal_to_serial']}"
    )
    return 0 if out["equal_to_serial"] else 1


if __name__ == "__main__":
    sys.exit(main())
