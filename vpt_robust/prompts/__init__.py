"""Prompt families that plug into a frozen model, and the factory that builds them by name.

Each family is one file that registers itself with ``@register_prompt(kind, Args, place=...)``
(``registry.py``); importing it here makes it available to configs. Places: ``pixel``
(``pixel.py``: padding, EVP), ``tokens`` (``tokens.py``: VPT; ``pool.py``: L2P's pool), ``text``
(``text.py``: CoOp).
"""

from __future__ import annotations

from vpt_robust.prompts import (  # noqa: F401  (each registers its families)
    domain,
    pixel,
    pool,
    text,
    tokens,
)
from vpt_robust.prompts.pixel import EVPPrompt, PaddingPrompt
from vpt_robust.prompts.pool import PromptPool
from vpt_robust.prompts.registry import (
    PROMPTS,
    PromptArgs,
    PromptTarget,
    build_prompt,
    prompt_place,
    register_prompt,
    validate_prompt_args,
)
from vpt_robust.prompts.text import CoOpContext
from vpt_robust.prompts.tokens import VPTPrompt

__all__ = [
    "PROMPTS",
    "CoOpContext",
    "EVPPrompt",
    "PaddingPrompt",
    "PromptPool",
    "PromptArgs",
    "PromptTarget",
    "VPTPrompt",
    "build_prompt",
    "prompt_place",
    "register_prompt",
    "validate_prompt_args",
]
