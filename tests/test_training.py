from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vpt_robust.config import TrainConfig
from vpt_robust.methods.optim import constant_with_warmup, make_optimizer, param_groups
from vpt_robust.methods.supervised import FrozenBackboneError, cosine_with_warmup, train_prompt
from vpt_robust.metrics import mean_std
from vpt_robust.models import PromptedClassifier, zero_shot_head
from vpt_robust.models.heads import LinearHead
from vpt_robust.prompts import PaddingPrompt
from vpt_robust.prompts.io import PromptMismatchError, load_prompt_state, save_prompt


def _toy_task(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = (torch.rand(n, 3, 32, 32, generator=gen) * 80).to(torch.uint8)
    images[labels == 0, :, 8:24, 8:16] = 255
    images[labels == 1, :, 8:24, 16:24] = 255
    return images, labels


def _model(backbone) -> PromptedClassifier:
    torch.manual_seed(0)
    return PromptedClassifier(
        backbone, zero_shot_head(backbone, ["left", "right"]), PaddingPrompt(32, 4)
    )


def test_training_lowers_the_loss_and_keeps_backbone_frozen(micro_backbone) -> None:
    images, labels = _toy_task()
    model = _model(micro_backbone)
    before = {k: v.clone() for k, v in micro_backbone.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.5, warmup_steps=0)
    first = train_prompt(model, images, labels, cfg=cfg, device=torch.device("cpu"), seed=0)
    cfg = TrainConfig(epochs=8, batch_size=16, lr=0.5, warmup_steps=0)
    last = train_prompt(
        _model(micro_backbone), images, labels, cfg=cfg, device=torch.device("cpu"), seed=0
    )
    assert last["final_loss"] < first["final_loss"]
    after = micro_backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_gradient_into_the_backbone_is_refused(micro_backbone) -> None:
    images, labels = _toy_task(16)
    model = _model(micro_backbone)
    next(micro_backbone.model.parameters()).requires_grad_(True)
    with pytest.raises(FrozenBackboneError):
        train_prompt(
            model, images, labels, cfg=TrainConfig(epochs=1), device=torch.device("cpu"), seed=0
        )


def test_saved_prompt_round_trips_and_refuses_other_backbones(
    micro_backbone, tmp_path: Path
) -> None:
    model = _model(micro_backbone)
    meta = {"backbone": micro_backbone.identity, "prompt": {"kind": "padding"}}
    save_prompt(tmp_path / "p", model.learned_state(), metadata=meta)
    tensors, saved = load_prompt_state(tmp_path / "p", expected_identity=micro_backbone.identity)
    other = _model(micro_backbone)
    torch.nn.init.zeros_(other.pixel_prompt.pad_up)
    other.load_learned_state(tensors)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), other(x))
    assert saved["prompt"]["kind"] == "padding"
    wrong = dict(micro_backbone.identity, name="ViT-B-32")
    with pytest.raises(PromptMismatchError, match="another backbone"):
        load_prompt_state(tmp_path / "p", expected_identity=wrong)
    (tmp_path / "p.json").unlink()
    with pytest.raises(FileNotFoundError, match="p.json is missing"):
        load_prompt_state(tmp_path / "p")


def test_schedule_and_stats() -> None:
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.0)
    assert [constant_with_warmup(s, 100, 4) for s in (0, 3, 4, 50, 100)] == [0.25, 1, 1, 1, 1]
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))


def test_train_prompt_stage_learns_every_family(micro_clip_name: str, tmp_path: Path) -> None:
    """The stage end to end on a small rendered set and a micro open_clip backbone: one output
    folder per family, one metrics entry per family, novel-class accuracy only where the
    learned tensors transfer to new classes."""
    import json

    from vpt_robust.config import validate
    from vpt_robust.data.embedded import materialize
    from vpt_robust.stages import prepare
    from vpt_robust.stages import train_prompt as stage
    from vpt_robust.stages.build import families, transfers_to_new_classes
    from vpt_robust.tracking import disabled_run

    materialize(tmp_path / "data", per_class_style=4)
    params = validate(
        {
            "paths": {k: str(tmp_path / k) for k in ("data", "outputs", "metrics")},
            "data": {"per_class_style": 4},
            "backbone": {"source": "open_clip", "name": micro_clip_name},
            "prompts": [
                {"kind": "vpt", "length": 2, "train": {"lr": 0.5}},
                {"kind": "none", "head": "linear", "train": {"optimizer": "adamw", "lr": 0.01}},
            ],
            "train": {"seeds": [0], "epochs": 1, "batch_size": 16},
            "runtime": {"device": "cpu"},
            "tracking": {"enabled": False},
        }
    )
    prepare.run(params, disabled_run())
    result = stage.run(params, disabled_run())
    assert set(result["families"]) == {"vpt", "linear_probe"}
    assert "test_novel_acc" in result["families"]["vpt"]
    assert "test_novel_acc" not in result["families"]["linear_probe"]
    assert [transfers_to_new_classes(params, f) for f in families(params)] == [True, False]
    for name in ("vpt", "linear_probe"):
        saved = tmp_path / "outputs" / "prompts" / name / "seed_0.json"
        meta = json.loads(saved.read_text())
        assert meta["family"] == name and meta["seed"] == 0
        assert meta["learned_values"] == result["families"][name]["learned_values"]
    metrics = json.loads((tmp_path / "metrics" / "train_prompt.json").read_text())
    assert metrics["families"]["vpt"]["test_base_acc"]["values"]


def _linear_model(backbone) -> PromptedClassifier:
    torch.manual_seed(0)
    return PromptedClassifier(backbone, LinearHead(32, 2), PaddingPrompt(32, 4))


def test_param_groups_scale_the_lr_by_longest_whole_component_prefix(micro_backbone) -> None:
    named = [(n, p) for n, p in _linear_model(micro_backbone).named_parameters() if p.requires_grad]
    groups = param_groups(named, {"head": 0.1, "head.fc.bias": 3.0}, lr=2.0)
    by_name = {n: g["lr"] for g in groups for n, p in named if any(p is q for q in g["params"])}
    assert by_name["head.fc.weight"] == pytest.approx(0.2)
    assert by_name["head.fc.bias"] == pytest.approx(6.0)
    assert {by_name[n] for n in by_name if n.startswith("pixel_prompt.")} == {2.0}
    with pytest.raises(ValueError, match=r"prefixes \['hea'\] match no trainable parameter"):
        param_groups(named, {"hea": 0.5}, lr=1.0)  # a prefix matches whole components only
    cfg = TrainConfig(param_groups={"head": 0.1})
    with pytest.raises(ValueError, match="needs named parameters"):
        make_optimizer([p for _, p in named], cfg)
    for bad, field in (({"head.": 1.0}, "param_groups"), ({"head": 0}, "param_groups.head")):
        with pytest.raises(ValueError, match=field):
            TrainConfig(param_groups=bad)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_the_trainer_applies_param_groups(micro_backbone) -> None:
    """One plain SGD step on the full batch: the head moves by exactly 0.1 of its ungrouped
    step, the pixel prompt by the same step."""
    images, labels = _toy_task(16)
    base = TrainConfig(epochs=1, batch_size=16, lr=0.5, momentum=0.0, warmup_steps=0)
    moves = []
    for cfg in (base, base.model_copy(update={"param_groups": {"head": 0.1}})):
        model = _linear_model(micro_backbone)
        start = {k: v.clone() for k, v in model.learned_state().items()}
        train_prompt(model, images, labels, cfg=cfg, device=torch.device("cpu"), seed=0)
        moves.append({k: v - start[k] for k, v in model.learned_state().items()})
    plain, grouped = moves
    assert plain["head.fc.weight"].abs().sum() > 0
    assert torch.allclose(grouped["head.fc.weight"], 0.1 * plain["head.fc.weight"], atol=1e-7)
    assert torch.allclose(grouped["head.fc.bias"], 0.1 * plain["head.fc.bias"], atol=1e-7)
    assert torch.equal(grouped["pixel_prompt.pad_up"], plain["pixel_prompt.pad_up"])


def test_constant_schedule_keeps_the_lr_after_warmup(micro_backbone) -> None:
    images, labels = _toy_task(16)
    lrs: dict[str, list[float]] = {}
    for schedule in ("cosine", "constant"):
        cfg = TrainConfig(epochs=3, batch_size=8, lr=0.5, warmup_steps=1, schedule=schedule)
        train_prompt(
            _linear_model(micro_backbone),
            images,
            labels,
            cfg=cfg,
            device=torch.device("cpu"),
            seed=0,
            on_step=lambda step, m, s=schedule: lrs.setdefault(s, []).append(m["lr"]),
        )
    assert lrs["constant"] == [0.5, 0.5, 0.5]
    assert lrs["cosine"][-1] == pytest.approx(0.0) and lrs["cosine"][0] < 0.5
