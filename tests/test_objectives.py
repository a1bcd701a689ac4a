"""The trainer's extension point: an objective ``(model, images, labels) -> (loss, logits, aux)``
that can run an inner attack, report auxiliary metrics, and is part of the resume fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vpt_robust.attacks.pgd import pgd
from vpt_robust.config import BackboneConfig, HeadConfig, PromptConfig, TrainConfig
from vpt_robust.methods.objectives import (
    Objective,
    cross_entropy_objective,
    eval_mode,
    objective_identity,
)
from vpt_robust.methods.supervised import train_prompt
from vpt_robust.models import Backbone, PromptedClassifier, load_backbone
from vpt_robust.models.classifier import build_classifier

CPU = torch.device("cpu")
# Deep-VPT dropout makes train and eval mode differ: the attack must see eval mode.
FAMILY = PromptConfig(
    kind="padding+vpt", padding={"pad_size": 4}, vpt={"length": 2, "dropout": 0.5}
)
CFG = TrainConfig(epochs=2, batch_size=8, lr=0.5, warmup_steps=0)


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def bb(micro_clip_name: str) -> Backbone:
    torch.manual_seed(0)
    return load_backbone(BackboneConfig(source="open_clip", name=micro_clip_name), CPU)


def _data(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 2


def _model(bb: Backbone) -> PromptedClassifier:
    torch.manual_seed(0)
    return build_classifier(bb, ["a", "b"], FAMILY, HeadConfig(kind="linear"))


@dataclass
class AttackedCE:
    """Cross-entropy on PGD examples found in eval mode (the TeCoA / adversarial-training shape);
    records what the attack saw, for the test."""

    eps: float
    steps: int = 2
    seen: list[Any] = field(default_factory=list)

    @property
    def identity(self) -> dict[str, Any]:
        return {"eps": self.eps, "steps": self.steps}

    def __call__(self, model, images, labels):
        with eval_mode(model):
            modes = {m.training for m in model.modules()}
            adv = pgd(model, images, labels, eps=self.eps, alpha=self.eps / 2, steps=self.steps)
        self.seen.append((images.detach().clone(), adv, modes, model.token_prompt.training))
        logits = model(adv)
        gap = (adv - images).abs().amax()
        return F.cross_entropy(logits.float(), labels), logits, {"linf": gap}


@dataclass(frozen=True)
class LabelShare:
    """Plain cross-entropy, reporting each batch's size, its share of label 1 and a constant."""

    def __call__(self, model, images, labels):
        loss, logits, _ = cross_entropy_objective(model, images, labels)
        share = (labels == 1).float().mean()
        return loss, logits, {"size": float(len(labels)), "label1": share, "const": 2.0}


def _run(bb, ckpt=None, objective=None, cfg=CFG, kill_after=None, steps=None):
    model = _model(bb)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if steps is not None:
            steps.append(metrics)
        if kill_after is not None and metrics["epoch"] == kill_after:
            raise Killed

    summary = train_prompt(
        model,
        *_data(),
        cfg=cfg,
        device=CPU,
        seed=3,
        checkpoint=ckpt,
        on_step=on_step,
        objective=objective,
    )
    return model, summary


def test_an_inner_attack_runs_in_eval_mode_and_stays_in_the_ball(bb: Backbone) -> None:
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    objective = AttackedCE(eps=4 / 255)
    assert isinstance(objective, Objective)
    model, summary = _run(bb, objective=objective)
    initial = _model(bb).learned_state()
    assert len(objective.seen) == 2 * 3  # 2 epochs of 3 batches (8, 8, 4)
    for clean, adv, modes, prompt_training_after in objective.seen:
        assert modes == {False}  # the whole model attacked in eval mode ...
        assert prompt_training_after  # ... and the loss forward back in train mode
        assert (adv - clean).abs().max() <= 4 / 255 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert not torch.equal(adv, clean)
    assert 0 < summary["train_linf"] <= 4 / 255 + 1e-6
    assert any(not torch.equal(initial[k], v) for k, v in model.learned_state().items())
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def test_aux_metrics_are_epoch_means_over_samples(bb: Backbone) -> None:
    steps: list[dict[str, float]] = []
    _, summary = _run(bb, objective=LabelShare(), steps=steps)
    # Batches of 8, 8 and 4 samples: the sample-weighted mean of the batch size is
    # (8 * 8 + 8 * 8 + 4 * 4) / 20 = 7.2 (a mean over batches would give 20 / 3).
    assert [round(m["train_size"], 6) for m in steps] == [7.2, 7.2]
    assert [round(m["train_label1"], 6) for m in steps] == [0.5, 0.5]
    assert [m["train_const"] for m in steps] == [2.0, 2.0]
    assert summary["train_label1"] == pytest.approx(0.5) and summary["train_const"] == 2.0
    _, plain = _run(bb)
    assert summary["final_loss"] == plain["final_loss"]  # same loss as the default objective
    assert "train_label1" not in plain


def test_the_objective_is_part_of_the_resume_fingerprint(bb: Backbone, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        _run(bb, ckpt, objective=AttackedCE(eps=2 / 255), kill_after=0)
    _, summary = _run(bb, ckpt)  # a clean run never resumes an adversarial checkpoint
    assert summary["resumed_epochs"] == 0
    with pytest.raises(Killed):
        _run(bb, ckpt, kill_after=0)
    _, summary = _run(bb, ckpt, objective=AttackedCE(eps=2 / 255))  # nor the other way round
    assert summary["resumed_epochs"] == 0
    with pytest.raises(Killed):
        _run(bb, ckpt, objective=AttackedCE(eps=2 / 255), kill_after=0)
    _, summary = _run(bb, ckpt, objective=AttackedCE(eps=4 / 255))  # nor another eps
    assert summary["resumed_epochs"] == 0
    with pytest.raises(Killed):
        _run(bb, ckpt, objective=AttackedCE(eps=2 / 255), kill_after=0)
    _, summary = _run(bb, ckpt, objective=AttackedCE(eps=2 / 255))  # the same run does
    assert summary["resumed_epochs"] == 1


def test_objective_identity() -> None:
    assert objective_identity(cross_entropy_objective) == {
        "objective": "vpt_robust.methods.objectives.cross_entropy_objective"
    }
    assert objective_identity(AttackedCE(eps=0.5))["config"] == {"eps": 0.5, "steps": 2}
    assert objective_identity(LabelShare())["config"] == {}
    with pytest.raises(TypeError, match="cannot be fingerprinted"):
        objective_identity(lambda m, x, y: cross_entropy_objective(m, x, y))


def test_a_lambda_trains_without_a_checkpoint_but_not_with_one(
    bb: Backbone, tmp_path: Path
) -> None:
    cfg = CFG.model_copy(update={"epochs": 1})
    calls = []

    def objective(model, images, labels):
        calls.append(len(labels))
        return cross_entropy_objective(model, images, labels)

    _run(bb, objective=objective, cfg=cfg)
    assert calls == [8, 8, 4]
    with pytest.raises(TypeError, match="cannot be fingerprinted"):
        _run(bb, tmp_path / "c.pt", objective=objective, cfg=cfg)


def _bad(kind: str):
    def objective(model, images, labels):
        loss, logits, aux = cross_entropy_objective(model, images, labels)
        if kind == "eval":
            model.eval()
        if kind == "vector_loss":
            loss = F.cross_entropy(logits, labels, reduction="none")
        if kind == "reserved_aux":
            aux = {"loss": loss.detach()}
        if kind == "vector_aux":
            aux = {"margin": logits.detach()[:, 0]}
        if kind == "logits":
            logits = logits[:1]
        return loss, logits, aux

    return objective


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("eval", RuntimeError, "left the model in eval mode"),
        ("vector_loss", ValueError, "loss must be a scalar tensor, got \\(8,\\)"),
        ("reserved_aux", ValueError, "aux metric name 'loss'"),
        ("vector_aux", ValueError, "aux metric 'margin' must be a scalar"),
        ("logits", ValueError, "logits must have shape \\(8, C\\)"),
    ],
)
def test_a_malformed_objective_is_refused_clearly(bb, kind, error, match) -> None:
    with pytest.raises(error, match=match):
        _run(bb, objective=_bad(kind), cfg=CFG.model_copy(update={"epochs": 1}))
