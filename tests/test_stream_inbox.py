"""New domain streams, without Prefect: validation, DVC hash, versions, resume, atomic latest."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from _stream_fixtures import make_folder, stream_params, tiny_checkpoint

from vpt_robust.config import validate
from vpt_robust.streams import (
    InboxWatcher,
    Registry,
    StreamFolderError,
    list_versions,
    process_folder,
    validate_folder,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _params(root: Path, ckpt: Path, **streams: Any):
    return validate(stream_params(root, ckpt, **streams))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_hash_is_what_dvc_add_records_and_ignores_the_folder_name(tmp_path: Path) -> None:
    import yaml
    from dvc.repo import Repo

    folder = validate_folder(make_folder(tmp_path / "first", n=6))
    renamed = validate_folder(shutil.copytree(tmp_path / "first", tmp_path / "other-name"))
    assert renamed.data_hash == folder.data_hash and folder.data_hash.endswith(".dir")

    repo_dir = tmp_path / "repo"
    shutil.copytree(tmp_path / "first", repo_dir / "stream")
    repo = Repo.init(str(repo_dir), no_scm=True)
    try:
        repo.add(str(repo_dir / "stream"))
    finally:
        repo.close()
    recorded = yaml.safe_load((repo_dir / "stream.dvc").read_text())["outs"][0]
    assert recorded == folder.dvc_record()["outs"][0] | {"path": "stream"}

    edited = tmp_path / "other-name" / "img_000.png"
    edited.write_bytes(edited.read_bytes() + b"\0")  # one more byte: another content
    assert validate_folder(tmp_path / "other-name").data_hash != folder.data_hash


def _undecodable(p: Path) -> str:
    (p / "img_002.png").write_bytes(b"not a png at all")
    return "img_002.png"


def _truncated(p: Path) -> str:
    data = (p / "img_001.png").read_bytes()
    (p / "img_001.png").write_bytes(data[: len(data) // 2])
    return "img_001.png"


def _empty_labels(p: Path) -> str:
    (p / "labels.csv").write_text("")
    return "labels.csv"


def _unlabelled(p: Path) -> str:
    lines = (p / "labels.csv").read_text().splitlines()
    (p / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")
    return "img_003.png"


def _stray_file(p: Path) -> str:
    (p / "notes.txt").write_text("hello")
    return "notes.txt"


def _no_images(p: Path) -> str:
    for f in p.glob("*.png"):
        f.unlink()
    (p / "labels.csv").unlink()
    return "no image files"


@pytest.mark.parametrize(
    "spoil", [_undecodable, _truncated, _empty_labels, _unlabelled, _stray_file, _no_images]
)
def test_a_bad_folder_fails_naming_the_file(tmp_path: Path, spoil) -> None:
    folder = make_folder(tmp_path / "s", n=4)
    validate_folder(folder)  # fine before it is spoiled
    needle = spoil(folder)
    with pytest.raises(StreamFolderError, match=needle.replace(".", r"\.")):
        validate_folder(folder)


def test_too_small_images_and_unknown_labels_are_refused(tmp_path: Path, ckpt: Path) -> None:
    small = make_folder(tmp_path / "small", n=2, size=6)
    with pytest.raises(StreamFolderError, match=r"img_000\.png: 6x6 px is smaller"):
        validate_folder(small)
    odd = make_folder(tmp_path / "odd", n=4, labels="folders")
    (odd / "star").rename(odd / "hexagon")
    with pytest.raises(StreamFolderError, match=r"\['hexagon'\] are not classes"):
        process_folder(odd, _params(tmp_path, ckpt))
    assert Registry(tmp_path / "store").latest() is None


def test_versions_chain_known_content_adapts_nothing_and_from_version(
    tmp_path: Path, ckpt: Path
) -> None:
    params = _params(tmp_path, ckpt)
    a = process_folder(make_folder(tmp_path / "a", seed=1), params)
    assert (a["status"], a["version"], a["parent"]) == ("adapted", 1, None)
    assert a["metrics"]["labelled"] and "error" in a["metrics"]["source"]
    assert set(a["metrics"]["adapted"]) == {"error", "confidence", "entropy", "robust_accuracy"}
    again = process_folder(shutil.copytree(tmp_path / "a", tmp_path / "a-again"), params)
    assert (again["status"], again["version"]) == ("known", 1)
    b = process_folder(make_folder(tmp_path / "b", seed=2, labels=None), params)
    assert (b["version"], b["parent"]) == (2, 1)
    assert "error" not in b["metrics"]["adapted"] and "robust_consistency" in b["metrics"]["source"]
    c = process_folder(
        make_folder(tmp_path / "c", seed=3, labels="folders"), params, from_version=1
    )
    assert (c["version"], c["parent"]) == (3, 1)
    rows = list_versions(params)
    assert [(r["version"], r["parent"], r["latest"]) for r in rows] == [
        (1, None, False),
        (2, 1, False),
        (3, 1, True),
    ]
    reg = Registry(tmp_path / "store")
    # the parent's adapted prompts are where version 2 started: its state moved on from them
    assert not _equal(reg.load_state(1)["state"], reg.load_state(2)["state"])


def test_killed_mid_stream_resumes_to_the_uninterrupted_state(tmp_path: Path, ckpt: Path) -> None:
    folder = make_folder(tmp_path / "s", n=16, seed=4)  # 4 batches, checkpoint after batch 2
    whole = process_folder(folder, _params(tmp_path / "whole", ckpt))
    expected = Registry(tmp_path / "whole" / "store").load_state(1)

    params = _params(tmp_path / "killed", ckpt)

    def kill(k: int) -> None:
        if k == 2:  # past the checkpoint written after batch 2 (k == 1)
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        process_folder(folder, params, on_batch=kill)
    store = Registry(tmp_path / "killed" / "store")
    assert store.latest() is None and store.checkpoint_path(whole["data_hash"]).is_file()
    seen: list[int] = []
    resumed = process_folder(folder, params, on_batch=seen.append)
    assert seen == [2, 3]  # resumed at the checkpoint, not from the start
    assert _equal(store.load_state(1), expected)
    assert resumed["metrics"] == whole["metrics"]
    assert not store.checkpoint_path(whole["data_hash"]).exists()


def test_a_failed_save_leaves_latest_untouched(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    params = _params(tmp_path, ckpt)
    process_folder(make_folder(tmp_path / "a", seed=1), params)
    reg = Registry(tmp_path / "store")
    before = reg.load_state(1)

    def boom(self: Registry, version: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Registry, "_set_latest", boom)
    with pytest.raises(OSError, match="disk full"):
        process_folder(make_folder(tmp_path / "b", seed=2), params)
    assert reg.latest() == 1 and [r["version"] for r in reg.versions()] == [1]
    assert not (reg.versions_dir / "2").exists() and _equal(reg.load_state(1), before)
    monkeypatch.undo()
    b = process_folder(tmp_path / "b", params)
    assert (b["status"], b["version"], b["parent"]) == ("adapted", 2, 1)


def test_two_folders_at_once_are_adapted_one_after_the_other(tmp_path: Path, ckpt: Path) -> None:
    params = _params(tmp_path, ckpt)
    folders = [make_folder(tmp_path / n, seed=s) for n, s in (("a", 1), ("b", 2))]
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def work(f: Path) -> None:
        try:
            results[f.name] = process_folder(f, params)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    chain = sorted((r["version"], r["parent"]) for r in results.values())
    assert chain == [(1, None), (2, 1)]  # the second started from the first: no lost update
    assert Registry(tmp_path / "store").latest() == 2


def test_watcher_reports_a_settled_folder_once(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = InboxWatcher(inbox, settle_seconds=2.0)
    make_folder(inbox / "s", n=2)
    (inbox / ".partial").mkdir()  # hidden: being written elsewhere
    assert watcher.poll(now=0.0) == []
    assert watcher.poll(now=1.0) == []
    assert watcher.poll(now=2.5) == [(inbox / "s").resolve()]
    assert watcher.poll(now=10.0) == []
    (inbox / "s" / "img_000.png").write_bytes(b"rewritten")  # changed: settles again
    assert watcher.poll(now=11.0) == []
    assert watcher.poll(now=13.5) == [(inbox / "s").resolve()]
