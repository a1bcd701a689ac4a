"""The `vpt-robust` command line: stages (what dvc.yaml calls), data, params, report."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vpt_robust.config import ConfigError, Params, load_params, parse_override
from vpt_robust.utils import keep_freed_memory


def _params(args: argparse.Namespace) -> Params:
    overrides: dict[str, Any] = {}
    from vpt_robust.config import deep_merge

    for text in args.set or []:
        overrides = deep_merge(overrides, parse_override(text))
    return load_params(args.params, preset=args.preset, overrides=overrides)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--preset", help="a preset in configs/ merged over the params file")
    p.add_argument("--set", action="append", metavar="BLOCK.FIELD=VALUE", help="override a value")


def cmd_stage(args: argparse.Namespace) -> int:
    from vpt_robust.stages import run_stage

    params = _params(args)
    result = run_stage(args.name, params)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _dvc_status(dvc: list[str]) -> set[str] | None:
    """Names of the stages ``dvc status`` reports changed, None if it could not tell."""
    proc = subprocess.run([*dvc, "status", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        return set(json.loads(proc.stdout or "{}"))
    except json.JSONDecodeError:
        return None


def _lock_hashes(lock_file: Path) -> dict[str, str]:
    import yaml

    from vpt_robust.tracking import lock_entry_hash

    if not lock_file.is_file():
        return {}
    entries = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    return {name: lock_entry_hash(entry) for name, entry in entries.items()}


def cmd_repro(args: argparse.Namespace) -> int:
    """``dvc repro`` as one MLflow pipeline run that names, per stage, the run that made its
    result: the child run that ran now, or the earlier run whose cached result dvc reused."""
    import yaml

    from vpt_robust import tracking

    dvc = [sys.executable, "-m", "dvc"]
    command = [*dvc, "repro", *args.dvc_args]
    params = load_params(args.params)
    cfg = params.tracking
    if not cfg.enabled:
        return subprocess.call(command)
    pid = tracking.new_pipeline_id("repro")
    parent = tracking.open_parent(cfg, pid, params.model_dump(), owner="repro")
    print(f"MLflow pipeline run {parent} (pipeline id {pid})", file=sys.stderr)
    rc = 1
    try:
        rc = subprocess.call(command, env={**os.environ, tracking.PIPELINE_ENV: pid})
    finally:
        stages = list(yaml.safe_load(Path("dvc.yaml").read_text()).get("stages", {}))
        changed = _dvc_status(dvc)
        up_to_date = set() if changed is None else set(stages) - changed
        lineage = tracking.record_lineage(
            cfg, parent, stages, _lock_hashes(Path("dvc.lock")), up_to_date
        )
        status = tracking.close_parent(cfg, parent, failed=rc != 0)
        for stage, text in lineage.items():
            print(f"  {stage}: {text}", file=sys.stderr)
        print(f"MLflow pipeline run {parent}: {status}", file=sys.stderr)
    return rc


def cmd_data(args: argparse.Namespace) -> int:
    from vpt_robust.data.versioning import DataVersionError, ensure_data

    params = _params(args)
    try:
        message = ensure_data(params, dvc_file=Path(args.dvc_file), force=args.force)
    except DataVersionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(message)
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    import yaml

    text = yaml.safe_dump(_params(args).model_dump(mode="json"), sort_keys=False)
    if args.output is None:
        print(text, end="")
        return 0
    out = Path(args.output)
    if not out.parent.is_dir():
        raise ConfigError(f"--output {out}: the folder {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)  # read first, replaced whole: the params file may be the one read
    print(f"wrote {out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    params = _params(args)
    from vpt_robust.stages.common import Layout

    report = Layout.of(params).outputs / "report" / "report.md"
    table = report.with_name("protocol_table.md")
    if not report.is_file() or not table.is_file():
        print(f"error: {table} not found: run `vpt-robust repro` first", file=sys.stderr)
        return 2
    print("The protocol table (%, mean over seeds; `-`: not measured by that stage):\n")
    print(table.read_text())
    print(f"Every table, with std and per-split numbers: {report}")
    print(
        "Browse every run in MLflow: `make ui` (then open http://127.0.0.1:5000), "
        f"store {params.tracking.uri}, experiment '{params.tracking.experiment}'."
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vpt_robust.models import BackboneError
    from vpt_robust.predict import run_predict

    try:
        return run_predict(
            args.prompt,
            args.inputs,
            top_k=args.top_k,
            device=args.device,
            batch_size=args.batch_size,
            checkpoint=args.checkpoint,
        )
    except (FileNotFoundError, ValueError, BackboneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the ``adapt-new-stream`` deployment and watch the inbox (``flows/stream.py``)."""
    from vpt_robust.config import PROJECT_ROOT

    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))  # flows/ sits beside the package, not in it
    from flows.stream import serve

    load_params(args.params)  # a bad params file stops here, with the CLI's error
    return serve(args.params)


def cmd_stream(args: argparse.Namespace) -> int:
    """Adapt on one stream folder by hand: the flow's function, without Prefect or a server."""
    from vpt_robust.streams import StreamFolderError, VersionError, process_folder

    params = _params(args)
    try:
        result = process_folder(args.path, params, from_version=args.from_version)
    except (StreamFolderError, VersionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result["status"] == "known":
        print(f"{args.path}: content {result['data_hash']} is version {result['version']} already")
    else:
        print(
            f"{args.path}: version {result['version']} (parent {result['parent']}), "
            f"content {result['data_hash']}, MLflow run {result['mlflow_run_id']}"
        )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    """The adapted versions of the stream store, oldest first."""
    from vpt_robust.streams import list_versions

    rows = list_versions(_params(args))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no adapted versions yet")
        return 0
    print("version  parent  data hash                              images  error   src err  run")
    for r in rows:
        m = r["metrics"]
        err = m["adapted"].get("error")
        src = m["source"].get("error")
        print(
            f"{r['version']:>7}{'*' if r['latest'] else ' '} {r['parent']!s:>6}  "
            f"{r['data_hash']:<38} {r['n_images']:>6}  "
            f"{'-' if err is None else f'{err:.3f}':>6}  {'-' if src is None else f'{src:.3f}':>7}  "
            f"{r['mlflow_run_id'] or '-'}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpt-robust", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from vpt_robust.stages import STAGES

    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    p.add_argument("name", choices=STAGES)
    p.add_argument("--json", action="store_true", help="print the stage's result as JSON")
    _add_config_args(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser(
        "repro",
        help="`dvc repro` (same arguments) as one MLflow parent run with every stage's lineage",
        description="Runs `dvc repro ARGS...` under one MLflow parent run. Stages that run are "
        "its child runs; for each stage dvc skips, the parent records the earlier run whose "
        "cached result was reused. Every other argument goes to dvc.",
    )
    p.add_argument("--params", default="params.yaml", help="params file dvc reads")
    p.set_defaults(func=cmd_repro, dvc_args=[])

    p = sub.add_parser(
        "data", help="materialise the embedded default data and check it against data.dvc"
    )
    p.add_argument("--dvc-file", default="data.dvc")
    p.add_argument("--force", action="store_true", help="rebuild even if data/ is up to date")
    _add_config_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "params", help="print the merged, validated params (e.g. to write a preset's params.yaml)"
    )
    _add_config_args(p)
    p.add_argument(
        "-o", "--output", help="write them to this file (it may be the params file itself)"
    )
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("predict", help="top-k classes of an image or a folder with a saved prompt")
    p.add_argument("--prompt", required=True, help="saved prompt (path without or with suffix)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--checkpoint", help="backbone checkpoint, if not where the prompt recorded it")
    p.add_argument("inputs", metavar="IMAGE_OR_FOLDER")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "serve", help="serve the adapt-new-stream Prefect deployment and watch streams.inbox"
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stream", help="adapt on one new stream folder now (no Prefect server)")
    p.add_argument("path", metavar="FOLDER")
    p.add_argument("--from-version", type=int, help="adapt from this version (default: latest)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_config_args(p)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("versions", help="list the adapted stream versions (* = latest)")
    p.add_argument("--json", action="store_true")
    _add_config_args(p)
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("show", help="print the headline report and how to browse results")
    _add_config_args(p)
    p.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "repro":
        args.dvc_args = extra  # every other argument (targets, --force, -s, ...) goes to dvc
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    keep_freed_memory()
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
