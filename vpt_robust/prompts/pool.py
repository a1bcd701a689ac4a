"""L2P's prompt pool (Wang et al., CVPR 2022): input-dependent token prompts chosen by key matching.

A pool holds ``size`` (M) prompts of ``length`` (Lp) tokens and one learnable key per prompt.
For every image the frozen model's feature WITHOUT prompts is the query; the ``top_n`` (N) keys
of highest cosine similarity pick the prompts, whose N x Lp tokens enter the ViT as
``[CLS, prompts, patches]`` (``models/prompted_vit.py``). Facts from the official code
(google-research/l2p, its PyTorch port JH-LEE-KR/l2p-pytorch ``prompt.py``), re-implemented:

- the surrogate loss pulls each selected key toward its query: the official loss is
  ``CE - lambda * sum_n cos(q, k_n)`` (summed over the N selected keys, averaged over the batch);
  we report ``key_pull = mean_b sum_n (1 - cos(q_b, k_n))``, the same gradient, but >= 0;
- batch-wise selection (official, optional): the N prompt ids chosen most often across the
  batch's per-sample top-N are used for every sample (ties: the lower id);
- per-task prompt mask (official 5-datasets setting, optional): while training task ``t`` the
  prompts ``t*N .. (t+1)*N-1`` are used for every sample, whatever the keys say.

Our choices where the paper or code leaves it open, or where we depart:

- Batch-wise selection and the task mask apply in TRAINING only. At evaluation every sample
  picks its own top-N, so a prediction never depends on the other images in the batch (the
  official code votes at test time too; that makes accuracy depend on batch size and order).
- The query is the frozen model's image feature (``Backbone.encode_image`` of the image
  without any prompt, pixel or token), computed by ``PromptedClassifier`` once per forward under
  ``torch.no_grad()`` and handed to ``prepare(query)``. The selection is a discrete function of
  the input, so an attack's input gradient flows through the selected prompts' forward only
  (as in the official code, where the query comes from a separate no-grad model).
- Keys are initialised U(-1, 1) (the official U(0, 1) puts all keys in one orthant, which a
  cosine cannot tell apart well for centred features) and prompt tokens like VPT's tokens
  (U(-v, v), v = sqrt(6 / (3 * patch^2 + width))).
- ``readout="prompts"`` (official ``head_type="prompt"``): the classifier's feature is the mean
  of the prompt tokens' outputs after the tower's final norm, through the tower's projection
  when it has one (so it has the dimension of the pooled feature and either head fits);
  ``readout="pool"``: the tower's own pooled feature (for a CLIP zero-shot head).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vpt_robust.prompts.registry import PromptArgs, PromptTarget, register_prompt

__all__ = ["PromptPool", "PoolArgs", "majority_vote", "select_top_n"]


def select_top_n(similarity: torch.Tensor, top_n: int) -> torch.Tensor:
    """Per-sample ids ``(B, N)`` of the ``top_n`` most similar keys (``similarity`` is
    ``(B, M)``), most similar first; ties go to the lower id (a stable sort)."""
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    return order[:, :top_n]


def majority_vote(ids: torch.Tensor, pool_size: int, top_n: int) -> torch.Tensor:
    """The ``top_n`` prompt ids chosen most often in ``ids`` ``(B, N)``; ties go to the lower id."""
    counts = torch.bincount(ids.reshape(-1), minlength=pool_size)
    # Descending count, then ascending id: a stable sort of ids already in ascending order.
    return torch.sort(counts, descending=True, stable=True).indices[:top_n]


class PromptPool(nn.Module):
    """M prompts of Lp tokens with M keys; per input the top-N prompts by query-key cosine.

    Call order (``PromptedClassifier.forward`` does it): ``prepare(query)`` with the frozen
    model's features ``(B, key_dim)``, then the prompted forward asks ``layer_tokens(0, B)``
    (the selected tokens, consumed once). ``auxiliary_losses()`` then holds that forward's
    ``key_pull`` loss (with a graph to the keys), ``last_ids`` its prompt ids ``(B, N)``.
    """

    place = "tokens"
    needs_query = True

    def __init__(
        self,
        width: int,
        key_dim: int,
        patch_size: int,
        size: int = 10,
        length: int = 5,
        top_n: int = 5,
        batchwise: bool = False,
        task_mask: bool = False,
        readout: Literal["prompts", "pool"] = "prompts",
    ) -> None:
        super().__init__()
        if not 1 <= top_n <= size:
            raise ValueError(f"prompt.top_n: {top_n} must be in [1, size={size}]")
        if length < 1 or width < 1 or key_dim < 1 or patch_size < 1:
            raise ValueError(
                f"PromptPool: length {length}, width {width}, key_dim {key_dim} and patch_size "
                f"{patch_size} must be >= 1"
            )
        if readout not in ("prompts", "pool"):
            raise ValueError(f"prompt.readout: {readout!r} is not one of 'prompts', 'pool'")
        self.size, self.prompt_length, self.top_n = size, length, top_n
        self.length = top_n * length  # tokens in the sequence (the prompted forward's contract)
        self.batchwise, self.task_mask, self.readout = batchwise, task_mask, readout
        bound = math.sqrt(6.0 / (3 * patch_size**2 + width))
        self.prompts = nn.Parameter(torch.empty(size, length, width).uniform_(-bound, bound))
        self.keys = nn.Parameter(torch.empty(size, key_dim).uniform_(-1.0, 1.0))
        self.task: int | None = None
        self._pending: torch.Tensor | None = None
        self._aux: dict[str, torch.Tensor] = {}
        self.last_ids: torch.Tensor | None = None

    def set_task(self, task: int | None) -> None:
        """The current training task (used by ``task_mask``); None: no task (evaluation)."""
        if task is not None and self.task_mask and (task + 1) * self.top_n > self.size:
            raise ValueError(
                f"prompt.task_mask: task {task} needs prompts up to {(task + 1) * self.top_n - 1} "
                f"but the pool has {self.size}; use size >= tasks * top_n"
            )
        self.task = task

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``(B, M)`` between queries and keys."""
        if query.dim() != 2 or query.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"L2P pool: query of shape {tuple(query.shape)}, expected (B, {self.keys.shape[1]})"
            )
        return F.normalize(query.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).t()

    def select(self, query: torch.Tensor) -> torch.Tensor:
        """Prompt ids ``(B, N)`` for ``query``: per sample in eval mode; in training the task
        mask (if on and a task is set), else the batch's majority vote (if ``batchwise``)."""
        with torch.no_grad():
            ids = select_top_n(self.similarity(query), self.top_n)
        batch = query.shape[0]
        if self.training and self.task_mask and self.task is not None:
            start = self.task * self.top_n
            fixed = torch.arange(start, start + self.top_n, device=ids.device)
            return fixed.expand(batch, -1)
        if self.training and self.batchwise:
            return majority_vote(ids, self.size, self.top_n).expand(batch, -1)
        return ids

    def key_pull(self, query: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``mean_b sum_n (1 - cos(q_b, k_{ids[b, n]}))``: pulls the selected keys to the query."""
        q = F.normalize(query.detach().float(), dim=-1)
        k = F.normalize(self.keys.float(), dim=-1)[ids]  # (B, N, D)
        cos = (k * q.unsqueeze(1)).sum(-1)
        return (1.0 - cos).sum(1).mean()

    def prepare(self, query: torch.Tensor) -> None:
        """Select the prompts for this batch's ``query`` (the frozen model's features)."""
        ids = self.select(query)
        self.last_ids = ids.detach()
        self._aux = {"key_pull": self.key_pull(query, ids)}
        self._pending = ids

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward: ``{"key_pull": scalar}`` (empty before one)."""
        return dict(self._aux)

    def layer_tokens(self, layer: int, batch: int) -> torch.Tensor | None:
        """The selected tokens ``(B, N * Lp, width)`` before block 0 (shallow: None after)."""
        if layer > 0:
            return None
        ids, self._pending = self._pending, None
        if ids is None:
            raise RuntimeError(
                "L2P pool: no query for this forward; call prepare(query) first "
                "(PromptedClassifier.forward does)"
            )
        if ids.shape[0] != batch:
            raise ValueError(f"L2P pool: prepared for {ids.shape[0]} images, asked for {batch}")
        return self.prompts[ids].reshape(batch, self.length, self.prompts.shape[-1])


class PoolArgs(PromptArgs):
    size: int = Field(10, ge=1)
    length: int = Field(5, ge=1)
    top_n: int = Field(5, ge=1)
    batchwise: bool = False
    task_mask: bool = False
    readout: Literal["prompts", "pool"] = "prompts"

    @model_validator(mode="after")
    def _fits(self) -> PoolArgs:
        if self.top_n > self.size:
            raise ValueError(f"top_n: {self.top_n} must be <= size {self.size}")
        return self


@register_prompt("l2p", PoolArgs, place="tokens")
def _l2p(args: PoolArgs, target: PromptTarget) -> nn.Module:
    backbone = target.require_backbone("l2p")
    geo = backbone.token_geometry
    return PromptPool(
        geo.width,
        backbone.feature_dim,
        geo.patch_size,
        size=args.size,
        length=args.length,
        top_n=args.top_n,
        batchwise=args.batchwise,
        task_mask=args.task_mask,
        readout=args.readout,
    )
