"""The Prefect flow runs the same stages under Prefect's test harness."""

from __future__ import annotations

import json
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


def test_pipeline_flow_runs_all_stages(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    from flows.pipeline import pipeline

    monkeypatch.chdir(tmp_path)
    state = pipeline(preset="smoke", params_file="params.yaml", return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert list(result) == [
        "prepare",
        "pretrain",
        "train_prompt",
        "evaluate",
        "stream_eval",
        "report",
    ]
    evaluation = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert evaluation["results"]["padding"]["base"]["clean"]["mean"] >= 0
    assert (tmp_path / "outputs" / "prompts" / "padding" / "seed_0.safetensors").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vpt-robust")
    runs = client.search_runs([exp.experiment_id])
    pids = {r.data.tags.get("vpt_robust.pipeline_id") for r in runs}
    assert len(pids) == 1 and next(iter(pids)).startswith("prefect-")


def test_flow_rejects_unknown_stage(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    from flows.pipeline import pipeline

    monkeypatch.chdir(tmp_path)
    state = pipeline(preset="smoke", stages=["nope"], materialise=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="'nope'"):
        state.result()
