"""The evaluate stage's per-model evaluation: PGD eps sweep + AutoAttack subset + flags."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from _attack_models import eval_data, single_thread, trained_cnn  # noqa: F401
from _autoattack_short import short_autoattack  # noqa: F401
from pytest import approx

from vpt_robust.config import ConfigError, validate
from vpt_robust.stages.evaluate import autoattack_subset, eps_label, evaluate_model, metric_names


@pytest.mark.usefixtures("short_autoattack")
def test_evaluate_model_sweeps_eps_and_runs_autoattack_on_a_fixed_subset() -> None:
    params = validate(
        {
            "evaluate": {
                "batch_size": 64,
                "attack": {"eps": ["1/255", "8/255"], "steps": 5},
                "autoattack": {"eps": ["8/255"], "n_samples": 12, "subset_seed": 3},
            },
            "runtime": {"device": "cpu"},
        }
    )
    images, labels = eval_data(48)
    global_index = torch.arange(1000, 1048)
    row, flags = evaluate_model(
        trained_cnn(),
        images,
        labels,
        global_index,
        params,
        device=torch.device("cpu"),
        seed=0,
        run_autoattack=True,
    )
    assert list(row) == metric_names(params)
    assert metric_names(params) == [
        "clean", "pgd_Linf_1/255", "pgd_Linf_8/255", "pgd_subset_Linf_8/255",
        "autoattack_Linf_8/255",
    ]  # fmt: skip
    subset = autoattack_subset(48, params)
    assert len(subset) == 12 and torch.equal(subset, subset.unique())  # sorted, no repeats
    other = validate({"evaluate": {"autoattack": {"n_samples": 12, "subset_seed": 4}}})
    assert not torch.equal(subset, autoattack_subset(48, other))
    assert torch.equal(autoattack_subset(8, params), torch.arange(8))  # fewer samples: all

    def rows(attack: str, eps: float) -> dict[int, dict]:
        picked = [f for f in flags if f["attack"] == attack and abs(f["eps"] - eps) < 1e-9]
        by_index = {f["index"]: f for f in picked}
        assert len(by_index) == len(picked)  # one row per sample
        return by_index

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    # Every metric is the mean of the flags saved for it, over the samples it names.
    for eps in (1 / 255, 8 / 255):
        pgd = rows("pgd", eps)
        assert sorted(pgd) == list(range(1000, 1048))
        assert row["clean"] == approx(mean(f["clean_correct"] for f in pgd.values()))
        assert row[f"pgd_Linf_{round(eps * 255)}/255"] == approx(
            mean(f["robust_correct"] for f in pgd.values())
        )
    aa = rows("autoattack-standard", 8 / 255)
    assert sorted(aa) == (1000 + subset).tolist()
    assert row["autoattack_Linf_8/255"] == approx(mean(f["robust_correct"] for f in aa.values()))
    pgd8 = rows("pgd", 8 / 255)
    on_subset = [pgd8[i]["robust_correct"] for i in sorted(aa)]
    assert row["pgd_subset_Linf_8/255"] == approx(mean(on_subset))
    # On the same samples the stronger attack is never above PGD (what the report compares).
    assert row["autoattack_Linf_8/255"] <= row["pgd_subset_Linf_8/255"]
    assert row["pgd_subset_Linf_8/255"] < row["clean"]


def test_pgd_on_the_subset_runs_when_autoattack_uses_an_eps_pgd_did_not(monkeypatch) -> None:
    """PGD at AutoAttack's eps on the subset alone equals PGD at that eps on all samples,
    restricted to the subset (its per-sample flags do not depend on the batch)."""
    import vpt_robust.stages.evaluate as stage
    from vpt_robust.attacks import RobustResult, robust_accuracy

    def no_attack(model, images, labels, *, eps, norm, **_):  # AutoAttack is not under test
        with torch.no_grad():
            clean = model(images).argmax(1) == labels
        return RobustResult("autoattack-standard", norm, eps, clean, clean)

    monkeypatch.setattr(stage, "autoattack", no_attack)
    params = validate(
        {
            "evaluate": {
                "attack": {"eps": ["1/255"], "steps": 5},
                "autoattack": {"eps": ["6/255"], "n_samples": 10, "subset_seed": 1},
            },
            "runtime": {"device": "cpu"},
        }
    )
    images, labels = eval_data(32)
    row, flags = evaluate_model(
        trained_cnn(), images, labels, torch.arange(32), params,
        device=torch.device("cpu"), seed=2, run_autoattack=True,
    )  # fmt: skip
    subset = autoattack_subset(32, params)
    full = robust_accuracy(
        trained_cnn(), (images, labels), eps=6 / 255, alpha=2.5 * 6 / 255 / 5, steps=5, seed=2
    )
    assert row["pgd_subset_Linf_6/255"] == approx(float(full.robust_correct[subset].float().mean()))
    pgd6 = sorted(f["index"] for f in flags if f["attack"] == "pgd" and f["eps"] == 6 / 255)
    assert pgd6 == subset.tolist()


def test_outputs_exist_without_flags_and_are_reproducible(tmp_path) -> None:
    """`save_flags: false` still writes the dvc out (subset indices and a manifest), and two
    writes of the same inputs give identical bytes (no times in the outs)."""
    from vpt_robust.stages.evaluate import write_outputs

    flags = [
        {"model": "zero_shot", "split": "base", "seed": 0, "attack": "pgd", "eps": 1 / 255,
         "index": i, "clean_correct": True, "robust_correct": i % 2 == 0}
        for i in range(5)
    ]  # fmt: skip
    subsets = {"base": [3, 7, 11]}
    out = tmp_path / "evaluate"
    with_flags = validate({"evaluate": {"save_flags": True}})
    without = validate({"evaluate": {"save_flags": False}})

    written = write_outputs(out, with_flags, subsets, flags)
    assert [p.name for p in written] == ["autoattack_subset.json", "flags.csv", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["flag_rows"] == 5
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert len((out / "flags.csv").read_text().splitlines()) == 6

    first = write_outputs(out, without, subsets, flags)
    assert sorted(p.name for p in out.iterdir()) == ["autoattack_subset.json", "manifest.json"]
    subset = json.loads((out / "autoattack_subset.json").read_text())
    assert subset["indices"] == {"base": [3, 7, 11]} and subset["n_samples"] == 100
    snapshot = {p.name: p.read_bytes() for p in first}
    again = write_outputs(out, without, subsets, flags)
    assert {p.name: p.read_bytes() for p in again} == snapshot
    assert b"second" not in b"".join(snapshot.values())


def test_eps_labels() -> None:
    assert eps_label(4 / 255, "Linf") == "4/255"
    assert eps_label(0.5, "L2") == "0.5"
    assert eps_label(0.003, "Linf") == "0.003"


def test_headline_table_marks_metrics_a_split_did_not_run() -> None:
    from vpt_robust.stages.report import headline_table

    stats = {"mean": 0.5, "std": 0.1}
    evaluation = {
        "metrics": ["clean", "autoattack_Linf_1/255"],
        "results": {
            "zero_shot": {
                "base": {"clean": stats, "autoattack_Linf_1/255": stats},
                "novel": {"clean": stats},
            }
        },
    }
    table = headline_table(evaluation)
    assert "| zero_shot | base | 50.0 ± 10.0 | 50.0 ± 10.0 |" in table
    assert "| zero_shot | novel | 50.0 ± 10.0 | – |" in table


def test_autoattack_runs_on_the_chosen_models_and_splits_only() -> None:
    from vpt_robust.stages.evaluate import autoattacked

    chosen = validate(
        {"evaluate": {"autoattack": {"models": ["zero_shot", "padding"], "splits": ["base"]}}}
    )
    assert autoattacked(chosen, "zero_shot", "base") and autoattacked(chosen, "padding", "base")
    assert not autoattacked(chosen, "evp", "base")
    assert not autoattacked(chosen, "padding", "novel")
    every = validate({"evaluate": {"autoattack": {"models": None}}})
    assert autoattacked(every, "evp", "base")
    off = validate({"evaluate": {"autoattack": {"enabled": False, "models": None}}})
    assert not autoattacked(off, "zero_shot", "base")
    with pytest.raises(ConfigError, match=r"evaluate.autoattack.models: \['vpt'\] are not"):
        validate({"evaluate": {"autoattack": {"models": ["vpt"]}}})
