"""Pretrain an in-house backbone: the pico ViT from scratch on 5 CIFAR-10 classes, or the hybrid by distillation.

    python -m trainer pretrain                       # ~17 min on 2 CPU cores, writes adapters/weights/
    python -m trainer pretrain --epochs 1 --out /tmp/w   # a quick look
    python -m trainer pretrain --backbone vit_hybrid_efflite0_128   # the default backbone: trainer/distill.py

Classes airplane, automobile, bird, cat, deer of ../shared/data/cifar10-jpeg.tar.gz, train split,
32×32 px; the other five classes are the downstream task `cifar5`, so pretraining never sees them.
Writes the fp16 safetensors weights and a model card with the test accuracy and this command.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from adapters.backbones import HYBRID_NAME, PICO_NAME, PICO_WEIGHTS

from .mini_vtab import PRETRAIN_CLASSES, extract_shared
from .optim import adamw, lr_at, set_lr


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the five pretraining classes as uint8 (N, 3, 32, 32), decoded once."""
    root = extract_shared("cifar10-jpeg.tar.gz") / "cifar10" / split
    xs, ys = [], []
    for label, cls in enumerate(PRETRAIN_CLASSES):
        for p in sorted((root / cls).glob("*.jpg")):
            xs.append(np.asarray(Image.open(p).convert("RGB")))
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    return x, torch.tensor(ys)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4 px zero padding and horizontal flip, on a uint8 batch."""
    b = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    i, j = torch.randint(0, 9, (2,), generator=gen).tolist()  # one offset per batch: cheap, still varied
    out = padded[:, :, i:i + 32, j:j + 32]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def normalize(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict) -> float:
    model.eval()
    correct = sum((model(normalize(x[i:i + 500], cfg)).argmax(1) == y[i:i + 500]).sum().item()
                  for i in range(0, len(x), 500))
    return correct / len(x)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default=PICO_NAME.split(".")[0], choices=[PICO_NAME.split(".")[0]],
                    help=f"this one; {HYBRID_NAME.split('.')[0]} is distilled by trainer/distill.py")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=PICO_WEIGHTS.parent)
    return ap


def fit(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
        cfg: dict, args: argparse.Namespace, gen: torch.Generator) -> None:
    """AdamW with the trainer's decay groups; lr warmup from 0, then cosine to 0, stepped per iteration.

    Args:
        model: The backbone being pretrained (trained in place).
        train: uint8 images and labels to train on.
        test: uint8 images and labels, evaluated every 5 epochs and at the end.
        cfg: The model's mean and std.
        args: Parsed `build_parser` options.
        gen: The generator of shuffling and augmentation.
    """
    (x_train, y_train), (x_test, y_test) = train, test
    opt = adamw(model, args.lr, args.weight_decay)
    steps_per_epoch = len(x_train) // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    step, t0 = 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        running = 0.0
        for k in range(steps_per_epoch):
            idx = perm[k * args.batch_size:(k + 1) * args.batch_size]
            x = normalize(augment(x_train[idx], gen), cfg)
            set_lr(opt, lr_at(step, total, warmup, args.lr, warmup_lr=0.0, min_lr=0.0))
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()  # sync point, but CPU-only: free
            step += 1
        acc = accuracy(model, x_test, y_test, cfg) if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs else float("nan")
        print(f"epoch {epoch + 1}/{args.epochs} loss {running / steps_per_epoch:.4f} test_acc {acc:.4f} "
              f"elapsed {time.time() - t0:.0f}s", flush=True)


def save(model: torch.nn.Module, out: Path, card: dict) -> Path:
    """Write the fp16 weights (atomically) and the model card beside them; returns the weights file.

    Args:
        model: The pretrained backbone.
        out: The folder.
        card: The model card; its `bytes` is filled in here.
    """
    out.mkdir(parents=True, exist_ok=True)
    weights = out / PICO_WEIGHTS.name
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    card["bytes"] = weights.stat().st_size
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return weights


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer pretrain [--backbone NAME]`; returns the exit status."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--backbone")
    known, _ = probe.parse_known_args(argv)
    if known.backbone and known.backbone.split(".")[0] == HYBRID_NAME.split(".")[0]:
        from .distill import main as distill_main

        return distill_main(argv)
    args = build_parser().parse_args(argv)
    # The resolved command (defaults included), so the model card reproduces the run by itself.
    command = "python -m trainer pretrain " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "backbone"))

    # setup
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    arch = PICO_NAME.split(".")[0]
    model = timm.create_model(arch, pretrained=False, num_classes=len(PRETRAIN_CLASSES), drop_path_rate=0.1)
    cfg = {"mean": model.pretrained_cfg["mean"], "std": model.pretrained_cfg["std"]}
    print(f"{arch}: {sum(p.numel() for p in model.parameters()):,} parameters, classes {PRETRAIN_CLASSES}")

    # data
    t0 = time.time()
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    print(f"data: {len(x_train)} train / {len(x_test)} test images decoded in {time.time() - t0:.0f}s")

    # train, then save: fp16 weights + model card
    t0 = time.time()
    fit(model, (x_train, y_train), (x_test, y_test), cfg, args, gen)
    card = {
        "model": PICO_NAME,
        "description": "pretrained in-house on 5 CIFAR-10 classes (NOT an ImageNet model)",
        "data": "CIFAR-10 train split (JPEG re-encoded), ../shared/data/cifar10-jpeg.tar.gz",
        "classes": list(PRETRAIN_CLASSES),
        "resolution": 32,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "test_top1": round(accuracy(model, x_test, y_test, cfg), 4),
        "epochs": args.epochs,
        "seed": args.seed,
        "recipe": {k: v for k, v in vars(args).items() if k != "out"},
        "minutes": round((time.time() - t0) / 60, 1),
        "bytes": None,
        "command": command,
    }
    save(model, args.out, card)
    print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
