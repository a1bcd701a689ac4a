"""Early exit in robust_accuracy: a sample leaves the attack at the first iterate that fools the
model. Its flags equal an any-iterate reference run without early exit, are never above the
full (last-iterate) attack's, do not depend on the batching, and cost fewer fwd+bwd passes."""

from __future__ import annotations

import pytest
import torch
from _attack_models import eval_data, single_thread, trained_cnn  # noqa: F401
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vpt_robust.attacks import robust_accuracy
from vpt_robust.attacks.pgd import input_gradient, per_sample_delta, pgd, pgd_step, step_sizes

# Linf: 1 of the 242 clean-correct samples is fooled by a middle iterate but not by the last
# one, where any-iterate and last-iterate differ. L2: two seeded restarts and a cosine schedule.
CASES = [
    {"norm": "Linf", "eps": 6 / 255, "steps": 10, "restarts": 1, "schedule": "constant",
     "random_start": False},
    {"norm": "L2", "eps": 0.5, "steps": 6, "restarts": 2, "schedule": "cosine",
     "random_start": True},
]  # fmt: skip


class Counting(nn.Module):
    """Records the batch size of every forward that builds a graph (the attack's fwd+bwd)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.grad_batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_batches.append(x.shape[0])
        return self.model(x)


def any_iterate_reference(
    model, images, labels, *, norm, eps, steps, restarts, schedule, random_start, seed
):
    """Robust flags where a sample is broken if ANY iterate of ANY restart fools the model, from
    a whole-batch PGD with no early exit (every sample runs every step of every restart)."""
    alpha = 2.5 * eps / steps
    with torch.no_grad():
        clean = model(images).argmax(1) == labels
    idx = clean.nonzero().squeeze(1)
    x0, y = images[idx], labels[idx]
    fooled = torch.zeros(len(idx), dtype=torch.bool)
    for r in range(restarts):
        delta = per_sample_delta(x0.shape[1:], idx.tolist(), eps, norm, seed=seed, restart=r)
        delta = delta if random_start else torch.zeros_like(x0)
        adv = pgd(model, x0, y, eps=eps, alpha=0.0, steps=0, norm=norm, init_delta=delta)
        for t, size in enumerate([*step_sizes(alpha, steps, schedule), None]):
            with torch.no_grad():
                fooled |= model(adv).argmax(1) != y
            if t < steps:
                grad = input_gradient(model, adv, y)
                adv = pgd_step(adv, x0, grad, size, eps=eps, norm=norm)
    robust = torch.zeros_like(clean)
    robust[idx] = ~fooled
    return clean, robust


def run(model, data, case, **kwargs):
    return robust_accuracy(
        model, data, eps=case["eps"], norm=case["norm"], steps=case["steps"],
        alpha=2.5 * case["eps"] / max(case["steps"], 1), restarts=case["restarts"],
        step_schedule=case["schedule"], random_start=case["random_start"], **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["norm"])
def test_flags_equal_the_any_iterate_reference_and_never_exceed_the_full_attack(case):
    model = trained_cnn()
    images, labels = eval_data(256)
    seed = 4
    early = run(model, (images, labels), case, batch_size=16, seed=seed)
    full = run(model, (images, labels), case, batch_size=16, seed=seed, early_exit=False)
    clean, reference = any_iterate_reference(model, images, labels, seed=seed, **case)
    assert torch.equal(early.clean_correct, clean) and torch.equal(full.clean_correct, clean)
    assert torch.equal(early.robust_correct, reference)
    assert not (early.robust_correct & ~full.robust_correct).any()
    if case["norm"] == "Linf":  # the data makes the distinction: a middle iterate fooled it
        assert early.robust_correct.sum() < full.robust_correct.sum()
    assert 0 < early.robust_correct.sum() < clean.sum()
    assert early.params["early_exit"] is True and full.params["early_exit"] is False


# Random starts decide most flags here (no step, three restarts): a strict test that
# each sample's start is seeded by its own index, whatever slot or refill it lands in.
NOISY = {**CASES[0], "eps": 48 / 255, "steps": 0, "restarts": 3, "random_start": True}


@pytest.mark.parametrize("case", [*CASES, NOISY], ids=["Linf", "L2", "noise-driven"])
def test_flags_are_identical_across_three_batchings(case):
    model = trained_cnn()
    images, labels = eval_data(96)
    big = run(model, (images, labels), case, batch_size=96, seed=9)
    small = run(model, (images, labels), case, batch_size=7, seed=9)
    loader = DataLoader(TensorDataset(images, labels), batch_size=10, shuffle=False)
    streamed = run(model, loader, case, batch_size=32, seed=9)
    assert 0 < big.robust_correct.sum() < big.clean_correct.sum()
    for other in (small, streamed):
        assert torch.equal(other.clean_correct, big.clean_correct)
        assert torch.equal(other.robust_correct, big.robust_correct)


def test_broken_samples_keep_the_iterate_that_fooled_the_model():
    model = trained_cnn()
    images, labels = eval_data(64)
    eps = 6 / 255
    result = robust_accuracy(
        model, (images, labels), eps=eps, steps=5, batch_size=16, return_adversarial=True
    )
    adv = result.adversarial
    assert adv.shape == images.shape
    with torch.no_grad():
        pred = model(adv).argmax(1)
    broken = result.clean_correct & ~result.robust_correct
    assert broken.any() and result.robust_correct.any()
    assert (pred[broken] != labels[broken]).all()
    assert (pred[result.robust_correct] == labels[result.robust_correct]).all()
    assert torch.equal(adv[~result.clean_correct], images[~result.clean_correct])
    assert (adv - images).abs().max().item() <= eps * (1 + 1e-5)
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0


def test_broken_samples_leave_and_the_queue_keeps_the_batch_full():
    case = {**CASES[0], "eps": 16 / 255, "steps": 5, "random_start": True}
    images, labels = eval_data(128)
    early_model, full_model = Counting(trained_cnn()), Counting(trained_cnn())
    early = run(early_model, (images, labels), case, batch_size=16, check=False)
    run(full_model, (images, labels), case, batch_size=16, check=False, early_exit=False)
    assert early.robust_accuracy < 0.5 * early.clean_accuracy  # most samples break early
    # Cost: one fwd+bwd per visited iterate, far fewer than every step on every sample.
    assert sum(early_model.grad_batches) < 0.6 * sum(full_model.grad_batches)
    sizes = early_model.grad_batches
    # Full batches while samples wait; then at most steps + 1 draining steps, never growing.
    n_drain = sum(s < 16 for s in sizes)
    assert sizes[: len(sizes) - n_drain] == [16] * (len(sizes) - n_drain)
    assert n_drain <= case["steps"] + 1
    assert sizes[len(sizes) - n_drain :] == sorted(sizes[len(sizes) - n_drain :], reverse=True)
