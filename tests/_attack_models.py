"""Small models for the attack tests: one trained briefly on a synthetic 10-class set, and
deliberately broken ones (masked gradients, stochastic) that the loud checks must catch."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 10
SIZE = 16


class TinyCNN(nn.Module):
    """A 16x16 CNN with its normalisation inside (inputs are [0,1] images)."""

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


def synthetic_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = a fixed colour/pattern prototype; images = prototype + heavy noise, in [0,1]."""
    protos = torch.rand(N_CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1234))
    protos = F.avg_pool2d(protos, 5, stride=1, padding=2)  # smooth blobs, not pixel noise
    protos = 0.5 + (protos - protos.mean()) * 3.0
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    noise = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5
    images = (protos[labels] + noise).clamp(0, 1)
    return images, labels


@functools.lru_cache(maxsize=1)
def trained_cnn() -> TinyCNN:
    """A TinyCNN trained for ~2 s: high clean accuracy, a robust accuracy that PGD can move."""
    torch.manual_seed(0)
    model = TinyCNN()
    images, labels = synthetic_data(2048, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(3):
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(epoch))
        for start in range(0, images.shape[0], 128):
            idx = perm[start : start + 128]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def eval_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic_data(n, seed=1)


class QuantisedInput(nn.Module):
    """Broken on purpose: rounds the input to 8 bits, so the input gradient is exactly zero."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 255) / 255)


class DropoutAlways(nn.Module):
    """Broken on purpose: dropout on the input that stays active in eval mode."""

    def __init__(self, model: nn.Module, p: float = 0.3) -> None:
        super().__init__()
        self.model = model
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(F.dropout(x, self.p, training=True))


@pytest.fixture(autouse=True)
def single_thread():
    """These models are tiny: intra-op threads only add synchronisation, and on a shared 2-core
    machine a second thread made AutoAttack 3x slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
