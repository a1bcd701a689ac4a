"""Test-time adaptation: adapters that adapt a model as they predict a stream of batches.

``build_adapter(name, model, **cfg)`` wraps any ``nn.Module`` mapping [0,1] images to logits
(a prompted CLIP classifier, a plain BatchNorm CNN) and returns an ``Adapter``:
``adapter(images) -> logits`` adapts on the batch and predicts it; ``predict``, ``reset``,
``state_dict`` / ``load_state_dict`` (``base.py``). Methods, one module each: ``source``,
``norm``, ``tent``, ``cotta`` (``baselines.py``); ``vdp`` and its ablations ``vdp_dap_only``,
``vdp_dsp_only``, ``vdp_no_homeostasis`` (``vdp.py``); ``tpt`` (``tpt.py``). The stream runner
is ``vpt_robust.methods.stream_runner.run_stream``.
"""

from __future__ import annotations

from vpt_robust.methods.tta import baselines, tpt, vdp  # noqa: F401  (each registers its methods)
from vpt_robust.methods.tta.base import (
    ADAPTERS,
    Adapter,
    AdapterArgs,
    build_adapter,
    register_adapter,
    validate_adapter_args,
)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterArgs",
    "build_adapter",
    "register_adapter",
    "validate_adapter_args",
]
