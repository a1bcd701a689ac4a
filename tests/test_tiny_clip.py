"""The embedded tiny CLIP: open_clip/timm machinery, hand-run trunk, checkpoints, pretraining."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import open_clip
import pytest
import torch
from _tiny_clip_spec import SMALL

from vpt_robust.data.embedded import EmbeddedData, load_embedded, materialize
from vpt_robust.methods.pretrain import (
    RandomBatches,
    multi_positive_clip_loss,
    pretrain_clip,
    supervised_warm_start,
)
from vpt_robust.models.tiny_clip import (
    TINY_CLIP_NAME,
    ConvStem,
    build_tiny_clip,
    load_tiny_clip,
    register_tiny_clip,
    save_clip_checkpoint,
    tiny_clip_name,
)


def _hand_trunk(trunk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The sequence the prompted forward drives by hand (tokens are inserted after _pos_embed)."""
    h = trunk.patch_embed(x)
    h = trunk._pos_embed(h)
    h = trunk.patch_drop(h)
    h = trunk.norm_pre(h)
    h = trunk.blocks(h)
    h = trunk.norm(h)
    return trunk.forward_head(h)


def test_default_model_is_a_hybrid_vit_clip() -> None:
    torch.manual_seed(0)
    model = build_tiny_clip().eval()
    assert isinstance(model, open_clip.CLIP)
    assert tiny_clip_name() == TINY_CLIP_NAME and TINY_CLIP_NAME in open_clip.list_models()
    trunk = model.visual.trunk
    assert isinstance(trunk.patch_embed, ConvStem)
    assert trunk.patch_embed.grid_size == (4, 4) and trunk.num_prefix_tokens == 1
    assert model.token_embedding.num_embeddings == 49408  # open_clip's own vocabulary
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_hand_trunk(trunk, x), trunk(x))
        feats = model.encode_image(x)
        text = model.encode_text(open_clip.tokenize(["a photo of a star"], model.context_length))
    assert feats.shape == (3, 128) and text.shape == (1, 128)
    with pytest.raises(ValueError, match="images"):
        trunk.patch_embed(torch.rand(1, 3, 24, 24))


def test_register_is_idempotent_and_variants_get_their_own_name() -> None:
    assert register_tiny_clip() == register_tiny_clip() == TINY_CLIP_NAME
    name = register_tiny_clip(**SMALL)
    assert name != TINY_CLIP_NAME and name == register_tiny_clip(**SMALL)
    with pytest.raises(ValueError, match="image_size"):
        build_tiny_clip(image_size=30)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    model = build_tiny_clip(**SMALL).eval()
    with torch.no_grad():  # make BatchNorm running statistics non-trivial, so they must round-trip
        model.visual.trunk.patch_embed.stem[1].running_mean.uniform_(-0.2, 0.2)
    x = torch.rand(2, 3, 32, 32)
    tokens = open_clip.tokenize(["a sketch of a red star", "a star"], model.context_length)
    path = save_clip_checkpoint(model, tmp_path / f"clip{suffix}")
    with torch.no_grad():
        ref = model(x, tokens)
        if suffix == ".safetensors":
            loaded = load_tiny_clip(path).eval()
        else:
            loaded = open_clip.create_model(
                tiny_clip_name(model.tiny_clip_spec), pretrained=str(path)
            )
            loaded.eval()
        out = loaded(x, tokens)
    for a, b in zip(ref, out, strict=True):
        assert torch.equal(a, b)


def test_default_checkpoint_loads_with_plain_open_clip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_tiny_clip().eval()
    path = save_clip_checkpoint(model, tmp_path / "tiny.safetensors")
    register_tiny_clip()
    loaded = open_clip.create_model(TINY_CLIP_NAME, pretrained=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))


def test_multi_positive_loss_counts_identical_captions_as_positives() -> None:
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.t()
    # all captions distinct: exactly CLIP's symmetric cross-entropy
    plain = multi_positive_clip_loss(img, txt, scale, torch.arange(4))
    ref = (
        torch.nn.functional.cross_entropy(logits, torch.arange(4))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))
    ) / 2
    assert torch.allclose(plain, ref)
    # rows 0 and 1 share a caption: each row's target is spread evenly over both
    ids = torch.tensor([0, 0, 1, 2])
    li, lt = logits.log_softmax(1), logits.t().log_softmax(1)
    rows_i = [-(li[0, 0] + li[0, 1]) / 2, -(li[1, 0] + li[1, 1]) / 2, -li[2, 2], -li[3, 3]]
    rows_t = [-(lt[0, 0] + lt[0, 1]) / 2, -(lt[1, 0] + lt[1, 1]) / 2, -lt[2, 2], -lt[3, 3]]
    expected = (torch.stack(rows_i).mean() + torch.stack(rows_t).mean()) / 2
    assert torch.allclose(multi_positive_clip_loss(img, txt, scale, ids), expected)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedData:
    root = materialize(tmp_path_factory.mktemp("emb") / "data", seed=0, per_class_style=8)
    return load_embedded(root)


def test_pretraining_reduces_the_loss(tiny_data: EmbeddedData) -> None:
    torch.manual_seed(0)
    model = build_tiny_clip(**SMALL)
    logged: list[tuple[int, dict[str, float]]] = []
    result = pretrain_clip(
        model,
        tiny_data,
        steps=20,
        batch_size=32,
        lr=3e-3,
        weight_decay=0.05,
        warmup_steps=3,
        device=torch.device("cpu"),
        seed=0,
        log_every=10,
        on_step=lambda step, m: logged.append((step, m)),
    )
    assert result["final_loss"] < result["first_loss"] - 0.3
    assert [s for s, _ in logged] == [0, 10, 19]
    assert set(logged[0][1]) == {"loss", "lr", "logit_scale"}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not model.training


def test_supervised_warm_start_trains_only_the_image_tower_on_the_labels() -> None:
    torch.manual_seed(0)
    model = build_tiny_clip(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    labels = torch.arange(4).repeat(16)
    colours = torch.tensor([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]])
    noise = torch.randint(0, 20, (64, 3, 32, 32))
    images = (colours[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    gen = torch.Generator().manual_seed(0)
    kw = dict(batch_size=16, lr=3e-3, weight_decay=0.0, device=torch.device("cpu"))
    loss = supervised_warm_start(model, images, labels, steps=30, generator=gen, **kw)
    assert loss < 0.3 * math.log(4)  # chance is log 4: the colours were learned
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("visual."))
    visual = [k for k in before if k.startswith("visual.")]
    changed = [k for k in visual if not torch.equal(after[k], before[k])]
    assert len(changed) > 0.8 * len(visual)


def test_pretraining_with_a_warm_start_reports_it(tiny_data: EmbeddedData) -> None:
    torch.manual_seed(0)
    kw = dict(steps=2, batch_size=32, lr=1e-3, weight_decay=0.0, warmup_steps=0, seed=0,
              device=torch.device("cpu"))  # fmt: skip
    result = pretrain_clip(build_tiny_clip(**SMALL), tiny_data, supervised_steps=3, **kw)
    assert result["supervised_steps"] == 3 and result["supervised_final_loss"] > 0
    assert "supervised_final_loss" not in pretrain_clip(build_tiny_clip(**SMALL), tiny_data, **kw)


def test_pretraining_rejects_bad_arguments(tiny_data: EmbeddedData) -> None:
    model = build_tiny_clip(**SMALL)
    kw = dict(lr=1e-3, weight_decay=0.0, warmup_steps=0, device=torch.device("cpu"), seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        pretrain_clip(model, tiny_data, steps=1, batch_size=1, **kw)
    with pytest.raises(ValueError, match="pretraining styles"):
        pretrain_clip(model, tiny_data.subset(list(range(5))), steps=1, batch_size=32, **kw)
    with pytest.raises(ValueError, match="precision"):
        pretrain_clip(model, tiny_data, steps=1, batch_size=32, precision="fp8", **kw)


def test_stem_depth_adds_stride_one_convs_and_keeps_the_token_grid() -> None:
    model = build_tiny_clip(**dict(SMALL, stem_depth=2))
    stem = model.visual.trunk.patch_embed
    convs = [m for m in stem.stem if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 * len(SMALL["stem_channels"]) + 1
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2]
    assert stem.patch_size == (4, 4) and stem.num_patches == 64
    assert model.encode_image(torch.rand(2, 3, 32, 32)).shape == (2, SMALL["embed_dim"])
    with pytest.raises(ValueError, match="stem_depth"):
        build_tiny_clip(**dict(SMALL, stem_depth=0))


def test_random_batches_cover_an_epoch_without_repeats() -> None:
    batches = RandomBatches(10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([batches.next() for _ in range(3)])
    assert len(set(epoch.tolist())) == 9


def test_patch_stem_is_timms_linear_patch_embedding_and_round_trips(tmp_path: Path) -> None:
    from timm.layers import PatchEmbed

    from vpt_robust.models.prompted_vit import vit_geometry

    torch.manual_seed(0)
    model = build_tiny_clip(**dict(SMALL, stem="patch", patch_size=8)).eval()
    embed = model.visual.trunk.patch_embed
    assert type(embed) is PatchEmbed and embed.proj.kernel_size == (8, 8)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())
    assert vit_geometry(model.visual).num_patches == 16
    assert tiny_clip_name(model.tiny_clip_spec) != tiny_clip_name(
        dataclasses.replace(model.tiny_clip_spec, stem="conv")
    )
    x = torch.rand(2, 3, 32, 32)
    path = save_clip_checkpoint(model, tmp_path / "patch.safetensors")
    loaded = load_tiny_clip(path).eval()
    assert loaded.tiny_clip_spec.stem == "patch"
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
    with pytest.raises(ValueError, match="stem: 'linear'"):
        build_tiny_clip(**dict(SMALL, stem="linear"))
    with pytest.raises(ValueError, match="not divisible by the stem stride 5"):
        build_tiny_clip(**dict(SMALL, stem="patch", patch_size=5))


def test_pretrain_stage_builds_the_architecture_params_name(tmp_path: Path) -> None:
    from vpt_robust.config import validate
    from vpt_robust.data.versioning import ensure_data
    from vpt_robust.stages import run_stage
    from vpt_robust.stages.common import Layout

    arch = dict(SMALL, stem="patch", patch_size=8, stem_channels=[8])
    params = validate(
        {
            "paths": {k: str(tmp_path / k) for k in ("data", "outputs", "metrics")},
            "data": {"per_class_style": 4, "max_prompt_train": 24, "max_test": 12},
            "pretrain": {"steps": 2, "supervised_steps": 1, "batch_size": 32, "architecture": arch},
            "runtime": {"device": "cpu", "threads": 1},
            "tracking": {"enabled": False},
        }
    )
    ensure_data(params, dvc_file=tmp_path / "absent.dvc")
    run_stage("prepare", params)
    run_stage("pretrain", params)
    spec = load_tiny_clip(Layout.of(params).checkpoint).tiny_clip_spec
    assert (spec.stem, spec.patch_size, spec.depth, spec.width) == ("patch", 8, 2, 32)
