"""The embedded data set: deterministic bytes, on-disk format, loading errors, splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vpt_robust.data.embedded import (
    CLASS_NAMES,
    DATA_FILES,
    HELDOUT_STYLES,
    PRETRAIN_STYLES,
    STYLE_NAMES,
    EmbeddedDataError,
    load_embedded,
    materialize,
    train_test_split,
)
from vpt_robust.data.render import COLOR_NAMES, STYLE_NOUNS

PER = 3


def _md5s(root: Path) -> dict[str, str]:
    return {f: hashlib.md5((root / f).read_bytes()).hexdigest() for f in DATA_FILES}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize(tmp_path_factory.mktemp("emb") / "data", seed=0, per_class_style=PER)


def test_same_seed_gives_identical_bytes(small_root: Path, tmp_path: Path) -> None:
    again = materialize(tmp_path / "again", seed=0, per_class_style=PER)
    assert _md5s(small_root) == _md5s(again)
    other = materialize(tmp_path / "other", seed=1, per_class_style=PER)
    assert _md5s(other)["images.npy"] != _md5s(small_root)["images.npy"]


def test_layout_shapes_and_captions(small_root: Path) -> None:
    assert sorted(p.name for p in small_root.iterdir()) == sorted(DATA_FILES)
    n = len(STYLE_NAMES) * len(CLASS_NAMES) * PER
    images = np.load(small_root / "images.npy")
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 20  # rendered content, not a blank array
    data = load_embedded(small_root)
    assert data.images.shape == (n, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and data.styles.dtype == torch.int64
    assert len(data.captions) == n
    assert data.class_names == CLASS_NAMES and len(CLASS_NAMES) == 20
    assert set(data.pretrain_styles) == set(PRETRAIN_STYLES)
    assert set(data.heldout_styles) == set(HELDOUT_STYLES) and len(HELDOUT_STYLES) >= 1
    assert torch.bincount(data.labels).tolist() == [len(STYLE_NAMES) * PER] * len(CLASS_NAMES)
    for cap, label, style in zip(data.captions, data.labels, data.styles, strict=True):
        noun = STYLE_NOUNS[STYLE_NAMES[style]]
        assert cap.startswith((f"a {noun} of ", f"an {noun} of ")), cap
        words = cap.split()
        assert words[-1] == CLASS_NAMES[label]
        assert words[-2] in COLOR_NAMES or words[-2] in ("a", "an")
    meta = json.loads((small_root / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["image_size"] == 32 and meta["num_images"] == n
    x = data.to_float()
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1


def test_styles_are_distinct_domains(small_root: Path) -> None:
    data = load_embedded(small_root)
    mean_per_style = [data.subset(data.style_mask(s)).to_float().mean().item() for s in STYLE_NAMES]
    # neon is dark, sketch is light paper: the styles really differ at the pixel level
    assert mean_per_style[STYLE_NAMES.index("neon")] < 0.25
    assert mean_per_style[STYLE_NAMES.index("sketch")] > 0.7


def test_subset_and_split(small_root: Path) -> None:
    data = load_embedded(small_root)
    mask = data.style_mask(PRETRAIN_STYLES)
    sub = data.subset(mask)
    assert len(sub) == int(mask.sum()) == len(PRETRAIN_STYLES) * len(CLASS_NAMES) * PER
    assert set(sub.styles.tolist()) == {STYLE_NAMES.index(s) for s in PRETRAIN_STYLES}
    picked = data.subset([0, 5, 7])
    assert picked.captions == [data.captions[i] for i in (0, 5, 7)]
    assert torch.equal(picked.images[1], data.images[5])
    assert len(data.subset(data.class_mask([0, 1]))) == 2 * len(STYLE_NAMES) * PER
    train, test = train_test_split(data, 1 / 3, seed=0)
    assert len(train) + len(test) == len(data)
    assert len(test) == len(STYLE_NAMES) * len(CLASS_NAMES)  # one of three per (style, class)
    with pytest.raises(EmbeddedDataError, match="styles"):
        data.style_mask("watercolour")
    with pytest.raises(EmbeddedDataError, match="mask"):
        data.subset(torch.ones(3, dtype=torch.bool))


def test_load_names_missing_file_and_bad_lengths(small_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in DATA_FILES:
        (broken / f).write_bytes((small_root / f).read_bytes())
    (broken / "labels.npy").unlink()
    with pytest.raises(EmbeddedDataError, match=r"labels\.npy"):
        load_embedded(broken)
    np.save(broken / "labels.npy", np.zeros(5, dtype=np.int64))
    with pytest.raises(EmbeddedDataError, match="disagree"):
        load_embedded(broken)
    with pytest.raises(EmbeddedDataError, match="not found"):
        load_embedded(tmp_path / "nowhere")


def test_materialize_replaces_own_files_only(tmp_path: Path) -> None:
    root = materialize(tmp_path / "d", seed=0, per_class_style=1)
    root = materialize(root, seed=2, per_class_style=1)  # overwriting our own set is fine
    assert json.loads((root / "meta.json").read_text())["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary leftovers
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        materialize(root, seed=0, per_class_style=1)
    assert (root / "notes.txt").exists()
    with pytest.raises(ValueError, match="per_class_style"):
        materialize(tmp_path / "e", per_class_style=0)
