"""The continual task runner: metrics on hand-computed matrices, task splits, masked training,
a short real sequence (L2P vs sequential tuning), and the stage end to end on smoke data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vpt_robust.config import HeadConfig, PromptConfig, TrainConfig
from vpt_robust.methods.continual import (
    ContinualObjective,
    EvalSettings,
    MethodSpec,
    SeenClasses,
    TaskSequence,
    average_accuracy,
    class_incremental,
    forgetting,
    mask_logits,
    matched_vpt_length,
    run_method,
)
from vpt_robust.methods.supervised import train_prompt
from vpt_robust.models import Backbone
from vpt_robust.models.classifier import build_classifier

CPU = torch.device("cpu")
NAN = math.nan
LINEAR = HeadConfig(kind="linear", templates=["a {}"])


def test_average_accuracy_and_forgetting_on_a_hand_computed_matrix() -> None:
    a = [
        [0.90, 0.80, 0.70, 0.60],
        [NAN, 0.95, 0.97, 0.50],
        [NAN, NAN, 0.40, 0.80],  # backward transfer: its best is the last evaluation
        [NAN, NAN, NAN, 0.85],
    ]
    assert average_accuracy(a) == pytest.approx((0.60 + 0.50 + 0.80 + 0.85) / 4)
    # max_t A[j, t] - A[j, T-1] over j < T-1: 0.90-0.60, 0.97-0.50, 0.80-0.80.
    assert forgetting(a) == pytest.approx((0.30 + 0.47 + 0.0) / 3)
    joint = [[NAN, 0.9], [NAN, 0.8]]  # evaluated once, after the last task
    assert forgetting(joint) == 0.0 and average_accuracy(joint) == pytest.approx(0.85)
    with pytest.raises(ValueError, match="at least two tasks"):
        forgetting([[0.5]])
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.5, 0.4]])
    with pytest.raises(ValueError, match="last column"):
        forgetting([[0.5, NAN], [NAN, 0.4]])


def test_class_incremental_split_is_disjoint_balanced_and_seeded() -> None:
    labels = torch.arange(6).repeat_interleave(10)
    candidates = torch.arange(60)[torch.arange(60) % 10 != 0]  # 9 per class
    tasks = class_incremental(labels, candidates, 3, n_train=4, n_test=3, seed=1)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5)]
    for t in tasks:
        assert len(t.train) == 8 and len(t.test) == 6
        assert set(labels[t.train].tolist()) == set(t.classes)
        assert not set(t.train.tolist()) & set(t.test.tolist())
        assert set(t.train.tolist()) <= set(candidates.tolist())
    again = class_incremental(labels, candidates, 3, n_train=4, n_test=3, seed=1)
    other = class_incremental(labels, candidates, 3, n_train=4, n_test=3, seed=2)
    assert all(torch.equal(a.train, b.train) for a, b in zip(tasks, again, strict=True))
    assert not all(torch.equal(a.train, b.train) for a, b in zip(tasks, other, strict=True))
    with pytest.raises(ValueError, match="do not split into 4 equal tasks"):
        class_incremental(labels, candidates, 4, n_train=4, n_test=3)
    with pytest.raises(ValueError, match="class 0: 9 images, fewer than"):
        class_incremental(labels, candidates, 3, n_train=8, n_test=3)
    seq = TaskSequence(torch.zeros(60, 3, 4, 4), labels, tuple("abcdef"), tasks)
    assert seq.seen_classes(1) == (0, 1, 2, 3)
    view = SeenClasses(torch.nn.Identity(), (4, 1))
    assert torch.equal(view.labels(torch.tensor([1, 4, 4])), torch.tensor([1, 0, 0]))
    assert torch.equal(view(torch.arange(6.0).view(1, 6)), torch.tensor([[4.0, 1.0]]))


def test_masked_logits_never_train_outside_the_task(micro_backbone: Backbone) -> None:
    torch.manual_seed(0)
    names = ["a", "b", "c", "d"]
    model = build_classifier(
        micro_backbone, names, PromptConfig(kind="l2p", size=4, length=2, top_n=2), LINEAR
    )
    before = {k: v.clone() for k, v in model.learned_state().items()}
    images = torch.rand(12, 3, 32, 32)
    labels = torch.tensor([0, 1] * 6)
    cfg = TrainConfig(
        epochs=3, batch_size=4, optimizer="adamw", lr=0.05, weight_decay=0.0, warmup_steps=0,
        schedule="constant", grad_clip=1.0, checkpoint=False,
    )  # fmt: skip
    objective = ContinualObjective((0, 1), aux_weight=0.1)
    summary = train_prompt(model, images, labels, cfg=cfg, device=CPU, seed=0, objective=objective)
    after = model.learned_state()
    assert torch.equal(after["head.fc.weight"][2:], before["head.fc.weight"][2:])
    assert torch.equal(after["head.fc.bias"][2:], before["head.fc.bias"][2:])
    assert not torch.equal(after["head.fc.weight"][:2], before["head.fc.weight"][:2])
    assert not torch.equal(after["token_prompt.keys"], before["token_prompt.keys"])
    assert summary["train_key_pull"] > 0
    logits = mask_logits(torch.zeros(2, 4), (1, 3))
    assert torch.isinf(logits[:, [0, 2]]).all() and (logits[:, [1, 3]] == 0).all()
    with pytest.raises(ValueError, match="weight_decay must be 0"):
        run_method(
            "l2p", None, lambda s: model, MethodSpec(None, LINEAR),
            cfg.model_copy(update={"weight_decay": 0.1}), EvalSettings(), device=CPU, seed=0,
        )  # fmt: skip


def test_matched_vpt_length_covers_the_pool_budget() -> None:
    # 10 prompts x 2 tokens x 192 + 10 keys x 128 = 5120 values -> 27 tokens of 192.
    assert matched_vpt_length(192, 128, 10, 2) == 27


COLORS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]])


def _colour_sequence(per_class: int = 30, n_test: int = 20) -> TaskSequence:
    """Six colour classes (a coloured square on dark noise), three tasks of two classes."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(per_class)
    x = torch.rand(len(labels), 3, 32, 32, generator=g) * 0.3
    pos = torch.randint(4, 14, (len(labels), 2), generator=g)
    for i, (r, c) in enumerate(pos.tolist()):
        x[i, :, r : r + 14, c : c + 14] = COLORS[labels[i]].view(3, 1, 1)
    images = (x * 255).round().to(torch.uint8)
    tasks = class_incremental(labels, torch.arange(len(labels)), 3, n_train=10, n_test=n_test)
    return TaskSequence(images, labels, ("r", "g", "b", "y", "c", "m"), tasks)


def test_l2p_forgets_less_than_sequential_prompt_tuning(micro_backbone: Backbone) -> None:
    """Three seeds of a three-task colour sequence: the pool (task-masked prompts, matched
    prompt budget) keeps old tasks where one shared VPT prompt drifts."""
    seq = _colour_sequence()
    cfg = TrainConfig(
        epochs=4, batch_size=10, optimizer="adamw", lr=0.02, weight_decay=0.0, warmup_steps=0,
        schedule="constant", grad_clip=1.0, checkpoint=False,
    )  # fmt: skip
    settings = EvalSettings(batch_size=64, eps=1 / 255, steps=2)
    geo = micro_backbone.token_geometry
    pool = PromptConfig(kind="l2p", size=6, length=2, top_n=2, task_mask=True)
    vpt = PromptConfig(kind="vpt", length=matched_vpt_length(geo.width, 32, 6, 2))
    specs = {"l2p": MethodSpec(pool, LINEAR, 0.5), "sequential": MethodSpec(vpt, LINEAR)}

    def build(spec: MethodSpec) -> torch.nn.Module:
        return build_classifier(micro_backbone, seq.class_names, spec.prompt, spec.head)

    runs: dict[str, list] = {"l2p": [], "sequential": []}
    for seed in (0, 1, 2):
        for name, spec in specs.items():
            torch.manual_seed(seed)
            runs[name].append(
                run_method(name, seq, build, spec, cfg, settings, device=CPU, seed=seed)
            )

    def mean(name: str, metric: str) -> float:
        return sum(r.metrics()[metric] for r in runs[name]) / len(runs[name])

    assert mean("l2p", "forgetting") < mean("sequential", "forgetting") - 0.1
    assert mean("l2p", "average_accuracy") > mean("sequential", "average_accuracy") + 0.05
    res = runs["l2p"][0]
    assert torch.isnan(res.acc[1, 0]) and not torch.isnan(res.acc[0, 2])
    assert (res.robust <= res.acc + 1e-9)[~torch.isnan(res.acc)].all()
    assert [sum(u) for u in res.usage] == [20 * 2 * 2] * 3  # top-2 per test image


def test_stage_writes_every_method_and_metric(tmp_path: Path, monkeypatch) -> None:
    from _tiny_clip_spec import SMALL

    from vpt_robust.config import validate
    from vpt_robust.data.embedded import materialize
    from vpt_robust.models.tiny_clip import build_tiny_clip, save_clip_checkpoint
    from vpt_robust.stages import continual, prepare
    from vpt_robust.tracking import disabled_run

    monkeypatch.chdir(tmp_path)
    materialize(Path("data"), seed=0, per_class_style=10)
    params = validate(
        {
            "data": {"per_class_style": 10, "base_classes": 12, "max_test": 40},
            "continual": {
                "tasks": 4, "n_train_per_class": 2, "n_test_per_class": 2, "seeds": [0, 1],
                "epochs": 1, "batch_size": 8, "pool_size": 4, "top_n": 1, "prompt_length": 1,
                "attack_steps": 1,
            },
            "runtime": {"device": "cpu"},
            "tracking": {"enabled": False},
        }
    )  # fmt: skip
    prepare.run(params, disabled_run())
    torch.manual_seed(0)
    save_clip_checkpoint(build_tiny_clip(**SMALL), Path("outputs/backbone/tiny_clip.safetensors"))
    out = continual.run(params, disabled_run())
    saved = json.loads(Path("metrics/continual.json").read_text())
    assert saved == json.loads(json.dumps(out))
    assert set(saved["results"]) == {"l2p", "sequential", "joint", "zero_shot"}
    for method, metrics in saved["results"].items():
        assert set(metrics) == set(continual.METRICS), method
        for stats in metrics.values():
            assert len(stats["values"]) == 2 and 0 <= stats["mean"] <= 1
    assert len(saved["matrices"]["l2p"]["accuracy"][0]) == 4
    assert [len(t["classes"]) for t in saved["sequence"]["tasks"]] == [5] * 4
    assert saved["results"]["joint"]["forgetting"]["values"] == [0.0, 0.0]
    assert len(saved["prompt_usage"]["l2p"][0]) == 4


def test_zero_shot_head_option_gives_the_learners_the_text_head(micro_backbone: Backbone) -> None:
    from vpt_robust.config import validate
    from vpt_robust.models.classifier import build_classifier
    from vpt_robust.stages.continual import method_specs

    params = validate({"continual": {"head": "zero_shot", "pool_size": 4, "top_n": 1}})
    geo, dim = micro_backbone.token_geometry, micro_backbone.feature_dim
    specs = method_specs(params, geo.width, dim)
    for name in ("l2p", "sequential", "joint"):
        assert specs[name].head.kind == "zero_shot", name
    assert specs["l2p"].prompt.args["readout"] == "pool"
    names = ["circle", "square", "star"]
    torch.manual_seed(0)
    l2p = build_classifier(micro_backbone, names, specs["l2p"].prompt, specs["l2p"].head)
    plain = build_classifier(micro_backbone, names, None, specs["zero_shot"].head)
    assert l2p.num_trainable() > 0
    assert not any(n.startswith("head.") for n, p in l2p.named_parameters() if p.requires_grad)
    x = torch.rand(4, 3, micro_backbone.image_size, micro_backbone.image_size)
    with torch.no_grad():
        assert l2p.eval()(x).shape == plain.eval()(x).shape == (4, 3)
    linear = method_specs(validate({}), geo.width, dim)
    assert linear["l2p"].head.kind == "linear" and linear["l2p"].prompt.args["readout"] == "prompts"
