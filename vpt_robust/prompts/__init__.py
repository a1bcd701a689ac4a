"""Prompt families that plug into a frozen model, and a factory that builds them by name.

A family registers a builder ``(args, image_size) -> nn.Module``; the module's ``place``
attribute ("pixel", "tokens" or "text") says where it plugs in. Adding a family is one file plus
one ``@register_prompt`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vpt_robust.prompts.pixel import PaddingPrompt

PromptBuilder = Callable[[dict[str, Any], int], nn.Module]
PROMPTS: dict[str, PromptBuilder] = {}


def register_prompt(kind: str) -> Callable[[PromptBuilder], PromptBuilder]:
    def deco(builder: PromptBuilder) -> PromptBuilder:
        PROMPTS[kind] = builder
        return builder

    return deco


def build_prompt(kind: str, args: dict[str, Any], image_size: int) -> nn.Module:
    """Build the prompt family ``kind`` with its config arguments; errors name the field."""
    if kind not in PROMPTS:
        raise ValueError(f"prompt.kind: {kind!r} is not one of {sorted(PROMPTS)}")
    try:
        return PROMPTS[kind](dict(args), image_size)
    except TypeError as exc:
        raise ValueError(f"prompt: bad arguments for {kind!r}: {exc}") from None


@register_prompt("padding")
def _padding(args: dict[str, Any], image_size: int) -> nn.Module:
    default = max(1, round(image_size * 30 / 224))
    return PaddingPrompt(image_size, args.pop("pad_size", default), **args)


__all__ = ["PROMPTS", "PaddingPrompt", "build_prompt", "register_prompt"]
