"""Data: VTAB-1k file lists, VPT-style FGVC json, ImageFolder; preprocessing from timm data configs.

Everything is read and checked before training starts: a missing image or a malformed line is a
DataError naming the file and line, not a crash in epoch 3. Images themselves are decoded lazily.

Layouts (`<dir>` is `<data root>/<task folder>`, or the data root itself):
    vtab          <dir>/{train800,val200,train800val200,test}.txt, lines `relative/path.jpg <int label>`
    fgvc          <dir>/{train,val,test}.json, {"relative/path.jpg": class_id}; images under
                  <dir>/images, <dir>/Images or <dir>
    imagefolder   <dir>/{train,val,test}/<class>/*.jpg (val and test optional, at least one of them)
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from .errors import DataError
from .tasks import FORMATS, Task

__all__ = ["Sample", "TaskData", "ImageDataset", "load_task_data", "resolve_data_dir", "detect_format",
           "task_data_config", "build_transform", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
Sample = tuple[Path, int]


@dataclass
class TaskData:
    """A task's validated file lists.

    Attributes:
        format: The layout it was read from.
        root: The task's data folder.
        labels: Class names, index = class id.
        splits: 'train' and 'test' always, 'val' when there is a validation split.
        notes: Choices made while reading (printed at start, kept in the adapter metadata).
    """

    format: str
    root: Path
    labels: list[str]
    splits: dict[str, list[Sample]]
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class ImageDataset(Dataset):
    """(path, label) pairs → (transformed image, label)."""

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        """
        Args:
            samples: Image paths and class ids.
            transform: PIL image → tensor.
        """
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path}: cannot decode image: {e}") from None
        return self.transform(image), label


# ---------------------------------------------------------------------------------------------
# Locating and detecting


def resolve_data_dir(task: Task, data_root: str | os.PathLike | None) -> Path:
    """The task's data folder: `<root>/<one of task.data_dirs or the task name>`, else the root.

    Args:
        task: The task (its data_root, from a task file, is used when data_root is None).
        data_root: --data-root or RLRR_DATA.
    """
    root = data_root or task.data_root
    if root is None:
        raise DataError(f"no data for task '{task.name}': pass --data-root DIR or set RLRR_DATA")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory")
    for name in (*task.data_dirs, task.name):
        if (root / name).is_dir():
            return root / name
    return root


def detect_format(directory: Path) -> str:
    """'vtab', 'fgvc' or 'imagefolder', from the files present.

    Args:
        directory: The task's data folder.
    """
    if (directory / "test.txt").is_file() or (directory / "train800val200.txt").is_file():
        return "vtab"
    if (directory / "train.json").is_file() or (directory / "test.json").is_file():
        return "fgvc"
    if (directory / "train").is_dir():
        return "imagefolder"
    raise DataError(
        f"{directory}: cannot detect the data format: expected train800val200.txt + test.txt (vtab), "
        "train.json + test.json (fgvc) or a train/ folder of class folders (imagefolder)")


def load_task_data(task: Task, data_root: str | os.PathLike | None, fmt: str | None = None,
                   holdout_val: bool = False) -> TaskData:
    """Find, read and validate a task's data.

    Args:
        task: The task (recipe class count is checked against the data).
        data_root: --data-root / RLRR_DATA (None: the task file's data_root).
        fmt: Force a layout; None: the task's, else detected.
        holdout_val: VTAB/FGVC: train on train800/train and validate on val200/val instead of
            training on both (the recipe trains on both and has no validation split).
    """
    directory = resolve_data_dir(task, data_root)
    fmt = fmt or task.format or detect_format(directory)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    reader = {"vtab": _read_vtab, "fgvc": _read_fgvc, "imagefolder": _read_imagefolder}[fmt]
    data = reader(directory, task.num_classes, holdout_val)
    if task.num_classes is not None and data.num_classes != task.num_classes:
        raise DataError(f"{directory}: found {data.num_classes} classes, task '{task.name}' has "
                        f"{task.num_classes}")
    for split in ("train", "test"):
        if not data.splits.get(split):
            raise DataError(f"{directory}: the {split} split is empty")
    return data


# ---------------------------------------------------------------------------------------------
# VTAB-1k file lists


def _read_list(path: Path, base: Path) -> list[tuple[Path, int, int]]:
    """`relative/path.jpg <int label>` lines → (path, label, line number); checks every line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)  # paths may hold spaces; the label is the last field
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{lineno}: expected '<relative/path> <int label>', got {raw!r}")
        label = int(parts[1])
        if label < 0:
            raise DataError(f"{path}:{lineno}: negative label {label}")
        rows.append((base / parts[0], label, lineno))
    if not rows:
        raise DataError(f"{path}: no samples in the file")
    return rows


def _check_exist(rows: list[tuple[Path, int, int]], listing: Path) -> None:
    missing = [(p, n) for p, _, n in rows if not p.is_file()]
    if missing:
        p, n = missing[0]
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"{listing}:{n}: image not found: {p}{more}")


def _read_vtab(directory: Path, num_classes: int | None, holdout_val: bool) -> TaskData:
    train_lists = ["train800.txt"] if holdout_val else ["train800val200.txt"]
    if not holdout_val and not (directory / "train800val200.txt").is_file() \
            and (directory / "train800.txt").is_file():
        train_lists = ["train800.txt", "val200.txt"]  # some releases ship only the two halves
    lists = {"train": train_lists, "test": ["test.txt"]}
    if holdout_val:
        lists["val"] = ["val200.txt"]
    read = {split: [(f, r) for f in files for r in _read_list(directory / f, directory)]
            for split, files in lists.items()}
    top = max(r[1] for rows in read.values() for _, r in rows)
    classes = num_classes if num_classes is not None else top + 1
    splits: dict[str, list[Sample]] = {}
    for split, rows in read.items():
        for f, (_, label, n) in rows:
            if label >= classes:
                raise DataError(f"{directory / f}:{n}: label {label} out of range for {classes} classes")
        for f in lists[split]:
            _check_exist([r for g, r in rows if g == f], directory / f)
        splits[split] = [(p, label) for _, (p, label, _) in rows]
    # VTAB lists carry no class names; the ids are the labels.
    return TaskData("vtab", directory, [str(i) for i in range(classes)], splits)


# ---------------------------------------------------------------------------------------------
# VPT-style FGVC json


def _line_of(text: str, key: str) -> int:
    pos = text.find(json.dumps(key))
    return text.count("\n", 0, pos) + 1 if pos >= 0 else 1


def _read_json(path: Path) -> tuple[dict[str, int], str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(doc, dict) or not doc:
        raise DataError(f"{path}:1: expected a non-empty object mapping image path -> class id")
    for key, value in doc.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{path}:{_line_of(text, key)}: class id of {key!r} must be an integer, "
                            f"got {value!r}")
    return doc, text


def _fgvc_image_dir(directory: Path, first: str) -> Path:
    for cand in (directory / "images", directory / "Images", directory):
        if (cand / first).is_file():
            return cand
    return directory


def _read_fgvc(directory: Path, num_classes: int | None, holdout_val: bool) -> TaskData:
    names = {"train": ["train.json"] if holdout_val else ["train.json", "val.json"], "test": ["test.json"]}
    if holdout_val:
        names["val"] = ["val.json"]
    if not holdout_val and not (directory / "val.json").is_file():
        names["train"] = ["train.json"]
    docs = {f: _read_json(directory / f) for files in names.values() for f in files}
    image_dir = _fgvc_image_dir(directory, next(iter(docs["train.json"][0])))
    # Class ids are made contiguous by sorting (VPT); names come from the images' folders if those
    # agree one-to-one with the ids (CUB: '001.Black_footed_Albatross/...').
    ids = sorted({v for doc, _ in docs.values() for v in doc.values()})
    index = {v: i for i, v in enumerate(ids)}
    folders: dict[int, set[str]] = {}
    splits: dict[str, list[Sample]] = {}
    for split, files in names.items():
        samples: list[Sample] = []
        for f in files:
            doc, text = docs[f]
            for key, value in doc.items():
                path = image_dir / key
                if not path.is_file():
                    raise DataError(f"{directory / f}:{_line_of(text, key)}: image not found: {path}")
                samples.append((path, index[value]))
                folders.setdefault(value, set()).add(Path(key).parts[0] if len(Path(key).parts) > 1 else "")
        splits[split] = samples
    named = [next(iter(folders[v])) for v in ids if len(folders[v]) == 1]
    labels = named if len(named) == len(ids) and all(named) and len(set(named)) == len(ids) \
        else [str(v) for v in ids]
    return TaskData("fgvc", directory, labels, splits)


# ---------------------------------------------------------------------------------------------
# ImageFolder


def _class_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_imagefolder(directory: Path, num_classes: int | None, holdout_val: bool) -> TaskData:
    train = directory / "train"
    if not train.is_dir():
        raise DataError(f"{train}: folder not found (imagefolder layout: <root>/{{train,val,test}}/<class>/*)")
    labels = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not labels:
        raise DataError(f"{train}: no class folders")
    index = {name: i for i, name in enumerate(labels)}
    splits: dict[str, list[Sample]] = {}
    for split in ("train", "val", "test"):
        folder = directory / split
        if not folder.is_dir():
            continue
        samples: list[Sample] = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"{class_dir}: class '{class_dir.name}' has no folder in {train}")
            images = _class_images(class_dir)
            if split == "train" and not images:
                raise DataError(f"{class_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
            samples += [(p, index[class_dir.name]) for p in images]
        splits[split] = samples
    notes = []
    if "test" not in splits:
        if "val" not in splits:
            raise DataError(f"{directory}: needs a test/ or val/ folder to evaluate on")
        # One held-out split only: evaluate on it once at the end, never select on it.
        splits["test"] = splits.pop("val")
        notes.append("no test/ folder: val/ is the test split (no validation split)")
    return TaskData("imagefolder", directory, labels, splits, notes)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def task_data_config(task: Task, model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """The timm data config of a task: what the eval transform (and the server) uses.

    Args:
        task: 'vtab' and 'fgvc' transforms follow the recipe; 'timm' the backbone's config.
        model: The backbone (for 'timm').
        img_size: Override the input resolution (e.g. 32 for CPU tests).
    """
    if task.transform == "vtab":
        # Resize straight to 224x224: squash with crop_pct 1 is exactly that in timm's terms.
        size = img_size or 224
        return {"input_size": (3, size, size), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "squash"}
    if task.transform == "fgvc":
        # Resize to 256x256, crop 224 (torchvision's default bilinear, as the reference code).
        size = img_size or 224
        return {"input_size": (3, size, size), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5), "crop_pct": 224 / 256, "crop_mode": "squash"}
    cfg = dict(resolve_model_data_config(model))
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
    return cfg


def build_transform(data_config: dict[str, Any], train: bool, hflip: bool = False,
                    random_crop: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform for the data config; for training, random crop / flip added to it.

    Training reuses the eval pipeline so train and test see the same resize and normalisation.

    Args:
        data_config: timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode).
        train: Build the training transform.
        hflip: Random horizontal flip (training only).
        random_crop: Random instead of center crop (training only).
    """
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    # Lists (a config read back from JSON) as tuples: the same transform as timm builds from them.
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in keys}
    tf = create_transform(**cfg, is_training=False)
    if not train:
        return tf
    ops = list(tf.transforms)
    at = next((i for i, op in enumerate(ops) if isinstance(op, T.CenterCrop)), 1)
    if random_crop and isinstance(ops[at], T.CenterCrop):
        ops[at] = T.RandomCrop(ops[at].size)
    if hflip:
        ops.insert(at + 1, T.RandomHorizontalFlip())
    return T.Compose(ops)
