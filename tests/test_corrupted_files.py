"""Loaders for CIFAR-10-C / CIFAR-100-C `.npy` files and ImageNet-C folders, on small files
written here in exactly the distributed formats; compared with robustbench's own loaders when
those import (robustbench 1.1.1 needs `pkg_resources` and a module named `autoattack`: we stub
the first and alias the second to pyautoattack for the duration of these tests)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpt_robust.data.corrupted_files import (
    CifarCSource,
    CorruptedFilesError,
    ImageNetCSource,
    imagenet_c_files,
    load_cifar_c,
    load_imagenet_c,
)

PER = 12  # images per severity in the test files (10,000 in the real ones)


def write_cifar_c(root: Path, corruptions: tuple[str, ...], per: int = PER) -> dict:
    """<corruption>.npy = 5 severities x per uint8 32x32x3 images; labels.npy = 5 x per labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=per).astype(np.uint8)
    np.save(root / "labels.npy", np.tile(labels, 5))
    data = {}
    for c in corruptions:
        data[c] = rng.integers(0, 256, size=(5 * per, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{c}.npy", data[c])
    return {"labels": labels, "images": data}


def write_imagenet_c(root: Path, corruption: str, severity: int, ids: list[str]) -> None:
    rng = np.random.default_rng(severity)
    for entry in ids:
        path = root / corruption / str(severity) / entry
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, quality=85)


@pytest.fixture
def robustbench_data():
    """robustbench.data imported with the two shims, or skip; removed from sys.modules after."""
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            stub = types.ModuleType("pkg_resources")

            def resource_filename(package: str, name: str) -> str:
                return str(Path(sys.modules[package].__file__).parent / name)

            stub.resource_filename = resource_filename  # type: ignore[attr-defined]
            mp.setitem(sys.modules, "pkg_resources", stub)
        try:
            import autoattack  # noqa: F401
        except ImportError:
            try:
                import pyautoattack
            except ImportError:
                pytest.skip("robustbench needs a module named autoattack; none installed")
            mp.setitem(sys.modules, "autoattack", pyautoattack)
        try:
            import robustbench.data as rb
        except Exception as exc:  # any import failure means: robustbench unusable here
            pytest.skip(f"robustbench.data does not import: {exc!r}")
        yield rb
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("robustbench", "autoattack", "pkg_resources"):
            sys.modules.pop(name, None)


def test_load_cifar_c_slices_the_severity_block(tmp_path: Path) -> None:
    files = write_cifar_c(tmp_path, ("fog", "snow"))
    for severity in (1, 3, 5):
        x, y = load_cifar_c(tmp_path, "fog", severity)
        block = files["images"]["fog"][(severity - 1) * PER : severity * PER]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (PER, 32, 32, 3)
        assert np.array_equal(x.numpy(), block)
        assert y.dtype == torch.int64 and np.array_equal(y.numpy(), files["labels"])
    xf, yf = load_cifar_c(tmp_path, "snow", 2, n_examples=5, as_float=True)
    assert xf.dtype == torch.float32 and tuple(xf.shape) == (5, 3, 32, 32)
    ref = files["images"]["snow"][PER : PER + 5].transpose(0, 3, 1, 2) / 255.0
    assert np.allclose(xf.numpy(), ref) and len(yf) == 5


def test_load_cifar_c_accepts_short_labels_file(tmp_path: Path) -> None:
    files = write_cifar_c(tmp_path, ("fog",))
    np.save(tmp_path / "labels.npy", files["labels"])
    _, y = load_cifar_c(tmp_path, "fog", 4)
    assert np.array_equal(y.numpy(), files["labels"])


def test_load_cifar_c_errors_name_the_problem(tmp_path: Path) -> None:
    write_cifar_c(tmp_path, ("fog",))
    with pytest.raises(CorruptedFilesError, match="glass_blur.npy: file not found"):
        load_cifar_c(tmp_path, "glass_blur", 1)
    with pytest.raises(CorruptedFilesError, match="severity"):
        load_cifar_c(tmp_path, "fog", 6)
    with pytest.raises(CorruptedFilesError, match="n_examples"):
        load_cifar_c(tmp_path, "fog", 1, n_examples=PER + 1)
    np.save(tmp_path / "bad.npy", np.zeros((7, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(CorruptedFilesError, match="5 severities"):
        load_cifar_c(tmp_path, "bad", 1)
    np.save(tmp_path / "gray.npy", np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(CorruptedFilesError, match=r"\(5 \* N, H, W, 3\)"):
        load_cifar_c(tmp_path, "gray", 1)
    np.save(tmp_path / "labels.npy", np.zeros(7, dtype=np.uint8))
    with pytest.raises(CorruptedFilesError, match="labels"):
        load_cifar_c(tmp_path, "fog", 1)


def test_cifar_c_source_fetches_in_requested_order(tmp_path: Path) -> None:
    files = write_cifar_c(tmp_path, ("fog",))
    src = CifarCSource(tmp_path, n_examples=10)
    assert len(src) == 10
    idx = torch.tensor([7, 2, 9, 2])
    x, y = src.fetch("fog", 3, idx, seed=0)
    ref = files["images"]["fog"][2 * PER + idx.numpy()].transpose(0, 3, 1, 2) / 255.0
    assert np.allclose(x.numpy(), ref)
    assert np.array_equal(y.numpy(), files["labels"][idx.numpy()])
    with pytest.raises(CorruptedFilesError, match="indices"):
        src.fetch("fog", 1, torch.tensor([PER]), seed=0)


def test_imagenet_c_folder_loader(tmp_path: Path) -> None:
    ids = ["n02/b.JPEG", "n01/a.JPEG", "n01/c.JPEG", "n03/d.JPEG"]
    write_imagenet_c(tmp_path, "fog", 2, ids)
    paths, targets, classes = imagenet_c_files(tmp_path, "fog", 2)
    assert classes == ["n01", "n02", "n03"]
    assert [p.name for p in paths] == ["a.JPEG", "c.JPEG", "b.JPEG", "d.JPEG"]
    assert targets == [0, 0, 1, 2]
    x, y = load_imagenet_c(tmp_path, "fog", 2)
    assert tuple(x.shape) == (4, 3, 24, 24) and x.dtype == torch.float32
    first = np.asarray(Image.open(tmp_path / "fog" / "2" / "n01" / "a.JPEG").convert("RGB"))
    assert np.allclose(x[0].permute(1, 2, 0).numpy() * 255.0, first, atol=1e-3)
    x2, y2 = load_imagenet_c(tmp_path, "fog", 2, image_ids=["n03/d.JPEG", "n02/b.JPEG"])
    assert y2.tolist() == [2, 1] and torch.equal(x2[0], x[3])
    src = ImageNetCSource(tmp_path)
    xs, ys = src.fetch("fog", 2, torch.tensor([3, 0]), seed=0)
    assert torch.equal(xs, x[[3, 0]]) and ys.tolist() == [2, 0]
    with pytest.raises(CorruptedFilesError, match="folder not found"):
        load_imagenet_c(tmp_path, "fog", 3)
    with pytest.raises(CorruptedFilesError, match="no class folder 'n09'"):
        load_imagenet_c(tmp_path, "fog", 2, image_ids=["n09/z.JPEG"])


def test_cifar_c_identical_to_robustbench(tmp_path: Path, robustbench_data) -> None:
    # robustbench hard-codes 10,000 images per severity, so this file has the real size
    # (50,000 x 32 x 32 x 3); only the rows read are filled, the rest stays a sparse zero file.
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    per, n = 10_000, 8
    rng = np.random.default_rng(1)
    images = np.lib.format.open_memmap(
        root / "fog.npy", mode="w+", dtype=np.uint8, shape=(5 * per, 32, 32, 3)
    )
    for severity in (1, 5):
        start = (severity - 1) * per
        images[start : start + n] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images.flush()
    del images
    np.save(root / "labels.npy", np.tile(rng.integers(0, 10, per).astype(np.uint8), 5))
    for severity in (1, 5):
        xr, yr = robustbench_data.load_cifar10c(
            n_examples=n, severity=severity, data_dir=str(tmp_path), corruptions=("fog",)
        )
        xo, yo = load_cifar_c(root, "fog", severity, n_examples=n, as_float=True)
        assert xr.dtype == xo.dtype and torch.equal(xr, xo)
        assert torch.equal(yr.long(), yo)
        assert float(xo.std()) > 0.1  # the filled rows, not the zero padding


def test_imagenet_c_identical_to_robustbench(tmp_path: Path, robustbench_data) -> None:
    ids_file = (
        Path(robustbench_data.__file__).parent / "helper_files" / "imagenet_test_image_ids.txt"
    )
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    n = 6
    root = tmp_path / "ImageNet-C"
    # robustbench maps every listed wnid to a class folder, so all of them must exist.
    for wnid in {i.split("/")[0] for i in ids}:
        (root / "fog" / "3" / wnid).mkdir(parents=True, exist_ok=True)
    write_imagenet_c(root, "fog", 3, ids[:n])
    xr, yr = robustbench_data.load_imagenetc(
        n_examples=n, severity=3, data_dir=str(tmp_path), corruptions=("fog",)
    )
    xo, yo = load_imagenet_c(root, "fog", 3, image_ids=ids[:n])
    assert torch.equal(xr, xo)
    assert torch.equal(yr.long(), yo)
