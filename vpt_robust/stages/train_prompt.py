"""train_prompt: learn every configured prompt family on the target style's base classes, once
per seed; save each as ``outputs/prompts/<family>/seed_<s>`` and report clean accuracy on the
base classes and, for families that transfer to new classes, on the held-out (novel) classes."""

from __future__ import annotations

from typing import Any

from vpt_robust.config import Params, PromptConfig, TrainConfig
from vpt_robust.data.embedded import load_embedded
from vpt_robust.methods.optim import autocast_dtype
from vpt_robust.methods.supervised import train_prompt
from vpt_robust.metrics import accuracy, mean_std
from vpt_robust.prompts.io import save_prompted_model
from vpt_robust.stages.build import (
    backbone_for,
    checkpoint_path,
    classifier,
    families,
    family_name,
    prompt_path,
)
from vpt_robust.stages.common import Layout, load_splits, setup_runtime, write_json
from vpt_robust.tracking import StageRun
from vpt_robust.utils import seed_everything


def _family_entry(
    params: Params, family: PromptConfig, train_cfg: TrainConfig, per_seed: dict[str, Any]
) -> dict[str, Any]:
    """One family's row of metrics/train_prompt.json: its settings, every seed's summary and
    the mean ± std over seeds (novel-class accuracy only when every seed measured it)."""
    seeds = per_seed.values()
    entry: dict[str, Any] = {
        "prompt": family.model_dump(mode="json"),
        "head": family.head_kind(params.head.kind),
        "train": train_cfg.model_dump(),
        "learned_values": next(iter(seeds))["learned_values"],
        "seeds": per_seed,
        "test_base_acc": _stats([s["test_base_acc"] for s in seeds]),
    }
    if all("test_novel_acc" in s for s in seeds):
        entry["test_novel_acc"] = _stats([s["test_novel_acc"] for s in seeds])
    return entry


def _stats(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": values}


# Facts about one execution, not about its inputs: they go to metrics/*.json and MLflow only,
# never into a dvc out (a resumed run learns the same tensors in fewer epochs of this process).
RUN_FACTS = ("seconds", "resumed_epochs")


def saved_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The training summary as stored with the prompt: a function of the stage's inputs."""
    return {k: v for k, v in summary.items() if k not in RUN_FACTS}


def run(params: Params, run: StageRun) -> dict[str, Any]:
    layout = Layout.of(params)
    device = setup_runtime(params)
    amp = autocast_dtype(params.runtime.precision, device)
    data = load_embedded(layout.data)
    splits = load_splits(layout)
    backbone = backbone_for(params, device)
    n_base = params.data.base_classes
    base, novel = list(data.class_names[:n_base]), list(data.class_names[n_base:])
    train_idx, base_idx, novel_idx = (
        splits["prompt_train"],
        splits["test_base"],
        splits["test_novel"],
    )
    bs = params.evaluate.batch_size
    fams = families(params)
    names = [family_name(params, f) for f in fams]
    run.log_params(
        {
            "families": {n: f.model_dump(mode="json") for n, f in zip(names, fams, strict=True)},
            "train": params.train.model_dump(),
            "head": params.head.model_dump(),
        }
    )
    results: dict[str, Any] = {}
    for name, family in zip(names, fams, strict=True):
        train_cfg = family.train_config(params.train)
        per_seed: dict[str, Any] = {}
        for seed in params.train.seeds:
            seed_everything(seed)
            model = classifier(backbone, base, params, prompted=True, family=family)
            summary = train_prompt(
                model,
                data.images[train_idx],
                data.labels[train_idx],
                cfg=train_cfg,
                device=device,
                seed=seed,
                amp_dtype=amp,
                checkpoint=checkpoint_path(layout, name, seed),
                fingerprint={"backbone": backbone.identity, "classes": base, "spec": model.spec},
                on_step=lambda step, m, n=name, s=seed: run.log_metrics(
                    {f"{n}.seed{s}.{k}": v for k, v in m.items()}, step=step
                ),
            )
            summary["test_base_acc"] = accuracy(
                model, data.images[base_idx], data.labels[base_idx], batch_size=bs, device=device
            )
            summary["learned_values"] = model.num_trainable()
            if not model.class_bound:
                # The same learned tensors, classifying the held-out classes zero-shot.
                novel_model = classifier(backbone, novel, params, prompted=True, family=family)
                novel_model.load_learned_state(model.learned_state())
                summary["test_novel_acc"] = accuracy(
                    novel_model,
                    data.images[novel_idx],
                    data.labels[novel_idx] - n_base,
                    batch_size=bs,
                    device=device,
                )
            path = prompt_path(layout, name, seed)
            extra = {"family": name, "train": train_cfg.model_dump(), "seed": seed}
            save_prompted_model(path, model, extra={**extra, "summary": saved_summary(summary)})
            for suffix in (".safetensors", ".json"):
                run.log_artifact(path.with_suffix(suffix), f"prompts/{name}")
            run.log_metrics({f"{name}.seed{seed}.{k}": summary[k] for k in RUN_FACTS})
            per_seed[str(seed)] = saved_summary(summary)
        results[name] = entry = _family_entry(params, family, train_cfg, per_seed)
        run.log_metrics(
            {
                f"{name}.{split}_mean": entry[split]["mean"]
                for split in ("test_base_acc", "test_novel_acc")
                if split in entry
            }
        )
    result = {"seeds": list(params.train.seeds), "families": results}
    write_json(layout.metrics_file("train_prompt"), result)
    return result
