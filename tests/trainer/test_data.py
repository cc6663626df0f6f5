"""Data formats (VTAB lists, FGVC json, ImageFolder), detection, errors with file:line, transforms."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
from PIL import Image
from torchvision import transforms as T

from trainer.data import (
    ImageDataset,
    build_transform,
    detect_format,
    load_task_data,
    resolve_data_dir,
    task_data_config,
)
from trainer.errors import DataError
from trainer.tasks import BUILTIN_TASKS, Task


def vtab_task(**kw: object) -> Task:
    return Task("dtd_mini", transform="vtab", **kw)


def test_vtab_layout(layouts: SimpleNamespace, tmp_path: Path) -> None:
    d = layouts.vtab(tmp_path)
    assert detect_format(d) == "vtab"
    data = load_task_data(vtab_task(num_classes=3), tmp_path)  # finds <root>/<task name>
    assert data.format == "vtab" and data.root == d
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 9, "test": 3}  # train800val200
    assert data.labels == ["0", "1", "2"]
    assert data.splits["train"][0] == (d / "images/000.jpg", 0)
    held = load_task_data(vtab_task(num_classes=3), tmp_path, holdout_val=True)
    assert {k: len(v) for k, v in held.splits.items()} == {"train": 6, "val": 3, "test": 3}


def test_vtab_class_count_comes_from_the_recipe(layouts: SimpleNamespace, tmp_path: Path) -> None:
    # A 1k subset can miss classes (sun397): the head still has the recipe's class count.
    layouts.vtab(tmp_path, n_classes=3)
    assert load_task_data(vtab_task(num_classes=5), tmp_path).num_classes == 5
    assert load_task_data(vtab_task(), tmp_path).num_classes == 3  # user task: max label + 1


def test_vtab_malformed_line_names_file_and_line(layouts: SimpleNamespace, tmp_path: Path) -> None:
    d = layouts.vtab(tmp_path)
    rows = (d / "test.txt").read_text().splitlines()
    rows.insert(1, "images/001.jpg not-a-label")
    (d / "test.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"test\.txt:2: expected '<relative/path> <int label>'"):
        load_task_data(vtab_task(), tmp_path)


def test_vtab_missing_image_names_file_and_line(layouts: SimpleNamespace, tmp_path: Path) -> None:
    d = layouts.vtab(tmp_path)
    (d / "images/010.jpg").unlink()  # the second line of test.txt
    with pytest.raises(DataError, match=r"test\.txt:2: image not found: .*010\.jpg"):
        load_task_data(vtab_task(), tmp_path)


def test_vtab_label_out_of_range(layouts: SimpleNamespace, tmp_path: Path) -> None:
    layouts.vtab(tmp_path, n_classes=3)
    with pytest.raises(DataError, match=r"train800val200\.txt:3: label 2 out of range for 2 classes"):
        load_task_data(vtab_task(num_classes=2), tmp_path)


def test_vtab_missing_list_file(layouts: SimpleNamespace, tmp_path: Path) -> None:
    d = layouts.vtab(tmp_path)
    (d / "test.txt").unlink()
    with pytest.raises(DataError, match=r"test\.txt: file not found"):
        load_task_data(vtab_task(format="vtab"), tmp_path)


def test_fgvc_layout(layouts: SimpleNamespace, tmp_path: Path) -> None:
    d = layouts.fgvc(tmp_path)
    assert detect_format(d) == "fgvc"
    task = BUILTIN_TASKS["cub"]
    data = load_task_data(Task("cub", num_classes=2, transform="fgvc", format="fgvc",
                               data_dirs=task.data_dirs), tmp_path)
    assert data.root == d
    # Ids 5 and 9 become 0 and 1 (sorted); names come from the image folders.
    assert data.labels == ["005.Red_Bird", "009.Blue_Bird"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "test": 4}  # trainval
    assert data.splits["test"][0] == (d / "images/009.Blue_Bird/4.jpg", 1)
    held = load_task_data(Task("cub", format="fgvc", data_dirs=task.data_dirs), tmp_path, holdout_val=True)
    assert {k: len(v) for k, v in held.splits.items()} == {"train": 6, "val": 2, "test": 4}


def test_fgvc_recipe_class_count_must_match(layouts: SimpleNamespace, tmp_path: Path) -> None:
    layouts.fgvc(tmp_path)
    with pytest.raises(DataError, match="found 2 classes, task 'cub' has 200"):
        load_task_data(BUILTIN_TASKS["cub"], tmp_path)


def test_fgvc_invalid_json_names_line(layouts: SimpleNamespace, tmp_path: Path) -> None:
    d = layouts.fgvc(tmp_path)
    (d / "test.json").write_text('{\n  "a.jpg": 1,\n  "b.jpg" 2\n}\n')
    with pytest.raises(DataError, match=r"test\.json:3: invalid JSON"):
        load_task_data(Task("x", format="fgvc"), d)


def test_fgvc_bad_class_id_and_missing_image_name_line(layouts: SimpleNamespace, tmp_path: Path) -> None:
    d = layouts.fgvc(tmp_path)
    doc = json.loads((d / "val.json").read_text())
    key = next(iter(doc))
    (d / "val.json").write_text(json.dumps({**doc, key: "five"}, indent=1))
    with pytest.raises(DataError, match=rf"val\.json:2: class id of '{key}' must be an integer"):
        load_task_data(Task("x", format="fgvc"), d)
    (d / "val.json").write_text(json.dumps({**doc, "005.Red_Bird/gone.jpg": 5}, indent=1))
    line = 2 + len(doc)
    with pytest.raises(DataError, match=rf"val\.json:{line}: image not found: .*gone\.jpg"):
        load_task_data(Task("x", format="fgvc"), d)


def test_imagefolder_layout(tiny_imagefolder: Path) -> None:
    assert detect_format(tiny_imagefolder) == "imagefolder"
    data = load_task_data(Task("tiny"), tiny_imagefolder)
    assert data.labels == ["blue", "red"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 16, "val": 8, "test": 8}
    assert data.notes == []


def test_imagefolder_without_test_uses_val_as_test(tiny_imagefolder: Path) -> None:
    import shutil

    shutil.rmtree(tiny_imagefolder / "test")
    data = load_task_data(Task("tiny"), tiny_imagefolder)
    assert set(data.splits) == {"train", "test"} and len(data.splits["test"]) == 8
    assert "val/ is the test split" in data.notes[0]


def test_imagefolder_unknown_class_in_test(layouts: SimpleNamespace, tiny_imagefolder: Path) -> None:
    layouts.image(tiny_imagefolder / "test" / "green" / "0.png", (0, 255, 0))
    with pytest.raises(DataError, match=r"test/green: class 'green' has no folder in .*train"):
        load_task_data(Task("tiny"), tiny_imagefolder)


def test_missing_and_undetectable_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass --data-root DIR or set RLRR_DATA"):
        resolve_data_dir(Task("x"), None)
    with pytest.raises(DataError, match="is not a directory"):
        load_task_data(Task("x"), tmp_path / "nope")
    with pytest.raises(DataError, match="cannot detect the data format"):
        load_task_data(Task("x"), tmp_path)


def test_undecodable_image_is_a_data_error(tiny_imagefolder: Path) -> None:
    bad = tiny_imagefolder / "train" / "red" / "000.png"
    bad.write_bytes(b"not a png")
    data = load_task_data(Task("tiny"), tiny_imagefolder)
    ds = ImageDataset(data.splits["train"], T.ToTensor())
    index = data.splits["train"].index((bad, 1))
    with pytest.raises(DataError, match=r"000\.png: cannot decode image"):
        ds[index]


def test_vtab_and_fgvc_transforms_follow_the_recipe() -> None:
    model = timm.create_model("test_vit", pretrained=False)
    vtab = task_data_config(BUILTIN_TASKS["dtd"], model)
    ops = build_transform(vtab, train=False).transforms
    assert isinstance(ops[0], T.Resize) and tuple(ops[0].size) == (224, 224)  # squash, no crop
    assert tuple(ops[1].size) == (224, 224)
    assert vtab["mean"] == vtab["std"] == (0.5, 0.5, 0.5)
    train_ops = build_transform(vtab, train=True, hflip=True).transforms
    assert any(isinstance(op, T.RandomHorizontalFlip) for op in train_ops)
    fgvc = task_data_config(BUILTIN_TASKS["cub"], model)
    ops = build_transform(fgvc, train=True, hflip=True, random_crop=True).transforms
    assert tuple(ops[0].size) == (256, 256) and isinstance(ops[1], T.RandomCrop) and tuple(ops[1].size) == (224, 224)
    timm_cfg = task_data_config(Task("user"), model, img_size=32)
    assert timm_cfg["input_size"] == (3, 32, 32) and timm_cfg["crop_pct"] == model.pretrained_cfg["crop_pct"]
    out = build_transform(timm_cfg, train=False)(Image.new("RGB", (50, 40)))
    assert out.shape == (3, 32, 32)
