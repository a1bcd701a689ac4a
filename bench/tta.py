"""Test-time adaptation on the embedded default: error and cost of each method, same stream.

source vs norm vs Tent vs CoTTA vs VDP (+ ablations) vs TPT on one corruption stream over the
PRETRAINING styles' test images (split ``pretrain_test``: the source model is good there, so
adaptation has something to keep), every method on the same stream object, several seeds (the
stream's sample order and every method's generator follow the seed). Cost per batch of each
method as a ratio to a plain forward, in the same run: ``wall`` (seconds per batch / source's)
and ``passes`` (model passes per image, forward + 2 x backward; source = 1). Needs ``data/`` and
``outputs/prepare`` + ``outputs/backbone`` (``vpt-robust data``, ``vpt-robust stage prepare``,
``vpt-robust stage pretrain``).

    python bench/tta.py                                          # defaults below
    python bench/tta.py --methods source tent vdp --severity 5 --seeds 0
    python bench/tta.py --arg vdp.ema=0.99 --arg cotta.lr=1e-4 --set paths.outputs=/tmp/out

Results go to ``<outputs>/bench/tta.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch
import yaml

from vpt_robust.config import PromptConfig, deep_merge, load_params, parse_override
from vpt_robust.corruptions import CORRUPTIONS, CorruptionStream, GeneratedSource
from vpt_robust.data.embedded import load_embedded
from vpt_robust.methods.stream_runner import run_stream
from vpt_robust.methods.tta import build_adapter
from vpt_robust.metrics import as_float_images
from vpt_robust.models.classifier import build_classifier
from vpt_robust.stages.build import backbone_for, classifier
from vpt_robust.stages.common import Layout, load_splits, setup_runtime

METHODS = [
    "source",
    "norm",
    "tent",
    "cotta",
    "vdp",
    "vdp_dap_only",
    "vdp_dsp_only",
    "vdp_no_homeostasis",
]


def _method_args(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, arg = key.partition(".")
        if not arg or not value:
            sys.exit(f"--arg {item!r}: expected METHOD.ARG=VALUE")
        out.setdefault(method, {})[arg] = yaml.safe_load(value)
    return out


def _summary(values: list[float]) -> dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset")
    ap.add_argument("--set", action="append", default=[], metavar="BLOCK.FIELD=VALUE")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--arg", action="append", default=[], metavar="METHOD.ARG=VALUE")
    ap.add_argument("--protocol", default="continual")
    ap.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--n-per-segment", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)

    overrides: dict[str, Any] = {}
    for item in args.set:
        overrides = deep_merge(overrides, parse_override(item))
    params = load_params(args.params, args.preset, overrides)
    margs = _method_args(args.arg)
    layout = Layout.of(params)
    device = setup_runtime(params)
    data = load_embedded(layout.data)
    idx = load_splits(layout)["pretrain_test"]
    names = list(data.class_names)
    backbone = backbone_for(params, device)
    images, labels = as_float_images(data.images[idx]), data.labels[idx]
    source = GeneratedSource(images, labels, device=device)

    results: dict[str, dict[str, list]] = {m: {} for m in args.methods}
    plan: dict[str, Any] = {}
    for seed in args.seeds:
        stream = CorruptionStream(
            source,
            args.protocol,
            corruptions=args.corruptions,
            severity=args.severity,
            n_per_segment=args.n_per_segment,
            batch_size=args.batch_size,
            seed=seed,
            shuffle=True,
        )
        plan = stream.describe()
        plan.pop("segments")
        for method in args.methods:
            if method == "tpt":
                init = params.head.templates[0].replace("{}", "").strip(" .")
                model = build_classifier(
                    backbone, names, PromptConfig(kind="coop", init=init), params.head
                )
            else:
                model = classifier(backbone, names, params, prompted=False)
            cfg = dict(margs.get(method, {}))
            if method not in ("source", "norm", "tent"):
                cfg.setdefault("seed", seed)
            torch.manual_seed(seed)
            res = run_stream(build_adapter(method, model, **cfg), stream)
            r = results[method]
            r.setdefault("mean_error", []).append(res.mean_error)
            r.setdefault("late_error", []).append(res.late_error)
            r.setdefault("seconds_per_batch", []).append(res.seconds_per_batch)
            r.setdefault("passes", []).append(res.cost["relative"])
            r.setdefault("rows", []).append([round(row["error"], 4) for row in res.rows])
            print(f"seed {seed} {method:20s} mean {res.mean_error:.4f} late {res.late_error:.4f}"
                  f" {res.seconds_per_batch:.3f}s/batch", flush=True)  # fmt: skip
    base = statistics.fmean(results["source"]["seconds_per_batch"]) if "source" in results else None
    table = {}
    for method, r in results.items():
        wall = statistics.fmean(r["seconds_per_batch"])
        table[method] = {
            "mean_error": _summary(r["mean_error"]),
            "late_error": _summary(r["late_error"]),
            "cost": {"wall": wall / base if base else None, "passes": r["passes"][0]},
            "per_domain_error": r["rows"],
        }
    out_dir = layout.outputs / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"stream": plan, "seeds": args.seeds, "method_args": margs, "results": table}
    (out_dir / "tta.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"protocol {args.protocol}, severity {args.severity}, {len(args.corruptions)} domains, "
        f"seeds {args.seeds}",
        "",
        "| method | mean error | late error | cost (wall) | cost (passes) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, t in table.items():
        m, late = t["mean_error"], t["late_error"]
        wall = t["cost"]["wall"]
        lines.append(
            f"| {method} | {100 * m['mean']:.1f} ± {100 * m['std']:.1f} | "
            f"{100 * late['mean']:.1f} ± {100 * late['std']:.1f} | "
            f"{'' if wall is None else f'{wall:.2f}x'} | {t['cost']['passes']:.1f}x |"
        )
    (out_dir / "tta.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
