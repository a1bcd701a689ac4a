"""Every preset in configs/ means what it says: each value it sets is the value the pipeline uses.

A preset is merged over params.yaml before validation; a value it sets can still fail to take
effect (a block the stages never read, a default that wins). So the check walks the preset's own
YAML and compares every leaf with the merged, validated params the stages read, where the prompt
families are what ``stages.build.families`` hands to train_prompt / evaluate / report.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from vpt_robust.config import PRESETS_DIR, PROJECT_ROOT, Params, load_params
from vpt_robust.stages.build import families

PARAMS_YAML = PROJECT_ROOT / "params.yaml"
PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))


def _used(params: Params) -> dict[str, Any]:
    """The params as the stages use them: every block, except that the fields holding prompt
    families are replaced by the families the stages learn (``families(params)``, as
    ``prompts``): a family field that ``families`` ignores takes no effect."""
    family_fields = {
        name for name, f in Params.model_fields.items() if "PromptConfig" in str(f.annotation)
    }
    view = params.model_dump(mode="json", exclude=family_fields)
    view["prompts"] = [f.model_dump(mode="json") for f in families(params)]
    return view


def _same(stated: Any, used: Any) -> bool:
    """Equal, reading a stated ``"4/255"`` (how eps values are written) as the number it is."""
    if isinstance(stated, str) and isinstance(used, float):
        try:
            return float(Fraction(stated)) == used
        except (ValueError, ZeroDivisionError):
            return False
    if isinstance(stated, bool) or isinstance(used, bool):
        return stated is used
    return stated == used


def _mismatches(stated: Any, used: Any, path: str) -> list[str]:
    """Every leaf of ``stated`` whose value in ``used`` differs (or is missing); lists must match
    in length and order, entry by entry."""
    if isinstance(stated, dict):
        if not isinstance(used, dict):
            return [f"{path}: the preset sets a mapping, the params hold {used!r}"]
        out: list[str] = []
        for key, value in stated.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in used:
                out.append(f"{where}: set by the preset, absent from the params the stages use")
            else:
                out.extend(_mismatches(value, used[key], where))
        return out
    if isinstance(stated, list):
        if not isinstance(used, list) or len(stated) != len(used):
            return [f"{path}: the preset sets {stated!r}, the stages use {used!r}"]
        return [
            m
            for i, (s, u) in enumerate(zip(stated, used, strict=True))
            for m in _mismatches(s, u, f"{path}.{i}")
        ]
    if not _same(stated, used):
        return [f"{path}: the preset sets {stated!r}, the stages use {used!r}"]
    return []


def test_there_are_presets() -> None:
    assert {p.stem for p in PRESETS} >= {"clip_vit_b32", "embedded", "smoke"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_gives_the_params_it_states(preset: Path) -> None:
    stated = yaml.safe_load(preset.read_text())
    params = load_params(PARAMS_YAML, preset=preset.stem)
    assert _mismatches(stated, _used(params), "") == []


def test_clip_preset_trains_the_papers_frame_at_224_px() -> None:
    params = load_params(PARAMS_YAML, preset="clip_vit_b32")
    trained = {f.family_name(params.head.kind): f for f in families(params)}
    assert trained["padding"].args == {"pad_size": 30}  # not params.yaml's 4 px (32 px model)
    assert trained["evp"].train_config(params.train).lr == 70.0


def test_embedded_preset_is_the_default_spelled_out() -> None:
    assert load_params(PARAMS_YAML, preset="embedded") == load_params(PARAMS_YAML)


def test_walk_reports_a_value_that_does_not_take_effect() -> None:
    used = {"train": {"lr": 4.0}, "prompts": [{"kind": "padding", "pad_size": 4}]}
    stated = {"train": {"lr": 40.0}, "prompt": {"kind": "padding"}, "prompts": [{"pad_size": 30}]}
    assert _mismatches(stated, used, "") == [
        "train.lr: the preset sets 40.0, the stages use 4.0",
        "prompt: set by the preset, absent from the params the stages use",
        "prompts.0.pad_size: the preset sets 30, the stages use 4",
    ]
    assert _mismatches({"eps": ["4/255", True]}, {"eps": [4 / 255, 1]}, "") == [
        "eps.1: the preset sets True, the stages use 1"
    ]


def test_full_preset_runs_at_least_the_reference_budget() -> None:
    """full.yaml is the paper-faithful run: every budget of reference.yaml or more, and AutoAttack
    on every model and TeCoA method (the default attacks one of each, and a preset that does not
    say otherwise inherits that)."""
    full = load_params(PARAMS_YAML, preset="full")
    ref = load_params(PARAMS_YAML, preset="reference")
    assert full.pretrain.supervised_steps >= ref.pretrain.supervised_steps
    assert full.pretrain.steps >= ref.pretrain.steps
    for size in ("max_test", "max_prompt_train"):  # None = every image
        cap, ref_cap = getattr(full.data, size), getattr(ref.data, size)
        assert cap is None or (ref_cap is not None and cap >= ref_cap), size
    for block in ("train", "adapt", "tecoa", "continual"):
        assert set(getattr(full, block).seeds) >= set(getattr(ref, block).seeds), block
    assert full.evaluate.autoattack.enabled and full.evaluate.autoattack.models is None
    assert full.evaluate.autoattack.n_samples >= ref.evaluate.autoattack.n_samples
    assert full.tecoa.autoattack and full.tecoa.autoattack_methods is None
    assert full.tecoa.autoattack_samples >= ref.tecoa.autoattack_samples
    assert {m.label for m in full.adapt.methods} >= {m.label for m in ref.adapt.methods}
