"""CTTA stream protocols: segment order, severities, resets, batching, logging, sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vpt_robust.corruptions import (
    CORRUPTIONS,
    CorruptionStream,
    GeneratedSource,
    StreamBatch,
    corrupt,
)
from vpt_robust.corruptions.streams import GRADUAL_SEVERITIES
from vpt_robust.data.corrupted_files import CifarCSource

N = 10


@pytest.fixture(scope="module")
def source() -> GeneratedSource:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(N, 3, 32, 32, generator=gen)
    labels = torch.arange(N) % 3
    return GeneratedSource(images, labels)


def segments_seen(stream: CorruptionStream) -> list[tuple]:
    seen: list[tuple] = []
    for batch in stream:
        if not seen or seen[-1][0] != batch.segment:
            seen.append((batch.segment, batch.corruption, batch.severity, batch.reset, batch.run))
    return seen


def test_continual_is_the_standard_order_at_severity_5_with_one_reset(source) -> None:
    stream = CorruptionStream(source, "continual", batch_size=4)
    segs = segments_seen(stream)
    assert [s[1] for s in segs] == list(CORRUPTIONS)
    assert {s[2] for s in segs} == {5}
    assert [s[3] for s in segs] == [True] + [False] * 14
    batches = list(stream)
    assert len(batches) == len(stream) == 15 * 3  # 10 samples -> batches of 4, 4, 2
    assert sum(b.reset for b in batches) == 1 and batches[0].reset
    assert [len(b.labels) for b in batches[:3]] == [4, 4, 2]
    first = batches[0]
    assert isinstance(first, StreamBatch) and first.images.shape == (4, 3, 32, 32)
    assert first.corruptions == ("gaussian_noise",) * 4 and first.severities.tolist() == [5] * 4
    assert first.indices.tolist() == [0, 1, 2, 3]


def test_reset_each_shift_resets_every_corruption(source) -> None:
    segs = segments_seen(CorruptionStream(source, "reset_each_shift", batch_size=N))
    assert [s[3] for s in segs] == [True] * 15


def test_gradual_runs_1_to_5_to_1_per_corruption_without_reset(source) -> None:
    stream = CorruptionStream(source, "gradual", corruptions=("fog", "snow"), batch_size=N)
    segs = segments_seen(stream)
    assert [s[2] for s in segs] == list(GRADUAL_SEVERITIES) * 2
    assert [s[1] for s in segs] == ["fog"] * 9 + ["snow"] * 9
    assert [s[3] for s in segs] == [True] + [False] * 17
    assert stream.describe()["severities"] == list(GRADUAL_SEVERITIES) * 2


def test_mixed_shuffles_all_corruptions_per_sample(source) -> None:
    stream = CorruptionStream(source, "mixed", batch_size=7, seed=3)
    batches = list(stream)
    names = [c for b in batches for c in b.corruptions]
    assert len(names) == 15 * N
    assert {c: names.count(c) for c in CORRUPTIONS} == dict.fromkeys(CORRUPTIONS, N)
    assert names[:15] != list(CORRUPTIONS)
    assert sum(len(set(b.corruptions)) > 1 for b in batches) > len(batches) // 2
    assert batches[0].reset and not any(b.reset for b in batches[1:])
    # Every sample is its base image under its own corruption.
    b = batches[0]
    for i, (name, idx) in enumerate(zip(b.corruptions, b.indices.tolist(), strict=True)):
        assert b.labels[i] == source.labels[idx]
        if name in ("contrast", "brightness", "zoom_blur", "pixelate"):
            ref = corrupt(source.images[idx : idx + 1], name, 5)
            assert torch.allclose(b.images[i], ref[0])


def test_random_orders_are_seeded_permutations_each_reset(source) -> None:
    stream = CorruptionStream(source, "random_orders", n_orders=3, seed=5, batch_size=N)
    orders = stream.orders()
    assert len(orders) == 3 and len({tuple(o) for o in orders}) == 3
    assert all(sorted(o) == sorted(CORRUPTIONS) for o in orders)
    assert orders == CorruptionStream(source, "random_orders", n_orders=3, seed=5).orders()
    assert orders != CorruptionStream(source, "random_orders", n_orders=3, seed=6).orders()
    segs = segments_seen(stream)
    assert [s[1] for s in segs] == [c for o in orders for c in o]
    assert [s[3] for s in segs] == ([True] + [False] * 14) * 3
    assert [s[4] for s in segs] == [0] * 15 + [1] * 15 + [2] * 15


def test_streams_are_reproducible_and_seed_dependent(source) -> None:
    def images(seed: int) -> list[torch.Tensor]:
        stream = CorruptionStream(source, "continual", corruptions=("gaussian_noise",), seed=seed)
        return [b.images for b in stream]

    a, b, c = images(0), images(0), images(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_shuffle_and_n_per_segment(source) -> None:
    stream = CorruptionStream(
        source, "continual", corruptions=("fog", "snow"), n_per_segment=6, shuffle=True, seed=2
    )
    idx = [s.indices for s in stream.segments]
    assert all(sorted(i) == list(range(6)) for i in idx) and idx[0] != idx[1]


def test_describe_is_json_and_complete(source) -> None:
    stream = CorruptionStream(source, "continual", batch_size=4, n_per_segment=8)
    desc = json.loads(json.dumps(stream.describe()))
    assert desc["protocol"] == "continual" and desc["orders"] == [list(CORRUPTIONS)]
    assert desc["reset_policy"].startswith("reset once")
    assert desc["n_batches"] == len(stream) == 30 and desc["n_samples"] == 120
    seg = desc["segments"][3]
    assert seg["corruption"] == "defocus_blur" and seg["severity"] == 5 and not seg["reset"]
    assert seg["indices"] == {"start": 0, "stop": 8}
    mixed = json.loads(json.dumps(CorruptionStream(source, "mixed", n_per_segment=2).describe()))
    ms = mixed["segments"][0]
    assert len(ms["indices"]) == len(ms["sample_corruptions"]) == 30
    assert mixed["source"]["kind"] == "generated"


def test_bad_arguments(source) -> None:
    with pytest.raises(ValueError, match="protocol"):
        CorruptionStream(source, "cyclic")
    with pytest.raises(ValueError, match="valid names"):
        CorruptionStream(source, corruptions=("fog", "rain"))
    with pytest.raises(ValueError, match="severity"):
        CorruptionStream(source, severity=0)
    with pytest.raises(ValueError, match="n_per_segment"):
        CorruptionStream(source, n_per_segment=N + 1)
    with pytest.raises(ValueError, match="repeat"):
        CorruptionStream(source, corruptions=("fog", "fog"))
    with pytest.raises(TypeError, match="CorruptionSource"):
        CorruptionStream(object())  # type: ignore[arg-type]


def test_generated_source_checks_its_images_once(source, monkeypatch) -> None:
    labels = torch.arange(N) % 3
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\], got min 0.0, max 2.0"):
        GeneratedSource(torch.linspace(0, 2, N * 3 * 32 * 32).view(N, 3, 32, 32), labels)
    with pytest.raises(TypeError, match="floating dtype"):
        GeneratedSource(torch.zeros(N, 3, 32, 32, dtype=torch.uint8), labels)
    # Batches are not range-checked again, and the result is what corrupt() gives with checks.
    import vpt_robust.corruptions.registry as registry

    calls: list[bool] = []
    real = registry.check_images
    monkeypatch.setattr(
        registry,
        "check_images",
        lambda x, values=True: (calls.append(values), real(x, values=values)),
    )
    idx = torch.arange(4)
    x, _ = source.fetch("contrast", 3, idx, seed=5)
    assert calls == [False]
    assert torch.equal(x, corrupt(source.images[:4], "contrast", 3, seed=5))


def test_stream_over_real_cifar_c_files(tmp_path: Path) -> None:
    per = 6
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, per).astype(np.uint8)
    np.save(tmp_path / "labels.npy", np.tile(labels, 5))
    data = {}
    for c in ("fog", "snow"):
        data[c] = rng.integers(0, 256, (5 * per, 32, 32, 3), dtype=np.uint8)
        np.save(tmp_path / f"{c}.npy", data[c])
    stream = CorruptionStream(
        CifarCSource(tmp_path), "gradual", corruptions=("fog", "snow"), batch_size=4
    )
    assert stream.describe()["source"]["kind"] == "cifar_c_files"
    for batch in stream:
        rows = (batch.severity - 1) * per + batch.indices.numpy()
        ref = data[batch.corruption][rows].transpose(0, 3, 1, 2) / 255.0
        assert np.allclose(batch.images.numpy(), ref)
        assert np.array_equal(batch.labels.numpy(), labels[batch.indices.numpy()])


def _distinct_per_batch(stream: CorruptionStream, labels: torch.Tensor) -> list[int]:
    return [len(set(labels[b.indices].tolist())) for b in stream]


def test_correlated_orders_classes_by_a_seeded_dirichlet_draw() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    src = GeneratedSource(torch.rand(200, 3, 16, 16, generator=gen), labels)
    kw = {"corruptions": ("fog", "contrast"), "batch_size": 20}
    stream = CorruptionStream(src, "correlated", seed=4, **kw)
    iid = CorruptionStream(src, "continual", seed=4, shuffle=True, **kw)
    # Every base sample once per domain, and one reset, as in the continual protocol.
    assert all(sorted(s.indices) == list(range(200)) for s in stream.segments)
    assert [s.reset for s in stream.segments] == [True, False]
    # Consecutive batches hold few classes (i.i.d. batches of 20 hold ~8.8 of the 10).
    few, many = _distinct_per_batch(stream, labels), _distinct_per_batch(iid, labels)
    assert sum(few) / len(few) < 4.5 and sum(many) / len(many) > 7.5
    # Class runs: the label changes between neighbours far less often than under i.i.d. order.
    seq = labels[list(stream.segments[0].indices)]
    iid_seq = labels[list(iid.segments[0].indices)]
    assert int((seq[1:] != seq[:-1]).sum()) < 70 < 150 < int((iid_seq[1:] != iid_seq[:-1]).sum())
    # A fresh draw per domain, reproducible from the seed, different for another seed.
    assert stream.segments[0].indices != stream.segments[1].indices
    again = CorruptionStream(src, "correlated", seed=4, **kw)
    assert [s.indices for s in again.segments] == [s.indices for s in stream.segments]
    other = CorruptionStream(src, "correlated", seed=5, **kw)
    assert other.segments[0].indices != stream.segments[0].indices
    # A larger concentration mixes the classes more.
    flat = CorruptionStream(src, "correlated", seed=4, dirichlet=100.0, **kw)
    assert sum(_distinct_per_batch(flat, labels)) > sum(few) + len(few)
    desc = stream.describe()
    assert desc["dirichlet"] == 0.1 and desc["reset_policy"].startswith("reset once")
    for batch in stream:  # the labels a batch carries are those of its base samples
        assert torch.equal(batch.labels, labels[batch.indices])
    with pytest.raises(ValueError, match="dirichlet"):
        CorruptionStream(src, "correlated", dirichlet=0.0)


def test_correlated_reads_labels_through_fetch_when_the_source_has_no_base_labels(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    per = 40
    labels = np.repeat(np.arange(4), per // 4).astype(np.uint8)
    np.save(tmp_path / "labels.npy", np.tile(labels, 5))
    np.save(tmp_path / "fog.npy", rng.integers(0, 256, (5 * per, 32, 32, 3), dtype=np.uint8))
    stream = CorruptionStream(
        CifarCSource(tmp_path), "correlated", corruptions=("fog",), batch_size=10, seed=0
    )
    seq = labels[list(stream.segments[0].indices)]
    assert sorted(stream.segments[0].indices) == list(range(per))
    assert int((seq[1:] != seq[:-1]).sum()) <= 8
