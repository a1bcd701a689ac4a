"""Pipeline stages: plain functions of the validated params, shared by DVC and Prefect.

Each stage reads its inputs from files, writes its outputs and ``metrics/<stage>.json``, and logs
to its own MLflow child run under the pipeline's parent run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vpt_robust.config import Params
from vpt_robust.tracking import StageRun, stage_run

STAGES = (
    "prepare",
    "pretrain",
    "train_prompt",
    "evaluate",
    "stream_eval",
    "stream_adapt",
    "tecoa",
    "continual",
    "report",
)


def stage_function(name: str) -> Callable[[Params, StageRun], dict[str, Any]]:
    """The ``run`` function of stage ``name`` (imported on demand: stages pull in torch)."""
    if name not in STAGES:
        raise ValueError(f"stage {name!r} is not one of {list(STAGES)}")
    return importlib.import_module(f"vpt_robust.stages.{name}").run


def run_stage(name: str, params: Params, pipeline_id: str | None = None) -> dict[str, Any]:
    """Run one stage inside its MLflow child run (FAILED in MLflow if it raises).

    ``pipeline_id`` names the pipeline run (parent) it belongs to; None: ``VPT_ROBUST_PIPELINE_ID``,
    else the calling ``dvc repro``, else a pipeline of its own (``tracking.pipeline_id``).
    """
    fn = stage_function(name)
    with stage_run(params.tracking, name, params.model_dump(), pipeline_id) as run:
        return fn(params, run)
