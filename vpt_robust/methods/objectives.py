"""Training objectives: what the supervised trainer minimises on one batch.

An objective is any callable ``objective(model, images, labels) -> (loss, logits, aux)``:

- ``images`` are float images in [0, 1] (the model normalises inside), ``labels`` class ids;
- ``loss`` is the scalar to minimise (compute it in float32: ``logits.float()``), with a graph
  to the model's trainable parameters;
- ``logits`` ``(B, C)`` are the predictions the training accuracy is counted on (for an
  adversarial objective, those on the adversarial images; for a masked one, the masked logits);
- ``aux`` maps a metric name to a scalar (a 0-d tensor or a float): extra metrics such as an
  auxiliary loss term. The trainer averages each over the epoch's samples and reports it as
  ``train_<name>`` through ``on_step`` and in its summary.

The trainer calls the objective with the model in train mode, under its autocast context, and
clears every gradient the objective left before it back-propagates ``loss``; it does not look
inside. An inner attack (TeCoA, plain adversarial training) runs inside the objective, through
the model, e.g. with ``vpt_robust.attacks.pgd``. Our choice for such attacks: run them in eval
mode (``with eval_mode(model): adv = pgd(model, ...)``), as TRADES does, then compute the loss
in train mode. The attack then sees the deterministic model that evaluation attacks (no prompt
dropout, no EVP input diversity), its strength does not depend on random masks, and it draws no
dropout numbers. An objective must leave the model in train mode (the trainer checks).

Resume: the trainer's checkpoint fingerprint includes ``objective_identity(objective)``, so a
checkpoint of an adversarial run never resumes a clean one (or one with another eps). Randomness
should come from the global RNGs (torch, CUDA, numpy, random), which checkpoints restore; an
objective that holds its own state (a ``torch.Generator``, a running statistic) exposes
``state_dict()`` / ``load_state_dict(state)`` (tensors and plain containers only), which the
trainer saves and restores with the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Objective",
    "ObjectiveOutput",
    "cross_entropy_objective",
    "eval_mode",
    "forward_passes_per_image",
    "objective_identity",
]

ObjectiveOutput = tuple[torch.Tensor, torch.Tensor, Mapping[str, "torch.Tensor | float"]]


@runtime_checkable
class Objective(Protocol):
    """``(model, images, labels) -> (loss, logits, aux)``; see the module docstring.

    Optionally ``identity`` (a JSON-able mapping, or a method returning one) naming everything
    that changes what the objective computes; dataclass instances and module-level functions
    get one automatically (``objective_identity``).
    """

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> ObjectiveOutput: ...


def cross_entropy_objective(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> ObjectiveOutput:
    """The default objective: cross-entropy of ``model(images)``, no auxiliary metrics."""
    logits = model(images)
    return F.cross_entropy(logits.float(), labels), logits, {}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block (an inner attack) with ``model`` in eval mode, then restore every
    submodule's own train/eval flag as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"objective: the identity of {what} is not JSON-serialisable ({exc}); give the "
            "objective an `identity` of plain values (numbers, strings, lists, dicts)"
        ) from exc


def objective_identity(objective: Any) -> dict[str, Any]:
    """What tells this objective apart from any other, for the resume fingerprint.

    An ``identity`` attribute (or method) wins; a dataclass instance is named by its type and
    field values; a module-level function by its qualified name. Anything else (a lambda, a
    closure, a callable object without ``identity``) cannot be told apart from a differently
    configured twin, so it is refused with a clear error rather than risk resuming the wrong run.
    """
    ident = getattr(objective, "identity", None)
    if ident is not None:
        value = ident() if callable(ident) else ident
        owner = objective if inspect.isfunction(objective) else type(objective)
        return {"objective": _qualname(owner), "config": _json(value, _qualname(owner))}
    if dataclasses.is_dataclass(objective) and not isinstance(objective, type):
        name = _qualname(type(objective))
        fields = {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective)}
        return {"objective": name, "config": _json(fields, name)}
    if inspect.isfunction(objective):
        name = _qualname(objective)
        if objective.__closure__ is None and "<" not in objective.__qualname__:
            return {"objective": name}
    raise TypeError(
        f"objective: {objective!r} cannot be fingerprinted for resume (a lambda, closure or "
        "callable object without `identity`); use a module-level function or a dataclass, give "
        "it an `identity` attribute, or set train.checkpoint false"
    )


def forward_passes_per_image(
    objective: Objective, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Forward passes of ``model`` per image in one step of ``objective`` (an inner attack's
    steps included): a training cost that is a function of the inputs, where wall time is not.
    Counted on one batch in train mode; the RNGs, the gradients and the mode are left as they
    were."""
    count = 0

    def hook(_module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        nonlocal count
        count += args[0].shape[0]

    was_training = model.training
    devices = [images.device] if images.device.type == "cuda" else []
    handle = model.register_forward_hook(hook)
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            objective(model, images, labels)
    finally:
        handle.remove()
        model.train(was_training)
    return count / images.shape[0]
