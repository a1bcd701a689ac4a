"""The full pipeline as a Prefect 3 flow: the same stage functions `dvc repro` runs, as tasks.

python -m flows.pipeline --preset embedded      # ephemeral Prefect, local MLflow store
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from vpt_robust import tracking
from vpt_robust.config import Params, load_params, validate
from vpt_robust.stages import STAGES, run_stage


@task(name="materialise-data", retries=0)
def materialise_data(params: dict[str, Any], dvc_file: str = "data.dvc") -> str:
    from vpt_robust.data.versioning import ensure_data

    return ensure_data(validate(params), dvc_file=Path(dvc_file))


@task(name="stage", retries=0)
def stage(name: str, params: dict[str, Any], pipeline_id: str) -> dict[str, Any]:
    return run_stage(name, validate(params), pipeline_id=pipeline_id)


@flow(name="vpt-robust-pipeline", log_prints=True)
def pipeline(
    preset: str | None = None,
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    materialise: bool = True,
) -> dict[str, Any]:
    """Run the stages in order (all by default) under one MLflow parent run for the flow run:
    RUNNING while its stages run, then FAILED if the flow or a stage failed, else FINISHED."""
    params: Params = load_params(params_file, preset=preset, overrides=overrides)
    selected = stages or list(STAGES)
    unknown = [s for s in selected if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: {unknown} are not among {list(STAGES)}")
    raw = params.model_dump(mode="json")
    pid = f"prefect-{flow_run.get_id() or tracking.new_pipeline_id('local')}"
    logger = get_run_logger()
    parent = None
    if params.tracking.enabled:
        parent = tracking.open_parent(params.tracking, pid, params.model_dump(), owner="flow")
    failed = True
    try:
        if materialise:
            logger.info(materialise_data(raw))
        results: dict[str, Any] = {}
        for name in selected:
            results[name] = stage.with_options(name=f"stage-{name}")(name, raw, pid)
            logger.info("stage %s done", name)
        failed = False
    finally:
        if parent is not None:
            status = tracking.close_parent(params.tracking, parent, failed=failed)
            logger.info("MLflow pipeline run %s: %s", parent, status)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the vpt-robust pipeline as a Prefect flow")
    parser.add_argument("--preset")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stages", nargs="*")
    args = parser.parse_args(argv)
    result = pipeline(preset=args.preset, params_file=args.params, stages=args.stages)
    if "report" in result:
        print(result["report"]["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
