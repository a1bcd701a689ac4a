from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vpt_robust.config import BackboneConfig
from vpt_robust.models import BackboneError, PromptedClassifier, load_backbone, zero_shot_head
from vpt_robust.prompts import PaddingPrompt


def test_backbone_is_frozen_and_normalises_inside(micro_backbone) -> None:
    assert all(not p.requires_grad for p in micro_backbone.parameters())
    x = torch.rand(2, 3, 32, 32)
    manual = (x - micro_backbone.mean) / micro_backbone.std
    assert torch.allclose(micro_backbone.normalize(x), manual)
    micro_backbone.train()
    assert not micro_backbone.model.training


def test_backbone_resizes_smaller_inputs(micro_backbone) -> None:
    head = zero_shot_head(micro_backbone, ["cat", "dog"])
    model = PromptedClassifier(micro_backbone, head)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 2)


def test_zero_shot_head_is_cosine_times_scale(micro_backbone) -> None:
    head = zero_shot_head(micro_backbone, ["cat", "dog", "bird"], ["a {}", "a photo of a {}"])
    feats = torch.randn(4, head.text_features.shape[1])
    logits = head(feats)
    assert logits.shape == (4, 3)
    cos = torch.nn.functional.cosine_similarity(feats[:, None], head.text_features[None], dim=-1)
    assert torch.allclose(logits, micro_backbone.logit_scale * cos, atol=1e-4)


def test_only_prompt_gets_gradients(micro_backbone) -> None:
    head = zero_shot_head(micro_backbone, ["cat", "dog"])
    model = PromptedClassifier(micro_backbone, head, PaddingPrompt(32, 4))
    loss = model(torch.rand(3, 3, 32, 32)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is None for p in micro_backbone.parameters())
    assert all(p.grad is not None for p in model.pixel_prompt.parameters())
    assert model.num_trainable() == sum(p.numel() for p in model.pixel_prompt.parameters())


def test_offline_pretrained_tag_fails_clearly() -> None:
    cfg = BackboneConfig(source="open_clip", name="RN50", pretrained="openai")
    with pytest.raises(BackboneError, match="weights are not reachable"):
        load_backbone(cfg, torch.device("cpu"))


def test_missing_checkpoint_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="not found"):
        load_backbone(
            BackboneConfig(source="open_clip", name="RN50", pretrained=str(tmp_path / "x.pt")),
            torch.device("cpu"),
        )
    with pytest.raises(BackboneError, match="run the pretrain stage"):
        load_backbone(
            BackboneConfig(), torch.device("cpu"), checkpoint=tmp_path / "none.safetensors"
        )


def test_open_clip_local_checkpoint_round_trip(micro_clip_name: str, tmp_path: Path) -> None:
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model(micro_clip_name)
    path = tmp_path / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cfg = BackboneConfig(source="open_clip", name=micro_clip_name, pretrained=str(path))
    backbone = load_backbone(cfg, torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval().encode_image(backbone.normalize(x))
        assert torch.allclose(backbone.encode_image(backbone.normalize(x)), ref, atol=1e-6)
    assert backbone.identity["sha256"] and backbone.identity["source"] == "open_clip"


def test_timm_backbone_from_local_weights(tmp_path: Path) -> None:
    import timm

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    cfg = BackboneConfig(
        source="timm",
        name="vit_tiny_patch16_224",
        pretrained=str(path),
        image_size=32,
        kwargs=kwargs,
    )
    backbone = load_backbone(cfg, torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(x), ref.eval()(x), atol=1e-6)
    assert not backbone.has_text and backbone.identity["sha256"]
    with pytest.raises(BackboneError, match="does not fit"):
        load_backbone(cfg.model_copy(update={"kwargs": {}}), torch.device("cpu"))
    bad = tmp_path / "bad.safetensors"
    save_file({"nonsense": torch.zeros(1)}, str(bad))
    with pytest.raises(BackboneError, match="does not fit"):
        load_backbone(cfg.model_copy(update={"pretrained": str(bad)}), torch.device("cpu"))


def test_robustbench_source_without_cache_names_the_spec(tmp_path: Path) -> None:
    from vpt_robust.models.robustbench import RobustBenchError, robustbench_available

    if not robustbench_available():
        pytest.skip("robustbench 1.1.1 model zoo not installed (make install adds it)")
    cfg = BackboneConfig(
        source="robustbench", name="cifar10/Linf/Standard", cache_dir=str(tmp_path)
    )
    with pytest.raises(RobustBenchError, match="cifar10/Linf/Standard.*not in the local cache"):
        load_backbone(cfg, torch.device("cpu"))
