"""The prompt-family registry: a config names a family and its arguments, the factory builds it.

A family registers a pydantic model of its arguments (validated when the config is read, so a
bad argument stops the pipeline before anything runs) and a builder
``(args, target) -> nn.Module``. The module's ``place`` attribute says where it plugs in:
``"pixel"`` (an image-to-image function), ``"tokens"`` (extra tokens in the ViT sequence) or
``"text"`` (learned context of the class prompts in the text tower).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

if TYPE_CHECKING:
    from vpt_robust.models.backbone import Backbone


class PromptArgs(BaseModel):
    """Base of every family's argument model: unknown arguments are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class PromptTarget:
    """What a prompt is built for: the model's input size, and (for token and text prompts) the
    frozen backbone and the class names."""

    image_size: int
    backbone: Backbone | None = None
    class_names: tuple[str, ...] = ()

    @classmethod
    def of(cls, backbone: Backbone, class_names: Sequence[str] = ()) -> PromptTarget:
        return cls(backbone.image_size, backbone, tuple(class_names))

    def require_backbone(self, kind: str) -> Backbone:
        if self.backbone is None:
            raise ValueError(f"prompt {kind!r} is built from the backbone; none was given")
        return self.backbone


PromptBuilder = Callable[[Any, PromptTarget], nn.Module]


@dataclass(frozen=True)
class PromptFamily:
    kind: str
    args_model: type[PromptArgs]
    builder: PromptBuilder
    place: str


PROMPTS: dict[str, PromptFamily] = {}


def register_prompt(
    kind: str, args_model: type[PromptArgs], *, place: str
) -> Callable[[PromptBuilder], PromptBuilder]:
    """Register ``builder`` as the prompt family ``kind`` (one line per family)."""
    if place not in ("pixel", "tokens", "text"):
        raise ValueError(f"place: {place!r} is not one of 'pixel', 'tokens', 'text'")

    def deco(builder: PromptBuilder) -> PromptBuilder:
        if kind in PROMPTS and PROMPTS[kind].builder is not builder:
            raise ValueError(f"prompt family {kind!r} is registered twice")
        PROMPTS[kind] = PromptFamily(kind, args_model, builder, place)
        return builder

    return deco


def _family(kind: str) -> PromptFamily:
    if kind not in PROMPTS:
        raise ValueError(f"prompt.kind: {kind!r} is not one of {sorted(PROMPTS)}")
    return PROMPTS[kind]


def validate_prompt_args(kind: str, args: dict[str, Any]) -> PromptArgs:
    """The family's validated arguments; errors name the family, the argument and the value."""
    family = _family(kind)
    try:
        return family.args_model.model_validate(dict(args))
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "arguments"
            if err["type"] == "extra_forbidden":
                known = sorted(family.args_model.model_fields)
                lines.append(f"{loc}: unknown argument (known: {known})")
            else:
                lines.append(f"{loc}: {err.get('input')!r}: {err['msg']}")
        raise ValueError(f"bad arguments for {kind!r}: " + "; ".join(lines)) from None


def prompt_place(kind: str) -> str:
    return _family(kind).place


def build_prompt(kind: str, args: dict[str, Any], target: PromptTarget | int) -> nn.Module:
    """Build the prompt family ``kind`` with its config arguments for ``target`` (or, for pixel
    prompts, just an image size); errors name the bad field."""
    family = _family(kind)
    if isinstance(target, int):
        target = PromptTarget(target)
    module = family.builder(validate_prompt_args(kind, args), target)
    module.kind = kind
    return module
