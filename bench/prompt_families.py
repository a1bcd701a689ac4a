"""Compare every prompt family on the embedded default, same epoch budget, several seeds.

zero-shot vs padding vs EVP vs VPT-shallow vs VPT-deep vs CoOp vs linear probe: clean accuracy on
the target style's base (training) classes, zero-shot accuracy on its held-out (novel) classes
for the families whose learned tensors are not tied to the training classes, and the number of
learned values. Needs ``data/`` and ``outputs/prepare`` + ``outputs/backbone`` (``vpt-robust
data``, ``vpt-robust stage prepare``, ``vpt-robust stage pretrain``).

    python bench/prompt_families.py                       # FAMILIES below, params.yaml's seeds
    python bench/prompt_families.py --tune                # first pick each family's lr
    python bench/prompt_families.py --families vpt_deep coop --epochs 5 --seeds 0

``--tune`` picks each family's learning rate from ``lr x {1/10, 1/3, 1, 3, 10}`` on seed 0, by
accuracy on a validation fifth held out of the prompt-training split (never the test split),
then runs every seed with the chosen rate on the full training split. Results go to
``outputs/bench/prompt_families.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vpt_robust.config import (
    ConfigError,
    PromptConfig,
    TrainConfig,
    deep_merge,
    load_params,
    parse_override,
)
from vpt_robust.data.embedded import load_embedded
from vpt_robust.methods.optim import autocast_dtype
from vpt_robust.methods.supervised import train_prompt
from vpt_robust.metrics import accuracy, mean_std
from vpt_robust.models.classifier import build_classifier
from vpt_robust.stages.build import backbone_for
from vpt_robust.stages.common import Layout, load_splits
from vpt_robust.utils import resolve_device, seed_everything

# The families compared, in params.yaml's `prompts:` format. Learning rates: the papers' values
# are for 224 px ViT-B (padding SGD 40, EVP normalised-gradient 70, CoOp SGD 0.002); these are
# the ones --tune chose on the embedded default (H100, bf16, 10 epochs) from a grid of
# 0.1x-10x around padding 40, EVP 10 (70 scaled by sqrt(1344 / 69840) for the 32 px border),
# VPT 1, CoOp 0.002 and linear probe (AdamW) 0.001.
FAMILIES: list[dict[str, Any]] = [
    {"name": "padding", "kind": "padding", "train": {"optimizer": "sgd", "lr": 4.0}},
    {"name": "evp", "kind": "evp", "train": {"optimizer": "normalized_sgd", "lr": 1.0}},
    {
        "name": "vpt_shallow",
        "kind": "vpt",
        "length": 10,
        "depth": "shallow",
        "train": {"optimizer": "sgd", "lr": 0.1},
    },
    {
        "name": "vpt_deep",
        "kind": "vpt",
        "length": 10,
        "depth": "deep",
        "train": {"optimizer": "sgd", "lr": 1.0},
    },
    {
        "name": "coop",
        "kind": "coop",
        "init": "a photo of a",
        "train": {"optimizer": "sgd", "lr": 0.006},
    },
    {
        "name": "linear_probe",
        "kind": "none",
        "head": "linear",
        "train": {"optimizer": "adamw", "lr": 0.01},
    },
]
LR_FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)


def _stats(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": values}


def _pct(stats: dict[str, Any] | None) -> str:
    return "n/a" if stats is None else f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        overrides: dict[str, Any] = {}
        for text in args.set or []:
            overrides = deep_merge(overrides, parse_override(text))
        self.params = load_params(args.params, preset=args.preset, overrides=overrides)
        self.device = resolve_device(args.device)
        self.amp = autocast_dtype(args.precision, self.device)
        layout = Layout.of(self.params)
        self.data = load_embedded(layout.data)
        self.splits = load_splits(layout)
        self.backbone = backbone_for(self.params, self.device)
        n = self.params.data.base_classes
        self.n_base = n
        self.base = list(self.data.class_names[:n])
        self.novel = list(self.data.class_names[n:])
        self.bs = self.params.evaluate.batch_size
        self.epochs = args.epochs or self.params.train.epochs
        self.lr_factors = tuple(args.lr_factors)

    def acc(self, model: torch.nn.Module, split: str, offset: int = 0) -> float:
        idx = self.splits[split]
        return accuracy(
            model,
            self.data.images[idx],
            self.data.labels[idx] - offset,
            batch_size=self.bs,
            device=self.device,
        )

    def zero_shot(self) -> dict[str, float]:
        base = build_classifier(self.backbone, self.base, None, self.params.head)
        novel = build_classifier(self.backbone, self.novel, None, self.params.head)
        return {
            "test_base_acc": self.acc(base, "test_base"),
            "test_novel_acc": self.acc(novel, "test_novel", self.n_base),
        }

    def train_cfg(self, family: PromptConfig, lr: float | None = None) -> TrainConfig:
        cfg = family.train_config(self.params.train)
        update: dict[str, Any] = {"epochs": self.epochs, "checkpoint": False}
        if lr is not None:
            update["lr"] = lr
        return TrainConfig.model_validate({**cfg.model_dump(), **update})

    def fit(
        self, family: PromptConfig, cfg: TrainConfig, seed: int, train_idx: torch.Tensor
    ) -> tuple[Any, dict[str, float]]:
        seed_everything(seed)
        model = build_classifier(self.backbone, self.base, family, self.params.head)
        summary = train_prompt(
            model,
            self.data.images[train_idx],
            self.data.labels[train_idx],
            cfg=cfg,
            device=self.device,
            seed=seed,
            amp_dtype=self.amp,
        )
        return model, summary

    def tune(self, family: PromptConfig) -> tuple[float, dict[str, float]]:
        """The lr with the best validation accuracy (seed 0, a fifth of prompt_train held out)."""
        idx = self.splits["prompt_train"]
        perm = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))]
        n_val = len(perm) // 5
        val, train = perm[:n_val], perm[n_val:]
        base_lr = self.train_cfg(family).lr
        scores: dict[float, float] = {}
        for factor in self.lr_factors:
            lr = base_lr * factor
            model, _ = self.fit(family, self.train_cfg(family, lr), 0, train)
            scores[lr] = accuracy(
                model,
                self.data.images[val],
                self.data.labels[val],
                batch_size=self.bs,
                device=self.device,
            )
            print(f"  tune {family.family_name()}: lr {lr:.4g} -> val {scores[lr]:.3f}", flush=True)
        best = max(scores, key=lambda k: scores[k])
        return best, scores

    def run_family(self, family: PromptConfig, seeds: list[int], lr: float | None) -> dict:
        cfg = self.train_cfg(family, lr)
        rows = []
        for seed in seeds:
            start = time.perf_counter()
            model, summary = self.fit(family, cfg, seed, self.splits["prompt_train"])
            row = {
                "seed": seed,
                "test_base_acc": self.acc(model, "test_base"),
                "train_acc": summary["train_acc"],
                "seconds": time.perf_counter() - start,
                "learned_values": model.num_trainable(),
            }
            if not model.class_bound:
                novel = build_classifier(self.backbone, self.novel, family, self.params.head)
                novel.load_learned_state(model.learned_state())
                row["test_novel_acc"] = self.acc(novel, "test_novel", self.n_base)
            rows.append(row)
            print(f"  {family.family_name()} seed {seed}: {row}", flush=True)
        out = {
            "prompt": family.model_dump(mode="json"),
            "train": cfg.model_dump(),
            "learned_values": rows[0]["learned_values"],
            "test_base_acc": _stats([r["test_base_acc"] for r in rows]),
            "seconds_per_run": _stats([r["seconds"] for r in rows]),
            "seeds": rows,
        }
        if all("test_novel_acc" in r for r in rows):
            out["test_novel_acc"] = _stats([r["test_novel_acc"] for r in rows])
        return out


def table(result: dict[str, Any]) -> str:
    zs = result["zero_shot"]
    lines = [
        "| family | learned values | optimiser, lr | base classes (%) | novel classes (%) |",
        "| --- | ---: | --- | ---: | ---: |",
        f"| zero-shot | 0 | - | {100 * zs['test_base_acc']:.1f} | "
        f"{100 * zs['test_novel_acc']:.1f} |",
    ]
    for name, r in result["families"].items():
        opt = f"{r['train']['optimizer']}, {r['train']['lr']:.4g}"
        lines.append(
            f"| {name} | {r['learned_values']:,} | {opt} | {_pct(r['test_base_acc'])} | "
            f"{_pct(r.get('test_novel_acc'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--preset")
    p.add_argument("--set", action="append", metavar="BLOCK.FIELD=VALUE")
    p.add_argument("--families", nargs="*", help="names from FAMILIES (default: all)")
    p.add_argument("--seeds", nargs="*", type=int, help="default: train.seeds")
    p.add_argument("--epochs", type=int, help="default: train.epochs (the same for every family)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--tune", action="store_true", help="pick each family's lr first (see doc)")
    p.add_argument(
        "--lr-factors", nargs="*", type=float, default=LR_FACTORS, help="the --tune grid"
    )
    p.add_argument("--lr", nargs="*", default=[], metavar="NAME=LR", help="a family's base lr")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/bench/prompt_families")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        bench = Bench(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    chosen = [f for f in FAMILIES if not args.families or f["name"] in args.families]
    unknown = set(args.families or []) - {f["name"] for f in FAMILIES}
    if unknown:
        print(f"error: unknown families {sorted(unknown)}", file=sys.stderr)
        return 2
    lrs = dict(item.split("=", 1) for item in args.lr)
    bad = set(lrs) - {f["name"] for f in FAMILIES}
    if bad:
        print(f"error: --lr names unknown families {sorted(bad)}", file=sys.stderr)
        return 2
    chosen = [
        {**f, "train": {**f["train"], "lr": float(lrs[f["name"]])}} if f["name"] in lrs else f
        for f in chosen
    ]
    seeds = args.seeds or list(bench.params.train.seeds)
    result: dict[str, Any] = {
        "backbone": bench.backbone.identity,
        "device": str(bench.device),
        "precision": str(bench.amp),
        "epochs": bench.epochs,
        "seeds": seeds,
        "train_images": len(bench.splits["prompt_train"]),
        "zero_shot": bench.zero_shot(),
        "families": {},
        "tuning": {},
    }
    print(f"zero-shot: {result['zero_shot']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in chosen:
        family = PromptConfig.model_validate(spec)
        lr = None
        if args.tune:
            lr, scores = bench.tune(family)
            result["tuning"][spec["name"]] = {"chosen_lr": lr, "val_acc": scores}
        result["families"][spec["name"]] = bench.run_family(family, seeds, lr)
        # Written after every family, so an interrupted run keeps what it measured.
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = table(result)
    out.with_suffix(".md").write_text(
        f"Embedded default, {bench.epochs} epochs, seeds {seeds}, {result['device']}:\n\n"
        + text
        + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
