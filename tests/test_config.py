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


def test_preset_prompts_replace_the_whole_list(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"prompts": [{"kind": "padding"}, {"kind": "evp"}]}))
    preset = tmp_path / "one.yaml"
    preset.write_text(yaml.safe_dump({"prompts": [{"kind": "vpt", "length": 3}]}))
    params = load_params(params_file, preset=str(preset))
    assert [(p.kind, p.args) for p in params.prompts] == [("vpt", {"length": 3})]
    assert [p.kind for p in validate({}).prompts] == ["padding"]  # the default: one family


def test_single_prompt_block_in_a_preset_names_both_keys_and_the_files(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"prompts": [{"kind": "padding", "pad_size": 4}]}))
    preset = tmp_path / "wide.yaml"
    preset.write_text(yaml.safe_dump({"prompt": {"kind": "padding", "pad_size": 30}}))
    with pytest.raises(ConfigError) as err:
        load_params(params_file, preset=str(preset))
    msg = str(err.value)
    assert msg.startswith(f"{preset}: `prompt` is not a params block")
    assert f"({params_file} sets `prompts`)" in msg
    assert "Write `prompts: [{kind: padding, pad_size: 30}]` instead of `prompt:`" in msg


def test_single_prompt_block_is_refused_wherever_it_comes_from(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"prompt": {"kind": "vpt"}, "prompts": []}))
    with pytest.raises(ConfigError, match=r"params.yaml: `prompt` is not .* \(it sets `prompts`\)"):
        load_params(params_file)
    params_file.write_text(yaml.safe_dump({"train": {"epochs": 1}}))
    with pytest.raises(ConfigError, match=r"^the overrides \(--set\): `prompt` is not a params"):
        load_params(params_file, overrides=parse_override("prompt.kind=vpt"))
    with pytest.raises(ConfigError, match=r"^params: `prompt` is not .*`prompts: \[\{kind: vpt"):
        validate({"prompt": {"kind": "vpt"}})


def test_empty_prompts_list_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"prompts: \[\] lists no prompt family"):
        validate({"prompts": []})


def test_prepare_names_a_command_that_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    from types import SimpleNamespace

    import torch

    from vpt_robust.cli import build_parser
    from vpt_robust.stages import prepare

    stored = SimpleNamespace(images=torch.zeros(1, 3, 32, 32))  # data/ rendered at 32 px
    monkeypatch.setattr(prepare, "load_embedded", lambda root: stored)
    params = validate({"data": {"image_size": 16}})
    with pytest.raises(ValueError, match="data.image_size: params say 16") as err:
        prepare.make_splits(params)
    commands = re.findall(r"`(vpt-robust [^`]*)`", str(err.value))
    assert commands == ["vpt-robust data --force"]
    args = build_parser().parse_args(commands[0].split()[1:])  # exits on an unknown command
    assert (args.command, args.force) == ("data", True)


def test_importing_the_config_does_not_import_torch() -> None:
    code = "import sys, vpt_robust.config; print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_pretrain_architecture_names_a_bad_field() -> None:
    params = validate({"pretrain": {"architecture": {"depth": 4, "stem": "patch"}}})
    assert params.pretrain.architecture == {"depth": 4, "stem": "patch"}
    with pytest.raises(ConfigError, match=r"pretrain.architecture.*unknown tiny CLIP spec fields"):
        validate({"pretrain": {"architecture": {"layers": 4}}})
    with pytest.raises(ConfigError, match=r"pretrain.architecture.*stem: 'linear'"):
        validate({"pretrain": {"architecture": {"stem": "linear"}}})
    with pytest.raises(ConfigError, match=r"pretrain.architecture.*data.image_size"):
        validate({"pretrain": {"architecture": {"image_size": 64}}})


def test_an_empty_or_missing_params_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    # `vpt-robust params --preset X > params.yaml` empties the file before it is read: merged
    # over the models' defaults, the preset would run another pipeline (one prompt family).
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"params.yaml: the file is empty .*--output"):
        load_params(empty, preset="full")
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_params(tmp_path / "absent.yaml", preset="full")


def test_params_output_rewrites_the_params_file_it_reads(tmp_path: Path, capsys) -> None:
    from vpt_robust.cli import main

    root = Path(__file__).resolve().parent.parent
    params_file = tmp_path / "params.yaml"
    params_file.write_text((root / "params.yaml").read_text())
    args = ["params", "--params", str(params_file), "--preset", "full", "-o", str(params_file)]
    assert main(args) == 0
    assert capsys.readouterr().out == f"wrote {params_file}\n"
    assert load_params(params_file) == load_params(root / "params.yaml", preset="full")
    assert main(["params", "--params", str(params_file)]) == 0  # stdout: the same params
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(params_file.read_text())
    assert (
        main(["params", "--params", str(params_file), "-o", str(tmp_path / "no" / "p.yaml")]) == 2
    )
    assert "the folder" in capsys.readouterr().err and params_file.read_text()
