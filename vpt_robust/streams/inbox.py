"""An arriving stream folder: validation, its DVC content hash, reading it, watching the inbox.

A stream folder is flat (images, optionally ``labels.csv`` with columns ``file,label``) or holds
one sub-folder per class (the sub-folder's name is the label). Validation decodes every image
and checks its size, the labels file and the layout; every problem is a ``StreamFolderError``
naming the file. The content hash is the one ``dvc add`` records for the folder (DVC's own
``dvc_data`` builds it: md5 of the sorted file list with each file's md5, suffixed ``.dir``), so
the same content under any folder name is the same version, and the hash can be checked with
DVC itself.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vpt_robust.data.images import IMAGE_SUFFIXES, read_image

LABELS_FILE = "labels.csv"


class StreamFolderError(ValueError):
    """A stream folder that cannot be adapted on; the message names the file."""


@dataclass(frozen=True)
class StreamFolder:
    """A validated stream folder: its image files (relative paths, sorted), their labels (class
    names, or None without labels) and the DVC record of its content."""

    root: Path
    files: list[str]
    labels: list[str] | None
    sizes: list[tuple[int, int]]
    data_hash: str
    nbytes: int
    nfiles: int
    label_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def dvc_record(self) -> dict[str, Any]:
        """The ``outs`` entry ``dvc add`` writes for this folder (a ``.dvc`` file's content)."""
        return {
            "outs": [
                {
                    "md5": self.data_hash,
                    "size": self.nbytes,
                    "nfiles": self.nfiles,
                    "hash": "md5",
                    "path": self.root.name,
                }
            ]
        }


def dvc_hash(path: str | Path) -> tuple[str, int, int]:
    """(md5 ``....dir``, total size, file count) of a folder, as ``dvc add`` computes them."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="vpt-dvc-hash-") as tmp:
        _, meta, obj = build(
            HashFileDB(fs, tmp), str(Path(path).resolve()), fs, "md5", dry_run=True
        )
    return str(obj.hash_info.value), int(meta.size or 0), int(meta.nfiles or 0)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _layout(root: Path) -> tuple[list[str], list[str] | None, str | None]:
    """(image files relative to root, labels from class folders or None, label source)."""
    entries = sorted(p for p in root.iterdir() if not _is_hidden(p))
    dirs = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    images: list[str] = []
    labels: list[str] | None = None
    if dirs:
        stray = [p for p in files if p.name != LABELS_FILE]
        if stray:
            raise StreamFolderError(
                f"{stray[0]}: a folder with class sub-folders holds no files of its own "
                f"(put images under a class folder)"
            )
        if any(p.name == LABELS_FILE for p in files):
            raise StreamFolderError(
                f"{root / LABELS_FILE}: give labels either by class sub-folders or by "
                f"{LABELS_FILE}, not both"
            )
        labels = []
        for d in dirs:
            for p in sorted(q for q in d.iterdir() if not _is_hidden(q)):
                if p.is_dir():
                    raise StreamFolderError(f"{p}: class folders hold images, not folders")
                images.append(str(p.relative_to(root)))
                labels.append(d.name)
        return images, labels, "folders"
    for p in files:
        if p.name == LABELS_FILE:
            continue
        images.append(p.name)
    return images, None, None


def _read_labels(path: Path, images: list[str]) -> list[str]:
    """Labels of ``images`` from ``labels.csv`` (``file,label``; every image labelled once)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise StreamFolderError(f"{path}: the labels file is empty (expected a header file,label)")
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise StreamFolderError(
            f"{path}: expected a header 'file,label' and one row per image, got "
            f"{text.splitlines()[0]!r}"
        )
    found: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        name, label = (row.get("file") or "").strip(), (row.get("label") or "").strip()
        if not name or not label:
            raise StreamFolderError(f"{path}: line {i}: empty file or label")
        if name in found:
            raise StreamFolderError(f"{path}: line {i}: {name!r} is labelled twice")
        if name not in images:
            raise StreamFolderError(f"{path}: line {i}: {name!r} is not an image of the folder")
        found[name] = label
    missing = [f for f in images if f not in found]
    if missing:
        raise StreamFolderError(f"{path}: no label for {missing[0]!r} ({len(missing)} unlabelled)")
    return [found[f] for f in images]


def _check_image(path: Path, min_size: int) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise StreamFolderError(
            f"{path}: not an image file (known suffixes: {', '.join(IMAGE_SUFFIXES)})"
        )
    try:
        with Image.open(path) as img:
            img.load()  # decode every byte: a truncated file fails here, not mid-stream
            size = img.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise StreamFolderError(f"{path}: cannot be decoded as an image ({exc})") from None
    if min(size) < min_size:
        raise StreamFolderError(
            f"{path}: {size[0]}x{size[1]} px is smaller than streams.min_image_size {min_size}"
        )
    return size


def validate_folder(
    path: str | Path, *, min_size: int = 8, max_images: int = 10_000
) -> StreamFolder:
    """Check a stream folder (layout, every image decodes and is large enough, the labels
    file) and hash its content the DVC way; ``StreamFolderError`` names the offending file."""
    root = Path(path)
    if not root.is_dir():
        raise StreamFolderError(f"{root}: no such folder")
    images, labels, source = _layout(root)
    if not images:
        raise StreamFolderError(
            f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder or its class "
            "sub-folders"
        )
    if len(images) > max_images:
        raise StreamFolderError(
            f"{root}: {len(images)} images exceed streams.max_images {max_images}"
        )
    sizes = [_check_image(root / f, min_size) for f in images]
    if (root / LABELS_FILE).is_file() and labels is None:
        labels, source = _read_labels(root / LABELS_FILE, images), LABELS_FILE
    data_hash, nbytes, nfiles = dvc_hash(root)
    return StreamFolder(root, images, labels, sizes, data_hash, nbytes, nfiles, source)


def read_stream(
    folder: StreamFolder, image_size: int, class_names: list[str]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The folder's images as float [0,1] (N, 3, S, S) at the model's size (shorter side resized,
    centre crop, as ``predict``), and its labels as class indices (None without labels)."""
    images = torch.stack([read_image(folder.root / f, image_size) for f in folder.files])
    if folder.labels is None:
        return images.float() / 255, None
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({lab for lab in folder.labels if lab not in index})
    if unknown:
        where = folder.root / (LABELS_FILE if folder.label_source == LABELS_FILE else "")
        raise StreamFolderError(
            f"{where}: labels {unknown} are not classes of the model {class_names}"
        )
    return images.float() / 255, torch.tensor([index[lab] for lab in folder.labels])


# --------------------------------------------------------------------------- watching


def folder_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(relative path, size, mtime ns) of every file below ``path``: changes while it is written."""
    out = []
    for dirpath, _, names in os.walk(path):
        for name in names:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


class InboxWatcher:
    """Finds the stream folders that arrived in ``inbox``: a sub-folder (not hidden) is ready
    once its files were unchanged for ``settle_seconds``; each ready content is reported once
    (a folder rewritten in place is reported again). Plain polling: no orchestrator here."""

    def __init__(self, inbox: str | Path, settle_seconds: float = 2.0) -> None:
        self.inbox = Path(inbox)
        self.settle = settle_seconds
        self._seen: dict[Path, tuple[tuple, float]] = {}  # signature and when it was first seen
        self._reported: dict[Path, tuple] = {}

    def poll(self, now: float | None = None) -> list[Path]:
        """The folders that became ready since the last call (absolute paths, sorted)."""
        now = time.monotonic() if now is None else now
        if not self.inbox.is_dir():
            return []
        ready = []
        current = {p.resolve() for p in self.inbox.iterdir() if p.is_dir() and not _is_hidden(p)}
        for gone in set(self._seen) - current:
            self._seen.pop(gone)
            self._reported.pop(gone, None)
        for path in sorted(current):
            sig = folder_signature(path)
            prev = self._seen.get(path)
            if prev is None or prev[0] != sig:
                self._seen[path] = (sig, now)
                prev = self._seen[path]
            if now - prev[1] >= self.settle and self._reported.get(path) != sig:
                self._reported[path] = sig
                ready.append(path)
        return ready
