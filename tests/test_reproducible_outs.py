"""Outputs are a function of inputs: two clean runs of the stages in two directories write
byte-identical dvc outs (no times, hosts, absolute paths or run ids in them). evaluate's outs
are checked the same way in tests/test_evaluate_stage.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vpt_robust.config import load_params
from vpt_robust.data.embedded import materialize
from vpt_robust.stages import stage_function
from vpt_robust.tracking import disabled_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "pretrain", "train_prompt")
OUTS = ("prepare", "backbone", "prompts")


def _tree_hash(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def _clean_run(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stages as dvc runs them: in the repo directory, with the relative paths of params."""
    root.mkdir(parents=True)
    monkeypatch.chdir(root)
    paths = {k: k for k in ("data", "outputs", "metrics")}
    params = load_params(
        ROOT / "params.yaml",
        preset="smoke",
        overrides={
            "paths": paths,
            "tracking": {"enabled": False},
            "pretrain": {"steps": 10},
            "train": {"epochs": 1},
        },
    )
    d = params.data
    materialize(
        Path(paths["data"]), seed=d.seed, image_size=d.image_size, per_class_style=d.per_class_style
    )
    for name in STAGES:
        stage_function(name)(params, disabled_run())
    return root.resolve() / "outputs"


def test_two_clean_runs_in_other_dirs_write_identical_outs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _clean_run(tmp_path / "a", monkeypatch)
    second = _clean_run(tmp_path / "b" / "deeper", monkeypatch)
    for out in OUTS:
        a, b = _tree_hash(first / out), _tree_hash(second / out)
        assert a and a == b, f"outputs/{out} differs between two clean runs"
    metrics_a, metrics_b = (
        _tree_hash(first.parent / "metrics"),
        _tree_hash(second.parent / "metrics"),
    )
    assert {f"{s}.json" for s in STAGES} <= set(metrics_a), sorted(metrics_a)
    assert metrics_a == metrics_b, "metrics/ (dvc metrics) differ between two clean runs"
    for out in (*OUTS, "../metrics"):
        for f in (second / out).rglob("*.json"):
            assert str(tmp_path) not in f.read_text(), f"{f} holds an absolute path"
    meta = json.loads((second / "prompts" / "padding" / "seed_0.json").read_text())
    assert "seconds" not in meta["summary"] and "train_acc" in meta["summary"]
