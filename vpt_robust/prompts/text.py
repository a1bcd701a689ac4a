"""Text prompts: learned context vectors of the class prompts (CoOp, Zhou et al. 2022).

Each class prompt is ``[SOT] ctx_1 ... ctx_M <class name> . [EOT]`` in the text tower's input
embedding space; the M context vectors are learned, the class-name embeddings stay those of the
frozen token embedding (KaiyangZhou/CoOp ``trainers/coop.py``, class token at the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import Field, field_validator
from torch import nn

from vpt_robust.prompts.registry import PromptArgs, PromptTarget, register_prompt

if TYPE_CHECKING:
    from vpt_robust.models.backbone import Backbone

RANDOM = "random"


class CoOpContext(nn.Module):
    """Learned context for the class prompts of ``class_names`` in ``backbone``'s text tower.

    ``init="a photo of a"`` (or any text): the context starts as that text's token embeddings and
    ``n_ctx`` is its token count (then the untrained prompts equal the zero-shot prompts
    ``"a photo of a {name}."``). ``init="random"``: N(0, 0.02), ``n_ctx`` vectors (default 16).
    ``class_specific``: one context per class, (C, M, d), instead of one shared (M, d); a
    shared context transfers to class names it was not trained on, a class-specific one cannot.
    """

    place = "text"

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        n_ctx: int | None = None,
        class_specific: bool = False,
        init: str = "a photo of a",
    ) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("CoOpContext: class_names is empty")
        self.class_names = tuple(class_names)
        self.class_specific = class_specific
        self.init = init
        device = backbone.mean.device
        if init == RANDOM:
            n = 16 if n_ctx is None else n_ctx
            if n < 1:
                raise ValueError(f"prompt.n_ctx: {n} must be >= 1")
            prefix_text = " ".join(["X"] * n)
        else:
            ids = backbone.tokenize([init])[0]
            n = int((ids != 0).sum()) - 2  # minus start- and end-of-text
            if n < 1:
                raise ValueError(f"prompt.init: {init!r} has no tokens")
            if n_ctx is not None and n_ctx != n:
                raise ValueError(
                    f"prompt.n_ctx: {n_ctx} differs from the {n} tokens of init {init!r}; "
                    "leave n_ctx out or use init: random"
                )
            prefix_text = init
        self.n_ctx = n
        tokens = backbone.tokenize([f"{prefix_text} {name}." for name in self.class_names]).to(
            device
        )
        length = tokens.shape[1]
        too_long = [
            name
            for name, row in zip(self.class_names, tokens, strict=True)
            if int((row != 0).sum()) >= length
        ]
        if too_long:
            raise ValueError(
                f"class prompts for {too_long[:3]} do not fit the text tower's context length "
                f"{length} with {n} context tokens"
            )
        with torch.no_grad():
            embedded = backbone.embed_tokens(tokens).float()
        width = embedded.shape[-1]
        # The frozen parts of every class prompt: start-of-text, and name + '.' + end + padding.
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n :].clone(), persistent=False)
        if init == RANDOM:
            shape = (len(self.class_names), n, width) if class_specific else (n, width)
            ctx = torch.randn(shape, device=device) * 0.02
        else:
            ctx = embedded[0, 1 : 1 + n].clone()
            if class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(self.class_names), 1, 1)
        self.ctx = nn.Parameter(ctx)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def embeddings(self) -> torch.Tensor:
        """The class prompts' input embeddings ``(C, L, d)`` with the current context."""
        ctx = self.ctx if self.class_specific else self.ctx.expand(self.num_classes, -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)

    def forward(self, backbone: Backbone) -> torch.Tensor:
        """Class text features ``(C, D)`` through ``backbone``'s frozen text tower."""
        return backbone.encode_text_embeddings(self.embeddings(), self.tokens)


class CoOpArgs(PromptArgs):
    n_ctx: int | None = Field(None, ge=1)
    class_specific: bool = False
    init: str = "a photo of a"

    @field_validator("init")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("init must be 'random' or a non-empty text such as 'a photo of a'")
        return v


@register_prompt("coop", CoOpArgs, place="text")
def _coop(args: CoOpArgs, target: PromptTarget) -> nn.Module:
    if not target.class_names:
        raise ValueError("prompt 'coop' is built for class names; none were given")
    return CoOpContext(
        target.require_backbone("coop"),
        target.class_names,
        n_ctx=args.n_ctx,
        class_specific=args.class_specific,
        init=args.init,
    )
