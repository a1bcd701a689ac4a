"""The loud checks: each one triggered by a deliberately broken model or result, and silent on a
healthy one."""

from __future__ import annotations

import pytest
import torch
from _attack_models import (
    DropoutAlways,
    QuantisedInput,
    TinyCNN,
    eval_data,
    trained_cnn,
)  # noqa: F401
from torch import nn

from vpt_robust.attacks import (
    EpsNotMonotoneError,
    GradientMaskingError,
    RobustAboveCleanError,
    RobustnessCheckError,
    RobustResult,
    StochasticModelError,
    check_deterministic,
    check_eps_monotone,
    check_gradients,
    check_robust_not_above_clean,
    robust_accuracy,
)


def test_error_classes_share_a_base():
    """Every check's failure is caught by one `except RobustnessCheckError` (and by a generic
    RuntimeError handler), while still telling which check failed."""
    images, labels = eval_data(16)
    triggers = {
        GradientMaskingError: lambda: check_gradients(
            QuantisedInput(trained_cnn()), images, labels
        ),
        StochasticModelError: lambda: check_deterministic(DropoutAlways(trained_cnn()), images),
        RobustAboveCleanError: lambda: check_robust_not_above_clean(
            clean_accuracy=0.5, robust_accuracy=0.6
        ),
        EpsNotMonotoneError: lambda: check_eps_monotone({0.0: 0.9, 1 / 255: 0.4, 2 / 255: 0.7}),
    }
    for cls, trigger in triggers.items():
        with pytest.raises(RobustnessCheckError) as caught:
            trigger()
        assert type(caught.value) is cls
        assert isinstance(caught.value, RuntimeError)


def test_masked_gradients_are_refused():
    masked = QuantisedInput(trained_cnn())
    images, labels = eval_data(64)
    with pytest.raises(GradientMaskingError, match=r"zero or not finite on 64 of 64"):
        check_gradients(masked, images, labels)
    with pytest.raises(GradientMaskingError):
        robust_accuracy(masked, (images, labels), eps=8 / 255, steps=5)
    # Why it matters: unchecked, the masked model looks far more robust than the same weights.
    fooled = robust_accuracy(masked, (images, labels), eps=8 / 255, steps=5, check=False)
    honest = robust_accuracy(trained_cnn(), (images, labels), eps=8 / 255, steps=5)
    assert fooled.robust_accuracy > honest.robust_accuracy + 0.2
    norms = check_gradients(trained_cnn(), images, labels)
    assert norms.shape == (64,) and (norms > 0).all()


def test_argmax_model_is_refused():
    class ArgmaxLogits(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(self.model(x).argmax(1), 10).float() * 10

    images, labels = eval_data(16)
    with pytest.raises(GradientMaskingError, match="does not depend differentiably"):
        check_gradients(ArgmaxLogits(trained_cnn()), images, labels)


def test_stochastic_model_is_refused_unless_eot():
    noisy = DropoutAlways(trained_cnn())
    images, labels = eval_data(32)
    with pytest.raises(StochasticModelError, match="eot_iter"):
        check_deterministic(noisy, images)
    with pytest.raises(StochasticModelError):
        robust_accuracy(noisy, (images, labels), eps=8 / 255, steps=2)
    eot = robust_accuracy(noisy, (images, labels), eps=8 / 255, steps=2, eot_iter=3)
    assert eot.params["eot_iter"] == 3
    check_deterministic(trained_cnn(), images)


def test_train_mode_dropout_is_named_in_the_message():
    model = TinyCNN()
    model.body.insert(1, nn.Dropout(0.5))
    model.train()
    images, _ = eval_data(8)
    with pytest.raises(StochasticModelError, match=r"train mode: call model.eval\(\)"):
        check_deterministic(model, images)
    model.eval()
    check_deterministic(model, images)


def test_robust_above_clean_from_a_batch_dependent_model():
    """A model with batch statistics (BatchNorm stuck in train mode) answers differently for the
    same images in another batch: flags measured in two passes then disagree."""

    class BatchStats(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.model(x)
            return nn.functional.batch_norm(logits, None, None, training=True)

    model = BatchStats(trained_cnn())
    images, labels = eval_data(64)
    with torch.no_grad():
        clean = model(images).argmax(1) == labels
        one_by_one = torch.cat([model(images[i : i + 2]).argmax(1) for i in range(0, 64, 2)])
    result = RobustResult("pgd0", "Linf", 0.0, clean, one_by_one == labels)
    with pytest.raises(RobustAboveCleanError, match="misclassified clean"):
        check_robust_not_above_clean(result)


def test_robust_above_clean_from_accuracies():
    with pytest.raises(RobustAboveCleanError, match="0.6000 is above clean accuracy 0.5000"):
        check_robust_not_above_clean(clean_accuracy=0.5, robust_accuracy=0.6, context="sweep")
    check_robust_not_above_clean(clean_accuracy=0.5, robust_accuracy=0.5)
    with pytest.raises(ValueError, match="both accuracies"):
        check_robust_not_above_clean(clean_accuracy=0.5)


def test_eps_monotone_passes_a_real_sweep_and_catches_a_rising_one():
    model = trained_cnn()
    images, labels = eval_data(128)
    sweep = [
        robust_accuracy(model, (images, labels), eps=e / 255, steps=5) for e in (0, 2, 4, 8, 16)
    ]
    check_eps_monotone(sweep)
    accs = [r.robust_accuracy for r in sweep]
    assert accs == sorted(accs, reverse=True) and accs[0] > accs[-1]

    # Pretend the 8/255 run failed (e.g. masked gradients at that eps): it rises above 4/255.
    broken = RobustResult("pgd5", "Linf", 8 / 255, sweep[3].clean_correct, sweep[1].robust_correct)
    with pytest.raises(EpsNotMonotoneError, match="rises with eps for pgd5 Linf"):
        check_eps_monotone([sweep[0], sweep[2], broken])
    with pytest.raises(EpsNotMonotoneError):
        check_eps_monotone({0.0: 0.9, 1 / 255: 0.4, 2 / 255: 0.7})
    check_eps_monotone({0.0: 0.9, 1 / 255: 0.4, 2 / 255: 0.403}, tol=0.005)
