"""Labelled images from local copies of torchvision data sets and image folders, and the
continual-learning task sequences built from them.

The files are read in the formats torchvision leaves on disk (nothing is downloaded at run time;
a missing file is a clear error naming the data set, the path expected and how to get it once).
Under one ``root``:

- CIFAR-10: ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``),
  the python pickles of https://www.cs.toronto.edu/~kriz/cifar.html.
- CIFAR-100: ``cifar-100-python/`` (``train``, ``test``, ``meta``); the 100 fine labels.
- MNIST / Fashion-MNIST: ``MNIST/raw/`` / ``FashionMNIST/raw/`` with
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, uncompressed or ``.gz``.
- SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` directly under ``root`` (torchvision's SVHN
  layout; label 10 is the digit 0).
- notMNIST (no torchvision class): ``notMNIST/Train/<A..J>/*.png`` and
  ``notMNIST/Test/<A..J>/*.png``, the layout of the Adversarial-Continual-Learning
  ``notMNIST.zip`` that the 5-datasets benchmark uses (L2P's PyTorch port reads the same).
- An image folder (torchvision's ``ImageFolder`` layout, e.g. ImageNet's ``train/``):
  ``root/<class>/<image>``, resized and centre-cropped as CLIP preprocesses.

Every reader returns uint8 images ``(N, 3, S, S)`` (grayscale repeated to three channels,
resized bilinearly to ``image_size`` S) with the data set's own train or test split, optionally
capped at ``per_class`` images per class (a seeded draw, made before any image is decoded or
resized). Class names are the data sets' names, written for the zero-shot head's templates
(``_`` -> space); the digit and letter sets get a qualifier (``handwritten digit 3``,
``house number 3``, ``letter C``) so that the 50 classes of 5-datasets stay distinct.

``torchvision_sequence`` builds the class-incremental ``TaskSequence`` of ``split_cifar100``
(100 classes in label order, ``tasks`` equal tasks; 10 x 10 by default) or ``five_datasets``
(CIFAR-10, MNIST, Fashion-MNIST, SVHN, notMNIST: one task of 10 classes each, labels offset by
10 per data set). Task training uses train images only, evaluation test images only.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vpt_robust.methods.continual import Task, TaskSequence

__all__ = [
    "SEQUENCES",
    "DatasetFilesError",
    "LabelledImages",
    "load_cifar10",
    "load_cifar100",
    "load_fashion_mnist",
    "load_mnist",
    "load_notmnist",
    "load_svhn",
    "DATASETS",
    "load_dataset",
    "load_image_folder",
    "read_idx",
    "torchvision_sequence",
]

Split = Literal["train", "test"]
SEQUENCES = ("split_cifar100", "five_datasets")
FASHION_NAMES = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
NOTMNIST_LETTERS = "ABCDEFGHIJ"
_TV = "python -c \"import torchvision; torchvision.datasets.{cls}('{root}', {arg}download=True)\""
_HOW = {
    "CIFAR-10": "download it once: " + _TV.format(cls="CIFAR10", root="{root}", arg=""),
    "CIFAR-100": "download it once: " + _TV.format(cls="CIFAR100", root="{root}", arg=""),
    "MNIST": "download it once: " + _TV.format(cls="MNIST", root="{root}", arg=""),
    "Fashion-MNIST": "download it once: " + _TV.format(cls="FashionMNIST", root="{root}", arg=""),
    "SVHN": "download it once, per split: "
    + _TV.format(cls="SVHN", root="{root}", arg="split='train', ")
    + " (and split='test')",
    "notMNIST": "download notMNIST.zip from github.com/facebookresearch/Adversarial-Continual-"
    "Learning (data/notMNIST.zip) and unzip it in {root}, giving notMNIST/Train/<A..J>/*.png "
    "and notMNIST/Test/<A..J>/*.png",
}


class DatasetFilesError(ValueError):
    """A local data set's root or file is missing or not in the format torchvision writes."""


@dataclass(frozen=True)
class LabelledImages:
    """One split of a data set: uint8 images (N, 3, S, S), int64 labels, the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")


def _need(path: Path, dataset: str, root: Path) -> Path:
    """``path`` if it exists, else a clear error: the data set, the path, how to get it."""
    if not path.exists():
        how = _HOW[dataset].format(root=root)
        raise DatasetFilesError(
            f"{dataset}: {path} not found (nothing is downloaded at run time); {how}"
        )
    return path


def _root(root: str | Path, dataset: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetFilesError(
            f"{dataset}: data root {path} is not a directory; " + _HOW[dataset].format(root=path)
        )
    return path


def _pick(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``per_class`` images of every class (seeded), in ascending order."""
    if per_class is None:
        return np.arange(len(labels))
    if per_class < 1:
        raise ValueError(f"per_class: expected >= 1 or None, got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in np.unique(labels).tolist():
        own = torch.from_numpy(np.flatnonzero(labels == c))
        keep.append(own[torch.randperm(len(own), generator=gen)[:per_class]])
    return torch.cat(keep).sort().values.numpy()


def _to_rgb(images: np.ndarray, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, C, H, W), C in {1, 3} -> uint8 (N, 3, size, size), bilinear, antialiased."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) == (size, size):
        return x.contiguous()
    out = torch.empty((len(x), 3, size, size), dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True)
        out[i : i + chunk] = part.round().clamp(0, 255).to(torch.uint8)
    return out


def _finish(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    per_class: int | None,
    seed: int,
    image_size: int,
) -> LabelledImages:
    keep = _pick(labels, per_class, seed)
    return LabelledImages(
        _to_rgb(images[keep], image_size),
        torch.from_numpy(labels[keep].astype(np.int64)),
        tuple(names),
    )


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")


# --------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's files are pickles of dicts of lists, bytes and numpy arrays: only numpy's
    array-rebuilding globals may load, so a crafted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _unpickle(path: Path, dataset: str, keys: Sequence[str]) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError) as exc:
        raise DatasetFilesError(f"{dataset}: {path} is not a CIFAR python pickle ({exc})") from None
    missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise DatasetFilesError(f"{dataset}: {path} lacks the entries {missing}")
    return entry


def _cifar(
    root: str | Path,
    dataset: str,
    folder: str,
    files: Sequence[str],
    label_key: str,
    meta: tuple[str, str],
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    base = _root(root, dataset)
    data, labels = [], []
    for name in files:
        path = _need(base / folder / name, dataset, base)
        entry = _unpickle(path, dataset, ("data", label_key))
        arr = np.asarray(entry["data"], dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
            raise DatasetFilesError(
                f"{dataset}: {path} data has shape {arr.shape}, expected (N, 3072)"
            )
        data.append(arr.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
        if len(labels[-1]) != len(data[-1]):
            raise DatasetFilesError(f"{dataset}: {path} has {len(data[-1])} images, "
                                    f"{len(labels[-1])} labels")  # fmt: skip
    meta_path = _need(base / folder / meta[0], dataset, base)
    names = [str(n).replace("_", " ") for n in _unpickle(meta_path, dataset, (meta[1],))[meta[1]]]
    y = np.concatenate(labels)
    if y.min() < 0 or y.max() >= len(names):
        raise DatasetFilesError(
            f"{dataset}: labels {int(y.min())}..{int(y.max())} outside the {len(names)} classes "
            f"of {meta_path}"
        )
    return np.concatenate(data), y, names


def load_cifar10(
    root: str | Path,
    split: Split = "train",
    *,
    per_class: int | None = None,
    seed: int = 0,
    image_size: int = 32,
) -> LabelledImages:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (the five train batches or ``test_batch``)."""
    _check_split(split)
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    x, y, names = _cifar(
        root, "CIFAR-10", "cifar-10-batches-py", files, "labels", ("batches.meta", "label_names")
    )
    return _finish(x, y, names, per_class, seed, image_size)


def load_cifar100(
    root: str | Path,
    split: Split = "train",
    *,
    per_class: int | None = None,
    seed: int = 0,
    image_size: int = 32,
) -> LabelledImages:
    """CIFAR-100 from ``root/cifar-100-python``: the 100 fine labels and their names."""
    _check_split(split)
    x, y, names = _cifar(
        root, "CIFAR-100", "cifar-100-python", [split], "fine_labels", ("meta", "fine_label_names")
    )
    return _finish(x, y, names, per_class, seed, image_size)


# --------------------------------------------------------------------------- MNIST-style idx


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format: big-endian header, uint8 payload), gz or not."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetFilesError(f"{path}: unreadable ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetFilesError(f"{path}: not a uint8 idx file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DatasetFilesError(
            f"{path}: header says {dims} ({int(np.prod(dims))} bytes), payload has "
            f"{len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _mnist_like(
    root: str | Path, dataset: str, folder: str, split: Split
) -> tuple[np.ndarray, np.ndarray]:
    _check_split(split)
    base = _root(root, dataset)
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        path = base / folder / "raw" / f"{prefix}-{kind}-ubyte"
        if not path.is_file() and path.with_name(path.name + ".gz").is_file():
            path = path.with_name(path.name + ".gz")
        arrays.append(read_idx(_need(path, dataset, base)))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetFilesError(
            f"{dataset}: images {images.shape} and labels {labels.shape} under "
            f"{base / folder / 'raw'} do not match (expected (N, H, W) and (N,))"
        )
    if labels.max(initial=0) > 9:
        raise DatasetFilesError(f"{dataset}: labels above 9 under {base / folder / 'raw'}")
    return images[:, None], labels.astype(np.int64)


def load_mnist(
    root: str | Path,
    split: Split = "train",
    *,
    per_class: int | None = None,
    seed: int = 0,
    image_size: int = 32,
) -> LabelledImages:
    """MNIST from ``root/MNIST/raw`` (torchvision's layout), grayscale -> 3 channels."""
    x, y = _mnist_like(root, "MNIST", "MNIST", split)
    names = [f"handwritten digit {d}" for d in range(10)]
    return _finish(x, y, names, per_class, seed, image_size)


def load_fashion_mnist(
    root: str | Path,
    split: Split = "train",
    *,
    per_class: int | None = None,
    seed: int = 0,
    image_size: int = 32,
) -> LabelledImages:
    """Fashion-MNIST from ``root/FashionMNIST/raw`` (torchvision's layout)."""
    x, y = _mnist_like(root, "Fashion-MNIST", "FashionMNIST", split)
    return _finish(x, y, FASHION_NAMES, per_class, seed, image_size)


# --------------------------------------------------------------------------- SVHN


def load_svhn(
    root: str | Path,
    split: Split = "train",
    *,
    per_class: int | None = None,
    seed: int = 0,
    image_size: int = 32,
) -> LabelledImages:
    """SVHN (cropped digits) from ``root/{train,test}_32x32.mat``; label 10 is the digit 0."""
    _check_split(split)
    base = _root(root, "SVHN")
    path = _need(base / f"{split}_32x32.mat", "SVHN", base)
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except (ValueError, OSError, TypeError) as exc:
        raise DatasetFilesError(f"SVHN: {path} is not a readable .mat file ({exc})") from None
    if "X" not in mat or "y" not in mat:
        raise DatasetFilesError(f"SVHN: {path} lacks the arrays 'X' and 'y'")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise DatasetFilesError(
            f"SVHN: {path} X has shape {x.shape}, expected (H, W, 3, N) with N = {len(y)} labels"
        )
    if y.min(initial=1) < 1 or y.max(initial=1) > 10:
        raise DatasetFilesError(f"SVHN: {path} labels outside 1..10")
    y[y == 10] = 0
    names = [f"house number {d}" for d in range(10)]
    return _finish(x.astype(np.uint8).transpose(3, 2, 0, 1), y, names, per_class, seed, image_size)


# --------------------------------------------------------------------------- notMNIST


def _decode_gray(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetFilesError(
            f"notMNIST: {path} is not a readable image ({exc}); remove it from the folder"
        ) from None


def load_notmnist(
    root: str | Path,
    split: Split = "train",
    *,
    per_class: int | None = None,
    seed: int = 0,
    image_size: int = 32,
) -> LabelledImages:
    """notMNIST letters A..J from ``root/notMNIST/{Train,Test}/<letter>/*.png`` (class = the
    letter's position in A..J); only the drawn images are decoded."""
    _check_split(split)
    base = _root(root, "notMNIST")
    folder = _need(base / "notMNIST" / ("Train" if split == "train" else "Test"), "notMNIST", base)
    paths: list[Path] = []
    labels: list[int] = []
    for c, letter in enumerate(NOTMNIST_LETTERS):
        files = sorted(_need(folder / letter, "notMNIST", base).glob("*.png"))
        if not files:
            raise DatasetFilesError(f"notMNIST: no .png images in {folder / letter}")
        paths.extend(files)
        labels.extend([c] * len(files))
    y = np.asarray(labels, dtype=np.int64)
    keep = _pick(y, per_class, seed)
    decoded = [_decode_gray(paths[i]) for i in keep]
    if len({img.shape for img in decoded}) == 1:
        images = _to_rgb(np.stack(decoded)[:, None], image_size)
    else:  # sizes differ: resize one by one
        images = torch.cat([_to_rgb(img[None, None], image_size) for img in decoded])
    names = [f"letter {letter}" for letter in NOTMNIST_LETTERS]
    return LabelledImages(images, torch.from_numpy(y[keep]), tuple(names))


# --------------------------------------------------------------------------- image folders


def _folder_names(root: Path, folders: list[Path], class_names: str | Path | None) -> list[str]:
    if class_names is None:
        return [f.name.replace("_", " ") for f in folders]
    path = Path(class_names).expanduser()
    if not path.is_file():
        raise DatasetFilesError(f"image folder: class_names file {path} not found")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if len(names) != len(folders):
        raise DatasetFilesError(
            f"image folder: {path} names {len(names)} classes but {root} has {len(folders)} "
            "class folders (one name per line, in the folders' sorted order)"
        )
    return names


def load_image_folder(
    root: str | Path,
    split: Split = "train",
    *,
    per_class: int | None = None,
    seed: int = 0,
    image_size: int = 224,
    class_names: str | Path | None = None,
) -> LabelledImages:
    """torchvision's ``ImageFolder`` layout: ``root/<class>/<image>`` (class = the sorted
    folder's position; ImageNet's ``train/`` or ``val/`` folder is such a root). ``split`` is
    not used (the root is one split). Images are resized so the shorter side is
    ``image_size`` and centre-cropped (CLIP's preprocessing); only the drawn images are
    decoded. ``class_names``: a text file with one name per line in the folders' order (for
    ImageNet's wnid folders); by default the folder names (``_`` -> space)."""
    from vpt_robust.data.images import IMAGE_SUFFIXES, read_image

    _check_split(split)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetFilesError(f"image folder: {base} is not a directory (root/<class>/<image>)")
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    if not folders:
        raise DatasetFilesError(f"image folder: {base} has no class sub-folders")
    paths: list[Path] = []
    labels: list[int] = []
    for c, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetFilesError(f"image folder: no images in {folder}")
        paths.extend(files)
        labels.extend([c] * len(files))
    y = np.asarray(labels, dtype=np.int64)
    keep = _pick(y, per_class, seed)
    try:
        images = torch.stack([read_image(paths[i], image_size) for i in keep])
    except ValueError as exc:
        raise DatasetFilesError(f"image folder: {exc}") from None
    names = _folder_names(base, folders, class_names)
    return LabelledImages(images, torch.from_numpy(y[keep]), tuple(names))


# --------------------------------------------------------------------------- sequences

FIVE_DATASETS: tuple[tuple[str, Callable[..., LabelledImages]], ...] = (
    ("cifar10", load_cifar10),
    ("mnist", load_mnist),
    ("fashion_mnist", load_fashion_mnist),
    ("svhn", load_svhn),
    ("notmnist", load_notmnist),
)


DATASETS: dict[str, Callable[..., LabelledImages]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "svhn": load_svhn,
    "notmnist": load_notmnist,
    "imagefolder": load_image_folder,
}


def load_dataset(name: str, root: str | Path, split: Split = "train", **kw: Any) -> LabelledImages:
    """The reader ``DATASETS[name]`` (keywords: ``per_class``, ``seed``, ``image_size``; an
    image folder also takes ``class_names``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset: {name!r} is not one of {sorted(DATASETS)}")
    if kw.get("class_names") is not None and name != "imagefolder":
        raise ValueError(f"dataset: class_names is for imagefolder only, not {name!r}")
    if name != "imagefolder":
        kw.pop("class_names", None)
    return DATASETS[name](root, split, **kw)


def _assemble(
    parts: Sequence[tuple[str, tuple[int, ...], LabelledImages, LabelledImages]],
    class_names: tuple[str, ...],
) -> TaskSequence:
    """Tasks ``(name, classes, train, test)`` with global labels -> one TaskSequence whose
    images are every task's train images, then every task's test images."""
    images, labels, spans = [], [], []
    start = 0
    for _, _, train, test in parts:
        for split in (train, test):
            images.append(split.images)
            labels.append(split.labels)
            spans.append(torch.arange(start, start + len(split.labels)))
            start += len(split.labels)
    tasks = [
        Task(name, classes, spans[2 * i], spans[2 * i + 1])
        for i, (name, classes, _, _) in enumerate(parts)
    ]
    return TaskSequence(torch.cat(images), torch.cat(labels), class_names, tasks, "class")


def _split_cifar100(
    root: str | Path, n_train: int | None, n_test: int | None, seed: int, size: int, tasks: int
) -> TaskSequence:
    train = load_cifar100(root, "train", per_class=n_train, seed=seed, image_size=size)
    test = load_cifar100(root, "test", per_class=n_test, seed=seed + 1, image_size=size)
    n = len(train.class_names)
    if tasks < 2 or n % tasks:
        raise ValueError(f"continual.tasks: {n} CIFAR-100 classes do not split into {tasks} tasks")
    per = n // tasks
    parts = []
    for t in range(tasks):
        cls = tuple(range(t * per, (t + 1) * per))
        keep = torch.tensor(cls)

        def sub(s: LabelledImages, keep: torch.Tensor = keep) -> LabelledImages:
            m = torch.isin(s.labels, keep)
            return LabelledImages(s.images[m], s.labels[m], s.class_names)

        parts.append((f"task{t}", cls, sub(train), sub(test)))
    return _assemble(parts, train.class_names)


def _five_datasets(
    root: str | Path, n_train: int | None, n_test: int | None, seed: int, size: int
) -> TaskSequence:
    parts, names = [], []
    for d, (name, load) in enumerate(FIVE_DATASETS):
        train = load(root, "train", per_class=n_train, seed=seed + 2 * d, image_size=size)
        test = load(root, "test", per_class=n_test, seed=seed + 2 * d + 1, image_size=size)
        offset = 10 * d
        classes = tuple(range(offset, offset + 10))
        shifted = [
            LabelledImages(s.images, s.labels + offset, s.class_names) for s in (train, test)
        ]
        parts.append((name, classes, *shifted))
        names.extend(train.class_names)
    return _assemble(parts, tuple(names))


def torchvision_sequence(
    name: str,
    root: str | Path,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    tasks: int | None = None,
) -> TaskSequence:
    """The class-incremental sequence ``name`` (``split_cifar100`` or ``five_datasets``) from
    the files under ``root``: at most ``n_train`` train / ``n_test`` test images per class (a
    draw seeded by ``seed``; None: all), resized to ``image_size``. ``tasks``: the number of
    equal CIFAR-100 tasks (default 10); five_datasets has 5 (one per data set)."""
    if name not in SEQUENCES:
        raise ValueError(f"continual.data: {name!r} is not one of {list(SEQUENCES)}")
    path = Path(root).expanduser()
    if not path.is_dir():
        wants = (
            "cifar-100-python/"
            if name == "split_cifar100"
            else "cifar-10-batches-py/, MNIST/raw/, FashionMNIST/raw/, train_32x32.mat and "
            "test_32x32.mat (SVHN), notMNIST/{Train,Test}/<A..J>/"
        )
        raise DatasetFilesError(
            f"{name}: data root {path} (continual.root) is not a directory; it must hold {wants} "
            "in torchvision's on-disk layout (vpt_robust/data/torchvision_sets.py)"
        )
    if name == "split_cifar100":
        return _split_cifar100(root, n_train, n_test, seed, image_size, tasks or 10)
    if tasks not in (None, len(FIVE_DATASETS)):
        raise ValueError(
            f"continual.tasks: five_datasets has {len(FIVE_DATASETS)} tasks (one per data set), "
            f"got {tasks}"
        )
    return _five_datasets(root, n_train, n_test, seed, image_size)
