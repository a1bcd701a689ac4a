"""The evaluation grid on Dask through Prefect equals the serial evaluation exactly: the same
metrics per model/split/seed as the evaluate stage, byte-identical per-sample flags, and the same
corruption errors as the cells run one after the other in this process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _params(root: Path) -> dict:
    return {
        "paths": {k: str(root / k) for k in ("data", "outputs", "metrics")},
        "data": {"per_class_style": 4, "max_prompt_train": 24, "max_test": 12},
        "pretrain": {"steps": 20, "batch_size": 32, "lr": 0.002, "warmup_steps": 2},
        "prompts": [{"name": "padding", "kind": "padding", "pad_size": 4}],
        "train": {"seeds": [0, 1], "epochs": 1, "batch_size": 16},
        "evaluate": {
            "batch_size": 8,  # several batches per split: flags must not depend on the batch
            "attack": {"eps": ["1/255", "4/255"], "steps": 2},
            # 4/255 is in the PGD sweep, 8/255 is not (its cell runs PGD on the subset itself)
            "autoattack": {"eps": ["4/255", "8/255"], "n_samples": 4, "splits": ["base"]},
        },
        "stream": {"n_per_segment": None, "batch_size": 4},  # all 12 base test images
        "grid": {
            "splits": ["base"],
            "corruptions": ["gaussian_noise"],
            "severities": [1, 5],
            "n_workers": 2,
        },
        "runtime": {"device": "cpu", "threads": 1},
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def pipeline_files(tmp_path_factory: pytest.TempPathFactory):
    """A tiny pipeline's files: data, splits, a 20-step tiny CLIP, padding prompts of 2 seeds,
    and the evaluate stage's own serial results over them."""
    from vpt_robust.config import validate
    from vpt_robust.data.versioning import ensure_data
    from vpt_robust.stages import run_stage

    root = tmp_path_factory.mktemp("grid")
    params = validate(_params(root))
    ensure_data(params, dvc_file=root / "absent.dvc")
    for stage in ("prepare", "pretrain", "train_prompt", "evaluate"):
        run_stage(stage, params)
    return root, params


def test_cells_cover_the_grid_in_the_evaluate_stages_order(pipeline_files) -> None:
    from vpt_robust.grid import enumerate_cells

    _, params = pipeline_files
    cells = enumerate_cells(params)
    # 2 seeds x 2 models x (2 PGD eps + 2 corruption cells), + AutoAttack at 2 eps for seed 0
    assert len(cells) == 2 * 2 * (2 + 2) + 2 * 2
    assert len(set(cells)) == len(cells)
    assert [c.key for c in cells[:7]] == [
        "zero_shot/base/seed0/pgd/1/255",
        "zero_shot/base/seed0/pgd/4/255",
        "zero_shot/base/seed0/autoattack/4/255",
        "zero_shot/base/seed0/autoattack/8/255",
        "zero_shot/base/seed0/corruption/gaussian_noise:1",
        "zero_shot/base/seed0/corruption/gaussian_noise:5",
        "padding/base/seed0/pgd/1/255",
    ]
    assert not [c for c in cells if c.kind == "autoattack" and c.seed != 0]
    with_novel = params.model_copy(
        update={"grid": params.grid.model_copy(update={"splits": ["base", "novel"]})}
    )
    novel = [c for c in enumerate_cells(with_novel) if c.split == "novel"]
    assert len(novel) == 2 * 2 * (2 + 2)  # padding transfers to novel classes; no AutoAttack
    aa = params.evaluate.autoattack.model_copy(update={"models": ["padding"]})
    padding_only = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"autoattack": aa})}
    )
    attacked = {c.model for c in enumerate_cells(padding_only) if c.kind == "autoattack"}
    assert attacked == {"padding"}  # the models evaluate.autoattack.models names, as the stage


def test_dask_grid_equals_the_serial_evaluation(prefect_harness, pipeline_files) -> None:
    from flows.grid import run_grid_flow
    from vpt_robust.grid import enumerate_cells, merge, run_serial

    root, params = pipeline_files
    merged = run_grid_flow(params)  # a LocalCluster of 2 worker processes
    assert merged["n_cells"] == len(enumerate_cells(params))

    # Per-sample flags: byte for byte the evaluate stage's flags.csv on the base classes (the
    # grid's split): the same rows in the same order.
    header, *rows = (root / "outputs" / "evaluate" / "flags.csv").read_bytes().splitlines(True)
    serial_flags = header + b"".join(r for r in rows if b",base," in r)
    assert (root / "outputs" / "grid" / "flags.csv").read_bytes() == serial_flags
    assert serial_flags.count(b"autoattack") == 2 * 2 * 4 and serial_flags.count(b"\n") > 50

    # Metrics: each seed's value of every column of the evaluate stage, exactly.
    evaluation = json.loads((root / "metrics" / "evaluate.json").read_text())
    seeds = evaluation["seeds"]
    compared = 0
    for model, by_split in evaluation["results"].items():
        for split, metrics in by_split.items():
            if split != "base":
                continue
            for key, stats in metrics.items():
                for i, value in enumerate(stats["values"]):
                    assert merged["attack"][model][split][str(seeds[i])][key] == value, key
                    compared += 1
    assert compared == 2 * 2 * 3 + 2 * 4  # clean + 2 PGD per row; 2 AutoAttack + PGD pairs

    # Corruption cells: equal to the same cells run one after another in this process.
    corruption_cells = [c for c in enumerate_cells(params) if c.kind == "corruption"]
    serial = merge(params, run_serial(params, corruption_cells))
    assert merged["corruption"] == serial["corruption"]
    counts = [
        m["n"]
        for by_split in serial["corruption"].values()
        for by_seed in by_split.values()
        for cells in by_seed.values()
        for m in cells.values()
    ]
    assert counts == [12] * 8  # every cell saw the 12 base test images
    written = json.loads((root / "metrics" / "grid.json").read_text())
    assert written["corruption"] == merged["corruption"]


def test_cuda_cluster_without_dask_cuda_is_a_clear_error() -> None:
    import importlib.util

    from flows.grid import DaskCudaMissingError, task_runner_for
    from vpt_robust.config import GridConfig

    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed: the missing-package error cannot occur")
    with pytest.raises(DaskCudaMissingError, match="grid.cluster: 'cuda' needs dask-cuda"):
        task_runner_for(GridConfig(cluster="cuda"))
    # a scheduler address wins over the cluster kind: nothing local is started
    runner = task_runner_for(GridConfig(cluster="cuda", address="tcp://10.0.0.5:8786"))
    assert runner.address == "tcp://10.0.0.5:8786"


def test_unknown_grid_models_are_named() -> None:
    from vpt_robust.config import validate
    from vpt_robust.grid import enumerate_cells

    params = validate({"grid": {"models": ["zero_shot", "nope"]}})
    with pytest.raises(ValueError, match=r"grid.models: \['nope'\] are not among"):
        enumerate_cells(params)


def _torch_threads_in_a_worker() -> tuple[int | None, int]:
    import torch

    from flows.grid import match_worker_threads

    torch.set_num_threads(2)  # what torch takes on this machine by default
    return match_worker_threads(), torch.get_num_threads()


def test_torch_in_a_dask_worker_takes_the_workers_thread_count() -> None:
    from distributed import Client, LocalCluster

    from flows.grid import match_worker_threads

    assert match_worker_threads() is None  # not in a worker: nothing changes
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c,
        Client(c) as client,
    ):
        assert client.submit(_torch_threads_in_a_worker).result() == (1, 1)
