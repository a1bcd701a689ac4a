"""PGD and robust_accuracy: agreement with torchattacks, threat-model invariants, per-sample
seeding, restarts, and the result table."""

from __future__ import annotations

import json

import pytest
import torch
import torchattacks
from _attack_models import TinyCNN, eval_data, single_thread, trained_cnn  # noqa: F401
from torch.utils.data import DataLoader, TensorDataset

from vpt_robust.attacks import RobustResult, default_alpha, per_sample_delta, pgd, robust_accuracy

SETTINGS = [("Linf", 8 / 255, torchattacks.PGD), ("L2", 0.5, torchattacks.PGDL2)]


@pytest.mark.parametrize(("norm", "eps", "peer"), SETTINGS)
def test_matches_torchattacks_from_the_same_start(norm, eps, peer):
    """Without random start both attacks are deterministic: the per-sample outcome must agree."""
    model = trained_cnn()
    images, labels = eval_data(512)
    alpha = default_alpha(eps, 10)
    kwargs = {"eps": eps, "norm": norm, "steps": 10, "alpha": alpha, "random_start": False}
    ours = robust_accuracy(model, (images, labels), early_exit=False, **kwargs)
    adv = peer(model, eps=eps, alpha=alpha, steps=10, random_start=False)(images, labels)
    with torch.no_grad():
        theirs = model(adv).argmax(1) == labels
    assert 0.2 < ours.robust_accuracy < 0.8  # the attack moves the model: a meaningful comparison
    assert (ours.robust_correct != theirs).sum().item() <= 1
    assert abs(ours.robust_accuracy - theirs.float().mean().item()) <= 1 / 512
    # Early exit (any iterate counts) is at least as strong as the last iterate.
    early = robust_accuracy(model, (images, labels), **kwargs)
    assert not (early.robust_correct & ~ours.robust_correct).any()


@pytest.mark.parametrize(("norm", "eps", "peer"), SETTINGS)
def test_matches_torchattacks_with_random_start(norm, eps, peer):
    model = trained_cnn()
    images, labels = eval_data(512)
    alpha = default_alpha(eps, 10)
    ours = robust_accuracy(
        model, (images, labels), eps=eps, norm=norm, steps=10, seed=3, early_exit=False
    )
    torch.manual_seed(3)
    adv = peer(model, eps=eps, alpha=alpha, steps=10, random_start=True)(images, labels)
    with torch.no_grad():
        theirs = (model(adv).argmax(1) == labels).float().mean().item()
    assert abs(ours.robust_accuracy - theirs) <= 0.025


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_adversarial_images_stay_in_the_ball_and_the_box(norm, schedule):
    model = trained_cnn()
    images, labels = eval_data(64)
    images[:8] = 0.0  # on the box's faces, where clamping and projection interact
    images[8:16] = 1.0
    eps = 8 / 255 if norm == "Linf" else 0.5
    adv = pgd(
        model, images, labels, eps=eps, alpha=default_alpha(eps, 5), steps=5, norm=norm,
        step_schedule=schedule, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    delta = (adv - images).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(p=2, dim=1)
    assert size.max().item() <= eps * (1 + 1e-5) + 1e-7
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    assert adv.dtype == images.dtype and not adv.requires_grad
    if norm == "L2":  # L2 steps must use the budget, not stay at the start
        assert size.max().item() > 0.9 * eps


def test_pgd_lowers_accuracy_and_targeted_mode_reaches_targets():
    model = trained_cnn()
    images, labels = eval_data(128)
    eps = 16 / 255
    targets = (labels + 1) % 10
    adv = pgd(
        model, images, labels, eps=eps, alpha=default_alpha(eps, 20), steps=20,
        targeted=True, target_labels=targets,
    )  # fmt: skip
    with torch.no_grad():
        hit = (model(adv).argmax(1) == targets).float().mean().item()
        before = (model(images).argmax(1) == targets).float().mean().item()
    assert hit > 0.5 > before
    with pytest.raises(ValueError, match="target_labels"):
        pgd(model, images, labels, eps=eps, alpha=0.01, steps=1, targeted=True)


def test_eps_zero_gives_clean_accuracy():
    model = trained_cnn()
    images, labels = eval_data(128)
    for norm in ("Linf", "L2"):
        adv = pgd(model, images, labels, eps=0.0, alpha=0.01, steps=3, norm=norm)
        assert torch.equal(adv, images)
        result = robust_accuracy(model, (images, labels), eps=0.0, steps=3, norm=norm)
        assert result.robust_accuracy == result.clean_accuracy
        assert torch.equal(result.robust_correct, result.clean_correct)
    with torch.no_grad():
        clean = (model(images).argmax(1) == labels).float().mean().item()
    assert result.clean_accuracy == pytest.approx(clean)
    assert 0.85 < clean < 1.0  # some clean mistakes, so their handling is exercised


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_flags_do_not_depend_on_batching(norm):
    model = trained_cnn()
    images, labels = eval_data(96)
    eps = 8 / 255 if norm == "Linf" else 0.5
    kwargs = {"eps": eps, "norm": norm, "steps": 5, "restarts": 2, "seed": 11}
    big = robust_accuracy(model, (images, labels), batch_size=96, **kwargs)
    small = robust_accuracy(model, (images, labels), batch_size=7, **kwargs)
    loader = DataLoader(TensorDataset(images, labels), batch_size=10, shuffle=False)
    via_loader = robust_accuracy(model, loader, batch_size=32, **kwargs)
    assert 0 < big.robust_correct.sum() < big.clean_correct.sum()
    for other in (small, via_loader):
        assert torch.equal(other.clean_correct, big.clean_correct)
        assert torch.equal(other.robust_correct, big.robust_correct)


def test_random_starts_are_per_sample_and_seeded():
    """Sample i's noise depends on (seed, restart, i) only: not on the batch it is drawn in."""
    for norm, eps in (("Linf", 8 / 255), ("L2", 0.5)):
        whole = per_sample_delta((3, 4, 4), range(10), eps, norm, seed=1, restart=0)
        part = per_sample_delta((3, 4, 4), [7, 3], eps, norm, seed=1, restart=0)
        assert torch.equal(part, whole[[7, 3]])
        assert not torch.equal(whole[0], whole[1])
        other_seed = per_sample_delta((3, 4, 4), range(10), eps, norm, seed=2, restart=0)
        other_restart = per_sample_delta((3, 4, 4), range(10), eps, norm, seed=1, restart=1)
        assert not torch.equal(whole, other_seed) and not torch.equal(whole, other_restart)
        size = whole.flatten(1).abs().amax(1) if norm == "Linf" else whole.flatten(1).norm(dim=1)
        assert size.max().item() <= eps * (1 + 1e-6)
    linf = per_sample_delta((3, 32, 32), range(4), 0.1, "Linf", seed=0, restart=0)
    assert linf.mean().abs().item() < 0.005 and linf.abs().max().item() > 0.099


def test_noise_driven_flags_follow_the_seed_not_the_batching():
    """With no gradient steps the outcome is the random start alone: a strict test of seeding."""
    model = trained_cnn()
    images, labels = eval_data(96)
    kwargs = {"eps": 48 / 255, "steps": 0, "restarts": 2}
    a = robust_accuracy(model, (images, labels), batch_size=96, seed=1, **kwargs)
    b = robust_accuracy(model, (images, labels), batch_size=5, seed=1, **kwargs)
    c = robust_accuracy(model, (images, labels), batch_size=96, seed=2, **kwargs)
    assert torch.equal(a.robust_correct, b.robust_correct)
    assert not torch.equal(a.robust_correct, c.robust_correct)


def test_a_sample_is_robust_only_if_it_survives_every_restart():
    model = trained_cnn()
    images, labels = eval_data(256)
    kwargs = {"eps": 8 / 255, "steps": 3, "seed": 5}
    one = robust_accuracy(model, (images, labels), restarts=1, **kwargs)
    four = robust_accuracy(model, (images, labels), restarts=4, **kwargs)
    # Restart 0 draws the same per-sample noise in both runs; later restarts can only break more.
    assert not (four.robust_correct & ~one.robust_correct).any()
    assert four.robust_correct.sum() < one.robust_correct.sum()
    assert not (four.robust_correct & ~four.clean_correct).any()


def test_amp_bf16_runs_and_respects_the_threat_model():
    model = trained_cnn()
    images, labels = eval_data(64)
    eps = 8 / 255
    adv = pgd(model, images, labels, eps=eps, alpha=2 / 255, steps=3, amp_dtype=torch.bfloat16)
    assert adv.dtype == torch.float32
    assert (adv - images).abs().max().item() <= eps + 1e-6
    result = robust_accuracy(model, (images, labels), eps=eps, steps=3, amp_dtype=torch.bfloat16)
    assert result.params["amp_dtype"] == "bfloat16"
    assert result.robust_accuracy < result.clean_accuracy


def test_model_left_in_train_mode_is_attacked_in_eval_mode_and_restored():
    model = TinyCNN()
    model.body.insert(0, torch.nn.Dropout(0.5))
    model.train()
    images, labels = eval_data(16)
    robust_accuracy(model, (images, labels), eps=4 / 255, steps=2)
    assert all(m.training for m in model.modules())


def test_bad_inputs_are_named():
    model = trained_cnn()
    images, labels = eval_data(8)
    with pytest.raises(ValueError, match=r"images: values span"):
        pgd(model, images * 2 - 1, labels, eps=0.1, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match=r"labels: expected shape \(8,\)"):
        pgd(model, images, labels[:4], eps=0.1, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match=r"images: expected a \(B, C, H, W\)"):
        pgd(model, images[0], labels, eps=0.1, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match="norm: 'L1'"):
        pgd(model, images, labels, eps=0.1, alpha=0.01, steps=1, norm="L1")
    with pytest.raises(ValueError, match="eps: -0.1"):
        robust_accuracy(model, (images, labels), eps=-0.1)
    with pytest.raises(ValueError, match="step_schedule: 'exp'"):
        robust_accuracy(model, (images, labels), eps=0.1, step_schedule="exp")
    with pytest.raises(ValueError, match="restarts: 3 restarts without random_start"):
        robust_accuracy(model, (images, labels), eps=0.1, restarts=3, random_start=False)
    with pytest.raises(ValueError, match="model: expected logits"):
        robust_accuracy(lambda x: x.mean(1), (images, labels), eps=0.1)


def test_result_rows_and_round_trip(tmp_path):
    model = trained_cnn()
    images, labels = eval_data(40)
    result = robust_accuracy(model, (images, labels), eps=8 / 255, steps=3)
    rows = result.to_rows()
    assert [r["index"] for r in rows] == list(range(40))
    assert sum(r["robust_correct"] for r in rows) == result.robust_correct.sum().item()
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(result.to_dict()))
    back = RobustResult.from_dict(json.loads(path.read_text()))
    assert torch.equal(back.robust_correct, result.robust_correct)
    assert back.summary() == result.summary()
    assert result.summary()["attack"] == "pgd3" and result.n == 40
    with pytest.raises(ValueError, match="robust_correct: 3 flags"):
        RobustResult("x", "Linf", 0.1, torch.ones(4, dtype=torch.bool), torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_step_loop_issues_no_host_sync_on_cuda():
    model = trained_cnn().cuda()
    images, labels = (t.cuda() for t in eval_data(64))
    pgd(model, images, labels, eps=8 / 255, alpha=2 / 255, steps=1)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        pgd(
            model, images, labels, eps=8 / 255, alpha=2 / 255, steps=5,
            check_inputs=False, amp_dtype=torch.bfloat16,
        )  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
