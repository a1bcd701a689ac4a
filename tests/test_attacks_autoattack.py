"""AutoAttack through pyautoattack: end to end on a tiny model, never above PGD, refuses a
stochastic model in the standard version, resumes from its file, labels the fast mode."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from _attack_models import (  # noqa: F401
    DropoutAlways,
    QuantisedInput,
    eval_data,
    single_thread,
    trained_cnn,
)
from _autoattack_short import ShortAutoAttack, short_autoattack  # noqa: F401
from torch import nn

from vpt_robust.attacks import StochasticModelError, autoattack, robust_accuracy
from vpt_robust.attacks.autoattack import FAST_NAME


class CountingModel(nn.Module):
    """Counts forwards, and can fail after a given number of them (a killed run)."""

    def __init__(self, model: nn.Module, fail_after: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated kill")
        return self.model(x)


def test_standard_runs_end_to_end_and_is_never_above_pgd():
    model = trained_cnn()
    images, labels = eval_data(16)
    eps = 8 / 255
    aa = autoattack(model, images, labels, eps=eps, batch_size=16, seed=0)
    pgd = robust_accuracy(model, (images, labels), eps=eps, steps=10)
    assert aa.attack == "autoattack-standard" and aa.n == 16
    assert torch.equal(aa.clean_correct, pgd.clean_correct)
    assert not (aa.robust_correct & ~aa.clean_correct).any()
    assert aa.robust_accuracy <= pgd.robust_accuracy
    assert 0 < aa.robust_accuracy < aa.clean_accuracy  # survivors went through every attack


def test_standard_refuses_a_stochastic_model_and_rand_runs():
    noisy = DropoutAlways(trained_cnn())
    images, labels = eval_data(8)
    with pytest.raises(StochasticModelError, match='version="rand"'):
        autoattack(noisy, images, labels, eps=8 / 255, batch_size=8)
    rand = autoattack(noisy, images, labels, eps=8 / 255, batch_size=8, version="rand")
    assert rand.attack == "autoattack-rand"
    # The EoT attacks broke samples the model classifies correctly clean (a no-op attack, or
    # one that never ran, leaves robust == clean).
    assert rand.robust_accuracy < rand.clean_accuracy
    assert rand.robust_accuracy < 0.5


def test_resume_file_skips_finished_chunks(tmp_path):
    model = trained_cnn()
    images, labels = eval_data(24)
    path = tmp_path / "aa.json"
    kwargs = {"eps": 32 / 255, "batch_size": 4, "chunk_size": 4, "seed": 1}
    fresh_model = CountingModel(model)
    fresh = autoattack(fresh_model, images, labels, **kwargs)
    killed = CountingModel(model, fail_after=fresh_model.calls // 2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        autoattack(killed, images, labels, resume_path=path, **kwargs)
    partial = json.loads(path.read_text())
    assert len(partial["clean"]) == 24 and 0 < len(partial["robust"]) < 24

    resumed_model = CountingModel(model)
    resumed = autoattack(resumed_model, images, labels, resume_path=path, **kwargs)
    assert torch.equal(resumed.robust_correct, fresh.robust_correct)
    assert torch.equal(resumed.clean_correct, fresh.clean_correct)
    assert resumed_model.calls < fresh_model.calls

    done = CountingModel(model)
    autoattack(done, images, labels, resume_path=path, **kwargs)
    assert done.calls <= 3  # determinism check and class count only: nothing left to attack

    with pytest.raises(ValueError, match="resume_path: .* different run"):
        autoattack(model, images, labels, resume_path=path, **{**kwargs, "eps": 16 / 255})


def test_fast_mode_is_labelled_as_torchattacks():
    model = trained_cnn()
    images, labels = eval_data(8)
    fast = autoattack(model, images, labels, eps=32 / 255, batch_size=8, fast=True)
    assert fast.attack == FAST_NAME == "autoattack-fast(torchattacks)"
    assert fast.params["fast"] is True
    # torchattacks' attacks ran and broke most clean-correct samples at this large eps.
    assert fast.robust_accuracy < 0.5 * fast.clean_accuracy


def test_bad_arguments_are_named():
    model = trained_cnn()
    images, labels = eval_data(4)
    with pytest.raises(ValueError, match="version: 'plus'"):
        autoattack(model, images, labels, eps=0.1, version="plus")
    with pytest.raises(ValueError, match="eps: 0"):
        autoattack(model, images, labels, eps=0)
    with pytest.raises(ValueError, match=r"indices: expected shape \(4,\)"):
        autoattack(model, images, labels, eps=0.1, indices=torch.arange(3))


def test_standard_runs_on_fewer_than_ten_classes():
    """APGD-T and FAB-T default to 9 target classes; with 4 classes they must use the 3 others."""
    model = trained_cnn()
    images, labels = eval_data(32)
    keep = labels < 4
    four_way = nn.Sequential(model, _FirstLogits(4))
    x, y = images[keep][:12], labels[keep][:12]
    aa = autoattack(four_way, x, y, eps=8 / 255, batch_size=16)
    assert aa.n == len(y)
    assert aa.robust_accuracy < aa.clean_accuracy


class _FirstLogits(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, : self.k]


aa_module = importlib.import_module("vpt_robust.attacks.autoattack")


class _RecordingBar:
    """Stands in for the progress bar: records what a user would see."""

    def __init__(self, desc: str, total: int, **_: object) -> None:
        self.desc, self.total, self.n, self.postfixes = desc, total, 0, []

    def __enter__(self) -> _RecordingBar:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix_str(self, text: str) -> None:
        self.postfixes.append(text)


@pytest.mark.usefixtures("short_autoattack")
def test_attack_by_attack_equals_the_library_run_and_reports_progress(monkeypatch):
    """One library call per attack and batch of survivors (so progress can name the attack and
    count samples) gives the flags of one `run_standard_evaluation` on the same samples."""
    bars: list[_RecordingBar] = []
    monkeypatch.setattr(
        aa_module, "progress_bar", lambda *a, **k: bars.append(_RecordingBar(*a, **k)) or bars[-1]
    )
    model = trained_cnn()
    images, labels = eval_data(24)
    eps = 6 / 255
    ours = autoattack(model, images, labels, eps=eps, batch_size=4, seed=3)
    clean = ours.clean_correct
    reference = ShortAutoAttack(model, norm="Linf", eps=eps, version="standard", seed=3)
    _, y_adv = reference.run_standard_evaluation(images[clean], labels[clean], batch_size=4)
    expected = torch.zeros_like(clean)
    expected[clean] = y_adv == labels[clean]
    assert torch.equal(ours.robust_correct, expected)
    assert 0 < ours.robust_accuracy < ours.clean_accuracy  # some survivors reached every attack

    (bar,) = bars
    n_clean = int(clean.sum())
    assert "autoattack-standard" in bar.desc and "eps=" in bar.desc
    assert bar.total == 4 * n_clean and bar.n == bar.total  # one step per (sample, attack)
    for attack in ("apgd-ce", "apgd-t", "fab-t", "square"):
        assert any(p.startswith(f"{attack} ") for p in bar.postfixes), attack
    first = next(p for p in bar.postfixes if p.startswith("apgd-ce "))
    assert first.startswith(f"apgd-ce 4/{n_clean} samples")
    assert bar.postfixes[-1].endswith(f"{int(ours.robust_correct.sum())}/{n_clean} still robust")


@pytest.mark.usefixtures("short_autoattack")
def test_library_checks_and_clean_pass_run_once_not_per_attack_and_batch():
    """Driving each attack's `perturb` ourselves: the model sees exactly the forwards of the
    library's own run, plus our one-off probe and clean pass, minus its one-off checks. One
    library call per attack and batch would add its checks and clean pass (8 forwards) each.
    Zero input gradients leave the breaking to Square's random search: flags that depend on
    each call's seed (seed 4 instead of 3 flips a sample here)."""
    model = QuantisedInput(trained_cnn())
    images, labels = eval_data(12)
    eps = 8 / 255
    ours_model = CountingModel(model)
    ours = autoattack(ours_model, images, labels, eps=eps, batch_size=4, seed=3)
    clean = ours.clean_correct
    ref_model = CountingModel(model)
    reference = ShortAutoAttack(ref_model, norm="Linf", eps=eps, version="standard", seed=3)
    _, y_adv = reference.run_standard_evaluation(images[clean], labels[clean], batch_size=4)
    expected = torch.zeros_like(clean)
    expected[clean] = y_adv == labels[clean]
    assert torch.equal(ours.robust_correct, expected)
    assert 0 < ours.robust_accuracy < ours.clean_accuracy
    # Ours: determinism check (2) + class count (1) + clean pass over 12 in batches of 4 (3)
    # + the library's range and dynamic checks once (2). The library: randomness (5), range
    # and dynamic (2) checks, and its clean pass over the clean-correct samples.
    ref_clean_pass = -(-int(clean.sum()) // 4)
    assert ours_model.calls - ref_model.calls == (2 + 1 + 3 + 2) - (5 + 2 + ref_clean_pass)
