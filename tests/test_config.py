from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vpt_robust.config import ConfigError, load_params, parse_override, validate


def test_defaults_validate() -> None:
    params = validate({})
    assert params.train.lr > 0
    assert params.backbone.source == "embedded"


def test_error_names_field_value_and_bound() -> None:
    with pytest.raises(ConfigError) as err:
        validate({"train": {"lr": -1}})
    assert "train.lr: -1 is not > 0" in str(err.value)


def test_unknown_field_and_literal_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        validate({"train": {"lrr": 1}, "evaluate": {"attack": {"norm": "L3"}}})
    msg = str(err.value)
    assert "train.lrr: unknown field" in msg
    assert "evaluate.attack.norm: 'L3' is not one of" in msg


def test_eps_accepts_fractions() -> None:
    params = validate({"evaluate": {"attack": {"eps": ["1/255", 0.5]}}})
    assert params.evaluate.attack.eps == [pytest.approx(1 / 255), 0.5]
    with pytest.raises(ConfigError, match="evaluate.attack.eps.0"):
        validate({"evaluate": {"attack": {"eps": ["2"]}}})


def test_preset_merges_over_params(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": {"epochs": 3, "lr": 1.0}}))
    params = load_params(params_file, preset="clip_vit_b32", overrides=parse_override("train.lr=2"))
    assert params.backbone.name == "ViT-B-32"
    assert params.train.epochs == 10  # preset wins over params.yaml
    assert params.train.lr == 2  # explicit override wins over both
    with pytest.raises(ConfigError, match="known presets"):
        load_params(params_file, preset="no-such-preset")


def test_backbone_requires_name() -> None:
    with pytest.raises(ConfigError, match="backbone.name is required"):
        validate({"backbone": {"source": "open_clip"}})


def test_cli_rejects_bad_value_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": -1}}))
    proc = subprocess.run(
        [sys.executable, "-m", "vpt_robust", "stage", "prepare"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "train.lr: -1 is not > 0" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
