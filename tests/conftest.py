"""Shared test setup: offline settings, quiet progress bars, small open_clip models."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Two torch/OpenMP threads spinning on a shared 2-core machine slow each other 6-10x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VPT_ROBUST_NO_PROGRESS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

MICRO_CLIP = "vpt-test-micro-vit"


@pytest.fixture(scope="session")
def micro_clip_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a very small open_clip ViT (random init) for fast unit tests."""
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 64,
            "patch_size": 8,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    path = tmp_path_factory.mktemp("clip_cfg") / f"{MICRO_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return MICRO_CLIP


@pytest.fixture
def micro_backbone(micro_clip_name: str):
    from vpt_robust.config import BackboneConfig
    from vpt_robust.models import load_backbone

    torch.manual_seed(0)
    return load_backbone(
        BackboneConfig(source="open_clip", name=micro_clip_name), torch.device("cpu")
    )


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
