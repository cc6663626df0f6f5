"""Trainer fixtures: a test_vit checkpoint on disk, real images from ../shared/data, tiny fixtures.

Real images are extracted once into the git-ignored `.cache/trainer-tests/` (never into the repo).
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CIFAR_CLASSES = ("airplane", "frog", "truck")  # far apart in colour and shape: learnable at 32 px


def write_image(path: Path, color: tuple[int, int, int], size: int = 12) -> Path:
    """A small solid-colour image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def make_vtab(root: Path, n_classes: int = 3) -> Path:
    """`<root>/dtd_mini/` with images/ and the four VTAB list files."""
    d = root / "dtd_mini"
    lines = {"train800.txt": [], "val200.txt": [], "test.txt": []}
    for i in range(12):
        label = i % n_classes
        rel = f"images/{i:03d}.jpg"
        write_image(d / rel, (label * 80, 100, 200 - label * 60))
        split = "train800.txt" if i < 6 else "val200.txt" if i < 9 else "test.txt"
        lines[split].append(f"{rel} {label}")
    for name, rows in lines.items():
        (d / name).write_text("\n".join(rows) + "\n")
    (d / "train800val200.txt").write_text("\n".join(lines["train800.txt"] + lines["val200.txt"]) + "\n")
    return d


def make_fgvc(root: Path) -> Path:
    """VPT-style `<root>/CUB_200_2011/` with images/<class folder>/ and train/val/test json (ids 5, 9)."""
    d = root / "CUB_200_2011"
    docs: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for cid, folder in ((9, "009.Blue_Bird"), (5, "005.Red_Bird")):
        for i in range(6):
            rel = f"{folder}/{i}.jpg"
            write_image(d / "images" / rel, (200, 10, 10) if cid == 5 else (10, 10, 200))
            docs["train" if i < 3 else "val" if i < 4 else "test"][rel] = cid
    for split, doc in docs.items():
        (d / f"{split}.json").write_text(json.dumps(doc, indent=1))
    return d


REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("RLRR_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = REPO / ".cache" / "trainer-tests"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Run these tiny models on one intra-op thread.

    On a 2-core machine shared with other jobs, two OpenMP threads spin at every barrier: a
    test_vit step measured 2.2 s with 2 threads vs 0.013 s with 1 under load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _require_shared(archive: str) -> Path:
    """The shared archive's path; skips the test, saying why, when the data folder or archive is absent."""
    src = SHARED_DATA / archive
    if not src.is_file():
        pytest.skip(f"{src} is missing: this test needs the real-image archives of ../shared/data "
                    "(or RLRR_SHARED_DATA)")
    return src


@pytest.fixture(scope="session")
def shared_cifar10() -> Path:
    """../shared/data/cifar10-jpeg.tar.gz (skips without it), read through trainer.mini_vtab."""
    return _require_shared("cifar10-jpeg.tar.gz")


def _extract(archive: str, name: str, keep: Callable[[list[str]], bool]) -> Path:
    """Extract members of a shared archive for which keep(parts) holds into CACHE/name, once."""
    out = CACHE / name
    if (out / ".done").exists():
        return out
    src = _require_shared(archive)
    tmp = CACHE / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(src) as tf:
        for m in tf:
            if m.isfile() and keep(m.name.split("/")):
                tf.extract(m, tmp, filter="data")
    (tmp / ".done").touch()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # whole folder at once: an interrupted extraction is never mistaken for done
    return out


@pytest.fixture(scope="session")
def cifar3() -> Path:
    """ImageFolder of 3 CIFAR-10 classes: 120 train and 100 test images each (32x32 JPEGs)."""
    def keep(parts: list[str]) -> bool:
        if len(parts) != 4 or parts[2] not in CIFAR_CLASSES:
            return False
        return int(Path(parts[3]).stem) < (120 if parts[1] == "train" else 100)
    return _extract("cifar10-jpeg.tar.gz", "cifar3", keep) / "cifar10"


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    """Ants/bees ImageFolder, train/ and val/ only (no test/): 50 train, 40 val images per class.

    A subset: these are full-size photos and decoding them dominates the test's time.
    """
    taken: dict[tuple[str, str], int] = {}

    def keep(parts: list[str]) -> bool:
        if len(parts) != 4:
            return False
        key = (parts[1], parts[2])
        taken[key] = taken.get(key, 0) + 1
        return taken[key] <= (50 if parts[1] == "train" else 40)
    return _extract("hymenoptera.tar", "hymenoptera-subset", keep) / "hymenoptera"


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random test_vit weights (1000-class head) as a local safetensors file: the offline backbone."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    path = tmp_path_factory.mktemp("backbone") / "test_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    """train/val/test of two solid-colour classes (red vs blue), 8/4/4 images per class."""
    root = tmp_path / "tiny"
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for cls, color in (("blue", (20, 40, 230)), ("red", (230, 30, 20))):
            for i in range(n):
                jitter = (i * 7) % 25
                write_image(root / split / cls / f"{i:03d}.png", tuple(min(255, c + jitter) for c in color))
    return root


@pytest.fixture
def layouts() -> SimpleNamespace:
    """Writers of tiny on-disk data: .vtab(root, n_classes), .fgvc(root), .image(path, color)."""
    return SimpleNamespace(vtab=make_vtab, fgvc=make_fgvc, image=write_image)
