"""Real `dvc repro` runs of the smoke preset in temporary git repos, and their MLflow tree.

One module-scoped history runs the repros once (2 shared cores: each costs a minute); every test
reads that history and checks one thing, so each stands alone whatever the order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from vpt_robust.stages import STAGES as _STAGES

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
STAGES = list(_STAGES)
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("VPT_ROBUST_PIPELINE_ID", None)
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _parent_of(output: str) -> str:
    found = re.findall(r"MLflow pipeline run (\w+) \(pipeline id", output)
    assert len(found) == 1, output
    return found[0]


def _make_repo(root: Path) -> Path:
    for name in ("dvc.yaml", "configs", ".dvcignore"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    shutil.copytree(
        ROOT / "vpt_robust", root / "vpt_robust", ignore=shutil.ignore_patterns("__pycache__")
    )
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q", "--force"], root)
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")  # dvc init writes its own
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    _run([str(BIN / "vpt-robust"), "params", "--preset", "smoke", "-o", "params.yaml"], root)
    assert "version it with `dvc add data`" in _run(["vpt-robust", "data"], root)
    _run(["dvc", "add", "-q", "data"], root)
    return root


def _set_attack_steps(repo: Path, old: int, new: int) -> None:
    params = (repo / "params.yaml").read_text()
    assert f"steps: {old}\n" in params
    (repo / "params.yaml").write_text(params.replace(f"steps: {old}\n", f"steps: {new}\n", 1))


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A full repro, an incremental one (one param), a no-op one (all through the wrapper), then
    a plain `dvc repro` after another param change."""
    repo = _make_repo(tmp_path_factory.mktemp("dvc-repo"))
    out: dict[str, Any] = {"repo": repo}
    out["full"] = _run(["vpt-robust", "repro"], repo)
    _set_attack_steps(repo, 2, 3)  # evaluate.attack.steps
    out["incremental"] = _run(["vpt-robust", "repro"], repo)
    out["noop"] = _run(["vpt-robust", "repro"], repo)
    _set_attack_steps(repo, 3, 4)
    out["plain"] = _run(["dvc", "repro"], repo)
    return out


def _client(repo: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    return client, client.get_experiment_by_name("vpt-robust").experiment_id


def _children(repo: Path, parent: str) -> list[Any]:
    client, exp = _client(repo)
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _tree(repo: Path, parent: str) -> dict[str, str]:
    """stage -> "ran" or "reused <run id>" for the children of ``parent``."""
    tree: dict[str, str] = {}
    for r in _children(repo, parent):
        stage = r.data.tags["vpt_robust.stage"]
        assert stage not in tree, f"two children for {stage}"
        reused = r.data.tags.get("vpt_robust.reused_run")
        tree[stage] = f"reused {reused}" if reused else "ran"
    return tree


def test_first_repro_runs_every_stage(history: dict[str, Any]) -> None:
    ran = _ran(history["full"])
    assert ran[:3] == ["prepare", "pretrain", "train_prompt"] and ran[-1] == "report"
    assert sorted(ran[3:-1]) == sorted(STAGES[3:-1])
    repo = history["repo"]
    evaluation = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(evaluation["results"]) == {"zero_shot", "padding", "linear_probe"}
    assert set(evaluation["results"]["linear_probe"]) == {"base"}  # bound to its classes
    assert "| padding | novel |" in (repo / "outputs" / "report" / "report.md").read_text()


def test_changing_one_param_reruns_only_its_dependants(history: dict[str, Any]) -> None:
    assert _ran(history["incremental"]) == ["evaluate", "report"]  # not stream_eval
    assert _ran(history["plain"]) == ["evaluate", "report"]


def test_repro_with_nothing_changed_runs_nothing(history: dict[str, Any]) -> None:
    assert _ran(history["noop"]) == []


def test_full_repro_is_one_finished_parent_with_a_child_per_stage(history: dict) -> None:
    repo, parent = history["repo"], _parent_of(history["full"])
    assert _tree(repo, parent) == dict.fromkeys(STAGES, "ran")
    client, _ = _client(repo)
    assert client.get_run(parent).info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in _children(repo, parent))
    # every stage run carries the hash of the dvc.lock entry it wrote
    assert all("vpt_robust.dvc_lock_hash" in r.data.tags for r in _children(repo, parent))
    train = next(
        r for r in _children(repo, parent) if r.data.tags["vpt_robust.stage"] == "train_prompt"
    )
    arts = [a.path for a in client.list_artifacts(train.info.run_id, "prompts/padding")]
    assert "prompts/padding/seed_0.safetensors" in arts and "prompts/padding/seed_0.json" in arts
    pretrain = next(
        r for r in _children(repo, parent) if r.data.tags["vpt_robust.stage"] == "pretrain"
    )
    assert len(client.get_metric_history(pretrain.info.run_id, "loss")) >= 2


def test_incremental_repro_runs_reran_stages_and_records_reused_ones(history: dict) -> None:
    repo = history["repo"]
    first, second = _parent_of(history["full"]), _parent_of(history["incremental"])
    assert first != second
    firsts = {r.data.tags["vpt_robust.stage"]: r.info.run_id for r in _children(repo, first)}
    rerun = {"evaluate", "report"}  # evaluate.attack.steps changed
    assert _tree(repo, second) == {
        s: "ran" if s in rerun else f"reused {firsts[s]}" for s in STAGES
    }
    client, _ = _client(repo)
    parent = client.get_run(second)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["vpt_robust.lineage.pretrain"] == f"reused {firsts['pretrain']}"
    assert parent.data.tags["vpt_robust.lineage.evaluate"].startswith("ran ")
    assert client.get_run(first).data.params["evaluate.attack.steps"] == "2"
    assert parent.data.params["evaluate.attack.steps"] == "3"


def test_noop_repro_is_a_parent_of_reuse_records_only(history: dict) -> None:
    repo = history["repo"]
    first, second, noop = (_parent_of(history[k]) for k in ("full", "incremental", "noop"))
    by_stage = {
        key: {r.data.tags["vpt_robust.stage"]: r.info.run_id for r in _children(repo, pid)}
        for key, pid in (("first", first), ("second", second))
    }
    made = dict(by_stage["first"], evaluate=by_stage["second"]["evaluate"])
    made["report"] = by_stage["second"]["report"]
    assert _tree(repo, noop) == {s: f"reused {made[s]}" for s in STAGES}
    client, _ = _client(repo)
    assert client.get_run(noop).info.status == "FINISHED"


def test_plain_dvc_repro_files_its_stages_under_one_parent(history: dict) -> None:
    repo = history["repo"]
    wrapped = {_parent_of(history[k]) for k in ("full", "incremental", "noop")}
    client, exp = _client(repo)
    parents = [
        r
        for r in client.search_runs([exp], max_results=1000)
        if "mlflow.parentRunId" not in r.data.tags and r.info.run_id not in wrapped
    ]
    assert len(parents) == 1
    plain = parents[0]
    assert plain.data.tags["vpt_robust.pipeline_id"].startswith("dvc-")
    assert _tree(repo, plain.info.run_id) == {"evaluate": "ran", "report": "ran"}
    assert plain.info.status == "FINISHED"


def test_data_check_accepts_a_match_and_refuses_a_change(history: dict) -> None:
    repo = history["repo"]
    assert "up to date" in _run(["vpt-robust", "data"], repo)

    def data(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["vpt-robust", "data", *args], cwd=repo, env=_env(), capture_output=True, text=True
        )

    proc = data("--set", "data.seed=1")
    assert proc.returncode == 3 and "refusing to overwrite" in proc.stderr
    assert "up to date" in _run(["vpt-robust", "data"], repo)  # nothing was lost
    proc = data("--force", "--set", "data.seed=1")
    assert proc.returncode == 3 and "does not match data.dvc" in proc.stderr
    assert "matches data.dvc" in _run(["vpt-robust", "data", "--force"], repo)  # restored
