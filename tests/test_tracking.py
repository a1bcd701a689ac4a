"""Real MLflow store (SQLite + artifact dir), read back with MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import vpt_robust.tracking as tracking_mod
from vpt_robust.config import TrackingConfig
from vpt_robust.tracking import (
    LINEAGE_PREFIX,
    LOCK_HASH_TAG,
    PARENT_TAG,
    PIPELINE_TAG,
    REUSED_TAG,
    close_parent,
    download_artifacts,
    log_json_file,
    open_parent,
    read_runs,
    record_lineage,
    resolve_uri,
    stage_run,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def tracking(store: Path, request: pytest.FixtureRequest) -> TrackingConfig:
    """An experiment of its own per test, in the module's store."""
    return TrackingConfig(
        uri=f"sqlite:///{store / 'mlflow.db'}",
        artifacts=str(store / "art"),
        experiment=request.node.name,
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


def _client(cfg: TrackingConfig) -> MlflowClient:
    return MlflowClient(resolve_uri(cfg.uri))


def _status(cfg: TrackingConfig, run_id: str) -> str:
    return _client(cfg).get_run(run_id).info.status


def test_failed_stage_fails_its_run_and_the_parent(tracking: TrackingConfig) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        stage_run(tracking, "train", {}, pid="p2") as run,
    ):
        raise RuntimeError("boom")
    assert _status(tracking, run.run_id) == "FAILED"
    assert _status(tracking, run.parent_id) == "FAILED"
    with stage_run(tracking, "report", {}, pid="p2") as later:
        pass
    assert later.parent_id == run.parent_id
    assert _status(tracking, later.run_id) == "FINISHED"
    assert _status(tracking, run.parent_id) == "FAILED"  # one failed stage fails the pipeline


def test_parent_runs_while_a_stage_runs_and_finishes_after(tracking: TrackingConfig) -> None:
    with stage_run(tracking, "prepare", {}, pid="p3") as run:
        assert _status(tracking, run.parent_id) == "RUNNING"
    assert _status(tracking, run.parent_id) == "FINISHED"
    with stage_run(tracking, "pretrain", {}, pid="p3") as second:
        assert _status(tracking, run.parent_id) == "RUNNING"
    assert second.parent_id == run.parent_id
    assert _status(tracking, run.parent_id) == "FINISHED"
    tags = _client(tracking).get_run(run.parent_id).data.tags
    assert tags[LINEAGE_PREFIX + "prepare"] == f"ran {run.run_id}"
    assert tags[LINEAGE_PREFIX + "pretrain"] == f"ran {second.run_id}"


def test_an_orchestrator_parent_stays_running_until_it_closes(tracking: TrackingConfig) -> None:
    parent = open_parent(tracking, "p4", {"a": 1}, owner="repro")
    assert _status(tracking, parent) == "RUNNING"
    with stage_run(tracking, "prepare", {}, pid="p4") as run:
        pass
    assert run.parent_id == parent
    assert _status(tracking, parent) == "RUNNING"  # the orchestrator is not done yet
    assert close_parent(tracking, parent, failed=False) == "FINISHED"
    assert _status(tracking, parent) == "FINISHED"
    other = open_parent(tracking, "p5", {}, owner="flow")
    assert close_parent(tracking, other, failed=True) == "FAILED"


def test_a_stage_run_by_hand_is_a_pipeline_of_its_own(
    tracking: TrackingConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(tracking_mod.PIPELINE_ENV, raising=False)
    monkeypatch.setattr(tracking_mod, "dvc_ancestor", lambda: None)
    with stage_run(tracking, "prepare", {"x": 1}) as first:
        pass
    with stage_run(tracking, "prepare", {"x": 1}) as second:  # same params: still a new parent
        pass
    assert first.parent_id != second.parent_id


def test_concurrent_stages_of_one_pipeline_create_one_parent(
    tracking: TrackingConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check-then-create under the store lock: widen the race window to make it certain."""
    import threading
    import time

    open_parent(tracking, "warm", {})  # the experiment exists; the race is on the parent only
    original = MlflowClient.create_run

    def slow_create_run(self, *args, **kwargs):
        time.sleep(0.3)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", slow_create_run)
    barrier = threading.Barrier(3)
    ids: list[str] = []

    def worker() -> None:
        barrier.wait()
        ids.append(open_parent(tracking, "race", {}))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 3 and len(set(ids)) == 1
    exp = _client(tracking).get_experiment_by_name(tracking.experiment)
    found = _client(tracking).search_runs(
        [exp.experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = 'race'"
    )
    assert len(found) == 1


FAKE_DVC = """#!{python}
import subprocess, sys
code = "from vpt_robust.tracking import pipeline_id; print(pipeline_id())"
for _ in range(2):  # two stages, each its own process under a shell, as dvc runs them
    subprocess.run(["/bin/sh", "-c", f"{python} -c '{{code}}'".format(code=code)], check=True)
"""


def test_stages_under_one_dvc_process_share_a_pipeline_id(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(FAKE_DVC.format(python=sys.executable))
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != tracking_mod.PIPELINE_ENV}
    runs = [
        subprocess.run([str(fake)], capture_output=True, text=True, env=env, check=True)
        for _ in range(2)
    ]
    first, second = (r.stdout.split() for r in runs)
    assert len(first) == 2 and first[0] == first[1] and first[0].startswith("dvc-")
    assert second[0] == second[1] and second[0] != first[0]  # another dvc repro, another id
    explicit = subprocess.run(
        [str(fake)],
        capture_output=True,
        text=True,
        check=True,
        env={**env, "VPT_ROBUST_PIPELINE_ID": "mine"},
    )
    assert explicit.stdout.split() == ["mine", "mine"]


def test_record_lineage_names_the_run_of_every_stage(tracking: TrackingConfig) -> None:
    client = _client(tracking)
    with stage_run(tracking, "prepare", {}, pid="old") as old_prepare:
        pass
    with stage_run(tracking, "train", {}, pid="old") as old_train:
        pass
    old_parent = old_prepare.parent_id
    assert record_lineage(
        tracking, old_parent, ["prepare", "train"], {"prepare": "h1", "train": "h2"}, set()
    ) == {"prepare": f"ran {old_prepare.run_id}", "train": f"ran {old_train.run_id}"}
    assert client.get_run(old_prepare.run_id).data.tags[LOCK_HASH_TAG] == "h1"

    parent = open_parent(tracking, "new", {}, owner="repro")
    with stage_run(tracking, "train", {}, pid="new") as new_train:
        pass
    lineage = record_lineage(
        tracking,
        parent,
        ["prepare", "train", "report", "pulled"],
        {"prepare": "h1", "train": "h3", "report": "h4", "pulled": "h5"},
        up_to_date={"prepare", "train", "pulled"},
    )
    assert lineage == {
        "prepare": f"reused {old_prepare.run_id}",
        "train": f"ran {new_train.run_id}",
        "report": "not run",  # changed, and dvc did not run it
        "pulled": "reused unknown",  # up to date, but no run in this store made it
    }
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
    )
    reused = {
        r.data.tags["vpt_robust.stage"]: r.data.tags[REUSED_TAG]
        for r in children
        if REUSED_TAG in r.data.tags
    }
    assert reused == {"prepare": old_prepare.run_id, "pulled": "unknown"}
    assert all(r.info.status == "FINISHED" for r in children)
    tags = client.get_run(parent).data.tags
    assert tags[LINEAGE_PREFIX + "prepare"] == f"reused {old_prepare.run_id}"
    assert close_parent(tracking, parent, failed=False) == "FINISHED"
    # a reuse record is never itself found as the run that made a result
    again = open_parent(tracking, "again", {}, owner="repro")
    lineage = record_lineage(tracking, again, ["prepare"], {"prepare": "h1"}, {"prepare"})
    assert lineage == {"prepare": f"reused {old_prepare.run_id}"}


def test_disabled_tracking_writes_nothing(tmp_path: Path) -> None:
    cfg = TrackingConfig(
        enabled=False, uri=f"sqlite:///{tmp_path / 'x.db'}", artifacts=str(tmp_path / "a")
    )
    with stage_run(cfg, "prepare", {}) as run:
        run.log_metrics({"a": 1.0})
        run.log_params({"b": 2})
    assert list(tmp_path.iterdir()) == []
