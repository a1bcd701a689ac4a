"""The stream_adapt stage on smoke-sized data with an untrained tiny CLIP (numbers mean nothing):
the JSON's shape, one stream object per seed for every method, config errors, reproducibility,
and the real-data preset up to its clear missing-file / offline error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vpt_robust.config import ConfigError, load_params, validate

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"runtime": {"device": "cpu"}, "tracking": {"enabled": False}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    """Smoke data, its splits and an untrained small tiny CLIP, once for the module."""
    from _tiny_clip_spec import SMALL

    from vpt_robust.data.embedded import materialize
    from vpt_robust.models.tiny_clip import build_tiny_clip, save_clip_checkpoint
    from vpt_robust.stages import prepare
    from vpt_robust.stages.common import Layout
    from vpt_robust.tracking import disabled_run

    root = tmp_path_factory.mktemp("stream_adapt")
    paths = {"data": str(root / "data"), "outputs": str(root / "out"), "metrics": str(root / "m")}
    params = load_params(ROOT / "params.yaml", "smoke", {**OFFLINE, "paths": paths})
    materialize(Path(paths["data"]), seed=0, per_class_style=params.data.per_class_style)
    prepare.run(params, disabled_run())
    torch.manual_seed(0)
    save_clip_checkpoint(build_tiny_clip(**SMALL), Layout.of(params).checkpoint)
    return params


def _with(params, **adapt):
    raw = params.model_dump(mode="json")
    raw["adapt"].update(adapt)
    return validate(raw)


def _untimed(obj):
    """The JSON with no key naming a time (there should be none: checked by equality)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if "second" not in k and "time" not in k}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def smoke_run(project):
    """The stage on the smoke preset, with every call of run_stream recorded."""
    from vpt_robust.stages import stream_adapt as stage
    from vpt_robust.tracking import disabled_run

    calls: list[tuple] = []
    original = stage.run_stream

    def spy(adapter, stream, *, attack=None, on_batch=None):
        labels: list[torch.Tensor] = []

        def record(k, batch, logits):
            labels.append(batch.labels.clone())
            on_batch(k, batch, logits)

        res = original(adapter, stream, attack=attack, on_batch=record)
        calls.append((adapter.name, stream, attack, torch.cat(labels)))
        return res

    mp = pytest.MonkeyPatch()
    mp.setattr(stage, "run_stream", spy)
    try:
        out = stage.run(project, disabled_run())
    finally:
        mp.undo()
    return out, calls


def test_the_stage_writes_every_method_in_the_stream_eval_shape(project, smoke_run) -> None:
    from vpt_robust.stages.common import Layout

    out, _ = smoke_run
    layout = Layout.of(project)
    saved = json.loads(layout.metrics_file("stream_adapt").read_text())
    assert saved == json.loads(json.dumps(out))
    cfg = project.adapt
    names = [m.label for m in cfg.methods]
    assert names == [
        "source", "norm", "tent", "cotta", "vdp", "vdp_dap_only", "vdp_dsp_only",
        "vdp_no_homeostasis", "tpt",
    ]  # fmt: skip
    assert list(out["results"]) == names and saved["protocol"] == "continual"
    assert set(saved["results"]) == set(names)  # (the file's keys are sorted)
    n_seeds = len(cfg.seeds)
    for name, res in saved["results"].items():
        for key in ("mean_error", "late_error"):
            stats = res[key]
            assert len(stats["values"]) == n_seeds, (name, key)
            assert stats["mean"] == pytest.approx(sum(stats["values"]) / n_seeds)
        # The per-domain table is in stream order, and the mean error is its mean per seed.
        assert [r["corruption"] for r in res["stream"]] == cfg.corruptions
        for s in range(n_seeds):
            per_domain = [r["errors"][s] for r in res["stream"]]
            assert res["mean_error"]["values"][s] == pytest.approx(np.mean(per_domain))
    cost = {n: r["cost"]["relative"] for n, r in saved["results"].items()}
    assert cost["source"] == 1.0 and cost["tent"] == 3.0  # one forward + one backward per image
    assert cost["cotta"] > cost["tent"] and saved["results"]["tpt"]["cost"]["ratio_to_source"] > 1
    assert set(saved["protocols"]) == {"continual", "correlated", "mixed"}
    # mixed draws its order per seed: one row per domain, in the standard order
    mixed = saved["protocols"]["mixed"]["results"]["source"]["stream"]
    assert [r["corruption"] for r in mixed] == cfg.corruptions and len(
        mixed[0]["errors"]
    ) == n_seeds
    assert saved["protocols"]["continual"]["results"] == saved["results"]
    assert saved["protocols"]["correlated"]["stream"]["dirichlet"] == cfg.dirichlet
    # The curve (dvc plot) holds every method's per-domain error of the default protocol.
    rows = (layout.metrics / "stream_adapt_curve.csv").read_text().splitlines()
    assert rows[0] == "model,position,domain,error"
    assert len(rows) == 1 + len(names) * len(cfg.corruptions)
    # The adversarial stream: only the configured methods, attacked segment 0 and after it.
    adv = saved["adversarial"]["results"]
    assert sorted(adv) == ["source", "vdp"]
    for res in adv.values():
        assert [r["attacked"] for r in res["stream"]] == [True, False]
        assert [r["after_attack"] for r in res["stream"]] == [False, True]
        assert len(res["attacked_error"]["values"]) == n_seeds
        assert len(res["after_attack_error_clean_stream"]["values"]) == n_seeds
    # source does not adapt: after the attacked segment its clean error is the clean stream's.
    src = adv["source"]
    assert src["after_attack_error"] == src["after_attack_error_clean_stream"]
    assert src["attacked_error"]["mean"] >= src["attacked_error_clean_stream"]["mean"]


def test_every_method_runs_on_the_same_stream_object_per_seed(project, smoke_run) -> None:
    out, calls = smoke_run
    cfg = project.adapt
    names = [m.label for m in cfg.methods]
    clean = [c for c in calls if c[2] is None]
    # protocols x seeds x methods, in that order; one stream object per (protocol, seed).
    assert len(clean) == len(cfg.protocols) * len(cfg.seeds) * len(names)
    per_stream = len(names)
    for start in range(0, len(clean), per_stream):
        group = clean[start : start + per_stream]
        assert [c[0] for c in group] == names
        assert all(c[1] is group[0][1] for c in group)
        assert all(torch.equal(c[3], group[0][3]) for c in group)
    streams = [clean[i][1] for i in range(0, len(clean), per_stream)]
    assert len({id(s) for s in streams}) == len(streams)
    assert [(s.protocol, s.seed) for s in streams] == [
        (p, seed) for p in cfg.protocols for seed in cfg.seeds
    ]
    # Seeds give different streams (order and noise); the digests say which.
    for p in cfg.protocols:
        digests = out["protocols"][p]["stream_digests"]
        assert len(set(digests)) == len(cfg.seeds)
    # The attacked runs use the default protocol's streams with the configured attack.
    attacked = [c for c in calls if c[2] is not None]
    assert [c[0] for c in attacked] == ["source", "vdp"] * len(cfg.seeds)
    assert {c[2].segments[0] for c in attacked} == {0}


def test_the_json_is_a_function_of_the_inputs(project, smoke_run) -> None:
    """A second run gives the same JSON, and it holds no timing field at all."""
    from vpt_robust.stages import stream_adapt as stage
    from vpt_robust.stages.common import Layout
    from vpt_robust.tracking import disabled_run

    first = json.loads(Layout.of(project).metrics_file("stream_adapt").read_text())
    assert _untimed(first) == first
    params = _with(project, methods=[{"method": "source"}, {"method": "vdp", "n_augmentations": 1}])
    params = _with(params, protocols=["continual"], attack={"enabled": False})
    a = stage.run(params, disabled_run())
    b = stage.run(params, disabled_run())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["adversarial"] is None and list(a["results"]) == ["source", "vdp"]
    # The same seed, method and stream as in the smoke run: the same numbers.
    assert a["results"]["vdp"]["mean_error"] == first["results"]["vdp"]["mean_error"]


@pytest.mark.parametrize(
    ("adapt", "message"),
    [
        ({"methods": [{"method": "tent", "lr": -1}]}, "adapt.methods.0: bad arguments for adapter"
         " 'tent': lr"),
        ({"methods": [{"method": "vdp", "n_augmentation": 2}]}, "'vdp': n_augmentation: unknown"),
        ({"methods": [{"method": "tnet"}]}, "'tnet' is not one of"),
        ({"methods": [{"method": "tent"}, {"method": "tent"}]}, "names \\['tent'\\] repeat"),
        ({"protocols": ["continual", "sideways"]}, "adapt.protocols.1: 'sideways'"),
        ({"attack": {"enabled": True, "segments": [15]}}, "adapt.attack.segments: \\[15\\] are"),
        ({"attack": {"methods": ["cotta"]}, "methods": [{"method": "source"}]}, "\\['cotta'\\]"),
        ({"data": "cifar_c_files"}, "adapt.files_root is required"),
    ],
)  # fmt: skip
def test_bad_adapt_settings_are_config_errors_naming_them(adapt, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate({"adapt": adapt})


def test_a_bad_method_arg_stops_before_anything_runs(project, monkeypatch) -> None:
    from vpt_robust.config import deep_merge

    raw = deep_merge(project.model_dump(mode="json"), {"adapt": {}})
    raw["adapt"]["methods"] = copy.deepcopy(raw["adapt"]["methods"])
    raw["adapt"]["methods"][4]["ema"] = 1.5
    with pytest.raises(ConfigError, match="adapt.methods.4: bad arguments for adapter 'vdp': ema"):
        validate(raw)


def test_tpt_on_a_classifier_backbone_is_refused_before_it_runs(project) -> None:
    from vpt_robust.models import Backbone
    from vpt_robust.stages.stream_adapt import check_models

    plain = Backbone(
        torch.nn.Linear(3, 2), kind="classifier", mean=(0.0,) * 3, std=(1.0,) * 3,
        image_size=32, identity={},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"adapt.methods: \['tpt'\] tune CLIP's text context"):
        check_models(project, plain, None)
    no_tpt = [m for m in project.adapt.methods if m.method != "tpt"]
    params = project.model_copy(
        update={"adapt": project.adapt.model_copy(update={"methods": no_tpt})}
    )
    with pytest.raises(ValueError, match=r"adapt.methods: \['norm'\] normalise with test-batch"):
        check_models(params, plain, None)


def test_the_cifar10c_preset_is_severity_5_and_fails_clearly_without_files(
    project, tmp_path: Path
) -> None:
    from vpt_robust.data.corrupted_files import CorruptedFilesError
    from vpt_robust.models.robustbench import RobustBenchError
    from vpt_robust.stages import stream_adapt as stage
    from vpt_robust.tracking import disabled_run

    overrides = {**OFFLINE, "paths": project.paths.model_dump()}
    params = load_params(ROOT / "params.yaml", "cifar10c_robustbench", overrides)
    cfg = params.adapt
    assert cfg.severity == 5 and cfg.data == "cifar_c_files" and cfg.corruptions is None
    assert params.backbone.source == "robustbench"
    assert "tpt" not in [m.method for m in cfg.methods]
    missing = tmp_path / "CIFAR-10-C"
    params = _with(params, files_root=str(missing))
    with pytest.raises(CorruptedFilesError, match="no <corruption>.npy files"):
        stage.run(params, disabled_run())
    # Files in the distributed format, but no cached robustbench checkpoint: the offline error.
    missing.mkdir()
    images = np.zeros((5 * 4, 32, 32, 3), dtype=np.uint8)
    for name in ("gaussian_noise", "fog"):
        np.save(missing / f"{name}.npy", images)
    np.save(missing / "labels.npy", np.arange(20) % 10)
    cache = tmp_path / "rb_cache"
    params = _with(params, n_per_segment=4, corruptions=["gaussian_noise", "fog"])
    raw = params.model_dump(mode="json")
    raw["backbone"]["cache_dir"] = str(cache)
    with pytest.raises(RobustBenchError, match="checkpoint not in the local cache|not installed"):
        stage.run(validate(raw), disabled_run())
