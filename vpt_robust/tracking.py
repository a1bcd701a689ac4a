"""The one module that talks to MLflow.

Every pipeline run is a parent MLflow run; every stage is a child run under it. Stages run in
separate processes under DVC, so the parent is found again by a tag holding the pipeline id
(``VPT_ROBUST_PIPELINE_ID`` if set, otherwise a hash of the resolved parameters).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vpt_robust.config import TrackingConfig

PIPELINE_TAG = "vpt_robust.pipeline_id"
STAGE_TAG = "vpt_robust.stage"
PARENT_TAG = "mlflow.parentRunId"


def resolve_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute so every process finds the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def pipeline_id(params: Mapping[str, Any]) -> str:
    """The id that groups stage runs into one pipeline run."""
    explicit = os.environ.get("VPT_ROBUST_PIPELINE_ID")
    if explicit:
        return explicit
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> ``{"train.lr": "40.0", ...}`` for MLflow params."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def _active(method: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(method)
    def wrapper(self: StageRun, *args: Any, **kwargs: Any) -> None:
        if self.client is not None:
            method(self, *args, **kwargs)

    return wrapper


class StageRun:
    """Logging handle of one stage's child run (a no-op handle when tracking is disabled)."""

    def __init__(self, client: Any, run_id: str, parent_id: str | None) -> None:
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id

    @_active
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @_active
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    @_active
    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    @_active
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_active
    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    @_active
    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    @_active
    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        if not rows:
            return
        columns = {k: [r.get(k) for r in rows] for k in rows[0]}
        self.client.log_table(self.run_id, data=columns, artifact_file=name)

    @_active
    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)


def disabled_run() -> StageRun:
    """A handle that accepts every call and records nothing (tracking disabled)."""
    return StageRun(None, "", None)


def _client(cfg: TrackingConfig) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_uri(cfg.uri))
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = Path(cfg.artifacts).resolve()
        location.mkdir(parents=True, exist_ok=True)
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location.as_uri())
    else:
        exp_id = exp.experiment_id
    return client, exp_id


def _parent(client: Any, exp_id: str, pid: str, params: Mapping[str, Any]) -> str:
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}'", max_results=50
    )
    parents = [r for r in found if PARENT_TAG not in r.data.tags]
    if parents:
        return parents[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline-{pid[:8]}", tags={PIPELINE_TAG: pid})
    handle = StageRun(client, run.info.run_id, None)
    handle.log_params(params)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextmanager
def stage_run(
    cfg: TrackingConfig, stage: str, params: Mapping[str, Any], pid: str | None = None
) -> Iterator[StageRun]:
    """Open the child run of ``stage`` under its pipeline's parent run; FAILED if it raises."""
    if not cfg.enabled:
        yield disabled_run()
        return
    client, exp_id = _client(cfg)
    pid = pid or pipeline_id(params)
    parent = _parent(client, exp_id, pid, params)
    run = client.create_run(
        exp_id,
        run_name=stage,
        tags={PARENT_TAG: parent, PIPELINE_TAG: pid, STAGE_TAG: stage},
    )
    handle = StageRun(client, run.info.run_id, parent)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def log_json_file(run: StageRun, path: Path) -> None:
    """Log a metrics JSON both as an artifact and as flat scalar metrics."""
    run.log_artifact(path)
    data = json.loads(Path(path).read_text())
    flat = {k: float(v) for k, v in flatten(data).items() if _is_number(v) and len(k) < 250}
    run.log_metrics(flat)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text not in ("True", "False")


def read_runs(cfg: TrackingConfig, pid: str | None = None) -> list[dict[str, Any]]:
    """Runs of the experiment (optionally of one pipeline) as plain dicts, newest first."""
    client, exp_id = _client(cfg)
    query = f"tags.`{PIPELINE_TAG}` = '{pid}'" if pid else ""
    runs = client.search_runs([exp_id], filter_string=query, max_results=1000)
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "parent": r.data.tags.get(PARENT_TAG),
            "stage": r.data.tags.get(STAGE_TAG),
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    ]


def download_artifacts(cfg: TrackingConfig, run_id: str, path: str) -> Path:
    """Fetch an artifact of a run into a temporary directory and return its local path."""
    from mlflow.artifacts import download_artifacts as _download

    target = tempfile.mkdtemp(prefix="vpt-robust-artifact-")
    return Path(
        _download(
            run_id=run_id, artifact_path=path, dst_path=target, tracking_uri=resolve_uri(cfg.uri)
        )
    )
