"""PGD and AutoAttack through a prompted CLIP model (open_clip micro ViT, zero-shot head): the
attacks see [0,1] images, the gradient flows through the prompt and the normalisation inside
the model, flags do not depend on the batch, and AutoAttack is never above PGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _attack_models import single_thread  # noqa: F401
from _autoattack_short import short_autoattack  # noqa: F401

from vpt_robust.attacks import autoattack, check_gradients, robust_accuracy
from vpt_robust.config import HeadConfig, PromptConfig
from vpt_robust.models.classifier import build_classifier

CLASSES = ["cat", "dog", "car", "tree"]
PROMPTS = {
    "padding": {"kind": "padding", "pad_size": 4},
    "vpt": {"kind": "vpt", "length": 4},
    "padding+vpt": {"kind": "padding+vpt", "padding": {"pad_size": 4}, "vpt": {"length": 4}},
}


def prompted(backbone, kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    model = build_classifier(backbone, CLASSES, PromptConfig(**PROMPTS[kind]), HeadConfig())
    with torch.no_grad():  # learned-looking prompts, not the near-zero init
        for p in model.trainable_parameters():
            p.normal_(0, 0.5)
    return model.eval()


def data(model: torch.nn.Module, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [0,1] images labelled with the model's own clean predictions (clean acc 1)."""
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return images, model(images).argmax(1)


@pytest.mark.parametrize("kind", ["padding", "vpt"])
def test_pgd_through_the_prompt_lowers_accuracy_with_batch_independent_flags(
    micro_backbone, kind
) -> None:
    model = prompted(micro_backbone, kind)
    images, labels = data(model)
    kwargs = {"eps": 8 / 255, "steps": 5, "seed": 0}
    whole = robust_accuracy(model, (images, labels), batch_size=12, **kwargs)
    split = robust_accuracy(model, (images, labels), batch_size=5, **kwargs)
    assert whole.clean_accuracy == 1.0
    assert whole.robust_accuracy < whole.clean_accuracy  # the attack moved predictions
    assert torch.equal(whole.robust_correct, split.robust_correct)
    assert torch.equal(whole.clean_correct, split.clean_correct)


@pytest.mark.parametrize("kind", ["padding", "vpt"])
def test_input_gradient_flows_through_the_prompt_and_the_normalisation(
    micro_backbone, kind
) -> None:
    """Autograd's input gradient matches a finite difference of the model's loss: the attack's
    gradient is the true one, normalisation and prompt included."""
    model = prompted(micro_backbone, kind)
    x, labels = data(model, n=4)
    assert (check_gradients(model, x, labels) > 0).all()

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inp), labels, reduction="sum")

    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x_req), x_req)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    h = 1e-3  # float32 throughout (the head computes in fp32)
    with torch.no_grad():
        numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=2e-2)
    # The prompt's own parameters get a gradient through the same graph.
    model.zero_grad()
    loss(x).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


@pytest.mark.usefixtures("short_autoattack")
def test_autoattack_through_the_prompt_is_never_above_pgd_on_the_same_samples(
    micro_backbone,
) -> None:
    model = prompted(micro_backbone, "padding+vpt")
    images, labels = data(model, n=8)
    eps = 4 / 255
    pgd = robust_accuracy(model, (images, labels), eps=eps, steps=10, seed=0)
    aa = autoattack(model, images, labels, eps=eps, batch_size=8, seed=0)
    assert torch.equal(aa.clean_correct, pgd.clean_correct)
    assert aa.robust_accuracy <= pgd.robust_accuracy
    assert aa.robust_accuracy < aa.clean_accuracy
