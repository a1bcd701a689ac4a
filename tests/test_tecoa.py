"""TeCoA: the inner attack, the text-guided loss, the no-text and fine-tune baselines, saving a
fine-tuned tower, resume of an adversarial run, and the zero-shot robustness stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _autoattack_short import short_autoattack  # noqa: F401

from vpt_robust.attacks import robust_accuracy
from vpt_robust.config import BackboneConfig, HeadConfig, PromptConfig, TrainConfig
from vpt_robust.methods.objectives import (
    cross_entropy_objective,
    forward_passes_per_image,
    objective_identity,
)
from vpt_robust.methods.supervised import FrozenBackboneError, train_prompt
from vpt_robust.methods.tecoa import (
    NoTextATObjective,
    PGDAttack,
    TeCoAHeadError,
    TeCoAObjective,
    finetune_classifier,
    tecoa_loss,
    zero_shot_transfer,
)
from vpt_robust.models import Backbone, load_backbone
from vpt_robust.models.classifier import build_classifier
from vpt_robust.models.heads import class_text_features
from vpt_robust.prompts.io import load_prompted_model, read_prompt_metadata, save_prompted_model

CPU = torch.device("cpu")
HEAD = HeadConfig(templates=["a photo of a {}"])
NAMES = ["circle", "square"]
VPT = PromptConfig(kind="vpt", length=2)


@pytest.fixture(scope="module")
def bb(micro_clip_name: str) -> Backbone:
    torch.manual_seed(0)
    return load_backbone(BackboneConfig(source="open_clip", name=micro_clip_name), CPU)


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 2


def _model(bb: Backbone, prompt: PromptConfig = VPT, head: HeadConfig = HEAD):
    torch.manual_seed(1)
    return build_classifier(bb, NAMES, prompt, head)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_inner_attack_changes_the_batch_within_the_ball_in_eval_mode(bb: Backbone) -> None:
    model = _model(bb, PromptConfig(kind="vpt", length=2, dropout=0.5)).train()
    x, y = _data()
    modes = []
    original = model.forward

    def spy(images: torch.Tensor) -> torch.Tensor:
        modes.append(model.token_prompt.dropout.training)
        return original(images)

    model.forward = spy  # type: ignore[method-assign]
    adv = PGDAttack(eps=4 / 255, steps=3, alpha=2 / 255)(model, x, y)
    assert modes and not any(modes)  # every attack forward saw eval mode (no prompt dropout)
    assert model.training and model.token_prompt.dropout.training  # restored afterwards
    gap = (adv - x).abs().amax()
    assert 1 / 255 < gap <= 4 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1


def test_tecoa_loss_equals_the_hand_computed_text_guided_loss(bb: Backbone) -> None:
    model = _model(bb).eval()
    x, y = _data(6)
    attack = PGDAttack(eps=2 / 255, steps=2, alpha=1 / 255)
    torch.manual_seed(5)
    loss = tecoa_loss(model, x, y, attack=attack)
    torch.manual_seed(5)
    adv = attack(model, x, y)
    assert not torch.equal(adv, x)
    with torch.no_grad():
        feats = bb.encode_image(bb.normalize(adv), token_prompt=model.token_prompt)
        text = class_text_features(bb, NAMES, HEAD.templates)
        logits = bb.logit_scale * F.normalize(feats, dim=-1) @ text.t()
        expected = -logits.log_softmax(-1)[torch.arange(6), y].mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # ... and on the clean batch it is NOT that value: the loss is on the adversarial images.
    clean = tecoa_loss(model, x, y, attack=PGDAttack(eps=0.0, steps=0, random_start=False))
    assert abs(float(clean.detach()) - float(expected)) > 1e-4


def test_training_cost_counts_the_inner_attacks_forwards_and_leaves_no_trace(bb: Backbone) -> None:
    model = _model(bb, PromptConfig(kind="vpt", length=2, dropout=0.5)).eval()
    x, y = _data(4)
    assert forward_passes_per_image(cross_entropy_objective, model, x, y) == 1.0
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    steps = forward_passes_per_image(TeCoAObjective(PGDAttack(steps=3)), model, x, y)
    assert steps == 1.0 + 3  # three attack steps, then the loss's forward
    assert torch.equal(torch.random.get_rng_state(), before)  # random start, dropout: forked
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_heads_are_checked(bb: Backbone) -> None:
    x, y = _data(4)
    linear = _model(bb, head=HeadConfig(kind="linear"))
    with pytest.raises(TeCoAHeadError, match="zero-shot text head"):
        TeCoAObjective()(linear, x, y)
    with pytest.raises(TeCoAHeadError, match="linear head"):
        NoTextATObjective()(_model(bb), x, y)


def test_only_prompt_parameters_get_gradients(bb: Backbone) -> None:
    model = _model(bb, PromptConfig(kind="padding+vpt", padding={"pad_size": 4}, vpt={"length": 2}))
    model.train()
    x, y = _data(4)
    loss, _, aux = TeCoAObjective(PGDAttack(eps=4 / 255))(model, x, y)
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == set(model.learned_state())  # every prompt tensor, and nothing else
    assert "token_prompt.tokens" in got and any(n.startswith("pixel_prompt.") for n in got)
    assert all(p.grad is None for p in bb.parameters())
    assert 0 < float(aux["linf"]) <= 4 / 255 + 1e-6


def test_finetune_trains_only_the_image_tower_of_a_private_copy(bb: Backbone) -> None:
    before = _state(bb)
    model = finetune_classifier(bb, NAMES, HEAD)
    x, y = _data(4)
    loss, _, _ = TeCoAObjective(PGDAttack(eps=4 / 255))(model.train(), x, y)
    loss.backward()
    got = [n for n, p in model.named_parameters() if p.grad is not None]
    assert got and all(n.startswith("backbone.model.visual.") for n in got)
    text = [p for n, p in model.backbone.model.named_parameters() if not n.startswith("visual.")]
    assert all(not p.requires_grad and p.grad is None for p in text)
    cfg = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", lr=1e-3, warmup_steps=0)
    with pytest.raises(FrozenBackboneError):  # never silently: the flag is required
        train_prompt(finetune_classifier(bb, NAMES, HEAD), x, y, cfg=cfg, device=CPU, seed=0)
    with pytest.raises(ValueError, match="finetune=True"):
        train_prompt(_model(bb), x, y, cfg=cfg, device=CPU, seed=0, finetune=True)
    train_prompt(model, x, y, cfg=cfg, device=CPU, seed=0, finetune=True)
    after = _state(bb)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shared one untouched
    moved = model.backbone.model.visual.state_dict()
    orig = bb.model.visual.state_dict()
    assert any(not torch.equal(moved[k], orig[k]) for k in orig)


def test_a_finetuned_tower_is_saved_flagged_and_loads_back(bb: Backbone, tmp_path: Path) -> None:
    model = finetune_classifier(bb, NAMES, HEAD)
    with torch.no_grad():
        for p in model.backbone.image_model.parameters():  # a "fine-tuned" tower
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ValueError, match="finetune=True"):
        save_prompted_model(tmp_path / "ft", model)
    with pytest.raises(ValueError, match="no trained backbone"):
        save_prompted_model(tmp_path / "p", _model(bb), finetune=True)
    save_prompted_model(tmp_path / "ft", model, finetune=True)
    assert read_prompt_metadata(tmp_path / "ft")["finetune"] is True
    assert "finetune" not in read_prompt_metadata(
        save_prompted_model(tmp_path / "p", _model(bb))[1]
    )
    before = _state(bb)
    loaded = load_prompted_model(tmp_path / "ft", backbone=bb, class_names=["star", *NAMES])
    assert all(torch.equal(before[k], v) for k, v in _state(bb).items())
    x, _ = _data(4)
    with torch.no_grad():
        ref = zero_shot_transfer(model, ["star", *NAMES], HEAD)(x)
        torch.testing.assert_close(loaded(x), ref)
        assert not torch.allclose(build_classifier(bb, ["star", *NAMES], None, HEAD)(x), ref)


def test_no_text_baseline_transfers_its_prompt_without_the_linear_head(bb: Backbone) -> None:
    model = _model(bb, head=HeadConfig(kind="linear"))
    with torch.no_grad():
        model.token_prompt.tokens.add_(1.0)
    zs = zero_shot_transfer(model, ["star", "ring", "cross"], HEAD)
    assert zs.head.num_classes == 3 and not zs.class_bound
    torch.testing.assert_close(zs.token_prompt.tokens, model.token_prompt.tokens)
    assert set(zs.learned_state()) == {"token_prompt.tokens"}


def test_identity_names_the_attack() -> None:
    a = objective_identity(TeCoAObjective(PGDAttack(eps=1 / 255)))
    assert a == objective_identity(TeCoAObjective(PGDAttack(eps=1 / 255)))
    assert a != objective_identity(TeCoAObjective(PGDAttack(eps=2 / 255)))
    assert a != objective_identity(NoTextATObjective(PGDAttack(eps=1 / 255)))
    with pytest.raises(ValueError, match="attack.eps"):
        PGDAttack(eps=-1.0)


def test_adversarial_run_resumes_to_the_uninterrupted_result(bb: Backbone, tmp_path: Path) -> None:
    x, y = _data(12)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.5, warmup_steps=0)
    objective = TeCoAObjective(PGDAttack(eps=4 / 255, steps=2, alpha=2 / 255))

    def run(ckpt: Path | None, kill_at: int | None = None):
        model = _model(bb, PromptConfig(kind="vpt", length=2, dropout=0.3))

        def on_step(step: int, m: dict[str, float]) -> None:
            if kill_at is not None and m["epoch"] == kill_at:
                raise KeyboardInterrupt

        torch.manual_seed(7)
        summary = train_prompt(
            model, x, y, cfg=cfg, device=CPU, seed=0, checkpoint=ckpt, on_step=on_step,
            objective=objective,
        )  # fmt: skip
        return model, summary

    ref, _ = run(None)
    ckpt = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, kill_at=1)
    torch.manual_seed(999)  # a resumed process starts from other RNG states
    resumed, summary = run(ckpt)
    assert summary["resumed_epochs"] == 2
    torch.testing.assert_close(resumed.token_prompt.tokens, ref.token_prompt.tokens, rtol=0, atol=0)


def test_a_short_tecoa_run_raises_robust_accuracy_over_zero_shot(bb: Backbone) -> None:
    # Two classes told apart by brightness, which the random micro CLIP does not separate
    # (zero-shot: chance); a prompt cannot fix a random tower, so this trains TeCoA fine-tuning
    # (the stage test covers the prompt variants on the pretrained tiny CLIP).
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = 0.35 + 0.3 * y.view(-1, 1, 1, 1) + 0.1 * torch.rand(64, 3, 32, 32, generator=g)
    xt, yt = x[:32], y[:32]
    eps = 4 / 255
    zs = build_classifier(bb, NAMES, None, HEAD)
    before = robust_accuracy(zs, (xt, yt), eps=eps, steps=10, device=CPU).robust_accuracy
    torch.manual_seed(1)
    model = finetune_classifier(bb, NAMES, HEAD)
    cfg = TrainConfig(epochs=6, batch_size=16, optimizer="adamw", lr=1e-3, warmup_steps=0)
    objective = TeCoAObjective(PGDAttack(eps=eps, steps=2, alpha=eps))
    train_prompt(model, x[32:], y[32:], cfg=cfg, device=CPU, seed=0, objective=objective,
                 finetune=True)  # fmt: skip
    after = robust_accuracy(model, (xt, yt), eps=eps, steps=10, device=CPU).robust_accuracy
    assert before <= 0.5 and after >= 0.9, (before, after)


# --- the stage, on smoke-sized data with an untrained tiny CLIP (numbers mean nothing) ---

AA_METHODS = ["zero_shot", "tecoa_vpt", "tecoa_finetune"]
STAGE_OVERRIDES = {
    "data": {"per_class_style": 6, "max_prompt_train": 48, "max_test": 24},
    "train": {"epochs": 1, "batch_size": 16},
    "evaluate": {"batch_size": 64},
    "tecoa": {
        "seeds": [0],
        "n_train": 24,
        "n_test": 12,
        "eval_eps": ["1/255", "4/255"],
        "eval_steps": 2,
        "autoattack_eps": ["4/255"],
        "autoattack_samples": 6,
        "autoattack_splits": ["novel", "base"],
        "autoattack": True,
        "autoattack_methods": AA_METHODS,
        "variants": [
            {"name": "vpt", "kind": "vpt", "length": 2, "train": {"lr": 0.1}},
            {"name": "padding", "kind": "padding", "pad_size": 4, "train": {"lr": 1.0}},
        ],
        "finetune_train": {"optimizer": "adamw", "lr": 1e-4},
    },
    "runtime": {"device": "cpu"},
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def stage_project(tmp_path_factory: pytest.TempPathFactory, project_root_module: Path):
    from vpt_robust.config import load_params
    from vpt_robust.data.embedded import materialize
    from vpt_robust.models.tiny_clip import build_tiny_clip, save_clip_checkpoint
    from vpt_robust.stages import prepare
    from vpt_robust.stages.common import Layout
    from vpt_robust.tracking import disabled_run

    root = tmp_path_factory.mktemp("tecoa_stage")
    paths = {"data": str(root / "data"), "outputs": str(root / "out"), "metrics": str(root / "m")}
    params = load_params(
        project_root_module / "params.yaml", overrides={**STAGE_OVERRIDES, "paths": paths}
    )
    materialize(Path(paths["data"]), seed=0, image_size=32, per_class_style=6)
    prepare.run(params, disabled_run())
    torch.manual_seed(0)
    save_clip_checkpoint(build_tiny_clip(), Layout.of(params).checkpoint)
    return params


@pytest.fixture(scope="module")
def project_root_module() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.mark.usefixtures("short_autoattack")
def test_tecoa_stage_writes_the_zero_shot_table_and_loadable_prompts(stage_project) -> None:
    from vpt_robust.stages import tecoa as stage
    from vpt_robust.stages.common import Layout
    from vpt_robust.tracking import disabled_run

    params = stage_project
    out = stage.run(params, disabled_run())
    layout = Layout.of(params)
    names = [
        "zero_shot", "clean_vpt", "no_text_vpt", "tecoa_vpt", "tecoa_padding", "tecoa_finetune"
    ]  # fmt: skip
    assert out["methods"] == names
    on_disk = json.loads(layout.metrics_file("tecoa").read_text())
    assert on_disk["results"] == out["results"]
    metrics = ["clean", "pgd_Linf_1/255", "pgd_Linf_4/255", "pgd_subset_Linf_4/255",
               "autoattack_Linf_4/255"]  # fmt: skip
    assert out["metrics"] == metrics
    for name in names:
        assert set(out["results"][name]) == {"novel", "heldout_styles", "base"}
        for split, cells in out["results"][name].items():
            attacked = split != "heldout_styles" and name in AA_METHODS
            assert list(cells) == (metrics if attacked else metrics[:3]), (name, split)
            cell = cells["pgd_Linf_4/255"]
            assert cell["values"] and cell["mean"] <= cells["clean"]["mean"]
    sizes = out["protocol"]["sizes"]
    assert sizes == {"train": 24, "novel": 12, "heldout_styles": 12, "base": 12}
    # Every trained method is saved and loads back on its own, over new classes too.
    for name in names[1:]:
        path = stage.prompt_file(layout, name, 0)
        meta = read_prompt_metadata(path)
        assert meta.get("finetune", False) is (name == "tecoa_finetune")
        assert meta["head"]["kind"] == "zero_shot"  # no_text: the linear head was dropped
        model = load_prompted_model(path, class_names=["cloud", "bolt"])
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    passes = {k: v["forward_passes_per_image"] for k, v in out["training"].items()}
    assert passes["clean_vpt"] == 1.0 and passes["no_text_vpt"] == passes["tecoa_vpt"] == 3.0
    assert out["training"]["tecoa_vpt"]["cost_vs_clean_prompt"] == 3.0  # 2 attack steps + 1
    assert "seconds_per_epoch" not in json.dumps(out)  # wall time goes to MLflow only
    curve = (layout.metrics / "tecoa_curve.csv").read_text().splitlines()
    assert curve[0] == "method,split,eps,robust_accuracy,std"
    assert len(curve) == 1 + len(names) * 3 * 3


def test_tecoa_splits_are_disjoint_from_pretraining_and_keep_prepare_as_is(stage_project) -> None:
    import numpy as np

    from vpt_robust.data.embedded import load_embedded
    from vpt_robust.stages.common import Layout, load_splits
    from vpt_robust.stages.prepare import make_splits
    from vpt_robust.stages.tecoa import tecoa_splits

    params = stage_project
    layout = Layout.of(params)
    data, splits = load_embedded(layout.data), load_splits(layout)
    train, evals = tecoa_splits(params, data, splits)
    again = tecoa_splits(params, data, splits)
    assert torch.equal(train, again[0])
    seen = set(splits["pretrain_train"].tolist())
    assert set(train.tolist()) <= seen
    n_base = params.data.base_classes
    assert bool((data.labels[train] < n_base).all())
    assert not seen & set(evals["novel"].index.tolist())
    assert not seen & set(evals["base"].index.tolist())
    assert bool((data.labels[evals["novel"].index] >= n_base).all())
    held = {data.style_names.index(s) for s in data.heldout_styles}
    assert set(data.styles[evals["heldout_styles"].index].tolist()) <= held
    with np.load(layout.splits) as z:
        fresh, _ = make_splits(params)
        assert sorted(z.files) == sorted(fresh)


def test_the_clip_preset_is_the_paper_and_fails_clearly_offline(stage_project) -> None:
    from vpt_robust.config import load_params
    from vpt_robust.models.backbone import BackboneError
    from vpt_robust.stages import tecoa as stage
    from vpt_robust.tracking import disabled_run

    root = Path(__file__).resolve().parent.parent
    paths = stage_project.paths.model_dump()
    params = load_params(
        root / "params.yaml",
        preset="tecoa_clip_vit_b32",
        overrides={"paths": paths, "runtime": {"device": "cpu"}, "tracking": {"enabled": False}},
    )
    cfg = params.tecoa
    assert (params.backbone.name, params.backbone.pretrained) == ("ViT-B-32", "openai")
    assert (cfg.train_eps, cfg.train_steps, cfg.train_alpha) == (1 / 255, 2, 1 / 255)
    assert cfg.eval_steps == 100 and cfg.seeds == [0, 1, 2] and 1 / 255 in cfg.eval_eps
    assert [v.family_name() for v in cfg.variants] == ["vpt", "padding", "padding_vpt"]
    assert cfg.variants[0].args["length"] == 100 and cfg.variants[1].args["pad_size"] == 30
    with pytest.raises(BackboneError, match="not reachable"):
        stage.run(params, disabled_run())


def test_autoattack_methods_must_name_the_stages_methods() -> None:
    from vpt_robust.config import ConfigError, validate

    params = validate({"tecoa": {"autoattack_methods": ["zero_shot", "tecoa_vpt"]}})
    assert params.tecoa.method_names()[:2] == ["zero_shot", "clean_vpt"]
    with pytest.raises(ConfigError, match=r"tecoa.autoattack_methods: \['vpt'\] are not methods"):
        validate({"tecoa": {"autoattack_methods": ["vpt"]}})
