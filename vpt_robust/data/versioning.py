"""Materialise the embedded default data and check it against what `data.dvc` records.

The data are generated, not downloaded, so a fresh machine must reproduce exactly the bytes that
DVC versioned; if it does not, say so loudly rather than train on silently different data.
"""

from __future__ import annotations

import json
from pathlib import Path

from vpt_robust.config import Params


class DataVersionError(RuntimeError):
    """The materialised data do not match the version recorded in data.dvc."""


def dvc_mismatch(dvc_file: Path) -> str | None:
    """None when the workspace holds exactly what ``dvc_file`` records, else what differs.

    Hashes with DVC's own machinery, so it also works in a fresh clone whose DVC cache is empty
    (where ``dvc status`` can only say "not in cache").
    """
    from dvc.repo import Repo

    repo = Repo(str(dvc_file.resolve().parent))
    try:
        problems = []
        for stage in repo.stage.collect(str(dvc_file.resolve())):
            for out in stage.outs:
                if not out.exists:
                    problems.append(f"{out} is missing")
                    continue
                recorded, actual = out.hash_info.value, out.get_hash().value
                if recorded != actual:
                    problems.append(f"{out} hashes to {actual}, {dvc_file.name} records {recorded}")
    finally:
        repo.close()
    return "; ".join(problems) or None


def _built_with(root: Path) -> dict[str, int] | None:
    """The generator parameters recorded in ``root/meta.json``, if it is there."""
    meta = root / "meta.json"
    if not meta.is_file():
        return None
    recorded = json.loads(meta.read_text())
    return {k: recorded.get(k) for k in ("seed", "image_size", "per_class_style")}


def ensure_data(params: Params, *, dvc_file: Path = Path("data.dvc"), force: bool = False) -> str:
    """Build ``paths.data`` from the data params unless it already matches ``dvc_file``."""
    from vpt_robust.data.embedded import materialize

    root = Path(params.paths.data)
    tracked = dvc_file.is_file()
    cfg = params.data
    wanted = {"seed": cfg.seed, "image_size": cfg.image_size, "per_class_style": cfg.per_class_style}
    built = _built_with(root)
    if tracked and not force and built == wanted and dvc_mismatch(dvc_file) is None:
        return f"{root}/ is up to date with {dvc_file}"
    if tracked and not force and built is not None and built != wanted:
        raise DataVersionError(
            f"params ask for data {wanted} but {root}/ (versioned by {dvc_file}) was built with "
            f"{built}; refusing to overwrite it. To re-version the data, run "
            f"`vpt-robust data --force`, then `dvc add {root}` and commit {dvc_file}."
        )
    materialize(root, seed=cfg.seed, image_size=cfg.image_size, per_class_style=cfg.per_class_style)
    if not tracked:
        return f"materialised {root}/; version it with `dvc add {root}` and commit {dvc_file}"
    change = dvc_mismatch(dvc_file)
    if change is not None:
        raise DataVersionError(
            f"{root}/ materialised from params (data.seed={cfg.seed}, data.image_size="
            f"{cfg.image_size}, data.per_class_style={cfg.per_class_style}) does not match "
            f"{dvc_file} ({change}). Either the data params changed since data.dvc was written "
            f"(then run `dvc add {root}` and commit {dvc_file}), or this machine renders "
            "differently (numpy / scikit-image versions)."
        )
    return f"materialised {root}/; it matches {dvc_file}"
