"""train_prompt: learn the configured prompt on the target style's base classes, once per seed."""

from __future__ import annotations

from typing import Any

from vpt_robust.config import Params
from vpt_robust.data.embedded import load_embedded
from vpt_robust.methods.supervised import train_prompt
from vpt_robust.metrics import accuracy, mean_std
from vpt_robust.prompts.io import save_prompt
from vpt_robust.stages.build import backbone_for, classifier
from vpt_robust.stages.common import Layout, amp_dtype, load_splits, setup_runtime, write_json
from vpt_robust.tracking import StageRun
from vpt_robust.utils import seed_everything


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    device = setup_runtime(params)
    data = load_embedded(layout.data)
    splits = load_splits(layout)
    backbone = backbone_for(params, device)
    base = list(data.class_names[: params.data.base_classes])
    train_idx, test_idx = splits["prompt_train"], splits["test_base"]
    run.log_params(
        {
            "prompt": params.prompt.model_dump(),
            "train": params.train.model_dump(),
            "head": params.head.model_dump(),
        }
    )
    per_seed: dict[str, Any] = {}
    for seed in params.train.seeds:
        seed_everything(seed)
        model = classifier(backbone, base, params, prompted=True)
        summary = train_prompt(
            model,
            data.images[train_idx],
            data.labels[train_idx],
            cfg=params.train,
            device=device,
            seed=seed,
            amp_dtype=amp_dtype(params, device),
            on_step=lambda step, m, s=seed: run.log_metrics(
                {f"seed{s}_{k}": v for k, v in m.items()}, step=step
            ),
        )
        summary["test_base_acc"] = accuracy(
            model,
            data.images[test_idx],
            data.labels[test_idx],
            batch_size=params.evaluate.batch_size,
            device=device,
        )
        summary["learned_values"] = model.num_trainable()
        metadata = {
            "prompt": params.prompt.model_dump(),
            "head": params.head.model_dump(),
            "train": params.train.model_dump(),
            "seed": seed,
            "backbone": backbone.identity,
            "class_names": base,
            "image_size": backbone.image_size,
            "summary": summary,
        }
        weights, meta = save_prompt(layout.prompt(seed), model.learned_state(), metadata=metadata)
        run.log_artifact(weights, "prompts")
        run.log_artifact(meta, "prompts")
        per_seed[str(seed)] = summary
    accs = [s["test_base_acc"] for s in per_seed.values()]
    mean, std = mean_std(accs)
    result = {
        "prompt": params.prompt.kind,
        "seeds": per_seed,
        "test_base_acc": {"mean": mean, "std": std, "values": accs},
    }
    run.log_metrics({"test_base_acc_mean": mean, "test_base_acc_std": std})
    write_json(layout.metrics_file("train_prompt"), result)
    return result
