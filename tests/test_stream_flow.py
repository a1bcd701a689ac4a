"""New domain streams end to end: a real Prefect server, the served deployment, inbox events,
MLflow; and `vpt-robust stream` without any server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from _stream_fixtures import make_folder, stream_params, tiny_checkpoint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", VPT_ROBUST_NO_PROGRESS="1", **extra)
    return env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("streams")
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    (root / "params.yaml").write_text(yaml.safe_dump(stream_params(root, ckpt, tracking=True)))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A Prefect server on 127.0.0.1 with its own PREFECT_HOME and a free port."""
    from flows.stream import start_server, stop_server

    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    proc, url = start_server()
    try:
        yield url, home
    finally:
        stop_server(proc)
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old


def _flow_runs(url: str) -> list[dict[str, Any]]:
    req = urllib.request.Request(
        f"{url}/flow_runs/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_runs(url: str, n: int, proc: subprocess.Popen, timeout: float) -> list[dict[str, Any]]:
    """The flow runs once ``n`` of them are in a final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`vpt-robust serve` exited early: {proc.returncode}")
        runs = _flow_runs(url)
        done = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
        if len(done) >= n:
            return runs
        time.sleep(1.0)
    raise AssertionError(f"fewer than {n} flow runs finished in {timeout:.0f} s: {_flow_runs(url)}")


def _mlflow_stream_runs(root: Path) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vpt-robust")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("vpt_robust.stage") == "stream"]


def _drop(src: Path, inbox: Path) -> None:
    """Write elsewhere, then move into the inbox in one rename (what a user should do)."""
    inbox.mkdir(exist_ok=True)
    os.rename(src, inbox / src.name)


def test_served_deployment_adapts_dropped_folders(server, workspace: Path) -> None:
    from vpt_robust.streams import Registry, validate_folder

    url, home = server
    staging = workspace / "staging"
    good = make_folder(staging / "day-1", seed=1)
    data_hash = validate_folder(good).data_hash
    shutil.copytree(good, staging / "day-1-again")
    bad = make_folder(staging / "broken", n=4)
    (bad / "img_001.png").write_bytes(b"garbage")

    log = (workspace / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "vpt_robust", "serve", "--params", str(workspace / "params.yaml")],
        cwd=ROOT,
        env=_env(PREFECT_API_URL=url, PREFECT_HOME=str(home), PREFECT_RUNNER_POLL_FREQUENCY="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tail = lambda: (workspace / "serve.log").read_text(errors="replace")[-4000:]  # noqa: E731
    try:
        _drop(good, workspace / "inbox")
        first = _wait_runs(url, 1, serve, timeout=150)
        states = [(r["state_type"], r["state"]["message"]) for r in first]
        assert [s for s, _ in states] == ["COMPLETED"], (states, tail())
        assert first[0]["parameters"]["path"] == str((workspace / "inbox" / "day-1").resolve())
        runs = _mlflow_stream_runs(workspace)
        assert [r.data.tags["vpt_robust.stream.data_hash"] for r in runs] == [data_hash]
        assert runs[0].info.status == "FINISHED"
        assert runs[0].data.tags["vpt_robust.stream.parent_version"] == "None"
        assert "batch.confidence" in runs[0].data.metrics
        store = Registry(workspace / "store")
        assert store.latest() == 1

        _drop(staging / "day-1-again", workspace / "inbox")  # the same content, another name
        _drop(bad, workspace / "inbox")
        runs = _wait_runs(url, 3, serve, timeout=150)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()
    by_folder = {Path(r["parameters"]["path"]).name: r for r in runs}
    assert set(by_folder) == {"day-1", "day-1-again", "broken"}, tail()
    assert by_folder["day-1-again"]["state_type"] == "COMPLETED"
    assert by_folder["broken"]["state_type"] == "FAILED"
    assert "img_001.png" in by_folder["broken"]["state"]["message"]
    assert store.latest() == 1 and [r["version"] for r in store.versions()] == [1]
    assert len(_mlflow_stream_runs(workspace)) == 1  # known content and a bad folder log no run


def test_stream_command_needs_no_server(tmp_path: Path, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(stream_params(tmp_path, ckpt, tracking=True)))
    folder = make_folder(tmp_path / "new-domain", seed=5, labels="folders")
    env = _env(PREFECT_HOME=str(tmp_path / "no-prefect-here"))
    cmd = [sys.executable, "-m", "vpt_robust"]
    done = subprocess.run(
        [*cmd, "stream", str(folder), "--params", str(params), "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, _, payload = done.stdout.partition("\n")
    result = json.loads(payload)
    assert first.startswith(f"{folder}: version 1 (parent None)")
    assert result["status"] == "adapted" and result["metrics"]["labelled"]
    runs = _mlflow_stream_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    assert runs[0].data.tags["vpt_robust.stream.data_hash"] == result["data_hash"]
    assert not (tmp_path / "no-prefect-here").exists()  # Prefect was never started

    from vpt_robust.cli import main  # the other commands in-process (no Prefect either)

    (folder / "circle" / "img_000.png").write_bytes(b"")
    assert main(["stream", str(folder), "--params", str(params)]) == 2
    assert "circle/img_000.png" in capsys.readouterr().err
    assert main(["versions", "--params", str(params)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split()[:3] == ["1*", "None", result["data_hash"]]
