"""bench/corruptions.py runs end to end and reports a ratio and a measured bound per row."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_corruption_bench_reports_ratios_and_bounds(tmp_path: Path) -> None:
    if importlib.util.find_spec("imagecorruptions") is None:
        pytest.skip("imagecorruptions is not installed")
    out = tmp_path / "bench.json"
    names = ["gaussian_noise", "contrast", "jpeg_compression"]
    cmd = [sys.executable, str(ROOT / "bench" / "corruptions.py"), "--sizes", "32", "--batch",
           "8", "--corruptions", *names, "--min-time", "0.01", "--max-reps", "2",
           "--max-ref-images", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {row["corruption"]: row for row in result["rows"]}
    assert list(rows) == names and result["malloc_thresholds_fixed"] in (True, False)
    for row in rows.values():
        assert row["ours_img_s"] > 0 and row["reference_img_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_img_s"] / row["reference_img_s"])
        assert row["floor_img_s"] <= row["clone_img_s"]
    assert rows["contrast"]["floor_kind"] == "clone"
    assert rows["gaussian_noise"]["floor_kind"] in ("draws", "clone")
    assert rows["jpeg_compression"]["floor_kind"] in ("codec", "clone")
    assert "| jpeg_compression |" in run.stdout
