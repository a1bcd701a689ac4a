"""The evaluate stage's per-model evaluation: PGD eps sweep + AutoAttack subset + flags."""

from __future__ import annotations

import torch
from _attack_models import eval_data, single_thread, trained_cnn  # noqa: F401

from vpt_robust.config import validate
from vpt_robust.stages.evaluate import autoattack_subset, eps_label, evaluate_model, metric_names


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
    assert row["pgd_Linf_8/255"] <= row["pgd_Linf_1/255"] <= row["clean"]
    assert row["autoattack_Linf_8/255"] <= row["clean"]
    subset = autoattack_subset(48, params)
    assert torch.equal(subset, autoattack_subset(48, params)) and len(subset) == 12
    aa_rows = [f for f in flags if f["attack"].startswith("autoattack")]
    assert sorted(f["index"] for f in aa_rows) == sorted((1000 + subset).tolist())
    pgd_rows = [f for f in flags if f["attack"] == "pgd"]
    assert len(pgd_rows) == 2 * 48 and min(f["index"] for f in pgd_rows) == 1000
    assert all(f["clean_correct"] or not f["robust_correct"] for f in flags)


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
