"""bench/corruptions.py runs end to end and reports a ratio and a measured bound per row."""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    # The run's settings are recorded as given.
    assert result["severity"] == 3 and result["table"] == "imagenet"
    assert result["threads_ours"] == 1 and result["threads_reference"] == 1
    assert result["batch"] == {"32": 8}
    # Without --glibc-malloc the thresholds are fixed wherever glibc's mallopt exists.
    assert result["malloc_thresholds_fixed"] is (platform.libc_ver()[0] == "glibc")
    rows = {row["corruption"]: row for row in result["rows"]}
    assert list(rows) == names
    for name, row in rows.items():
        assert set(row) == ROW_KEYS and (row["size"], row["batch"]) == (32, 8)
        assert min(row["ours_img_s"], row["reference_img_s"], row["clone_img_s"]) > 0
        # Every ratio is the one its rates give: ours, the clone bound, and the floor.
        assert row["ratio"] == pytest.approx(row["ours_img_s"] / row["reference_img_s"])
        assert row["bound_ratio"] == pytest.approx(row["clone_img_s"] / row["reference_img_s"])
        assert row["floor_ratio"] == pytest.approx(row["floor_img_s"] / row["reference_img_s"])
        # The floor is the clone bound, or the corruption's own unavoidable part where slower.
        assert row["floor_kind"] in ("clone", FLOOR_KINDS[name])
        if row["floor_kind"] == "clone":
            assert row["floor_img_s"] == row["clone_img_s"]
        else:
            assert row["floor_img_s"] < row["clone_img_s"]
        # The printed table shows the same numbers.
        line = next(ln for ln in run.stdout.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] == f"{row['ratio']:.1f}x"
        assert cells[4].endswith(row["floor_kind"])


ROW_KEYS = {
    "corruption", "size", "batch", "ours_img_s", "reference_img_s", "ratio", "clone_img_s",
    "bound_ratio", "floor_kind", "floor_img_s", "floor_ratio",
}  # fmt: skip
FLOOR_KINDS = {"gaussian_noise": "draws", "contrast": "clone", "jpeg_compression": "codec"}


def test_floor_parts_are_the_ones_no_implementation_avoids() -> None:
    """Noises: their random draws; JPEG: the codec calls; contrast: none (the clone bound)."""
    spec = importlib.util.spec_from_file_location(
        "bench_corruptions", ROOT / "bench" / "corruptions.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = torch.rand(2, 3, 16, 16)
    assert bench.floor_call(x, "contrast", 3, "imagenet") is None
    kind, draw = bench.floor_call(x, "gaussian_noise", 3, "imagenet")
    assert kind == "draws" and draw(0).shape == x.shape
    assert torch.equal(draw(4), draw(4)) and not torch.equal(draw(4), draw(5))  # seeded per rep
    kind, codec = bench.floor_call(x, "jpeg_compression", 3, "imagenet")
    decoded = codec(0)
    assert kind == "codec" and sum(len(part) for part in decoded) == 2
