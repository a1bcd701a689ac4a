"""pretrain: train the embedded tiny CLIP contrastively, or record a real backbone as it is;
then measure zero-shot accuracy on pretraining styles and on the held-out target style."""

from __future__ import annotations

from typing import Any

from vpt_robust.config import Params
from vpt_robust.data.embedded import load_embedded
from vpt_robust.metrics import accuracy
from vpt_robust.stages.build import backbone_for, classifier
from vpt_robust.stages.common import Layout, load_splits, setup_runtime, write_json
from vpt_robust.tracking import StageRun
from vpt_robust.utils import seed_everything

WALL_CLOCK = ("seconds", "images_per_second")  # MLflow only: dvc outs are functions of inputs


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    device = setup_runtime(params)
    data = load_embedded(layout.data)
    splits = load_splits(layout)
    run.log_params(
        {"backbone": params.backbone.model_dump(), "pretrain": params.pretrain.model_dump()}
    )
    result: dict[str, Any] = {}
    layout.backbone_dir.mkdir(parents=True, exist_ok=True)
    if params.backbone.source == "embedded":
        from vpt_robust.methods.pretrain import pretrain_clip
        from vpt_robust.models.tiny_clip import build_tiny_clip, save_clip_checkpoint

        seed_everything(params.data.seed)
        model = build_tiny_clip(image_size=params.data.image_size, **params.pretrain.architecture)
        cfg = params.pretrain
        result["pretrain"] = pretrain_clip(
            model,
            data.subset(splits["pretrain_train"]),
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            augment=cfg.augment,
            supervised_steps=cfg.supervised_steps,
            device=device,
            seed=params.data.seed,
            on_step=lambda step, m: run.log_metrics(m, step=step),
        )
        save_clip_checkpoint(model.cpu(), layout.checkpoint)
        del model
        timing = {k: result["pretrain"].pop(k) for k in WALL_CLOCK}
        run.log_metrics({f"pretrain_{k}": v for k, v in timing.items()})
    backbone = backbone_for(params, device)
    result["backbone"] = backbone.identity
    n_base = params.data.base_classes
    names = list(data.class_names)
    bs = params.evaluate.batch_size
    zero_shot: dict[str, float] = {}
    for split, classes, offset in (
        ("pretrain_test", names, 0),
        ("test_base", names[:n_base], 0),
        ("test_novel", names[n_base:], n_base),
    ):
        idx = splits[split]
        model = classifier(backbone, classes, params, prompted=False)
        zero_shot[split] = accuracy(
            model, data.images[idx], data.labels[idx] - offset, batch_size=bs, device=device
        )
    result["zero_shot"] = zero_shot
    run.log_metrics({f"zero_shot_{k}": v for k, v in zero_shot.items()})
    write_json(layout.backbone_dir / "backbone.json", backbone.identity)
    if layout.checkpoint.is_file():
        run.log_artifact(layout.backbone_dir)
    write_json(layout.metrics_file("pretrain"), result)
    return result
