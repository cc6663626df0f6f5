"""The hybrid backbone's frozen stem, run once per image: cached stem features (and teacher outputs).

    python -m trainer.stem_cache --out .cache/distill/vit_hybrid_efflite0_128     # pretraining's set

The stem (EfficientNet-Lite0's body up to stride 32, then its 1×1 conv head) comes before every
adapter and never trains, so the costly part, the body's output for an image, is computed once and
kept in git-ignored shards of `SHARD` images: `feats` (N, 320, 4, 4) fp16 (`FrozenStem` applies the
cheap conv head to them), and for distillation the teacher's ImageNet `logits` (N, 1000) and pooled
features `pooled` (N, 1280), fp16, computed from the same body output. A finished shard is never
recomputed, so an interrupted run resumes.

Distillation images (never a split any task evaluates on): CIFAR-10 train, Fashion-MNIST train,
the hymenoptera train photos (the eval view plus timm-augmented views). Evaluation sets for the
agreement figures: 500 CIFAR-10 test images (50 per class) and the 153 hymenoptera val photos.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset

from adapters.backbones import HYBRID_NAME, lite0_teacher

from .mini_vtab import CACHE, FASHION_MNIST, _idx, extract_shared

__all__ = ["SHARD", "Item", "stem_of", "teacher_head", "cache_items", "load_shards", "distill_sets", "frozen_stem",
           "CachedStemDataset"]

SHARD = 256
Item = Callable[[], Image.Image]  # a lazily decoded image


def stem_of(model: nn.Module) -> nn.Module:
    """The frozen stem of a hybrid timm ViT (`patch_embed.backbone`)."""
    return model.patch_embed.backbone


def teacher_head(teacher: nn.Module, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of EfficientNet-Lite0 after the stride-32 stage: (logits (N, 1000), pooled (N, 1280)).

    Args:
        teacher: `adapters.backbones.lite0_teacher()`.
        feats: Stem features (N, 320, h, w).
    """
    pooled = teacher.global_pool(teacher.bn2(teacher.conv_head(feats)))  # bn2 includes the ReLU6
    return teacher.classifier(pooled), pooled


@torch.inference_mode()
def _encode(stem: nn.Module, teacher: nn.Module | None, x: torch.Tensor) -> dict[str, torch.Tensor]:
    feats = stem.body(x.contiguous(memory_format=torch.channels_last)).contiguous()  # (N, 320, h, w)
    out = {"feats": feats.half()}
    if teacher is not None:
        logits, pooled = teacher_head(teacher, feats)
        out.update(logits=logits.half(), pooled=pooled.half())
    return out


def cache_items(items: Sequence[Item], out: Path, stem: nn.Module, transform: Callable,
                teacher: nn.Module | None = None, labels: Sequence[int] | None = None, say=print) -> int:
    """Encode `items` into `out/shard_NNNNN.safetensors` (atomically, skipping finished shards).

    Args:
        items: Image loaders, in a fixed order.
        out: The set's folder.
        stem: The frozen stem.
        transform: PIL image -> normalised (3, H, W) tensor (the model's eval transform or an augmentation).
        teacher: When given, also store its logits and pooled features.
        labels: Optional labels stored beside the features.
        say: Where progress lines go.
    """
    out.mkdir(parents=True, exist_ok=True)
    stem.eval()
    t0, done = time.time(), 0
    for start in range(0, len(items), SHARD):
        path = out / f"shard_{start // SHARD:05d}.safetensors"
        if path.exists():
            continue
        x = torch.stack([transform(load()) for load in items[start:start + SHARD]])
        tensors = _encode(stem, teacher, x)
        if labels is not None:
            tensors["labels"] = torch.tensor(labels[start:start + SHARD])
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
        done += len(x)
        say(f"{out.name}: {min(start + SHARD, len(items))}/{len(items)} images, "
            f"{done / (time.time() - t0):.1f} img/s", flush=True)
    return len(items)


def load_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every finished shard of a set, concatenated in order."""
    shards = [load_file(str(p)) for p in sorted(folder.glob("shard_*.safetensors"))]
    if not shards:
        return {}
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def _open(path: Path) -> Item:
    return lambda: Image.open(path).convert("RGB")


def _interleave(groups: Sequence[Sequence[Path]], limit: int) -> list[Path]:
    # Class-balanced at every prefix: a pretraining run that starts early sees every class.
    out = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    return out[:limit]


def _fashion(n: int) -> list[Item]:
    x = _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")[:n]  # train split only: the task tests on t10k
    return [(lambda a=a: Image.fromarray(np.ascontiguousarray(a)).convert("RGB")) for a in x]


def distill_sets(cifar_train: int, fashion: int, hym_views: int, cifar_test: int = 500
                  ) -> Iterator[tuple[str, list[Item], str]]:
    """(set name, images, 'eval' | 'aug') in caching order: what matters most first, so a run cut short
    (CPU is scarce) still has the hymenoptera photos, CIFAR-10 and both evaluation sets."""
    cifar = extract_shared("cifar10-jpeg.tar.gz") / "cifar10"
    classes = sorted(p.name for p in (cifar / "train").iterdir())
    hym = extract_shared("hymenoptera.tar") / "hymenoptera"
    hym_train = [_open(p) for c in ("ants", "bees") for p in sorted((hym / "train" / c).glob("*.jpg"))]
    cifar_train_items = [_open(p) for p in _interleave(
        [sorted((cifar / "train" / c).glob("*.jpg")) for c in classes], cifar_train)]
    yield "eval_hym_val", [_open(p) for c in ("ants", "bees") for p in sorted((hym / "val" / c).glob("*.jpg"))], "eval"
    yield "train_hym", hym_train, "eval"
    yield "train_cifar", cifar_train_items[:SHARD * 8], "eval"
    yield "eval_cifar_test", [_open(p) for p in _interleave(
        [sorted((cifar / "test" / c).glob("*.jpg"))[:cifar_test // len(classes)] for c in classes], cifar_test)], "eval"
    for v in range(hym_views):
        yield f"train_hym_aug{v}", hym_train, "aug"
    yield "train_cifar_more", cifar_train_items[SHARD * 8:], "eval"
    if FASHION_MNIST.is_dir() and fashion:
        yield "train_fashion", _fashion(fashion), "eval"


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.stem_cache`: cache the distillation and agreement sets; returns the exit status."""
    import timm

    import adapters  # noqa: F401 - registers the hybrid backbone with timm

    ap = argparse.ArgumentParser(prog="python -m trainer.stem_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=CACHE / "distill" / HYBRID_NAME.split(".")[0])
    ap.add_argument("--cifar-train", type=int, default=50000,
                    help="CIFAR-10 train images, class-interleaved (the shipped weights: all 50,000)")
    ap.add_argument("--cifar-test", type=int, default=500, help="CIFAR-10 test images for agreement")
    ap.add_argument("--fashion", type=int, default=20000, help="Fashion-MNIST train images (if installed)")
    ap.add_argument("--hym-views", type=int, default=8, help="augmented views of each hymenoptera train photo")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the augmented views are reproducible
    model = timm.create_model(HYBRID_NAME.split(".")[0], pretrained=False)
    stem = stem_of(model).to(memory_format=torch.channels_last)
    teacher = lite0_teacher().to(memory_format=torch.channels_last)
    cfg = resolve_data_config({}, model=model)
    tfs = {"eval": create_transform(**cfg, is_training=False),
           "aug": create_transform(**cfg, is_training=True, scale=(0.35, 1.0), hflip=0.5, color_jitter=0.2)}
    for name, items, kind in distill_sets(args.cifar_train, args.fashion, args.hym_views, args.cifar_test):
        cache_items(items, args.out / name, stem, tfs[kind], teacher)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- the trainer's path: a task's images through the frozen stem once ---------------------------

def frozen_stem(model: nn.Module) -> nn.Module | None:
    """The model's `FrozenStem` (the hybrid backbone), else None."""
    from adapters.backbones import FrozenStem

    stem = getattr(getattr(model, "patch_embed", None), "backbone", None)
    return stem if isinstance(stem, FrozenStem) else None


def _stem_key(stem: nn.Module) -> str:
    # The body's weights: what the cached features are the output of (the conv head runs on them later).
    h = hashlib.sha256()
    for name, t in sorted((k, v) for k, v in stem.state_dict().items() if k.startswith("model.")):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class CachedStemDataset(Dataset):
    """A trainer `ImageDataset` with a deterministic transform, as the frozen stem's features.

    Each image goes through the stem's body once; its features (fp16, ~10 KB) are kept under
    `cache/<sha1 of real path, mtime, size, transform, body weights>.pt`, so every run on the same
    files (grid points, the refit, the test split) shares them. `FrozenStem` takes such features
    from its body's output on (its conv head still runs), so the model is the one that serves images.

    Args:
        base: The dataset of (path, label) samples and its transform (no randomness).
        stem: The model's frozen stem.
        cache: The feature folder (git-ignored).
        batch_size: Images per stem pass while filling the cache.
    """

    def __init__(self, base: Dataset, stem: nn.Module, cache: Path = CACHE / "stem", batch_size: int = 64) -> None:
        self.labels = [label for _, label in base.samples]
        cache.mkdir(parents=True, exist_ok=True)
        salt = f"{base.transform!r}|{_stem_key(stem)}"
        files = [cache / f"{self._key(Path(p), salt)}.pt" for p, _ in base.samples]
        missing = [i for i, f in enumerate(files) if not f.exists()]
        for start in range(0, len(missing), batch_size):
            idx = missing[start:start + batch_size]
            x = torch.stack([base[i][0] for i in idx]).to(next(stem.parameters()).device)
            with torch.inference_mode():
                feats = stem.eval().body(x.contiguous(memory_format=torch.channels_last)).contiguous().half().cpu()
            for i, feat in zip(idx, feats, strict=True):
                tmp = files[i].with_suffix(".tmp")
                torch.save(feat.clone(), tmp)  # clone: a view would save the whole batch's storage
                tmp.replace(files[i])
        self.feats = torch.stack([torch.load(f, weights_only=True) for f in files]) if files else torch.empty(0)

    @staticmethod
    def _key(path: Path, salt: str) -> str:
        st = path.stat()
        return hashlib.sha1(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{salt}".encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.feats[i].float(), self.labels[i]
