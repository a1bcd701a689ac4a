"""The robustbench backbone source, offline: spec errors, the missing-cache error, and a real
model-zoo entry built from a checkpoint written into robustbench's cache layout."""

from __future__ import annotations

import pytest
import torch

from vpt_robust.models.robustbench import (
    RobustBenchError,
    expected_checkpoints,
    load_robustbench_model,
    parse_robustbench_spec,
    robustbench_available,
)

needs_zoo = pytest.mark.skipif(
    not robustbench_available(),
    reason="robustbench 1.1.1 model zoo not importable (see vpt_robust/models/robustbench.py)",
)
# WRN-28-4, 5.8M parameters: the smallest CIFAR-10 entry that loads through the plain path.
SMALL = "robustbench:cifar10/L2/Ding2020MMA"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cifar10/Linf/Standard", "does not start with 'robustbench:'"),
        ("robustbench:cifar10/Linf", "must have three parts"),
        ("robustbench:cifar10//Standard", "must have three parts"),
        ("robustbench:mnist/Linf/Standard", "dataset 'mnist'"),
        ("robustbench:cifar10/L1/Standard", "threat model 'L1'"),
    ],
)
def test_bad_specs_are_named(spec, message):
    with pytest.raises(RobustBenchError, match=message):
        parse_robustbench_spec(spec)
    with pytest.raises(RobustBenchError, match=message):
        load_robustbench_model(spec, "/nonexistent")


def test_spec_round_trip():
    parsed = parse_robustbench_spec("robustbench:imagenet/corruptions_3d/Some_Model-B")
    assert (parsed.dataset, parsed.threat_model, parsed.model_name) == (
        "imagenet",
        "corruptions_3d",
        "Some_Model-B",
    )
    assert str(parsed) == "robustbench:imagenet/corruptions_3d/Some_Model-B"


@needs_zoo
def test_missing_cache_fails_with_spec_and_path(tmp_path):
    spec = "robustbench:cifar10/Linf/Carmon2019Unlabeled"
    expected = tmp_path / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt"
    with pytest.raises(RobustBenchError) as info:
        load_robustbench_model(spec, tmp_path)
    text = str(info.value)
    assert spec in text and str(expected) in text and str(tmp_path) in text
    assert not expected.exists()  # nothing was downloaded or created


@needs_zoo
def test_unknown_model_name_suggests_close_ones(tmp_path):
    with pytest.raises(RobustBenchError, match=r"not in robustbench's cifar10/Linf.*Carmon2019"):
        load_robustbench_model("robustbench:cifar10/Linf/Carmon2019Unlabled", tmp_path)


@needs_zoo
def test_ensemble_entries_expect_one_file_per_member(tmp_path):
    files = expected_checkpoints("robustbench:cifar10/Linf/Chen2020Adversarial", tmp_path)
    assert len(files) > 1
    assert files[0] == tmp_path / "cifar10" / "Linf" / "Chen2020Adversarial.pt_m0.pt"


@needs_zoo
def test_zoo_entry_loads_from_a_cached_checkpoint(tmp_path):
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    reference = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.L2]["Ding2020MMA"]["model"]()
    reference.eval()
    (path,) = expected_checkpoints(SMALL, tmp_path)
    path.parent.mkdir(parents=True)
    # Published checkpoints wrap the weights as {'state_dict': ...} with DataParallel prefixes.
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": state}, path)

    model = load_robustbench_model(SMALL, tmp_path)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        assert out.shape == (2, 10)
        assert torch.allclose(out, reference(images), atol=1e-5)
