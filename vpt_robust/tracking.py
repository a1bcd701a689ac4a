"""The one module that talks to MLflow.

One pipeline run (one ``dvc repro``, one ``vpt-robust repro``, one Prefect flow run) is one parent
MLflow run; every stage that runs is a child run under it. Stages run in separate processes under
DVC, so they find their parent by a tag holding the pipeline id (see ``pipeline_id``), under a file
lock, so two stages never create two parents for one pipeline.

Who owns the parent decides its status. An orchestrator (``vpt-robust repro``, the Prefect flow)
opens it RUNNING and closes it FINISHED or FAILED; a parent created by the first stage of a plain
``dvc repro`` is kept truthful by every stage: RUNNING while a stage runs, then FAILED if any of its
stages failed, else FINISHED. ``vpt-robust repro`` also records, for each stage that dvc skipped,
the earlier run whose cached result it reused (``record_lineage``).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vpt_robust.config import TrackingConfig

PIPELINE_TAG = "vpt_robust.pipeline_id"
STAGE_TAG = "vpt_robust.stage"
PARENT_TAG = "mlflow.parentRunId"
OWNER_TAG = "vpt_robust.owner"  # of a parent: "stages" (plain dvc repro), "repro", "flow"
LOCK_HASH_TAG = "vpt_robust.dvc_lock_hash"  # of a stage run: hash of its dvc.lock entry
REUSED_TAG = "vpt_robust.reused_run"  # of a reuse record: the run whose result was reused
LINEAGE_PREFIX = "vpt_robust.lineage."  # of a parent, per stage: "ran <id>" | "reused <id>" | ...
PIPELINE_ENV = "VPT_ROBUST_PIPELINE_ID"


def resolve_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute so every process finds the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks since boot) of ``pid`` from /proc, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), fields[19]


def _is_dvc(pid: int) -> bool:
    """Whether ``pid`` runs the dvc command line (``dvc ...``, ``python .../dvc``, ``-m dvc``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    argv = [a.decode(errors="replace") for a in argv if a]
    if not argv:
        return False
    if Path(argv[0]).name == "dvc":
        return True
    if Path(argv[0]).name.startswith("python") and len(argv) > 1:
        return Path(argv[1]).name == "dvc" or argv[1:3] == ["-m", "dvc"]
    return False


def dvc_ancestor() -> str | None:
    """``<pid>-<start ticks>`` of the nearest ancestor ``dvc`` process (Linux /proc), else None.

    The pid alone could be reused; with its start time it names one process, for the whole life
    of one ``dvc repro``, which is what groups its stage processes into one pipeline run.
    """
    pid = os.getppid()
    for _ in range(64):
        stat = _proc_stat(pid)
        if stat is None or pid <= 1:
            return None
        if _is_dvc(pid):
            return f"{pid}-{stat[1]}"
        pid = stat[0]
    return None


def pipeline_id() -> str:
    """The id that groups stage runs into one pipeline run.

    ``VPT_ROBUST_PIPELINE_ID`` when set (``vpt-robust repro``, the Prefect flow, a user); else the
    ancestor ``dvc`` process (one plain ``dvc repro``), hashed with this boot's id; else a fresh
    id, so a stage run by hand is a pipeline of its own (never filed under an older parent).
    """
    explicit = os.environ.get(PIPELINE_ENV)
    if explicit:
        return explicit
    dvc = dvc_ancestor()
    if dvc is not None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = ""
        return "dvc-" + hashlib.sha256(f"{boot}:{dvc}".encode()).hexdigest()[:16]
    return new_pipeline_id("run")


def new_pipeline_id(prefix: str) -> str:
    """A fresh, unique pipeline id (``<prefix>-<32 hex>``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


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

    @_active
    def log_image(self, image: Any, name: str) -> None:
        """An (H, W, 3) array (floats in [0, 1] or uint8) as a PNG artifact ``name``."""
        self.client.log_image(self.run_id, image, artifact_file=name)


def disabled_run() -> StageRun:
    """A handle that accepts every call and records nothing (tracking disabled)."""
    return StageRun(None, "", None)


def _client(cfg: TrackingConfig) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_uri(cfg.uri))
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return client, exp.experiment_id
    with store_lock(cfg):  # two first stages must not both create the experiment
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is not None:
            return client, exp.experiment_id
        location = Path(cfg.artifacts).resolve()
        location.mkdir(parents=True, exist_ok=True)
        return client, client.create_experiment(cfg.experiment, artifact_location=location.as_uri())


def lock_path(cfg: TrackingConfig) -> Path:
    """The lock file of one tracking store: machine-wide, named by the store's URI."""
    key = hashlib.sha256(resolve_uri(cfg.uri).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"vpt-robust-mlflow-{key}.lock"


@contextmanager
def store_lock(cfg: TrackingConfig) -> Iterator[None]:
    """Hold the store's exclusive lock (flock; threads and processes alike) for a find-or-create."""
    with open(lock_path(cfg), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_parent(client: Any, exp_id: str, pid: str) -> Any | None:
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}'", max_results=1000
    )
    parents = [r for r in found if PARENT_TAG not in r.data.tags]
    return min(parents, key=lambda r: r.info.start_time) if parents else None


def _find_or_create_parent(
    client: Any, exp_id: str, pid: str, params: Mapping[str, Any], owner: str
) -> Any:
    """The parent run of pipeline ``pid``, created RUNNING if none; call under ``store_lock``."""
    found = _find_parent(client, exp_id, pid)
    if found is not None:
        return found
    run = client.create_run(
        exp_id, run_name=f"pipeline-{pid}"[:48], tags={PIPELINE_TAG: pid, OWNER_TAG: owner}
    )
    StageRun(client, run.info.run_id, None).log_params(params)
    return client.get_run(run.info.run_id)


def open_parent(
    cfg: TrackingConfig, pid: str, params: Mapping[str, Any], owner: str = "stages"
) -> str:
    """Find or create (RUNNING) the parent run of pipeline ``pid``; return its run id.

    ``owner`` other than ``"stages"`` (``"repro"``, ``"flow"``) means the caller closes it with
    ``close_parent``; stages then leave its status alone.
    """
    client, exp_id = _client(cfg)
    with store_lock(cfg):
        return _find_or_create_parent(client, exp_id, pid, params, owner).info.run_id


def _children(client: Any, exp_id: str, parent_id: str) -> list[Any]:
    return client.search_runs(
        [exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=1000
    )


def _status_from(children: list[Any]) -> str:
    statuses = {r.info.status for r in children}
    if "RUNNING" in statuses:
        return "RUNNING"
    return "FAILED" if statuses & {"FAILED", "KILLED"} else "FINISHED"


def _set_status(client: Any, run_id: str, status: str) -> None:
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def settle_parent(cfg: TrackingConfig, parent_id: str, *, failed: bool = False) -> str:
    """Set the parent's status from its children (RUNNING if one runs, FAILED if one failed,
    else FINISHED), or FAILED whatever they say when ``failed``; return the status set."""
    client, exp_id = _client(cfg)
    with store_lock(cfg):
        status = "FAILED" if failed else _status_from(_children(client, exp_id, parent_id))
        _set_status(client, parent_id, status)
    return status


def close_parent(cfg: TrackingConfig, parent_id: str, *, failed: bool) -> str:
    """An orchestrator's end of its pipeline run: FAILED if it failed or a stage did, else
    FINISHED (never RUNNING: nothing of this pipeline runs once its orchestrator is done)."""
    client, exp_id = _client(cfg)
    status = _status_from(_children(client, exp_id, parent_id))
    return settle_parent(cfg, parent_id, failed=failed or status != "FINISHED")


@contextmanager
def stage_run(
    cfg: TrackingConfig, stage: str, params: Mapping[str, Any], pid: str | None = None
) -> Iterator[StageRun]:
    """Open the child run of ``stage`` under its pipeline's parent run; FAILED if it raises."""
    if not cfg.enabled:
        yield disabled_run()
        return
    client, exp_id = _client(cfg)
    pid = pid or pipeline_id()
    with store_lock(cfg):
        parent = _find_or_create_parent(client, exp_id, pid, params, "stages")
        parent_id = parent.info.run_id
        run = client.create_run(
            exp_id,
            run_name=stage,
            tags={PARENT_TAG: parent_id, PIPELINE_TAG: pid, STAGE_TAG: stage},
        )
        owned = parent.data.tags.get(OWNER_TAG, "stages") == "stages"
        if owned:
            client.update_run(parent_id, status="RUNNING")
    client.set_tag(parent_id, LINEAGE_PREFIX + stage, f"ran {run.info.run_id}")
    handle = StageRun(client, run.info.run_id, parent_id)
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)
        if owned:
            settle_parent(cfg, parent_id)


def lock_entry_hash(entry: Mapping[str, Any]) -> str:
    """Hash of one stage's dvc.lock entry (cmd, deps, params, outs with their hashes): equal
    exactly when dvc would call that stage's result the same."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _earlier_run(client: Any, exp_id: str, stage: str, lock_hash: str) -> str | None:
    """The latest FINISHED run of ``stage`` that produced the dvc.lock entry ``lock_hash``."""
    found = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{LOCK_HASH_TAG}` = '{lock_hash}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    ran = [r for r in found if REUSED_TAG not in r.data.tags]
    return ran[0].info.run_id if ran else None


def record_lineage(
    cfg: TrackingConfig,
    parent_id: str,
    stages: list[str],
    lock_hashes: Mapping[str, str],
    up_to_date: set[str],
) -> dict[str, str]:
    """After a ``dvc repro`` under ``parent_id``: for every stage, what the parent holds.

    A stage that ran has its child run, now tagged with the hash of the dvc.lock entry it wrote.
    A stage dvc skipped as up to date gets a reuse record (a FINISHED child run tagged with the
    earlier run that produced the same dvc.lock entry, or ``unknown`` when none in this store
    did, e.g. a result pulled from a dvc remote). Any other stage (dvc stopped before it, or it
    is outside the repro's targets and stale) is marked ``not run``. Returns stage -> lineage.
    """
    client, exp_id = _client(cfg)
    children = [r for r in _children(client, exp_id, parent_id) if REUSED_TAG not in r.data.tags]
    ran = {r.data.tags.get(STAGE_TAG): r for r in children}
    pid = client.get_run(parent_id).data.tags[PIPELINE_TAG]
    lineage: dict[str, str] = {}
    for stage in stages:
        lock_hash = lock_hashes.get(stage)
        if stage in ran:
            child = ran[stage]
            if lock_hash and child.info.status == "FINISHED":
                client.set_tag(child.info.run_id, LOCK_HASH_TAG, lock_hash)
            lineage[stage] = f"ran {child.info.run_id}"
        elif stage in up_to_date and lock_hash:
            earlier = _earlier_run(client, exp_id, stage, lock_hash) or "unknown"
            record = client.create_run(
                exp_id,
                run_name=f"{stage} (reused)",
                tags={
                    PARENT_TAG: parent_id,
                    PIPELINE_TAG: pid,
                    STAGE_TAG: stage,
                    REUSED_TAG: earlier,
                },
            )
            client.set_terminated(record.info.run_id, "FINISHED")
            lineage[stage] = f"reused {earlier}"
        else:
            lineage[stage] = "not run"
    for stage, text in lineage.items():
        client.set_tag(parent_id, LINEAGE_PREFIX + stage, text)
    return lineage


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
            "reused": r.data.tags.get(REUSED_TAG),
            "lock_hash": r.data.tags.get(LOCK_HASH_TAG),
            "lineage": {
                k[len(LINEAGE_PREFIX) :]: v
                for k, v in r.data.tags.items()
                if k.startswith(LINEAGE_PREFIX)
            },
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
