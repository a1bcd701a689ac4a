"""Every prompt family: registry and config, EVP and its optimiser, stacking, either head, a
short real training run per family, the saved artefact round trip, and predict."""

from __future__ import annotations

import io
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vpt_robust.config import BackboneConfig, ConfigError, HeadConfig, PromptConfig, TrainConfig
from vpt_robust.config import validate as validate_params
from vpt_robust.methods.optim import NormalizedSGD
from vpt_robust.methods.supervised import train_prompt
from vpt_robust.metrics import accuracy
from vpt_robust.models import Backbone, load_backbone
from vpt_robust.models.classifier import build_classifier
from vpt_robust.prompts import EVPPrompt, PaddingPrompt, build_prompt
from vpt_robust.prompts.io import (
    ClassMismatchError,
    PromptMismatchError,
    load_prompted_model,
    save_prompted_model,
)

NAMES = ["red", "green", "blue", "yellow", "purple", "white"]
COLORS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.6, 0, 0.8], [1, 1, 1]])
HEAD = HeadConfig(templates=["a photo of a {}."])
CPU = torch.device("cpu")


def colour_task(n: int, seed: int, framed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A coloured square on dark noise; the class is its colour. ``framed``: the target domain,
    where every image also has a red 4 px frame (a shift the frozen model has not seen)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(NAMES), (n,), generator=g)
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.3
    pos = torch.randint(4, 14, (n, 2), generator=g)
    for i in range(n):
        r, c = pos[i]
        x[i, :, r : r + 14, c : c + 14] = COLORS[labels[i]].view(3, 1, 1)
    if framed:
        red = COLORS[0].view(3, 1, 1)
        x[:, :, :4], x[:, :, -4:], x[:, :, :, :4], x[:, :, :, -4:] = red, red, red, red
    return (x * 255).round().to(torch.uint8), labels


@pytest.fixture(scope="module")
def aligned(micro_clip_name: str, tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    """A micro CLIP whose random towers are aligned on the colour task by fitting only the two
    output projections (seconds), so that zero-shot works on the source domain; loaded from a
    checkpoint file like a real backbone (its identity carries the file's hash)."""
    torch.manual_seed(0)
    model = open_clip.create_model(micro_clip_name).eval()
    tokens = open_clip.get_tokenizer(micro_clip_name)([f"a photo of a {n}." for n in NAMES])
    x, y = colour_task(256, 100, framed=False)
    mean = torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.constants.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    vproj, tproj = model.visual.proj, model.text_projection
    with torch.no_grad():
        model.visual.proj, model.text_projection = None, None
        fi, ft = model.encode_image((x.float() / 255 - mean) / std), model.encode_text(tokens)
    model.visual.proj, model.text_projection = vproj, tproj
    wv = torch.nn.Parameter(torch.randn(fi.shape[1], vproj.shape[1]) / 8)
    wt = torch.nn.Parameter(torch.randn(ft.shape[1], tproj.shape[1]) / 6)
    opt = torch.optim.Adam([wv, wt], lr=1e-2)
    for _ in range(200):
        logits = 20 * F.normalize(fi @ wv, dim=-1) @ F.normalize(ft @ wt, dim=-1).T
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.visual.proj.copy_(wv)
        model.text_projection.copy_(wt)
        model.logit_scale.fill_(torch.tensor(20.0).log())
    path = tmp_path_factory.mktemp("aligned") / "aligned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cfg = BackboneConfig(source="open_clip", name=micro_clip_name, pretrained=str(path))
    return load_backbone(cfg, CPU)


FAMILIES = {
    "padding": (PromptConfig(kind="padding"), {"lr": 3.0}),
    "evp": (PromptConfig(kind="evp"), {"optimizer": "normalized_sgd", "lr": 3.0}),
    "vpt_shallow": (PromptConfig(kind="vpt", length=4), {"lr": 0.3}),
    "vpt_deep": (PromptConfig(kind="vpt", length=4, depth="deep"), {"lr": 1.0}),
    "coop": (PromptConfig(kind="coop"), {"lr": 0.005}),
    "linear_probe": (PromptConfig(kind="none", head="linear"), {"optimizer": "adamw", "lr": 0.05}),
    "padding_vpt": (PromptConfig(kind="padding+vpt", vpt={"length": 4}), {"lr": 0.3}),
}


def test_a_short_training_run_of_every_family_beats_zero_shot(aligned: Backbone) -> None:
    source = colour_task(120, 1, framed=False)
    target = colour_task(96, 2, framed=True)
    zero_shot = build_classifier(aligned, NAMES, None, HEAD)
    assert accuracy(zero_shot, *source) > 0.9  # the frozen model knows the source domain
    base = accuracy(zero_shot, *target)
    assert base < 0.4  # ... and the framed target domain fools it
    for name, (family, train) in FAMILIES.items():
        torch.manual_seed(0)
        model = build_classifier(aligned, NAMES, family, HEAD)
        cfg = TrainConfig(epochs=5, batch_size=16, warmup_steps=2, **train)
        train_prompt(model, *target, cfg=cfg, device=CPU, seed=0)
        acc = accuracy(model, *target)
        assert acc >= base + 0.1, f"{name}: {acc:.2f} vs zero-shot {base:.2f}"


def test_registry_builds_families_by_name_with_clear_errors(aligned: Backbone) -> None:
    from vpt_robust.prompts import PromptTarget

    target = PromptTarget.of(aligned, NAMES)
    assert build_prompt("vpt", {"length": 3, "depth": "deep"}, target).tokens.shape[:2] == (2, 3)
    assert isinstance(build_prompt("evp", {}, 224), EVPPrompt)
    with pytest.raises(ValueError, match="prompt.kind: 'nope' is not one of"):
        build_prompt("nope", {}, target)
    with pytest.raises(ValueError, match="length: -1"):
        build_prompt("vpt", {"length": -1}, target)
    with pytest.raises(ValueError, match="lenght: unknown argument"):
        build_prompt("vpt", {"lenght": 3}, target)
    with pytest.raises(ValueError, match="built from the backbone"):
        build_prompt("vpt", {}, 32)


def test_config_names_families_validates_args_and_overrides() -> None:
    params = validate_params(
        {
            "prompts": [
                {"kind": "vpt", "length": 10, "depth": "deep", "name": "vpt_deep"},
                {"kind": "evp", "train": {"optimizer": "normalized_sgd", "lr": 50}},
                {"kind": "none", "head": "linear"},
                {"kind": "padding+vpt", "padding": {"pad_size": 3}, "vpt": {"length": 2}},
            ]
        }
    )
    names = [p.family_name(params.head.kind) for p in params.prompts]
    assert names == ["vpt_deep", "evp", "linear_probe", "padding_vpt"]
    evp = params.prompts[1].train_config(params.train)
    assert (evp.optimizer, evp.lr, evp.epochs) == ("normalized_sgd", 50, params.train.epochs)
    assert params.prompts[3].parts() == [("padding", {"pad_size": 3}), ("vpt", {"length": 2})]
    bad = {
        "unknown kind": ([{"kind": "vpx"}], "each part must be one of"),
        "bad arg": ([{"kind": "vpt", "length": -2}], "length: -2"),
        "repeat": ([{"kind": "vpt"}, {"kind": "vpt"}], "family names ['vpt'] repeat"),
        "idle": ([{"kind": "none"}], "nothing to learn"),
        "override": ([{"kind": "vpt", "train": {"lr": -1}}], "train: lr: -1 is not > 0"),
        "override field": ([{"kind": "vpt", "train": {"seeds": [1]}}], "not per-family"),
        "stack args": ([{"kind": "padding+vpt", "length": 2}], "must sit under a part name"),
    }
    for case, (prompts, message) in bad.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_params({"prompts": prompts})
            pytest.fail(case)


def test_learned_value_counts_match_the_papers() -> None:
    assert sum(p.numel() for p in build_prompt("padding", {}, 224).parameters()) == 69_840
    assert sum(p.numel() for p in build_prompt("evp", {}, 224).parameters()) == 69_840
    assert build_prompt("evp", {}, 224).inner_size == 164


def test_evp_shrinks_pads_and_perturbs_only_the_border() -> None:
    prompt = EVPPrompt(32, 4).eval()
    with torch.no_grad():
        for p in prompt.parameters():
            p.uniform_(-1, 1)
    x = torch.rand(2, 3, 32, 32)
    y = prompt(x)
    shrunk = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(y[..., 4:-4, 4:-4], shrunk, atol=1e-6)  # centre: the shrunk image
    assert torch.equal(y - F.pad(y[..., 4:-4, 4:-4], (4, 4, 4, 4)), prompt.frame().expand_as(y))
    prompt.train()
    torch.manual_seed(0)
    a, b = prompt(x), prompt(x)
    assert not torch.allclose(a, b)  # input diversity: flips and zoomed crops, in training only
    assert torch.equal(a[..., :4, :], b[..., :4, :])  # the border is the prompt alone
    prompt.diversity = False
    assert torch.allclose(prompt(x), y, atol=1e-6)


def test_normalized_sgd_moves_by_exactly_lr_along_the_gradient() -> None:
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    opt = NormalizedSGD([a, b], lr=0.5)
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    opt.step()
    assert torch.allclose(a.data, torch.tensor([-0.3, 0.0, 0.0]))
    assert torch.allclose(b.data, torch.tensor([[0.0, -0.4], [0.0, 0.0]]))
    a.grad = a.grad * 1000  # the loss scale does not matter
    b.grad = b.grad * 1000
    opt.step()
    assert torch.allclose(a.data, torch.tensor([-0.6, 0.0, 0.0]))


def test_stacking_and_either_head(aligned: Backbone) -> None:
    stacked = build_classifier(
        aligned, NAMES, PromptConfig(kind="evp+vpt", vpt={"length": 2}), HEAD
    )
    assert isinstance(stacked.pixel_prompt, EVPPrompt) and stacked.token_prompt is not None
    linear = build_classifier(aligned, NAMES, PromptConfig(kind="padding", head="linear"), HEAD)
    assert isinstance(linear.pixel_prompt, PaddingPrompt)
    n_head = (aligned.feature_dim + 1) * len(NAMES)
    assert linear.num_trainable() == linear.pixel_prompt.frame().count_nonzero() + n_head
    assert linear(torch.rand(2, 3, 32, 32)).shape == (2, len(NAMES))
    with pytest.raises(ValueError, match="at most one pixel prompt"):
        build_classifier(aligned, NAMES, PromptConfig(kind="padding+evp"), HEAD)


@pytest.mark.parametrize(
    "family",
    [
        PromptConfig(kind="evp+vpt", vpt={"length": 2, "depth": "deep"}),
        PromptConfig(kind="coop", init="random", n_ctx=4),
        PromptConfig(kind="vpt", length=3, head="linear"),
    ],
    ids=["evp+vpt_deep", "coop", "vpt_linear"],
)
def test_saved_prompt_rebuilds_the_classifier_with_identical_logits(
    aligned: Backbone, micro_clip_name: str, tmp_path: Path, family: PromptConfig
) -> None:
    torch.manual_seed(3)
    model = build_classifier(aligned, NAMES, family, HEAD)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # as if trained
    model.eval()
    weights, meta = save_prompted_model(tmp_path / "p", model, extra={"seed": 3})
    assert weights.suffix == ".safetensors" and meta.suffix == ".json"
    loaded = load_prompted_model(tmp_path / "p", "cpu")  # backbone rebuilt from the record
    assert loaded.backbone is not aligned and loaded.class_names == tuple(NAMES)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # Another backbone (other weights file) is refused, naming what differs.
    other = tmp_path / "other.safetensors"
    state = {k: v.clone() for k, v in aligned.model.state_dict().items()}
    state["logit_scale"] += 1
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    wrong = load_backbone(
        BackboneConfig(source="open_clip", name=micro_clip_name, pretrained=str(other)), CPU
    )
    with pytest.raises(PromptMismatchError, match="learned for another backbone: sha256"):
        load_prompted_model(tmp_path / "p", backbone=wrong)
    # Classes: pixel/token prompts and a shared context transfer; a linear head does not.
    if model.class_bound:
        with pytest.raises(ClassMismatchError, match="bound to its"):
            load_prompted_model(tmp_path / "p", backbone=aligned, class_names=["cat", "dog"])
    else:
        novel = load_prompted_model(tmp_path / "p", backbone=aligned, class_names=["cat", "dog"])
        assert novel(x).shape == (3, 2)


def test_predict_prints_top_k_for_a_file_or_folder(aligned: Backbone, tmp_path: Path) -> None:
    from PIL import Image

    from vpt_robust.predict import predict_images, run_predict

    model = build_classifier(aligned, NAMES, PromptConfig(kind="vpt", length=2), HEAD)
    save_prompted_model(tmp_path / "prompt", model)
    folder = tmp_path / "images"
    folder.mkdir()
    images, labels = colour_task(3, 5, framed=False)
    for i, img in enumerate(images):
        big = img.permute(1, 2, 0).numpy().repeat(3, 0).repeat(2, 1)  # 96 x 64, not square
        Image.fromarray(big).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    preds = predict_images(tmp_path / "prompt.json", folder, top_k=2, device="cpu")
    assert [p.path.name for p in preds] == ["img0.png", "img1.png", "img2.png"]
    assert all(len(p.top) == 2 and p.top[0][1] >= p.top[1][1] for p in preds)
    assert sum(p.top[0][0] == NAMES[y] for p, y in zip(preds, labels, strict=True)) >= 2
    out = io.StringIO()
    assert run_predict(tmp_path / "prompt", folder / "img0.png", top_k=3, out=out) == 0
    line = out.getvalue().strip()
    assert line.startswith(str(folder / "img0.png")) and line.count("%)") == 3
    with pytest.raises(FileNotFoundError, match="no such image file or folder"):
        predict_images(tmp_path / "prompt", tmp_path / "missing.png")
