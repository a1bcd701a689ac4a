"""The report run reads in the MLflow UI: `mlflow server` on 127.0.0.1 over a store written by
the report stage (on small synthetic metrics files and one learned padding prompt), opened in
headless Chromium (Playwright driving Debian's /usr/bin/chromium; no downloaded browser)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _stats(mean: float) -> dict:
    return {"mean": mean, "std": 0.01, "values": [mean]}


def _stream(models: list[str], base: float) -> dict:
    rows = [
        {"run": 0, "segment": i, "corruption": c, "severity": 5, "error": base + 0.1 * i, "n": 8}
        for i, c in enumerate(["gaussian_noise", "fog"])
    ]
    return {m: {"mean_error": _stats(base + 0.05), "stream": rows} for m in models}


def _metrics_files(root: Path) -> None:
    from vpt_robust.stages.common import write_json

    m = root / "metrics"
    write_json(m / "prepare.json", {"target_style": "night"})
    write_json(
        m / "pretrain.json",
        {
            "backbone": {"name": "vpt-tiny-clip", "source": "embedded"},
            "zero_shot": {"pretrain_test": 0.7, "test_base": 0.4, "test_novel": 0.3},
        },
    )
    metrics = ["clean", "pgd_Linf_1/255", "pgd_Linf_4/255", "pgd_subset_Linf_1/255"]
    metrics.append("autoattack_Linf_1/255")
    row = dict(zip(metrics, map(_stats, [0.62, 0.41, 0.08, 0.45, 0.37]), strict=True))
    write_json(
        m / "evaluate.json",
        {
            "attack": {"norm": "Linf", "eps": [1 / 255, 4 / 255], "steps": 10},
            "autoattack": {
                "enabled": True,
                "version": "standard",
                "fast": False,
                "n_samples": 8,
                "splits": ["base"],
            },
            "metrics": metrics,
            "seeds": [0],
            "results": {"zero_shot": {"base": row}, "padding": {"base": row}},
        },
    )
    write_json(
        m / "stream_eval.json",
        {"stream": {"protocol": "continual"}, "results": _stream(["zero_shot", "padding"], 0.5)},
    )
    adapt = _stream(["source", "tent"], 0.4)
    for res in adapt.values():
        res.update(late_error=_stats(0.45), cost={"ratio_to_source": 1.0})
    write_json(m / "stream_adapt.json", {"protocol": "continual", "seeds": [0], "results": adapt})
    write_json(
        m / "tecoa.json",
        {
            "metrics": ["clean", "pgd_Linf_1/255"],
            "train_attack": {"eps": 1 / 255, "steps": 2, "norm": "Linf"},
            "seeds": [0],
            "results": {
                "tecoa_vpt": {"base": {"clean": _stats(0.5), "pgd_Linf_1/255": _stats(0.3)}}
            },
        },
    )
    names = ["average_accuracy", "forgetting", "robust_average_accuracy", "robust_forgetting"]
    matrix = [[0.9, 0.5], [None, 0.8]]
    write_json(
        m / "continual.json",
        {
            "sequence": {"tasks": [{"name": "t0"}, {"name": "t1"}]},
            "seeds": [0],
            "results": {"l2p": {k: _stats(0.6) for k in names}},
            "matrices": {"l2p": {"accuracy": [matrix], "robust": [matrix]}},
        },
    )


def _padding_prompt(root: Path) -> None:
    import torch

    from vpt_robust.prompts.io import save_prompt
    from vpt_robust.prompts.registry import build_prompt

    torch.manual_seed(0)
    module = build_prompt("padding", {"pad_size": 4}, 32)
    tensors = {f"pixel_prompt.{k}": v for k, v in module.state_dict().items()}
    save_prompt(root / "outputs/prompts/padding/seed_0", tensors, metadata={"image_size": 32})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A store holding one pipeline whose report stage ran on the synthetic files."""
    from vpt_robust.config import validate
    from vpt_robust.stages import run_stage

    root = tmp_path_factory.mktemp("ui")
    _metrics_files(root)
    _padding_prompt(root)
    params = validate(
        {
            "paths": {k: str(root / k) for k in ("data", "outputs", "metrics")},
            "prompts": [{"name": "padding", "kind": "padding", "pad_size": 4}],
            "train": {"seeds": [0]},
            "tracking": {
                "uri": f"sqlite:///{root / 'mlflow.db'}",
                "artifacts": str(root / "mlartifacts"),
            },
        }
    )
    run_stage("report", params, pipeline_id="ui-test")
    return root, params


def test_report_run_logs_table_tags_and_images(store) -> None:
    from vpt_robust import tracking

    root, params = store
    (report,) = [r for r in tracking.read_runs(params.tracking) if r["stage"] == "report"]
    assert report["metrics"]["padding.pgd_Linf_004-255"] == 8.0
    assert report["metrics"]["continual/l2p.continual_forgetting"] == 60.0
    assert report["metrics"]["tta/tent.stream_mean_error"] == 45.0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(params.tracking.uri)
    run = client.get_run(report["run_id"])
    assert run.data.tags["backbone"] == "vpt-tiny-clip"
    assert run.data.tags["method.tecoa/tecoa_vpt"] == "true"
    files = {a.path for a in client.list_artifacts(report["run_id"])}
    assert {
        "protocol_table.json",
        "stream_error_curves.png",
        "continual_accuracy_matrices.png",
        "prompt_padding.png",
    } <= files


def test_show_prints_the_one_protocol_table_and_where_to_browse(store, capsys) -> None:
    from vpt_robust.cli import main

    root, _ = store
    params_file = Path(__file__).resolve().parent.parent / "params.yaml"
    sets = [f"--set=paths.{k}={root / k}" for k in ("data", "outputs", "metrics")]
    assert main(["show", "--params", str(params_file), *sets]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:4] == ["method", "stage", "clean", "pgd_Linf_001-255"]
    assert head[-3:] == ["stream error", "continual avg acc", "forgetting"]
    by_method = {c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in lines)}
    assert by_method["padding"][1:4] == ["evaluate", "62.0", "41.0"]
    assert by_method["padding"][-3] == "55.0"  # its stream mean error
    assert by_method["tta/tent"][2] == "-" and by_method["tta/tent"][-3] == "45.0"
    assert by_method["continual/l2p"][-2:] == ["60.0", "60.0"]
    assert by_method["tecoa/tecoa_vpt"][2:4] == ["50.0", "30.0"]
    assert "report.md" in out and "make ui" in out
    (root / "outputs/report/protocol_table.md").unlink()
    assert main(["show", "--params", str(params_file), *sets]) == 2
    assert "run `vpt-robust repro` first" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(store):
    root, _ = store
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not answer /health in 60 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()


def test_the_report_run_renders_in_chromium(store, server, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium executable on PATH (Debian: apt-get install -y chromium)")
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    root, params = store
    client = MlflowClient(params.tracking.uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    (report,) = client.search_runs([exp.experiment_id], "tags.`vpt_robust.stage` = 'report'")
    run_url = f"{server}/#/experiments/{exp.experiment_id}/runs/{report.info.run_id}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # the experiment's runs table (MLflow 3 opens an experiment on its GenAI overview)
        page.goto(f"{server}/#/experiments/{exp.experiment_id}/runs")
        page.get_by_text("pipeline-ui-test").first.wait_for(timeout=60_000)
        assert page.get_by_text("2 matching runs").count() == 1  # the parent and its report
        page.screenshot(path=str(tmp_path / "experiment.png"))

        page.goto(run_url)
        page.get_by_text("report", exact=True).first.wait_for(timeout=60_000)
        for text in ("backbone", "vpt-tiny-clip", "padding.pgd_Linf_004-255"):
            assert page.get_by_text(text).count() > 0, text

        page.goto(f"{run_url}/artifacts/protocol_table.json")
        page.get_by_text("tecoa/tecoa_vpt").first.wait_for(timeout=60_000)
        for text in ("continual_forgetting", "pgd_Linf_004-255", "tta/tent"):
            assert page.get_by_text(text).count() > 0, text
        page.screenshot(path=str(tmp_path / "table.png"))

        # each image artifact renders as an <img> of the logged PNG's own size (the 32 px
        # padding prompt; the heatmap figure), not just some icon of the page
        for name in ("prompt_padding.png", "continual_accuracy_matrices.png"):
            local = client.download_artifacts(report.info.run_id, name, str(tmp_path / "dl"))
            width = int.from_bytes(Path(local).read_bytes()[16:20], "big")  # PNG IHDR width
            page.goto(f"{run_url}/artifacts/{name}")
            page.reload()  # a hash change alone keeps the previous preview
            page.wait_for_function(
                "(w) => [...document.images].some(i => i.complete && i.naturalWidth === w)",
                arg=width,
                timeout=60_000,
            )
        page.screenshot(path=str(tmp_path / "heatmaps.png"))
        browser.close()
    shots = sorted(tmp_path.glob("*.png"))
    assert [s.name for s in shots] == ["experiment.png", "heatmaps.png", "table.png"]
    assert all(s.stat().st_size > 10_000 for s in shots)
