from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vpt_robust.config import TrainConfig
from vpt_robust.methods.supervised import FrozenBackboneError, cosine_with_warmup, train_prompt
from vpt_robust.metrics import mean_std
from vpt_robust.models import PromptedClassifier, zero_shot_head
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
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
