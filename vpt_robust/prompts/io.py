"""Saving and loading learned prompts: safetensors of the tensors + JSON of what made them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class PromptMismatchError(ValueError):
    """A saved prompt does not belong to the backbone or prompt family it is loaded onto."""


def save_prompt(
    path: str | Path, tensors: dict[str, torch.Tensor], *, metadata: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (the learned tensors) and ``<path>.json``, each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for target, write in (
        (weights, lambda p: save_file(tensors, str(p))),
        (meta, lambda p: Path(p).write_text(json.dumps(metadata, indent=2, default=str))),
    ):
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        os.replace(tmp, target)
    return weights, meta


def load_prompt_state(
    path: str | Path, *, expected_identity: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a saved prompt; refuse it if it was learned on another backbone."""
    path = Path(path)
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for f in (weights, meta):
        if not f.is_file():
            raise FileNotFoundError(f"saved prompt is incomplete: {f} is missing")
    metadata = json.loads(meta.read_text())
    if expected_identity is not None:
        saved = metadata.get("backbone", {})
        keys = ("source", "name", "sha256") if "sha256" in expected_identity else ("source", "name")
        diff = {k: (saved.get(k), expected_identity.get(k)) for k in keys}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        if diff:
            raise PromptMismatchError(
                f"{weights} was learned for another backbone: "
                + ", ".join(f"{k} saved={a!r} vs current={b!r}" for k, (a, b) in diff.items())
            )
    return load_file(str(weights)), metadata
