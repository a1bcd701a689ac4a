"""The versions of the adapted state, one per adapted stream, and the atomic "latest" pointer.

Layout of a store::

    <store>/latest                 the latest version number (text); absent: none yet
    <store>/versions/<k>/state.pt  the adapter's state_dict (prompts, teacher, importance, ...)
    <store>/versions/<k>/version.json   data hash, parent version, method, metrics, MLflow run
    <store>/versions/<k>/stream.dvc     the DVC record of the stream folder (``dvc add``'s outs)
    <store>/work/<hash>/checkpoint.pt   the resumable checkpoint of a stream being adapted
    <store>/.lock                  held while a stream is adapted and saved (one at a time)

A version is written into a temporary folder, renamed into ``versions/`` and only then made
latest by an ``os.replace`` of the pointer file: a failure at any step leaves the previous
latest as it was, and a version above ``latest`` (a crash between the two renames) is not
a version (it is removed by the next save). Versions are numbered under the lock, so two
streams saved at once never lose an update.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
RECORD_FILE = "version.json"
DVC_FILE = "stream.dvc"


class VersionError(ValueError):
    """A version that does not exist or does not fit the current source model or method."""


class Registry:
    """The version store at ``root`` (see the module doc)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------ reading
    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def latest(self) -> int | None:
        """The latest version number, None before the first."""
        path = self.root / "latest"
        if not path.is_file():
            return None
        text = path.read_text().strip()
        return int(text) if text else None

    def versions(self) -> list[dict[str, Any]]:
        """Every committed version's record, oldest first."""
        latest = self.latest()
        if latest is None or not self.versions_dir.is_dir():
            return []
        numbers = sorted(
            int(p.name) for p in self.versions_dir.iterdir() if p.name.isdigit() and p.is_dir()
        )
        return [self.record(k) for k in numbers if k <= latest]

    def record(self, version: int) -> dict[str, Any]:
        path = self.versions_dir / str(version) / RECORD_FILE
        latest = self.latest()
        if latest is None or version > latest or not path.is_file():
            known = [r["version"] for r in self.versions()] if latest is not None else []
            raise VersionError(f"version {version} does not exist in {self.root} (known: {known})")
        return json.loads(path.read_text())

    def find_hash(self, data_hash: str) -> dict[str, Any] | None:
        """The version that adapted on the content ``data_hash``, if any."""
        for rec in self.versions():
            if rec["data_hash"] == data_hash:
                return rec
        return None

    def load_state(self, version: int) -> dict[str, Any]:
        """The adapter state_dict saved with ``version`` (tensors only: ``weights_only``)."""
        self.record(version)
        path = self.versions_dir / str(version) / STATE_FILE
        return torch.load(path, map_location="cpu", weights_only=True)

    # ------------------------------------------------------------ writing
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive for the store (flock: threads and processes alike)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _next_number(self) -> int:
        latest = self.latest() or 0
        if self.versions_dir.is_dir():
            for p in self.versions_dir.iterdir():  # uncommitted leftovers of a crash
                if p.name.isdigit() and int(p.name) > latest:
                    shutil.rmtree(p, ignore_errors=True)
        return latest + 1

    def save(
        self, state: dict[str, Any], record: dict[str, Any], dvc_record: dict[str, Any]
    ) -> int:
        """Write a new version and make it latest, atomically; call under ``lock()``.
        Returns its number; ``record`` gets ``version`` added."""
        import yaml

        k = self._next_number()
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_dir / f".tmp-{uuid.uuid4().hex}"
        final = self.versions_dir / str(k)
        tmp.mkdir()
        try:
            torch.save(state, tmp / STATE_FILE)
            rec = {**record, "version": k}
            (tmp / RECORD_FILE).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
            (tmp / DVC_FILE).write_text(yaml.safe_dump(dvc_record, sort_keys=False))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            self._set_latest(k)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        return k

    def _set_latest(self, version: int) -> None:
        tmp = self.root / f".latest-{uuid.uuid4().hex}"
        tmp.write_text(f"{version}\n")
        os.replace(tmp, self.root / "latest")

    # ------------------------------------------------------------ checkpoints
    def checkpoint_path(self, data_hash: str) -> Path:
        return self.root / "work" / data_hash.replace(".", "_") / "checkpoint.pt"

    def write_checkpoint(self, data_hash: str, payload: dict[str, Any]) -> None:
        path = self.checkpoint_path(data_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"checkpoint-{uuid.uuid4().hex}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def read_checkpoint(self, data_hash: str) -> dict[str, Any] | None:
        path = self.checkpoint_path(data_hash)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def drop_checkpoint(self, data_hash: str) -> None:
        shutil.rmtree(self.checkpoint_path(data_hash).parent, ignore_errors=True)
