"""The adapter interface and registry of test-time adaptation methods.

An adapter wraps any ``nn.Module`` that maps [0,1] images to logits. ``adapter(images)`` adapts
on the batch and returns its logits (online: each batch is seen once, predicted with the state
the method defines, then the state moves on); ``predict(images)`` gives the logits of the
current state without adapting (what an attacker differentiates); ``reset()`` restores the start
state exactly; ``state_dict()`` / ``load_state_dict()`` carry everything that decides later
outputs (weights or prompts, optimiser state, generator state, detector state), so a stream
stopped mid-way and resumed in a fresh adapter gives the results of an uninterrupted run.
An adapter only ever sees images: never a corruption name, severity or label.

Methods register like prompt families: ``@register_adapter(name, Args)`` on a builder
``(model, args) -> Adapter``; ``Args`` is a pydantic model, so unknown or bad arguments stop
with an error naming the method and the argument.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn


class AdapterArgs(BaseModel):
    """Base of every method's arguments: unknown arguments are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images: expected a float (B, C, H, W) tensor, got "
            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}"
        )


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of softmax(logits), in fp32."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the student's prediction against the teacher's soft labels."""
    return -(teacher.float().softmax(-1) * student.float().log_softmax(-1)).sum(-1)


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict (later in-place updates do not reach it)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """For the duration: every submodule in eval mode and no parameter requiring grad; each
    module's own flags are restored afterwards. Nothing in the model is written."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def use_batch_statistics(model: nn.Module) -> int:
    """Make every BatchNorm of ``model`` normalise with the current batch's statistics (running
    statistics dropped, never updated), as Tent, CoTTA and BN adaptation do; call it on a copy.
    Returns the number of BatchNorm layers changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            n += 1
    return n


def make_optimizer(
    params: list[nn.Parameter] | list[dict[str, Any]], kind: str, lr: float, **kw: Any
) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=kw["betas"], weight_decay=kw["weight_decay"])
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=kw["betas"], weight_decay=kw["weight_decay"])
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=kw["momentum"], weight_decay=kw["weight_decay"]
        )
    raise ValueError(f"optimizer: {kind!r} is not one of 'adam', 'adamw', 'sgd'")


class Adapter:
    """Base class: cost accounting, image checks, the call protocol.

    ``counts`` are model passes in images: ``forward`` (images through the model), ``backward``
    (images whose forward took part in a backward pass), ``images`` (test images seen) and
    ``batches``; a plain forward of the stream costs ``forward == images``.
    """

    name = "adapter"

    def __init__(self, model: nn.Module, args: AdapterArgs) -> None:
        self.model = model
        self.args = args
        self.device = model_device(model)
        self.counts = {"forward": 0, "backward": 0, "images": 0, "batches": 0}

    # ------------------------------------------------------------ subclasses implement
    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ common
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        images = images.to(self.device)
        with torch.enable_grad():
            logits = self.adapt(images)
        self.counts["images"] += images.shape[0]
        self.counts["batches"] += 1
        return logits.detach()

    def forward(self, module: nn.Module | Callable, x: torch.Tensor) -> torch.Tensor:
        """``module(x)``, counted."""
        self.counts["forward"] += x.shape[0]
        return module(x)

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides later outputs, detached and copied, plus the counts."""
        state = copy.deepcopy(self._state())
        return {"method": self.name, "state": state, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(
                f"state_dict: saved for adapter {state.get('method')!r}, this is {self.name!r}"
            )
        self._load(copy.deepcopy(state["state"]))
        self.counts = dict(state["counts"])


def generator_for(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


AdapterBuilder = Callable[[nn.Module, Any], Adapter]


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    args_model: type[AdapterArgs]
    builder: AdapterBuilder


ADAPTERS: dict[str, AdapterMethod] = {}


def register_adapter(
    name: str, args_model: type[AdapterArgs]
) -> Callable[[AdapterBuilder], AdapterBuilder]:
    """Register ``builder`` as the test-time adaptation method ``name``."""

    def deco(builder: AdapterBuilder) -> AdapterBuilder:
        if name in ADAPTERS and ADAPTERS[name].builder is not builder:
            raise ValueError(f"adapter {name!r} is registered twice")
        ADAPTERS[name] = AdapterMethod(name, args_model, builder)
        return builder

    return deco


def validate_adapter_args(name: str, cfg: dict[str, Any]) -> AdapterArgs:
    """The method's validated arguments; errors name the method, the argument and the value."""
    if name not in ADAPTERS:
        raise ValueError(f"adapter: {name!r} is not one of {sorted(ADAPTERS)}")
    model = ADAPTERS[name].args_model
    try:
        return model.model_validate(dict(cfg))
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "arguments"
            if err["type"] == "extra_forbidden":
                lines.append(f"{loc}: unknown argument (known: {sorted(model.model_fields)})")
            else:
                lines.append(f"{loc}: {err.get('input')!r}: {err['msg']}")
        raise ValueError(f"bad arguments for adapter {name!r}: " + "; ".join(lines)) from None


def build_adapter(name: str, model: nn.Module, **cfg: Any) -> Adapter:
    """The adapter ``name`` around ``model`` ([0,1] images -> logits) with arguments ``cfg``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    args = validate_adapter_args(name, cfg)
    adapter = ADAPTERS[name].builder(model, args)
    adapter.name = name
    return adapter


def mean_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the top softmax probability (a 0-dim tensor)."""
    return F.softmax(logits.float(), dim=-1).amax(-1).mean()
