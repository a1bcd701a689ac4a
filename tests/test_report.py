"""What the report shows a reader: AutoAttack beside PGD on the same subset, readable corruption
names, and the stream aggregation (per-position mean/std over seeds, the stream's mean)."""

from __future__ import annotations

import math

import pytest

from vpt_robust.config import validate
from vpt_robust.stages.evaluate import metric_names
from vpt_robust.stages.report import column_title, headline_table, stream_table
from vpt_robust.stages.stream_eval import aggregate_stream


def _stats(mean: float, std: float = 0.0) -> dict[str, float]:
    return {"mean": mean, "std": std, "values": [mean]}


def test_headline_table_puts_pgd_on_the_autoattack_subset_beside_autoattack() -> None:
    params = validate({"evaluate": {"attack": {"eps": ["1/255", "4/255"], "steps": 10}}})
    columns = metric_names(params)
    evaluation = {
        "attack": params.evaluate.attack.model_dump(),
        "metrics": columns,
        "results": {
            "zero_shot": {
                "base": {
                    "clean": _stats(0.5),
                    "pgd_Linf_1/255": _stats(0.085, 0.01),
                    "pgd_Linf_4/255": _stats(0.01),
                    "pgd_subset_Linf_1/255": _stats(0.13),
                    "autoattack_Linf_1/255": _stats(0.11),
                },
                "novel": {
                    "clean": _stats(0.4),
                    "pgd_Linf_1/255": _stats(0.2),
                    "pgd_Linf_4/255": _stats(0.05),
                },  # fmt: skip
            }
        },
    }
    header, _, base, novel = headline_table(evaluation).splitlines()
    titles = [c.strip() for c in header.strip("|").split("|")]
    assert titles == [
        "model", "classes", "clean", "PGD-10 1/255", "PGD-10 4/255",
        "PGD-10@subset 1/255", "AutoAttack@subset 1/255",
    ]  # fmt: skip
    # AutoAttack (11.0) reads against PGD on its own samples (13.0), right beside it.
    assert (
        base
        == "| zero_shot | base | 50.0 ± 0.0 | 8.5 ± 1.0 | 1.0 ± 0.0 | 13.0 ± 0.0 | 11.0 ± 0.0 |"
    )
    assert novel.endswith("| 5.0 ± 0.0 | – | – |")
    assert column_title("pgd_L2_0.5", evaluation) == "PGD-10 L2 0.5"


def _seed_rows(errors: list[float]) -> list[dict]:
    domains = [("gaussian_noise", 5), ("shot_noise", 5), ("elastic_transform", 5)]
    return [
        {"run": 0, "segment": i, "corruption": c, "severity": s, "error": e, "n": 10}
        for i, ((c, s), e) in enumerate(zip(domains, errors, strict=True))
    ]


def test_stream_aggregation_means_over_seeds_per_position_and_over_the_stream() -> None:
    per_seed = {
        "zero_shot": [_seed_rows([0.2, 0.4, 0.9]), _seed_rows([0.4, 0.6, 0.5])],
        "padding": [_seed_rows([0.1, 0.3, 0.2]), _seed_rows([0.1, 0.5, 0.2])],
    }
    results, curve = aggregate_stream(per_seed)
    zs = results["zero_shot"]
    assert [r["error"] for r in zs["stream"]] == pytest.approx([0.3, 0.5, 0.7])
    assert [r["errors"] for r in zs["stream"]] == [[0.2, 0.4], [0.4, 0.6], [0.9, 0.5]]
    assert zs["stream"][2]["error_std"] == pytest.approx(math.sqrt(0.08))  # sample std
    assert zs["stream"][1]["corruption"] == "shot_noise" and zs["stream"][1]["n"] == 10
    # Per seed the mean over the stream (0.5, 0.5), then mean and std over seeds.
    assert zs["mean_error"]["values"] == pytest.approx([0.5, 0.5])
    assert zs["mean_error"]["mean"] == pytest.approx(0.5) and zs["mean_error"]["std"] == 0
    pad = results["padding"]["mean_error"]
    assert pad["values"] == pytest.approx([0.2, 0.8 / 3])
    assert pad["std"] == pytest.approx(abs(0.2 - 0.8 / 3) / math.sqrt(2))
    assert curve[:2] == [
        {"model": "zero_shot", "position": 0, "domain": "gaussian_noise:5", "error": pytest.approx(0.3)},
        {"model": "zero_shot", "position": 1, "domain": "shot_noise:5", "error": pytest.approx(0.5)},
    ]  # fmt: skip
    assert len(curve) == 6

    table = stream_table({"results": results}).splitlines()
    assert table[0] == "| # | domain | severity | zero_shot | padding |"
    assert table[2] == "| 1 | gaussian_noise | 5 | 30.0 | 10.0 |"
    assert table[3] == "| 2 | shot_noise | 5 | 50.0 | 40.0 |"  # full names, never cut
    assert table[4].startswith("| 3 | elastic_transform | 5 |")
    assert table[5] == "| | **mean** | | 50.0 ± 0.0 | 23.3 ± 4.7 |"


def test_stream_aggregation_refuses_seeds_with_different_streams() -> None:
    other = _seed_rows([0.1, 0.2, 0.3])
    other[1]["corruption"] = "impulse_noise"
    with pytest.raises(ValueError, match=r"per_seed\['m'\]\[1\]: its stream order differs"):
        aggregate_stream({"m": [_seed_rows([0.1, 0.2, 0.3]), other]})
    with pytest.raises(ValueError, match="no stream rows"):
        aggregate_stream({"m": []})


def test_stream_aggregation_by_domain_pools_seeds_whose_order_differs() -> None:
    first = _seed_rows([0.2, 0.4, 0.6])
    second = [dict(r, segment=i) for i, r in enumerate(reversed(_seed_rows([0.1, 0.3, 0.5])))]
    second.append({**second[0], "segment": 3, "error": 0.3, "n": 30})  # a domain seen twice
    with pytest.raises(ValueError, match="stream order differs"):
        aggregate_stream({"m": [first, second]})
    results, curve = aggregate_stream({"m": [first, second]}, by_domain=True)
    table = results["m"]["stream"]
    assert [r["corruption"] for r in table] == ["gaussian_noise", "shot_noise", "elastic_transform"]
    # elastic_transform in seed 1: (0.5 * 10 + 0.3 * 30) / 40 = 0.35, pooled by sample count
    assert table[2]["errors"] == pytest.approx([0.6, 0.35]) and table[2]["n"] == 10
    assert table[0]["errors"] == pytest.approx([0.2, 0.1])
    assert results["m"]["mean_error"]["values"] == pytest.approx([0.4, (0.9 + 0.3) / 4])
    assert [c["domain"] for c in curve] == [
        "gaussian_noise:5",
        "shot_noise:5",
        "elastic_transform:5",
    ]
    other = _seed_rows([0.1, 0.2, 0.3])
    other[1]["corruption"] = "impulse_noise"
    with pytest.raises(ValueError, match=r"\[1\]: its domains differ"):
        aggregate_stream({"m": [first, other]}, by_domain=True)


def test_method_tables_show_every_method_with_its_numbers() -> None:
    from vpt_robust.stages.report import adapt_table, continual_table, tecoa_table

    def stats(m: float) -> dict[str, float]:
        return {"mean": m, "std": 0.01, "values": [m]}

    adapt = {
        "results": {
            "source": {
                "mean_error": stats(0.5),
                "late_error": stats(0.6),
                "cost": {"ratio_to_source": 1.0},
            },
            "tent": {
                "mean_error": stats(0.4),
                "late_error": stats(0.3),
                "cost": {"ratio_to_source": 3.0},
            },
        }
    }
    text = adapt_table(adapt)
    assert "| source | 50.0 ± 1.0 | 60.0 ± 1.0 | 1.0x |" in text
    assert "| tent | 40.0 ± 1.0 | 30.0 ± 1.0 | 3.0x |" in text
    tecoa = {
        "metrics": ["clean", "pgd_Linf_4/255"],
        "eval_attack": {"attack": {"steps": 10}},
        "results": {"vpt": {"novel": {"clean": stats(0.3), "pgd_Linf_4/255": stats(0.1)}}},
    }
    text = tecoa_table(tecoa)
    assert "| method | split | clean | PGD-10 4/255 |" in text
    assert "| vpt | novel | 30.0 ± 1.0 | 10.0 ± 1.0 |" in text
    keys = ("average_accuracy", "forgetting", "robust_average_accuracy", "robust_forgetting")
    continual = {
        "results": {"l2p": {k: stats(v) for k, v in zip(keys, (0.8, 0.1, 0.5, 0.2), strict=True)}}
    }
    assert "| l2p | 80.0 ± 1.0 | 10.0 ± 1.0 | 50.0 ± 1.0 | 20.0 ± 1.0 |" in continual_table(
        continual
    )
