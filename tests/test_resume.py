"""A killed training run resumes from its per-epoch checkpoint and ends exactly as an
uninterrupted one; a checkpoint of another run is never resumed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vpt_robust.config import BackboneConfig, HeadConfig, PromptConfig, TrainConfig
from vpt_robust.methods.supervised import train_prompt
from vpt_robust.models import Backbone, PromptedClassifier, load_backbone
from vpt_robust.models.classifier import build_classifier

CPU = torch.device("cpu")
# EVP's input diversity and deep-VPT dropout both draw random numbers every step, and SGD
# momentum carries state across epochs: all of it must be restored for an exact resume.
FAMILY = PromptConfig(kind="evp+vpt", vpt={"length": 2, "depth": "deep", "dropout": 0.2})
CFG = TrainConfig(epochs=3, batch_size=8, lr=0.5, momentum=0.9, warmup_steps=2, grad_clip=1.0)


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def bb(micro_clip_name: str) -> Backbone:
    torch.manual_seed(0)
    return load_backbone(BackboneConfig(source="open_clip", name=micro_clip_name), CPU)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(
        20
    ) % 2


def _model(bb: Backbone) -> PromptedClassifier:
    torch.manual_seed(0)
    return build_classifier(bb, ["a", "b"], FAMILY, HeadConfig(kind="linear"))


@dataclass(frozen=True)
class NoisyCE:
    """Cross-entropy on the batch plus Gaussian noise drawn from the global RNG."""

    sigma: float

    def __call__(self, model, images, labels):
        noise = self.sigma * torch.randn_like(images)
        logits = model((images + noise).clamp(0, 1))
        return F.cross_entropy(logits.float(), labels), logits, {"noise": noise.abs().mean()}


class PrivateNoiseCE:
    """The same with its own generator: its state travels through state_dict/load_state_dict."""

    identity = {"sigma": 0.1}

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, model, images, labels):
        noise = 0.1 * torch.randn(images.shape, generator=self.gen)
        logits = model((images + noise).clamp(0, 1))
        return F.cross_entropy(logits.float(), labels), logits, {"noise": noise.abs().mean()}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


def _run(
    bb: Backbone,
    ckpt: Path,
    cfg: TrainConfig = CFG,
    kill_after: int | None = None,
    objective: Any = None,
):
    model = _model(bb)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if kill_after is not None and metrics["epoch"] == kill_after:
            raise Killed

    summary = train_prompt(
        model,
        *_data(),
        cfg=cfg,
        device=CPU,
        seed=7,
        checkpoint=ckpt,
        on_step=on_step,
        objective=objective,
    )
    return model, summary


def test_killed_run_resumes_to_the_uninterrupted_result(bb: Backbone, tmp_path: Path) -> None:
    reference, ref_summary = _run(bb, tmp_path / "ref.pt")
    assert not (tmp_path / "ref.pt").exists()  # removed once training completed
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        _run(bb, ckpt, kill_after=0)
    assert ckpt.is_file()
    torch.manual_seed(123)  # the resumed process starts with other RNG states
    resumed, summary = _run(bb, ckpt)
    assert summary["resumed_epochs"] == 1 and ref_summary["resumed_epochs"] == 0
    ref_state, state = reference.learned_state(), resumed.learned_state()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    for key in ("final_loss", "train_acc", "steps"):
        assert summary[key] == ref_summary[key]


def test_a_checkpoint_of_another_run_is_not_resumed(bb: Backbone, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        _run(bb, ckpt, kill_after=0)
    other = CFG.model_copy(update={"lr": 0.4})
    _, summary = _run(bb, ckpt, cfg=other)
    assert summary["resumed_epochs"] == 0
    with pytest.raises(Killed):
        _run(bb, ckpt, kill_after=1)
    _, summary = _run(bb, ckpt, cfg=CFG.model_copy(update={"resume": False}))
    assert summary["resumed_epochs"] == 0
    ckpt.write_bytes(b"torn file")
    _, summary = _run(bb, ckpt)
    assert summary["resumed_epochs"] == 0


@pytest.mark.parametrize("make", [lambda: NoisyCE(0.1), PrivateNoiseCE], ids=["global", "own"])
def test_a_random_objective_resumes_bit_identical(bb: Backbone, tmp_path: Path, make) -> None:
    """A non-default objective drawing random numbers (from the global RNG, or from its own
    generator that it checkpoints) resumes to exactly the uninterrupted run."""
    cfg = CFG.model_copy(
        update={"epochs": 2, "schedule": "constant", "param_groups": {"head": 0.1}}
    )
    reference, ref_summary = _run(bb, tmp_path / "ref.pt", cfg=cfg, objective=make())
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        _run(bb, ckpt, cfg=cfg, kill_after=0, objective=make())
    torch.manual_seed(123)
    resumed, summary = _run(bb, ckpt, cfg=cfg, objective=make())
    assert summary["resumed_epochs"] == 1
    ref_state, state = reference.learned_state(), resumed.learned_state()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    for key in ("final_loss", "train_acc", "train_noise", "steps"):
        assert summary[key] == ref_summary[key]
