"""The one prompted ViT forward, on open_clip's ViT, timm's ViT and the tiny CLIP's hybrid ViT."""

from __future__ import annotations

import pytest
import torch
from _tiny_clip_spec import SMALL
from torch import nn

from vpt_robust.config import BackboneConfig, HeadConfig, PromptConfig
from vpt_robust.models import Backbone, load_backbone
from vpt_robust.models.classifier import build_classifier
from vpt_robust.models.prompted_vit import PromptedForwardError, vit_geometry
from vpt_robust.prompts import VPTPrompt

TIMM_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def _timm(**extra: object) -> Backbone:
    torch.manual_seed(0)
    cfg = BackboneConfig(
        source="timm", name="vit_tiny_patch16_224", image_size=32, kwargs={**TIMM_KW, **extra}
    )
    return load_backbone(cfg, torch.device("cpu"))


def _tiny_clip() -> Backbone:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from vpt_robust.models.tiny_clip import build_tiny_clip

    torch.manual_seed(0)
    model = build_tiny_clip(**SMALL)
    name = "tiny-clip-test"
    return Backbone(
        model,
        kind="clip",
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        image_size=32,
        identity={"source": "test", "name": name},
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),
    )


@pytest.fixture(scope="module")
def towers(micro_clip_name: str) -> dict[str, Backbone]:
    torch.manual_seed(0)
    clip = load_backbone(
        BackboneConfig(source="open_clip", name=micro_clip_name), torch.device("cpu")
    )
    return {
        "open_clip": clip,
        "timm": _timm(),
        "timm_avg_reg": _timm(global_pool="avg", reg_tokens=2, class_token=True),
        "tiny_clip": _tiny_clip(),
    }


KINDS = ["open_clip", "timm", "timm_avg_reg", "tiny_clip"]


def _prompt(bb: Backbone, length: int, depth: str) -> VPTPrompt:
    geo = bb.token_geometry
    return VPTPrompt(geo.width, geo.num_layers, geo.patch_size, length, depth, dropout=0.0)


def _blocks(bb: Backbone) -> nn.ModuleList:
    tower = bb.image_model
    if hasattr(tower, "transformer"):
        return tower.transformer.resblocks
    return getattr(tower, "trunk", tower).blocks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_no_prompt_tokens_reproduce_the_frozen_model_exactly(towers, kind: str, depth: str) -> None:
    bb = towers[kind]
    x = bb.normalize(torch.rand(3, 3, 32, 32))
    with torch.no_grad():
        plain = bb.encode_image(x)
        empty = bb.encode_image(x, token_prompt=_prompt(bb, 0, depth))
    assert empty.shape == plain.shape
    assert torch.equal(empty, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_lengths_and_deep_replacement(towers, kind: str) -> None:
    bb = towers[kind]
    geo = bb.token_geometry
    n_seq = geo.num_prefix_tokens + geo.num_patches
    seen: list[torch.Tensor] = []
    hooks = [
        b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        for b in _blocks(bb)
    ]
    try:
        for depth in ("shallow", "deep"):
            seen.clear()
            prompt = _prompt(bb, 5, depth).eval()
            with torch.no_grad():
                bb.encode_image(bb.normalize(torch.rand(2, 3, 32, 32)), token_prompt=prompt)
            assert len(seen) == geo.num_layers
            assert [h.shape[1] for h in seen] == [n_seq + 5] * geo.num_layers
            start = geo.num_prefix_tokens  # [prefix tokens, P, patches]
            for layer, h in enumerate(seen):
                slots = h[:, start : start + 5]
                fresh = prompt.tokens[min(layer, prompt.num_prompt_layers - 1)]
                if depth == "deep" or layer == 0:
                    assert torch.equal(slots, fresh.expand(2, -1, -1))
                else:  # shallow: the slots carry what the previous block made of the prompt
                    assert not torch.allclose(slots, prompt.tokens[0].expand(2, -1, -1))
    finally:
        for h in hooks:
            h.remove()
    assert _prompt(bb, 5, "deep").tokens.shape == (geo.num_layers, 5, geo.width)
    assert _prompt(bb, 5, "shallow").tokens.shape == (1, 5, geo.width)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_prompts_and_head(towers, kind: str) -> None:
    bb = towers[kind]
    family = PromptConfig(kind="padding+vpt", vpt={"length": 3, "depth": "deep"})
    model = build_classifier(bb, ["a", "b", "c"], family, HeadConfig(kind="linear")).train()
    model(torch.rand(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert all(not p.requires_grad for p in bb.parameters())
    learned = dict(model.named_parameters())
    assert {k for k, p in learned.items() if p.requires_grad} == {
        k for k in learned if k.startswith(("token_prompt.", "pixel_prompt.", "head."))
    }
    for name in ("token_prompt.tokens", "pixel_prompt.pad_up", "head.fc.weight"):
        assert learned[name].grad is not None and learned[name].grad.abs().sum() > 0
    assert not bb.model.training  # the frozen encoder stays in eval mode while prompts train


def test_prompts_act_and_their_order_does_not_matter(towers) -> None:
    bb = towers["tiny_clip"]
    x = bb.normalize(torch.rand(2, 3, 32, 32))
    torch.manual_seed(1)
    prompt = _prompt(bb, 4, "deep")
    shuffled = _prompt(bb, 4, "deep")
    shuffled.tokens.data.copy_(prompt.tokens.data[:, [2, 0, 3, 1]])
    with torch.no_grad():
        plain = bb.encode_image(x)
        a = bb.encode_image(x, token_prompt=prompt)
        b = bb.encode_image(x, token_prompt=shuffled)
    assert not torch.allclose(a, plain, atol=1e-3)
    # No position embedding on prompts: attention sees them as a set (so TeCoA's appended
    # tokens and VPT's prepended ones are the same prompt).
    assert torch.allclose(a, b, atol=1e-5)


def test_vpt_init_bound_dropout_and_geometry(towers) -> None:
    geo = towers["tiny_clip"].token_geometry
    assert (geo.width, geo.num_layers, geo.patch_size, geo.num_prefix_tokens) == (32, 2, 4, 1)
    assert geo.num_patches == 64  # 32 px through a stride-4 conv stem: 8 x 8 tokens
    prompt = VPTPrompt(768, 12, 16, length=10, depth="deep", dropout=0.5)
    bound = (6 / (3 * 16**2 + 768)) ** 0.5
    assert prompt.tokens.abs().max() <= bound and prompt.tokens.abs().max() > 0.9 * bound
    assert prompt.tokens.numel() == 12 * 10 * 768
    assert VPTPrompt(768, 12, 16, 10).dropout.p == 0.0
    assert VPTPrompt(768, 12, 16, 10, depth="deep").dropout.p == 0.1
    prompt.eval()
    assert torch.equal(prompt.layer_tokens(3, 2), prompt.tokens[3].expand(2, -1, -1))
    prompt.train()
    assert not torch.equal(prompt.layer_tokens(3, 2), prompt.tokens[3].expand(2, -1, -1))
    with pytest.raises(ValueError, match="depth"):
        VPTPrompt(8, 2, 4, 1, depth="middle")


def test_non_vit_towers_are_refused_clearly() -> None:
    with pytest.raises(PromptedForwardError, match="token prompts need a ViT image tower"):
        vit_geometry(nn.Linear(3, 3))
