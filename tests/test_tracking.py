"""Real MLflow store (SQLite + artifact dir), read back with MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vpt_robust.config import TrackingConfig
from vpt_robust.tracking import (
    PARENT_TAG,
    download_artifacts,
    log_json_file,
    read_runs,
    resolve_uri,
    stage_run,
)


@pytest.fixture
def tracking(tmp_path: Path) -> TrackingConfig:
    return TrackingConfig(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifacts=str(tmp_path / "art"), experiment="t"
    )


def test_stages_share_one_parent_and_read_back(tracking: TrackingConfig, tmp_path: Path) -> None:
    params = {"train": {"lr": 40.0, "seeds": [0, 1]}}
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"acc": {"mean": 0.5}, "name": "x"}))
    with stage_run(tracking, "prepare", params, pid="p1") as run:
        run.log_params({"data": {"seed": 3}})
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        log_json_file(run, metrics)
        run.log_table([{"eps": 0.0, "acc": 0.9}, {"eps": 0.1, "acc": 0.2}], "curve.json")
    with stage_run(tracking, "report", params, pid="p1") as run2:
        run2.log_text("# hi", "report.md")

    client = MlflowClient(resolve_uri(tracking.uri))
    child = client.get_run(run.run_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags[PARENT_TAG] == run.parent_id == run2.parent_id
    assert child.data.params["data.seed"] == "3"
    assert child.data.metrics["acc.mean"] == 0.5
    history = client.get_metric_history(run.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    parent = client.get_run(run.parent_id)
    assert parent.data.params["train.seeds"] == "[0, 1]"
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"m.json", "curve.json"} <= names
    local = download_artifacts(tracking, run2.run_id, "report.md")
    assert local.read_text() == "# hi"
    runs = read_runs(tracking, "p1")
    assert sorted(r["stage"] or "parent" for r in runs) == ["parent", "prepare", "report"]
    assert Path(tracking.artifacts).is_dir()


def test_failed_stage_is_marked_failed(tracking: TrackingConfig) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        stage_run(tracking, "train", {}, pid="p2") as run,
    ):
        raise RuntimeError("boom")
    status = MlflowClient(resolve_uri(tracking.uri)).get_run(run.run_id).info.status
    assert status == "FAILED"


def test_disabled_tracking_writes_nothing(tmp_path: Path) -> None:
    cfg = TrackingConfig(
        enabled=False, uri=f"sqlite:///{tmp_path / 'x.db'}", artifacts=str(tmp_path / "a")
    )
    with stage_run(cfg, "prepare", {}) as run:
        run.log_metrics({"a": 1.0})
        run.log_params({"b": 2})
    assert list(tmp_path.iterdir()) == []
