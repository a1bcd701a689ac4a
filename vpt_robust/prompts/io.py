"""Saving and loading learned prompts: safetensors of the tensors + JSON of what made them.

A saved prompt is two files, ``<path>.safetensors`` (the learned tensors: prompts and, for a
linear head, the head) and ``<path>.json`` (the prompt and head configs, the backbone's identity
with its checkpoint hash and the config that rebuilds it, the class names, and whatever the
trainer adds: train config, seed, summary). ``load_prompted_model(path)`` rebuilds the whole
classifier from them alone.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from vpt_robust.models.backbone import Backbone
    from vpt_robust.models.classifier import PromptedClassifier

FORMAT = "vpt-robust/prompt-v1"


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
        # Weights from a file are identified by their hash, others by their tag (e.g. "openai").
        last = "sha256" if "sha256" in expected_identity else "pretrained"
        keys = ("source", "name", last)
        diff = {k: (saved.get(k), expected_identity.get(k)) for k in keys}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        if diff:
            raise PromptMismatchError(
                f"{weights} was learned for another backbone: "
                + ", ".join(f"{k} saved={a!r} vs current={b!r}" for k, (a, b) in diff.items())
            )
    return load_file(str(weights)), metadata


class ClassMismatchError(PromptMismatchError):
    """Learned tensors that belong to one class list (a linear head, a class-specific CoOp
    context) were asked for another class list."""


def save_prompted_model(
    path: str | Path,
    model: PromptedClassifier,
    *,
    extra: dict[str, Any] | None = None,
    finetune: bool = False,
) -> tuple[Path, Path]:
    """Save ``model``'s learned tensors and everything needed to rebuild it (see module doc).

    ``extra`` (e.g. ``{"train": ..., "seed": 0, "summary": ...}``) is stored alongside.
    ``finetune=True`` (TeCoA's fine-tune baseline) saves trained image-tower weights too and
    records ``"finetune": true``; trained backbone weights without it are refused, never saved
    silently.
    """
    backbone = model.backbone
    if not model.spec:
        raise ValueError(
            "this classifier has no spec (prompt and head configs): build it with "
            "vpt_robust.models.classifier.build_classifier so that it can be rebuilt"
        )
    tensors = model.learned_state()
    tower = sorted(k for k in tensors if k.startswith("backbone."))
    if tower and not finetune:
        raise ValueError(
            f"backbone weights are trainable ({tower[:3]}...): pass finetune=True to save a "
            "fine-tuned image tower (recorded in the file), or freeze the backbone"
        )
    if finetune and not tower:
        raise ValueError("finetune=True but the model has no trained backbone weights")
    metadata = {
        **(extra or {}),
        **({"finetune": True} if finetune else {}),
        "format": FORMAT,
        "prompt": model.spec["prompt"],
        "head": model.spec["head"],
        "class_names": list(model.class_names),
        "backbone": backbone.identity,
        "backbone_config": (
            backbone.config.model_dump(mode="json") if backbone.config is not None else None
        ),
        "image_size": backbone.image_size,
        "learned_values": int(sum(t.numel() for t in tensors.values())),
        "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
    }
    return save_prompt(path, tensors, metadata=metadata)


def read_prompt_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON half of a saved prompt."""
    meta = Path(path).with_suffix(".json")
    if not meta.is_file():
        raise FileNotFoundError(f"saved prompt is incomplete: {meta} is missing")
    return json.loads(meta.read_text())


def load_prompted_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    backbone: Backbone | None = None,
    class_names: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
) -> PromptedClassifier:
    """Rebuild the classifier saved at ``path`` (eval mode, on ``device``).

    The backbone is rebuilt from the config the prompt recorded (``checkpoint`` overrides the
    recorded checkpoint file, e.g. after moving the project), or ``backbone`` is used as given
    (e.g. to evaluate many prompts on one loaded backbone). Either way a prompt learned on
    another backbone (other source, name, or checkpoint hash / tag) is refused with
    ``PromptMismatchError``. ``class_names`` (default: the saved ones) lets a prompt that is
    not bound to its classes (pixel or token prompts with the zero-shot head, a shared CoOp
    context) classify other classes, e.g. held-out ones; a class-bound one is refused with
    ``ClassMismatchError``. A file saved with ``finetune=True`` loads its image-tower weights
    into a private copy of ``backbone`` (the given one stays as it was).
    """
    from vpt_robust.config import BackboneConfig, HeadConfig, PromptConfig
    from vpt_robust.models.backbone import load_backbone
    from vpt_robust.models.classifier import build_classifier
    from vpt_robust.utils import resolve_device

    path = Path(path)
    metadata = read_prompt_metadata(path)
    if metadata.get("format") != FORMAT:
        raise PromptMismatchError(
            f"{path.with_suffix('.json')}: format {metadata.get('format')!r} is not {FORMAT!r}; "
            "it was not written by save_prompted_model"
        )
    device = resolve_device(device) if isinstance(device, str) else device
    if backbone is None:
        saved_cfg = metadata.get("backbone_config")
        if saved_cfg is None:
            raise PromptMismatchError(
                f"{path.with_suffix('.json')} records no backbone config; pass backbone="
            )
        cfg = BackboneConfig.model_validate(saved_cfg)
        if checkpoint is not None:
            cfg = cfg.model_copy(update={"pretrained": str(checkpoint)})
        elif cfg.pretrained and Path(cfg.pretrained).suffix and not Path(cfg.pretrained).is_file():
            raise FileNotFoundError(
                f"the backbone checkpoint this prompt was learned on, {cfg.pretrained}, is not "
                f"found from {Path.cwd()}; run from the project root or pass checkpoint="
            )
        backbone = load_backbone(cfg, device)
    elif metadata.get("finetune") is True:
        backbone = copy.deepcopy(backbone)  # the fine-tuned weights go into a private copy
    if metadata.get("finetune") is True:
        # A TeCoA fine-tune: the image tower's weights are among the saved tensors.
        backbone.image_model.requires_grad_(True)
    tensors, metadata = load_prompt_state(path, expected_identity=backbone.identity)
    if metadata.get("image_size") != backbone.image_size:
        raise PromptMismatchError(
            f"{path.with_suffix('.safetensors')} was learned for {metadata.get('image_size')} px "
            f"inputs; this backbone takes {backbone.image_size} px"
        )
    saved_names = list(metadata["class_names"])
    names = list(class_names) if class_names is not None else saved_names
    model = build_classifier(
        backbone,
        names,
        PromptConfig.model_validate(metadata["prompt"]),
        HeadConfig.model_validate(metadata["head"]),
    )
    if names != saved_names and model.class_bound:
        raise ClassMismatchError(
            f"{path.with_suffix('.safetensors')} holds a {metadata['prompt'].get('kind')!r} "
            f"prompt with a {metadata['head'].get('kind')!r} head bound to its "
            f"{len(saved_names)} training classes; it cannot classify other classes"
        )
    model.load_learned_state({k: v.to(backbone.mean.device) for k, v in tensors.items()})
    return model.eval()
