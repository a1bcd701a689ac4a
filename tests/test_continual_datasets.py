"""Continual task sequences from local files in torchvision's on-disk formats (Split CIFAR-100,
5-datasets), written small by the tests; the stage's dispatch and its clear errors; and the
embedded data's domain-incremental sequence, run end to end."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpt_robust.config import ConfigError, HeadConfig, PromptConfig, TrainConfig, validate
from vpt_robust.data import torchvision_sets as tvs
from vpt_robust.data.embedded import STYLE_NAMES, EmbeddedData
from vpt_robust.methods.continual import EvalSettings, MethodSpec, TaskSequence, run_method
from vpt_robust.models import Backbone
from vpt_robust.models.classifier import build_classifier
from vpt_robust.stages.continual import build_sequence

CPU = torch.device("cpu")
LINEAR = HeadConfig(kind="linear", templates=["a photo of a {}"])
TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


def _value(label: int, test: bool) -> int:
    """The grey level of every image of a class and split: the label and split, readable back."""
    return 2 * label + int(test)


def _constant(labels: list[int], test: bool, h: int, w: int, channels: int) -> np.ndarray:
    """(N, channels, h, w) uint8 images, each filled with its class/split value; channel 1 of a
    3-channel image holds the image's index within its class instead (to tell draws apart)."""
    x = np.empty((len(labels), channels, h, w), dtype=np.uint8)
    seen: dict[int, int] = {}
    for i, c in enumerate(labels):
        x[i] = _value(c, test)
        if channels == 3:
            x[i, 1] = 100 + seen.get(c, 0)
        seen[c] = seen.get(c, 0) + 1
    return x


def _labels(n_classes: int, per_class: int) -> list[int]:
    return [c for _ in range(per_class) for c in range(n_classes)]  # interleaved, as shipped


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def write_cifar10(root: Path) -> None:
    """cifar-10-batches-py: 3 train images per class spread over the 5 batches, 2 test."""
    folder = root / "cifar-10-batches-py"
    labels = _labels(10, TRAIN_PER_CLASS)
    x = _constant(labels, False, 32, 32, 3).reshape(len(labels), -1)
    for b, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        _pickle(folder / f"data_batch_{b}", {"data": x[part], "labels": [labels[i] for i in part]})
    test = _labels(10, TEST_PER_CLASS)
    _pickle(folder / "test_batch", {
        "data": _constant(test, True, 32, 32, 3).reshape(len(test), -1), "labels": test,
    })  # fmt: skip
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]  # fmt: skip
    _pickle(folder / "batches.meta", {"label_names": names})


CIFAR100_NAMES = [f"class_{i:02d}" for i in range(99)] + ["aquarium_fish"]


def write_cifar100(root: Path) -> None:
    """cifar-100-python: fine and coarse labels, 3 train / 2 test images per fine class."""
    folder = root / "cifar-100-python"
    for split, per, test in (("train", TRAIN_PER_CLASS, False), ("test", TEST_PER_CLASS, True)):
        fine = _labels(100, per)
        _pickle(folder / split, {
            "data": _constant(fine, test, 32, 32, 3).reshape(len(fine), -1),
            "fine_labels": fine, "coarse_labels": [c // 5 for c in fine],
        })  # fmt: skip
    _pickle(folder / "meta", {"fine_label_names": CIFAR100_NAMES, "coarse_label_names": []})


def _idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_mnist_like(root: Path, folder: str, compress: bool) -> None:
    """``<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, 28 x 28 grey."""
    raw = root / folder / "raw"
    for prefix, per, test in (("train", TRAIN_PER_CLASS, False), ("t10k", TEST_PER_CLASS, True)):
        labels = _labels(10, per)
        _idx(raw / f"{prefix}-images-idx3-ubyte", _constant(labels, test, 28, 28, 1)[:, 0],
             compress)  # fmt: skip
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.asarray(labels), compress)


def write_svhn(root: Path) -> None:
    """``{train,test}_32x32.mat``: X (32, 32, 3, N), y (N, 1) in 1..10 (10 = digit 0)."""
    from scipy.io import savemat

    for split, per, test in (("train", TRAIN_PER_CLASS, False), ("test", TEST_PER_CLASS, True)):
        digits = _labels(10, per)
        x = _constant(digits, test, 32, 32, 1).repeat(3, axis=1).transpose(2, 3, 1, 0)
        y = np.asarray([d if d else 10 for d in digits], dtype=np.uint8).reshape(-1, 1)
        savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})


def write_notmnist(root: Path) -> None:
    """``notMNIST/{Train,Test}/<A..J>/*.png``, 28 x 28 grey."""
    for split, per, test in (("Train", TRAIN_PER_CLASS, False), ("Test", TEST_PER_CLASS, True)):
        for c, letter in enumerate("ABCDEFGHIJ"):
            folder = root / "notMNIST" / split / letter
            folder.mkdir(parents=True)
            for k in range(per):
                img = np.full((28, 28), _value(c, test), dtype=np.uint8)
                Image.fromarray(img, mode="L").save(folder / f"{letter}{k}.png")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A torchvision root with every data set of Split CIFAR-100 and 5-datasets, small."""
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    write_mnist_like(tmp_path, "MNIST", compress=False)
    write_mnist_like(tmp_path, "FashionMNIST", compress=True)  # the .gz torchvision downloads
    write_svhn(tmp_path)
    write_notmnist(tmp_path)
    return tmp_path


def _decoded(images: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Labels and test flags read back from channel 0's grey level."""
    v = images[:, 0, 0, 0].long()
    return (v // 2).tolist(), (v % 2 == 1).tolist()


READERS = {
    "cifar10": (tvs.load_cifar10, "airplane"),
    "cifar100": (tvs.load_cifar100, "class 00"),
    "mnist": (tvs.load_mnist, "handwritten digit 0"),
    "fashion_mnist": (tvs.load_fashion_mnist, "T-shirt/top"),
    "svhn": (tvs.load_svhn, "house number 0"),
    "notmnist": (tvs.load_notmnist, "letter A"),
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_each_reader_gives_its_split_as_rgb_images_with_labels_and_names(
    root: Path, name: str
) -> None:
    load, first = READERS[name]
    n_classes = 100 if name == "cifar100" else 10
    for split, per in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        got = load(root, split, image_size=32)
        if split == "train":
            train = got
        assert got.images.dtype == torch.uint8 and got.images.shape == (n_classes * per, 3, 32, 32)
        assert torch.equal(got.labels.bincount(), torch.full((n_classes,), per))
        labels, is_test = _decoded(got.images)
        assert labels == got.labels.tolist()  # SVHN's label 10 came back as digit 0
        assert set(is_test) == {split == "test"}  # the dataset's own split, not a re-draw
        # grey images repeated to 3 channels, a constant image stays constant through the resize
        if name not in ("cifar10", "cifar100"):
            assert (got.images == got.images[:, :1, :1, :1]).all()
        assert len(got.class_names) == n_classes and got.class_names[0] == first
    small = load(root, "train", image_size=16)
    assert small.images.shape == (len(train.labels), 3, 16, 16)
    assert torch.equal(small.images[:, :, 0, 0], train.images[:, :, 0, 0])
    native = load(root, "train", image_size=28)  # the digit sets' own size: no resize
    assert native.images.shape == (len(train.labels), 3, 28, 28)


def test_cifar100_names_and_the_seeded_per_class_cap(root: Path) -> None:
    full = tvs.load_cifar100(root, "train")
    assert full.class_names[-1] == "aquarium fish"  # underscores read as spaces (zero-shot text)
    capped = tvs.load_cifar100(root, "train", per_class=2, seed=0)
    assert torch.equal(capped.labels.bincount(), torch.full((100,), 2))

    def draw(seed: int) -> list[tuple[int, int]]:
        x = tvs.load_cifar100(root, "train", per_class=1, seed=seed).images
        return list(zip(x[:, 0, 0, 0].tolist(), x[:, 1, 0, 0].tolist(), strict=True))

    assert draw(3) == draw(3)
    assert any(draw(s) != draw(0) for s in (1, 2, 3))  # channel 1: the image's index in class
    with pytest.raises(ValueError, match="per_class: expected >= 1"):
        tvs.load_cifar100(root, "train", per_class=0)


def test_split_cifar100_is_ten_tasks_of_ten_classes_trained_on_train_tested_on_test(
    root: Path,
) -> None:
    seq = tvs.torchvision_sequence("split_cifar100", root, n_train=2, seed=0)
    assert isinstance(seq, TaskSequence) and seq.kind == "class" and len(seq.tasks) == 10
    assert seq.class_names[:2] == ("class 00", "class 01") and len(seq.class_names) == 100
    assert seq.images.shape == (100 * (2 + TEST_PER_CLASS), 3, 32, 32)
    for t, task in enumerate(seq.tasks):
        assert task.classes == tuple(range(10 * t, 10 * t + 10))
        assert len(task.train) == 10 * 2 and len(task.test) == 10 * TEST_PER_CLASS
        for part, test in ((task.train, False), (task.test, True)):
            assert set(seq.labels[part].tolist()) == set(task.classes)
            labels, is_test = _decoded(seq.images[part])
            assert labels == seq.labels[part].tolist() and set(is_test) == {test}
    assert seq.seen_classes(1) == tuple(range(20))
    five = tvs.torchvision_sequence("split_cifar100", root, tasks=5)
    assert [len(t.classes) for t in five.tasks] == [20] * 5
    with pytest.raises(ValueError, match="continual.tasks: 100 CIFAR-100 classes do not split"):
        tvs.torchvision_sequence("split_cifar100", root, tasks=7)


def test_five_datasets_is_one_task_of_ten_classes_per_dataset(root: Path) -> None:
    seq = tvs.torchvision_sequence("five_datasets", root, n_test=1, seed=0)
    names = [t.name for t in seq.tasks]
    assert names == ["cifar10", "mnist", "fashion_mnist", "svhn", "notmnist"]
    assert len(seq.class_names) == 50 and len(set(seq.class_names)) == 50
    assert seq.class_names[0] == "airplane" and seq.class_names[10] == "handwritten digit 0"
    assert seq.class_names[20] == "T-shirt/top" and seq.class_names[30] == "house number 0"
    assert seq.class_names[49] == "letter J"
    assert seq.images.shape == (50 * (TRAIN_PER_CLASS + 1), 3, 32, 32)
    for d, task in enumerate(seq.tasks):
        assert task.classes == tuple(range(10 * d, 10 * d + 10))
        assert len(task.train) == 10 * TRAIN_PER_CLASS and len(task.test) == 10
        for part, test in ((task.train, False), (task.test, True)):
            local, is_test = _decoded(seq.images[part])
            # global label = the dataset's own label + 10 per dataset before it
            assert [c + 10 * d for c in local] == seq.labels[part].tolist()
            assert set(is_test) == {test}
    assert seq.seen_classes(4) == tuple(range(50))
    with pytest.raises(ValueError, match="five_datasets has 5 tasks"):
        tvs.torchvision_sequence("five_datasets", root, tasks=10)


def test_missing_roots_and_files_are_clear_errors(root: Path, tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(tvs.DatasetFilesError, match=r"split_cifar100: data root .*nowhere"):
        tvs.torchvision_sequence("split_cifar100", nowhere)
    with pytest.raises(tvs.DatasetFilesError, match=r"five_datasets: .*notMNIST/\{Train,Test\}"):
        tvs.torchvision_sequence("five_datasets", nowhere)
    with pytest.raises(tvs.DatasetFilesError, match="CIFAR-10: data root .*download it once"):
        tvs.load_cifar10(nowhere)
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        tvs.DatasetFilesError,
        match=r"MNIST: .*MNIST/raw/t10k-labels-idx1-ubyte not found .*nothing is downloaded.*"
        r"torchvision.datasets.MNIST",
    ):
        tvs.torchvision_sequence("five_datasets", root)
    (root / "test_32x32.mat").unlink()
    with pytest.raises(tvs.DatasetFilesError, match=r"SVHN: .*test_32x32.mat not found"):
        tvs.load_svhn(root, "test")
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(tvs.DatasetFilesError, match=r"CIFAR-100: .*cifar-100-python/meta"):
        tvs.torchvision_sequence("split_cifar100", root)
    for png in (root / "notMNIST" / "Test" / "C").iterdir():
        png.unlink()
    with pytest.raises(tvs.DatasetFilesError, match=r"notMNIST: no .png images in .*Test/C"):
        tvs.load_notmnist(root, "test")
    bad = root / "bad-idx"
    bad.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(tvs.DatasetFilesError, match="not a uint8 idx file"):
        tvs.read_idx(bad)


def test_config_needs_a_root_for_real_data_and_the_stage_dispatches(root: Path) -> None:
    with pytest.raises(ConfigError, match="continual.root: continual.data 'split_cifar100'"):
        validate({"continual": {"data": "split_cifar100"}})
    with pytest.raises(ConfigError, match="continual.tasks: five_datasets has 5 tasks"):
        validate({"continual": {"data": "five_datasets", "root": "x", "tasks": 10}})
    with pytest.raises(ConfigError, match="continual.sequence: 'domain_incremental' needs"):
        validate({"continual": {"data": "five_datasets", "root": "x",
                                "sequence": "domain_incremental"}})  # fmt: skip
    with pytest.raises(ConfigError, match="continual.n_train_per_class: null"):
        validate({"continual": {"n_train_per_class": None}})
    params = validate({"continual": {
        "data": "split_cifar100", "root": str(root), "tasks": 10, "n_train_per_class": 1,
        "n_test_per_class": None, "image_size": 24,
    }})  # fmt: skip
    seq = build_sequence(params, None, {})  # real data: the embedded data is not read
    assert len(seq.tasks) == 10 and seq.images.shape == (100 * 3, 3, 24, 24)
    assert len(seq.tasks[0].train) == 10 and len(seq.tasks[0].test) == 10 * TEST_PER_CLASS


def _train_cfg() -> TrainConfig:
    return TrainConfig(
        epochs=1, batch_size=8, optimizer="adamw", lr=0.01, weight_decay=0.0, warmup_steps=0,
        schedule="constant", grad_clip=1.0, checkpoint=False,
    )  # fmt: skip


def test_a_two_task_slice_of_split_cifar100_runs_end_to_end(
    root: Path, micro_backbone: Backbone
) -> None:
    full = tvs.torchvision_sequence("split_cifar100", root, n_train=2, n_test=1)
    seq = TaskSequence(full.images, full.labels, full.class_names, full.tasks[:2])
    spec = MethodSpec(PromptConfig(kind="l2p", size=4, length=1, top_n=1), LINEAR, 0.1)

    def build(s: MethodSpec) -> torch.nn.Module:
        return build_classifier(micro_backbone, seq.class_names, s.prompt, s.head)

    torch.manual_seed(0)
    res = run_method(
        "l2p", seq, build, spec, _train_cfg(), EvalSettings(batch_size=32, steps=1),
        device=CPU, seed=0,
    )  # fmt: skip
    assert res.acc.shape == (2, 2) and torch.isnan(res.acc[1, 0])
    filled = ~torch.isnan(res.acc)
    assert filled.sum() == 3 and ((res.acc[filled] >= 0) & (res.acc[filled] <= 1)).all()
    assert [sum(u) for u in res.usage] == [10, 10]  # top-1 prompt for each of 10 test images
    assert len(res.train) == 2


def _embedded(per: int = 5, n_classes: int = 4) -> tuple[EmbeddedData, dict[str, torch.Tensor]]:
    """A small in-memory embedded set: ``per`` images per class and style; the first image of
    every (class, pretraining style) is in pretrain_train."""
    styles = torch.arange(len(STYLE_NAMES)).repeat_interleave(n_classes * per)
    labels = torch.arange(n_classes).repeat_interleave(per).repeat(len(STYLE_NAMES))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8)
    data = EmbeddedData(images, labels, styles, [""] * len(labels),
                        class_names=tuple("abcd"[:n_classes]))  # fmt: skip
    first = torch.arange(len(labels)) % per == 0
    pre = torch.isin(styles, torch.tensor([STYLE_NAMES.index(s) for s in data.pretrain_styles]))
    return data, {"pretrain_train": (first & pre).nonzero().squeeze(1)}


def test_domain_incremental_embedded_sequence_is_one_task_per_style_unmasked(
    micro_backbone: Backbone,
) -> None:
    data, splits = _embedded()
    params = validate({"continual": {
        "sequence": "domain_incremental", "n_train_per_class": 2, "n_test_per_class": 2,
    }})  # fmt: skip
    seq = build_sequence(params, data, splits)
    assert seq.kind == "domain" and [t.name for t in seq.tasks] == list(STYLE_NAMES)
    taken = set(splits["pretrain_train"].tolist())
    for i, task in enumerate(seq.tasks):
        assert task.classes == (0, 1, 2, 3)
        for part in (task.train, task.test):
            assert torch.equal(seq.labels[part].bincount(), torch.full((4,), 2))
            assert set(data.styles[part].tolist()) == {i}
            assert not set(part.tolist()) & taken
        assert not set(task.train.tolist()) & set(task.test.tolist())
    # no masking: every class is seen from the first task on
    assert all(seq.seen_classes(t) == (0, 1, 2, 3) for t in range(len(seq.tasks)))
    spec = MethodSpec(PromptConfig(kind="vpt", length=2), LINEAR)

    def build(s: MethodSpec) -> torch.nn.Module:
        return build_classifier(micro_backbone, seq.class_names, s.prompt, s.head)

    torch.manual_seed(0)
    res = run_method(
        "sequential", seq, build, spec, _train_cfg(), EvalSettings(batch_size=32, steps=1),
        device=CPU, seed=0,
    )  # fmt: skip
    n = len(STYLE_NAMES)
    lower = torch.tril(torch.ones(n, n, dtype=torch.bool), -1)
    assert torch.isnan(res.acc[lower]).all() and not torch.isnan(res.acc[~lower]).any()
    assert len(res.train) == n


class _RunsCode:
    def __reduce__(self):  # a pickle that would call os.system when loaded
        import os

        return (os.system, ("true",))


def test_a_cifar_pickle_with_code_in_it_is_refused(root: Path) -> None:
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": _RunsCode(), "labels": [0]}))
    with pytest.raises(
        tvs.DatasetFilesError, match=r"test_batch is not a CIFAR python pickle.*system"
    ):
        tvs.load_cifar10(root, "test")


def test_class_incremental_in_a_held_out_style_takes_only_that_style() -> None:
    data, splits = _embedded(per=6)
    kw = {"tasks": 2, "n_train_per_class": 3, "n_test_per_class": 2}
    night = STYLE_NAMES.index("night")
    seq = build_sequence(validate({"continual": {**kw, "style": "night"}}), data, splits)
    assert [t.classes for t in seq.tasks] == [(0, 1), (2, 3)]
    for task in seq.tasks:
        for part in (task.train, task.test):
            assert set(data.styles[part].tolist()) == {night}
    seq = build_sequence(validate({"continual": kw}), data, splits)  # the pretraining styles
    pre = {STYLE_NAMES.index(s) for s in data.pretrain_styles}
    used = torch.cat([torch.cat([t.train, t.test]) for t in seq.tasks])
    assert set(data.styles[used].tolist()) <= pre
    assert not set(used.tolist()) & set(splits["pretrain_train"].tolist())
