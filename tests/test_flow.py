"""The Prefect flow runs the same stages under Prefect's test harness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vpt-robust")
    return client.search_runs([exp.experiment_id], max_results=100)


def _params_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in ``tmp_path`` with the project's params.yaml (presets merge over it)."""
    shutil.copy(Path(__file__).resolve().parent.parent / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)


def test_pipeline_flow_runs_all_stages(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    from flows.pipeline import pipeline

    _params_here(tmp_path, monkeypatch)
    state = pipeline(preset="smoke", params_file="params.yaml", return_state=True)
    assert state.is_completed(), state
    result = state.result()
    from vpt_robust.stages import STAGES

    assert list(result) == list(STAGES)
    # each task ran the stage function itself: its result is what the stage wrote
    for name in ("evaluate", "stream_eval", "tecoa", "continual", "report"):
        written = json.loads((tmp_path / "metrics" / f"{name}.json").read_text())
        assert json.loads(json.dumps(result[name], default=str)) == written, name
    clean = result["evaluate"]["results"]["padding"]["base"]["clean"]["mean"]
    assert 0.0 < clean <= 1.0
    assert (tmp_path / "outputs" / "prompts" / "padding" / "seed_0.safetensors").is_file()

    runs = _runs(tmp_path)
    pids = {r.data.tags.get("vpt_robust.pipeline_id") for r in runs}
    assert len(pids) == 1 and next(iter(pids)).startswith("prefect-")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["vpt_robust.stage"] for r in children) == sorted(result)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)


def test_a_failing_stage_fails_the_flow_and_its_parent_run(
    prefect_harness, tmp_path: Path, monkeypatch
) -> None:
    from flows.pipeline import pipeline

    _params_here(tmp_path, monkeypatch)  # no data, no splits: evaluate fails at once
    state = pipeline(preset="smoke", stages=["evaluate"], materialise=False, return_state=True)
    assert state.is_failed()
    runs = _runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert [(r.data.tags["vpt_robust.stage"], r.info.status) for r in children] == [
        ("evaluate", "FAILED")
    ]


def test_flow_rejects_unknown_stage(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    from flows.pipeline import pipeline

    _params_here(tmp_path, monkeypatch)
    state = pipeline(preset="smoke", stages=["nope"], materialise=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="'nope'"):
        state.result()
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was opened
