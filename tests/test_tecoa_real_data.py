"""TeCoA on real data sets (``tecoa.data``): image folders and torchvision's formats, written
small by the tests; the splits the stage builds from them, a short stage run over them, and the
ViT-B/32 preset up to its clear offline errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _autoattack_short import short_autoattack  # noqa: F401 (a fixture)
from PIL import Image
from test_continual_datasets import write_cifar10, write_cifar100

from vpt_robust.config import ConfigError, load_params, validate
from vpt_robust.data import torchvision_sets as tvs

ROOT = Path(__file__).resolve().parent.parent
FOLDER_CLASSES = ("circle", "square", "star")


def write_image_folder(root: Path, per_class: int = 4, size: int = 40) -> Path:
    """root/<class>/<i>.png filled with 10 * class + i (so a draw can be read back), wider than
    high (the reader must resize and crop)."""
    for c, name in enumerate(FOLDER_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            x = np.full((size, size + 8, 3), 10 * c + i, dtype=np.uint8)
            x[:, -4:] = 200  # a strip the centre crop cuts off
            Image.fromarray(x).save(root / name / f"{i}.png")
    return root


def test_image_folder_reads_classes_in_sorted_order_resized_and_capped(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "train")
    full = tvs.load_image_folder(root, image_size=16)
    assert full.class_names == FOLDER_CLASSES
    assert full.images.shape == (12, 3, 16, 16) and full.images.dtype == torch.uint8
    assert full.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    centre = full.images[:, 0, 8, 8].tolist()  # a flat area keeps its value
    assert centre == [10 * c + i for c in range(3) for i in range(4)]
    capped = tvs.load_image_folder(root, per_class=2, seed=1, image_size=16)
    assert capped.labels.tolist() == [0, 0, 1, 1, 2, 2]
    again = tvs.load_image_folder(root, per_class=2, seed=1, image_size=16)
    assert torch.equal(capped.images, again.images)
    names = tmp_path / "names.txt"
    names.write_text("round thing\nbox\nstar shape\n")
    named = tvs.load_dataset("imagefolder", root, image_size=16, class_names=names)
    assert named.class_names == ("round thing", "box", "star shape")


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(tvs.DatasetFilesError, match=r"image folder: .*nowhere is not a directory"):
        tvs.load_image_folder(tmp_path / "nowhere")
    root = write_image_folder(tmp_path / "train")
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(tvs.DatasetFilesError, match="names 2 classes but .* has 3 class folders"):
        tvs.load_image_folder(root, class_names=names)
    (root / "empty").mkdir()
    with pytest.raises(tvs.DatasetFilesError, match=r"no images in .*empty"):
        tvs.load_image_folder(root)
    (root / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(tvs.DatasetFilesError, match=r"broken.png: cannot read as an image"):
        tvs.load_image_folder(root)
    with pytest.raises(ValueError, match="class_names is for imagefolder only"):
        tvs.load_dataset("cifar10", root, class_names=names)
    with pytest.raises(ValueError, match="'stl10' is not one of"):
        tvs.load_dataset("stl10", root)


def _data_block(train: Path, cifar: Path) -> dict:
    return {
        "train": {"dataset": "imagefolder", "root": str(train)},
        "eval": {
            "cifar10": {"dataset": "cifar10", "root": str(cifar), "split": "test"},
            "folder_again": {"dataset": "imagefolder", "root": str(train), "per_class": 1},
        },
        "image_size": 32,
    }


def test_tecoa_data_config_is_validated(tmp_path: Path) -> None:
    block = {"tecoa": {"data": _data_block(tmp_path, tmp_path), "autoattack_splits": ["novel"]}}
    with pytest.raises(ConfigError, match=r"autoattack_splits: \['novel'\] are not evaluation"):
        validate(block)
    bad = _data_block(tmp_path, tmp_path)
    bad["eval"]["cifar10"]["class_names"] = "names.txt"
    with pytest.raises(ConfigError, match="class_names is for dataset imagefolder only"):
        validate({"tecoa": {"data": bad, "autoattack_splits": ["cifar10"]}})
    ok = validate({"tecoa": {"data": _data_block(tmp_path, tmp_path),
                             "autoattack_splits": ["cifar10"]}})  # fmt: skip
    assert list(ok.tecoa.data.eval) == ["cifar10", "folder_again"]


def test_real_sets_train_on_one_set_and_evaluate_each_with_its_own_classes(tmp_path) -> None:
    from vpt_robust.stages.tecoa import tecoa_sets

    train = write_image_folder(tmp_path / "train")
    write_cifar10(tmp_path / "cifar")
    params = validate({
        "tecoa": {"data": _data_block(train, tmp_path / "cifar"), "n_train": 9, "n_test": 15,
                  "autoattack_splits": ["cifar10"]},
    })  # fmt: skip
    sets = tecoa_sets(params)
    assert sets.classes == list(FOLDER_CLASSES)
    assert len(sets.labels) == 9 and sets.images.shape[1:] == (3, 32, 32)
    cifar = sets.splits["cifar10"]
    assert cifar.classes[:2] == ["airplane", "automobile"] and len(cifar.classes) == 10
    assert len(cifar.labels) == 15  # n_test caps the 20 test images
    # test images carry 2 * label + 1 (test_continual_datasets' encoding): labels match images
    assert torch.equal(cifar.images[:, 0, 0, 0].long(), 2 * cifar.labels + 1)
    assert cifar.index.tolist() == sorted(cifar.index.tolist())
    folder = sets.splits["folder_again"]
    assert folder.labels.tolist() == [0, 1, 2] and folder.classes == list(FOLDER_CLASSES)
    assert sets.protocol["splits"]["cifar10"].startswith("cifar10 test split at")


@pytest.mark.usefixtures("short_autoattack")
def test_stage_on_real_data_writes_one_row_per_eval_set(tmp_path: Path) -> None:
    from vpt_robust.models.tiny_clip import build_tiny_clip, save_clip_checkpoint
    from vpt_robust.stages import tecoa as stage
    from vpt_robust.stages.common import Layout
    from vpt_robust.tracking import disabled_run

    train = write_image_folder(tmp_path / "train")
    write_cifar10(tmp_path / "cifar")
    paths = {k: str(tmp_path / k) for k in ("data", "outputs", "metrics")}
    params = load_params(ROOT / "params.yaml", overrides={
        "paths": paths, "runtime": {"device": "cpu"}, "tracking": {"enabled": False},
        "train": {"epochs": 1, "batch_size": 8},
        "tecoa": {
            "data": _data_block(train, tmp_path / "cifar"), "seeds": [0], "n_test": 10,
            "eval_eps": ["4/255"], "eval_steps": 2, "autoattack_eps": ["4/255"],
            "autoattack_samples": 4, "autoattack_splits": ["cifar10"], "autoattack_methods": None,
            "autoattack": True,
            "variants": [{"name": "vpt", "kind": "vpt", "length": 2}],
            "clean_prompt": False, "no_text": False, "finetune": False,
        },
    })  # fmt: skip
    torch.manual_seed(0)
    save_clip_checkpoint(build_tiny_clip(), Layout.of(params).checkpoint)
    out = stage.run(params, disabled_run())
    assert out["methods"] == ["zero_shot", "tecoa_vpt"]
    assert out["protocol"]["sizes"] == {"train": 12, "cifar10": 10, "folder_again": 3}
    for method in out["methods"]:
        assert set(out["results"][method]) == {"cifar10", "folder_again"}
        assert "autoattack_Linf_4/255" in out["results"][method]["cifar10"]
        assert "autoattack_Linf_4/255" not in out["results"][method]["folder_again"]


def test_the_clip_preset_stops_at_the_offline_backbone_and_reads_its_data(tmp_path) -> None:
    from vpt_robust.models.backbone import BackboneError
    from vpt_robust.stages import tecoa as stage
    from vpt_robust.stages.tecoa import tecoa_sets
    from vpt_robust.tracking import disabled_run

    paths = {k: str(tmp_path / k) for k in ("data", "outputs", "metrics")}
    base = {"paths": paths, "runtime": {"device": "cpu"}, "tracking": {"enabled": False}}
    params = load_params(ROOT / "params.yaml", preset="tecoa_clip_vit_b32", overrides=base)
    cfg = params.tecoa.data
    assert cfg is not None and cfg.train.dataset == "imagefolder" and cfg.image_size == 224
    assert set(cfg.eval) == {"imagenet_val", "cifar10", "cifar100"}
    assert (cfg.eval["cifar10"].split, cfg.train.per_class) == ("test", 50)
    with pytest.raises(BackboneError, match="not reachable"):
        stage.run(params, disabled_run())  # the backbone is loaded first (seconds, not minutes)
    with pytest.raises(tvs.DatasetFilesError, match="image folder: .* is not a directory"):
        tecoa_sets(params)  # the preset's roots do not exist here
    folder = write_image_folder(tmp_path / "imagenet")
    write_cifar10(tmp_path / "cifar")
    write_cifar100(tmp_path / "cifar")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(FOLDER_CLASSES) + "\n")
    at_folder = {"root": str(folder), "class_names": str(names)}
    block = {
        "train": at_folder,
        "eval": {"imagenet_val": at_folder, "cifar10": {"root": str(tmp_path / "cifar")},
                 "cifar100": {"root": str(tmp_path / "cifar")}},
    }  # fmt: skip
    params = load_params(
        ROOT / "params.yaml",
        preset="tecoa_clip_vit_b32",
        overrides={**base, "tecoa": {"data": block}},
    )
    sets = tecoa_sets(params)
    assert sets.images.shape == (12, 3, 224, 224) and sets.classes == list(FOLDER_CLASSES)
    assert {k: len(v.classes) for k, v in sets.splits.items()} == {
        "imagenet_val": 3, "cifar10": 10, "cifar100": 100,
    }  # fmt: skip
