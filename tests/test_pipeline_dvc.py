"""A real `dvc repro` of the smoke preset in a temporary git repo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, project_root_module: Path) -> Path:
    root = tmp_path_factory.mktemp("dvc-repo")
    for name in ("dvc.yaml", "configs"):
        src = project_root_module / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    shutil.copytree(
        project_root_module / "vpt_robust",
        root / "vpt_robust",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    params = _run([str(BIN / "vpt-robust"), "params", "--preset", "smoke"], root)
    (root / "params.yaml").write_text(params)
    assert "version it with `dvc add data`" in _run(["vpt-robust", "data"], root)
    _run(["dvc", "add", "-q", "data"], root)
    return root


@pytest.fixture(scope="module")
def project_root_module() -> Path:
    return Path(__file__).resolve().parent.parent


def test_repro_runs_every_stage_then_nothing_then_only_dependants(repo: Path) -> None:
    first = _run(["dvc", "repro"], repo)
    ran = _ran(first)
    assert ran[:3] == ["prepare", "pretrain", "train_prompt"] and ran[-1] == "report"
    assert sorted(ran[3:-1]) == ["evaluate", "stream_eval"]
    evaluation = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(evaluation["results"]) == {"zero_shot", "padding", "linear_probe"}
    assert set(evaluation["results"]["linear_probe"]) == {"base"}  # bound to its classes
    report = (repo / "outputs" / "report" / "report.md").read_text()
    assert "| padding | novel |" in report

    assert _ran(_run(["dvc", "repro"], repo)) == []

    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("steps: 2\n", "steps: 3\n", 1))
    assert "steps: 3" in (repo / "params.yaml").read_text()
    assert _ran(_run(["dvc", "repro"], repo)) == ["evaluate", "report"]  # not stream_eval

    # the data check: a materialisation that matches data.dvc is accepted, a changed one is refused
    assert "up to date" in _run(["vpt-robust", "data"], repo)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        ["vpt-robust", "data", "--set", "data.seed=1"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3 and "refusing to overwrite" in proc.stderr
    assert "up to date" in _run(["vpt-robust", "data"], repo)  # nothing was lost
    proc = subprocess.run(
        ["vpt-robust", "data", "--force", "--set", "data.seed=1"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3 and "does not match data.dvc" in proc.stderr


def test_each_stage_logged_a_child_run_under_one_parent(repo: Path) -> None:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vpt-robust")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    stages = {r.data.tags["vpt_robust.stage"] for r in children}
    assert stages == {"prepare", "pretrain", "train_prompt", "evaluate", "stream_eval", "report"}
    first_parent = {
        r.data.tags["mlflow.parentRunId"]
        for r in children
        if r.data.tags["vpt_robust.stage"] == "prepare"
    }
    assert len(first_parent) == 1
    train = next(r for r in children if r.data.tags["vpt_robust.stage"] == "train_prompt")
    arts = [a.path for a in client.list_artifacts(train.info.run_id, "prompts/padding")]
    assert "prompts/padding/seed_0.safetensors" in arts and "prompts/padding/seed_0.json" in arts
    pretrain = next(r for r in children if r.data.tags["vpt_robust.stage"] == "pretrain")
    assert len(client.get_metric_history(pretrain.info.run_id, "loss")) >= 2
