"""Contrastive pretraining of the embedded tiny CLIP (zero-shot accuracy is measured by the
pretrain stage through the same zero-shot head every other stage uses).

The loss is CLIP's symmetric InfoNCE with one change: images whose captions are identical are
all positives of each other (soft targets spread evenly over them, as in UniCL, Yang et al.
2022). With ~900 distinct captions a batch of 128 often holds duplicates, and plain InfoNCE
would push apart pairs that are truly alike (for a small CNN tower this was worth +11 pt
zero-shot here, see ENVIRONMENT.md). Only images of the data set's pretraining styles are used:
the held-out styles stay a domain the model has never seen. Each step wraps the captions in a
random one of ``CAPTION_VARIANTS`` so that zero-shot templates with a full stop or a lead-in
("This is a photo of a {}") stay in distribution for the small text tower.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vpt_robust.data.embedded import EmbeddedData
from vpt_robust.models.tiny_clip import clip_mean_std, clip_tokenize
from vpt_robust.utils import progress

__all__ = [
    "CAPTION_VARIANTS",
    "augment_batch",
    "clip_normalizer",
    "multi_positive_clip_loss",
    "pretrain_clip",
    "supervised_warm_start",
]


# Each step wraps every caption in one of these at random, so the text tower also meets the
# punctuation and lead-ins of common zero-shot templates ("a photo of a {}.", "This is a
# photo of a {}") instead of only the bare captions.
CAPTION_VARIANTS: tuple[str, ...] = ("{}", "{}.", "this is {}", "this is {}.")


def clip_normalizer(
    model: nn.Module, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mean/std normalisation an open_clip model expects, read from its preprocess config."""
    mean_, std_ = clip_mean_std(model)
    mean = torch.tensor(mean_, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std_, device=device).view(1, 3, 1, 1)
    return lambda x: (x - mean) / std


def multi_positive_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_ids: torch.Tensor,
) -> torch.Tensor:
    """Symmetric CLIP loss where every pair with the same caption id is a positive.

    Features must be L2-normalised; the target of each row is uniform over its positives.
    """
    logits = logit_scale * image_features @ text_features.t()
    pos = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)
    target = pos / pos.sum(dim=1, keepdim=True)
    loss_i = torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t = torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean()
    return (loss_i + loss_t) / 2


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip, zoom (0.9-1.1), rotation (+-8 deg) and shift (+-6%), batched.

    No colour changes: captions name the colour. Random numbers come from a CPU generator so
    a seed gives the same augmentations on any device.
    """
    b = images.shape[0]
    rand = torch.rand(b, 5, generator=generator).to(images.device, images.dtype)
    scale = 0.9 + 0.2 * rand[:, 0]
    angle = (rand[:, 1] - 0.5) * (2 * math.pi * 8 / 180)
    flip = torch.where(rand[:, 2] < 0.5, -1.0, 1.0).to(images.dtype)
    shift = (rand[:, 3:5] - 0.5) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # As in open_clip's training: no decay on gains, biases, norms and the logit scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (
            p.ndim < 2 or "bn" in name or "norm" in name or "bias" in name or "logit_scale" in name
        )
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class RandomBatches:
    """Epochs of seeded random permutations, cut into batches (the last partial one dropped)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.gen = n, batch_size, generator
        self.order, self.cursor = torch.randperm(n, generator=generator), 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.n:
            self.order, self.cursor = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx


def _caption_tokens(
    captions: Sequence[str], variants: Sequence[str], model: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ids of the distinct captions, and their tokens: row ``i * len(variants) + v``
    is caption ``i`` wrapped in variant ``v``."""
    if not variants or any("{}" not in v for v in variants):
        raise ValueError(f"caption_variants: each needs a '{{}}' slot, got {variants!r}")
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    caption_ids = torch.tensor([index[c] for c in captions], device=device)
    context_length = getattr(model, "context_length", 77)
    tokens = clip_tokenize([v.format(c) for c in uniq for v in variants], context_length)
    return caption_ids, tokens.to(device)


def _lr_at(step: int, steps: int, warmup_steps: int, lr: float) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress_ = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * lr * (1 + math.cos(math.pi * progress_))


def supervised_warm_start(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    generator: torch.Generator,
) -> float:
    """Train the image tower on the class labels through a temporary linear head (dropped
    afterwards); AdamW, warm-up then cosine decay. Returns the mean loss of the last tenth.

    Why: contrastively from scratch the tower learns colour and style first (the loss stalls
    near log 5, about the images of a batch that share them) and the shape late; an image tower
    that already separates the classes lets the contrastive stage align the text tower in a
    few hundred steps (LiT, Zhai et al. 2022, starts from a supervised image tower and locks
    it; here both towers then train)."""
    visual = model.visual
    normalize = clip_normalizer(model, device)
    n_classes = int(labels.max()) + 1
    with torch.no_grad():
        dim = model.encode_image(normalize(images[:2].float().div(255.0))).shape[-1]
    head = nn.Linear(dim, n_classes).to(device)
    params = [{"params": list(visual.parameters()) + list(head.parameters())}]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batches = RandomBatches(len(labels), batch_size, generator)
    labels = labels.to(device)
    losses = []
    model.train()
    for step in progress(range(steps), desc="pretrain: supervised warm start", total=steps):
        idx = batches.next().to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, max(1, steps // 10), lr)
        x = normalize(images[idx].float().div_(255.0))
        loss = F.cross_entropy(head(model.encode_image(x)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tenth = max(1, steps // 10)
    return sum(losses[-tenth:]) / tenth


def _pretraining_set(
    data: EmbeddedData, steps: int, batch_size: int, precision: str
) -> EmbeddedData:
    """The pretraining styles' images, after checking the arguments that would waste a run."""
    if steps < 1:
        raise ValueError(f"steps: {steps} must be >= 1")
    if batch_size < 2:
        raise ValueError(f"batch_size: {batch_size} must be >= 2 for a contrastive loss")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: {precision!r} is not 'fp32' or 'bf16'")
    train = data.subset(data.style_mask(data.pretrain_styles))
    if len(train) < batch_size:
        raise ValueError(
            f"data: {len(train)} images of the pretraining styles {list(data.pretrain_styles)} "
            f"are fewer than batch_size {batch_size}"
        )
    return train


def pretrain_clip(
    model: nn.Module,
    data: EmbeddedData,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    device: torch.device,
    seed: int,
    augment: bool = True,
    precision: str = "fp32",
    grad_clip: float | None = None,
    caption_variants: Sequence[str] = CAPTION_VARIANTS,
    supervised_steps: int = 0,
    log_every: int = 10,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train an open_clip model contrastively on the pretraining styles' images and captions.

    AdamW with linear warm-up then cosine decay to zero; ``precision`` is ``"fp32"`` or
    ``"bf16"`` (autocast). ``supervised_steps`` > 0 first trains the image tower on the class
    labels (``supervised_warm_start``, same lr and batch size) with its own generator, so the
    contrastive steps' batches do not depend on it. ``on_step(step, {"loss", "lr",
    "logit_scale"})`` runs every ``log_every`` steps and at the last. The model is left in eval
    mode. Returns the first and last tenth's mean loss, the logit scale, time and images/s.
    """
    train = _pretraining_set(data, steps, batch_size, precision)
    caption_ids, tokens = _caption_tokens(train.captions, caption_variants, model, device)
    n_var = len(caption_variants)
    images = train.images.to(device)
    normalize = clip_normalizer(model, device)

    start = time.perf_counter()
    model.to(device).train()
    warm_loss = None
    if supervised_steps:
        warm_loss = supervised_warm_start(
            model, images, train.labels, steps=supervised_steps, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, device=device,
            generator=torch.Generator().manual_seed(seed + 1),
        )  # fmt: skip
    optimizer = torch.optim.AdamW(
        _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6
    )
    gen = torch.Generator().manual_seed(seed)
    max_log_scale = math.log(100.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    losses: list[float] = []
    batches = RandomBatches(len(train), batch_size, gen)
    for step in progress(range(steps), desc="pretrain CLIP", total=steps):
        idx = batches.next().to(device)
        x = images[idx].float().div_(255.0)
        if augment:
            x = augment_batch(x, gen)
        cid = caption_ids[idx]
        current_lr = _lr_at(step, steps, warmup_steps, lr)
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        with autocast:
            loss = _contrastive_loss(model, normalize(x), cid, tokens, n_var, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        losses.append(loss.item())
        if on_step is not None and (step % log_every == 0 or step == steps - 1):
            scale = model.logit_scale.exp().item()
            on_step(step, {"loss": losses[-1], "lr": current_lr, "logit_scale": scale})
    seconds = time.perf_counter() - start
    model.eval()
    tenth = max(1, steps // 10)
    return {
        "first_loss": sum(losses[:tenth]) / tenth,
        "final_loss": sum(losses[-tenth:]) / tenth,
        "logit_scale": float(model.logit_scale.exp().item()),
        "seconds": seconds,
        "images_per_second": (steps + supervised_steps) * batch_size / seconds,
        "steps": float(steps),
        "supervised_steps": float(supervised_steps),
        **({"supervised_final_loss": warm_loss} if warm_loss is not None else {}),
    }


def _contrastive_loss(
    model: nn.Module,
    x: torch.Tensor,
    caption_ids: torch.Tensor,
    tokens: torch.Tensor,
    n_variants: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """The multi-positive CLIP loss of normalised images ``x`` against one randomly drawn
    wording (of ``n_variants``) of each image's caption."""
    img_f = F.normalize(model.encode_image(x).float(), dim=-1)
    # Identical captions have identical features: encode each distinct one once.
    uniq_cid, inverse = torch.unique(caption_ids, return_inverse=True)
    variant = torch.randint(n_variants, (len(uniq_cid),), generator=gen).to(x.device)
    txt = model.encode_text(tokens[uniq_cid * n_variants + variant])
    txt_f = F.normalize(txt.float(), dim=-1)[inverse]
    return multi_positive_clip_loss(img_f, txt_f, model.logit_scale.exp().float(), caption_ids)
