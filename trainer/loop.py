"""python -m trainer --task NAME runs `train()` below: setup → data → model → optimizer → loop → store.

    python -m trainer --task dtd --data-root /data/vtab-1k                  # the recipe's defaults
    python -m trainer --task dtd --data-root /data/vtab-1k --resume         # continue an interrupted run
    python -m trainer --task ants --data-root data/hymenoptera --backbone test_vit \\
        --checkpoint test_vit.safetensors --img-size 32 --epochs 5          # small, offline, on CPU

The recipe (recipe.md): AdamW (betas .9/.999, eps 1e-8), no decay on biases, shifts and SSF
scale/shift; linear warmup from 1e-7 then cosine to 1e-8, stepped every iteration (the reference
steps per epoch, one epoch late, and adds 10 cool-down epochs: we do neither); stochastic depth
rising linearly over the blocks; autocast on CUDA, fp32 on CPU. Model selection never looks at
test: we report last-epoch test accuracy, and test accuracy at the best validation epoch when a
validation split exists (the reference code reports the best test accuracy over epochs).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from adapters import RLRRConfig, adapter_state_dict, add_rlrr, backbone_fingerprint, save_adapter

from . import plots
from .backbone import DEFAULT_BACKBONE, backbone_spec, create_backbone
from .data import ImageDataset, build_transform, load_task_data, task_data_config
from .errors import ConfigError, StoreError
from .progress import Progress
from .tasks import Task

__all__ = ["TrainConfig", "TrainResult", "train", "lr_at", "param_groups", "evaluate", "METHODS"]

METHODS = ("rlrr", "ssf", "linear", "full")
WARMUP_LR, MIN_LR = 1e-7, 1e-8
CKPT_NAME, LOG_NAME = "ckpt.pt", "log.jsonl"


@dataclass
class TrainConfig:
    """Everything a run depends on, resolved (task recipe + command-line overrides)."""

    task: Task
    data_root: str | None = None
    format: str | None = None
    holdout_val: bool = False
    backbone: str = DEFAULT_BACKBONE
    checkpoint: str | None = None
    img_size: int | None = None
    method: str = "rlrr"
    rlrr_overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 5e-5
    batch_size: int = 32
    warmup_epochs: float = 10.0
    drop_path: float = 0.1
    seed: int = 42
    workers: int = 4
    device: str = "auto"
    store: str = "store"
    run_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.rlrr_overrides and self.method != "rlrr":
            raise ConfigError(f"the ablation switches {sorted(self.rlrr_overrides)} apply to --method rlrr only")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs ({self.warmup_epochs}) must be in [0, --epochs={self.epochs})")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError("--stop-after must be >= 1")
        self.rlrr_config()  # invalid ablation combinations fail here, before anything is built

    def rlrr_config(self) -> RLRRConfig | None:
        """The adapter configuration of this method (None for full fine-tuning)."""
        if self.method == "full":
            return None
        try:
            return RLRRConfig.preset(self.method, **self.rlrr_overrides)
        except ValueError as e:
            raise ConfigError(f"invalid adapter configuration: {e}") from None

    def recipe(self) -> dict[str, Any]:
        """What determines the trained weights: checked on --resume, stored in the adapter."""
        rc = self.rlrr_config()
        return {
            "task": self.task.name, "method": self.method, "rlrr_config": rc.to_dict() if rc else None,
            "backbone": self.backbone, "img_size": self.img_size, "holdout_val": self.holdout_val,
            "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
            "batch_size": self.batch_size, "warmup_epochs": self.warmup_epochs, "warmup_lr": WARMUP_LR,
            "min_lr": MIN_LR, "drop_path": self.drop_path, "hflip": self.task.hflip,
            "transform": self.task.transform, "seed": self.seed, "optimizer": "adamw(0.9, 0.999, 1e-8)",
            "schedule": "linear warmup + cosine, per iteration",
        }


@dataclass
class TrainResult:
    """What a run produced."""

    metrics: dict[str, Any]
    model: nn.Module
    run_dir: Path
    adapter_dir: Path | None
    export_path: Path | None


def lr_at(it: int, total: int, warmup: int, peak: float, warmup_lr: float = WARMUP_LR,
          min_lr: float = MIN_LR) -> float:
    """Learning rate at iteration `it`: linear warmup warmup_lr → peak, then cosine peak → min_lr.

    Args:
        it: Iteration (optimizer step) index, from 0.
        total: Iterations in the whole run.
        warmup: Warmup iterations.
        peak: The lr reached at the end of warmup.
        warmup_lr: The lr at iteration 0.
        min_lr: The lr the cosine decays to (reached at `total`).
    """
    if it < warmup:
        return warmup_lr + (peak - warmup_lr) * it / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices, the head and RLRR's l/c; none on biases, shifts,
    SSF scale/shift, norm weights or timm's no_weight_decay() tensors (pos_embed, cls_token).

    Args:
        model: The model; only parameters with requires_grad are included.
        weight_decay: Decay of the decayed group.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        decayed = leaf in ("rlrr_l", "rlrr_c") or (p.ndim >= 2 and name not in skip)
        (decay if decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on `loader`.

    Args:
        model: The classifier (put in eval mode here, left in eval mode).
        loader: Batches of (images, labels).
        device: Where the model is.
        amp_dtype: Autocast dtype on CUDA; None for fp32.
    """
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += labels.numel()
    return {"top1": 100.0 * correct / max(n, 1), "loss": loss / max(n, 1), "n": n}


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != own:
        raise ConfigError(f"checkpoint tensors do not match the model: {sorted(set(state) ^ own)[:5]}")
    model.load_state_dict(state, strict=False)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    np.random.set_state(tuple(np.array(x, dtype=np.uint32) if isinstance(x, list) else x for x in s["numpy"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # Written beside the target and renamed: Ctrl-C mid-write leaves the previous checkpoint intact.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _draw_pictures(model: nn.Module, rlrr_config: RLRRConfig | None, run_dir: Path, log_path: Path, title: str,
                   metrics: dict[str, Any]) -> dict[str, str | None]:
    """The final curves and (adapters only) the per-layer shift; their paths, for the adapter's metadata."""
    curves = plots.draw_curves(run_dir, title, metrics, log_name=log_path.name, say=_say)
    shift = None
    if rlrr_config is not None:
        shift = plots.draw_shift(model, adapter_state_dict(model), rlrr_config, run_dir, title, say=_say)
    paths = {"run_dir": run_dir, "log": log_path, "curves": curves, "shift": shift}
    return {k: None if v is None else str(Path(v).resolve()) for k, v in paths.items()}


def train(cfg: TrainConfig) -> TrainResult:
    """Train `cfg.task` and write its adapter to the store (or, for --method full, a model file).

    Args:
        cfg: The resolved run configuration.
    """
    # -- setup: refuse what would fail at the end before spending any time --------------------
    task = cfg.task
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    store_dir = Path(cfg.store) / task.name
    run_dir = Path(cfg.run_dir or Path("runs") / f"{task.name}-{cfg.method}-s{cfg.seed}")
    ckpt_path = run_dir / CKPT_NAME
    if cfg.method != "full" and store_dir.exists() and not cfg.overwrite:
        raise StoreError(f"{store_dir} already exists; pass --overwrite to replace it")
    if cfg.resume and not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    if ckpt_path.exists() and not (cfg.resume or cfg.overwrite):
        raise StoreError(f"{ckpt_path} holds an earlier run: pass --resume to continue it or --overwrite "
                         "to start over")
    if ckpt_path.exists() and cfg.overwrite and not cfg.resume:
        ckpt_path.unlink()  # a fresh run: an interruption must not later --resume the old one
    rlrr_config = cfg.rlrr_config()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # also fixes the adapter's random ('reference') init

    # -- data: every file list read and checked now, not in epoch 3 -----------------------------
    data = load_task_data(task, cfg.data_root, cfg.format, cfg.holdout_val)
    num_classes = data.num_classes

    # -- model -----------------------------------------------------------------------------------
    # --img-size is the timm kwarg img_size (position grid resampled once at load). The spec goes
    # into the adapter, and a server built from the same spec has the same fingerprint.
    spec = backbone_spec(cfg.backbone, cfg.checkpoint, cfg.img_size)
    model = create_backbone(spec, drop_path=cfg.drop_path)
    fingerprint = backbone_fingerprint(model)  # ~0.5 s for ViT-B on CPU
    data_config = task_data_config(task, model, cfg.img_size)
    if rlrr_config is None:
        model.reset_classifier(num_classes)  # full fine-tuning: everything trains
    else:
        add_rlrr(model, rlrr_config, num_classes)
    model.to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {**cfg.recipe(), "data_root": str(data.root), "format": data.format, "classes": num_classes,
               "splits": {k: len(v) for k, v in data.splits.items()}, "device": str(device),
               "precision": str(amp_dtype or "fp32"), "checkpoint": cfg.checkpoint, "run_dir": str(run_dir),
               "store": None if cfg.method == "full" else str(store_dir), "data_config": data_config}
    _say("config " + json.dumps(summary, default=str))
    for note in data.notes:
        _say(f"note: {note}")
    _say(f"params: trainable {n_train:,} / total {n_total:,} ({100.0 * n_train / n_total:.3f}%)")
    (run_dir / "config.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    # -- loaders ---------------------------------------------------------------------------------
    train_tf = build_transform(data_config, train=True, hflip=task.hflip, random_crop=task.transform == "fgvc")
    eval_tf = build_transform(data_config, train=False)
    shuffle_gen = torch.Generator()
    loader_kw = {"batch_size": cfg.batch_size, "num_workers": cfg.workers,
                 "pin_memory": device.type == "cuda", "persistent_workers": cfg.workers > 0}
    train_loader = DataLoader(ImageDataset(data.splits["train"], train_tf), shuffle=True,
                              generator=shuffle_gen, drop_last=False, **loader_kw)
    eval_loaders = {s: DataLoader(ImageDataset(data.splits[s], eval_tf), shuffle=False, **loader_kw)
                    for s in ("val", "test") if data.splits.get(s)}

    # -- optimizer and schedule: lr is a pure function of the iteration, set before each step ----
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                                  eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # loss scaling: fp16 only
    iters_per_epoch = len(train_loader)
    total_iters = cfg.epochs * iters_per_epoch
    warmup_iters = round(cfg.warmup_epochs * iters_per_epoch)

    # -- resume ----------------------------------------------------------------------------------
    start_epoch, it, train_seconds, best = 0, 0, 0.0, None
    if cfg.resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["recipe"] != cfg.recipe() or ckpt["fingerprint"] != fingerprint:
            diff = sorted(k for k in cfg.recipe() if ckpt["recipe"].get(k) != cfg.recipe()[k])
            raise ConfigError(f"--resume: {ckpt_path} was made with different settings ({diff or 'backbone'})")
        _load_trainable(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, it, train_seconds, best = ckpt["epoch"], ckpt["iter"], ckpt["train_seconds"], ckpt["best"]
        _set_rng_state(ckpt["rng"])
        _say(f"resumed from {ckpt_path} after epoch {start_epoch}")
    log_path = run_dir / LOG_NAME
    old_log = log_path.read_text().splitlines() if cfg.resume and log_path.exists() else []
    # Drop epochs logged after the checkpoint was taken (a crash between the two writes).
    log_path.write_text("".join(line + "\n" for line in old_log if json.loads(line)["epoch"] <= start_epoch))

    # -- training loop ---------------------------------------------------------------------------
    progress = Progress(cfg.epochs, iters_per_epoch, done_iters=it)  # a bar on a terminal, else lines
    title = f"{task.name} · {cfg.method} · {cfg.backbone}"
    curves = plots.CurveWriter(run_dir, title, LOG_NAME, say=progress.write)  # beside the log, while it grows
    stop_epoch = min(cfg.epochs, cfg.stop_after) if cfg.stop_after else cfg.epochs
    run_start_it, run_start_t = it, time.perf_counter()
    for epoch in range(start_epoch, stop_epoch):
        model.train()
        shuffle_gen.manual_seed(cfg.seed * 1_000_003 + epoch)  # the epoch's order depends on (seed, epoch) only
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (images, labels) in enumerate(train_loader):
            lr = lr_at(it, total_iters, warmup_iters, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            it += 1
            # .item() syncs with the GPU once per step; cheap next to a ViT forward/backward.
            loss_sum += loss.item() * labels.numel()
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += labels.numel()
            ips = seen / (time.perf_counter() - t0)
            eta = (time.perf_counter() - run_start_t) / max(it - run_start_it, 1) * (total_iters - it)
            stats = {"loss": f"{loss_sum / seen:.4f}", "acc": f"{100.0 * correct / seen:.1f}%",
                     "img/s": f"{ips:.1f}", "lr": f"{lr:.2e}"}
            progress.step(epoch, step, stats, eta)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen,
                                  "train_top1": 100.0 * correct / seen, "img_per_s": seen / epoch_seconds,
                                  "seconds": epoch_seconds}

        # -- per-epoch validation (never test): remember the best epoch's trainable tensors ------
        if "val" in eval_loaders:
            val = evaluate(model, eval_loaders["val"], device, amp_dtype)
            record.update(val_top1=val["top1"], val_loss=val["loss"])
            if best is None or val["top1"] > best["val_top1"]:
                best = {"val_top1": val["top1"], "epoch": epoch + 1, "state": _trainable_state(model)}
        progress.epoch(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        curves.update(force=epoch + 1 == stop_epoch)  # at most every 30 s: a draw costs up to ~1 s

        # -- checkpoint: everything needed to continue bit-for-bit --------------------------------
        _atomic_torch_save({"model": _trainable_state(model), "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(), "epoch": epoch + 1, "iter": it,
                            "train_seconds": train_seconds, "best": best, "rng": _rng_state(),
                            "recipe": cfg.recipe(), "fingerprint": fingerprint}, ckpt_path)
    progress.close()
    if stop_epoch < cfg.epochs:
        _say(f"stopped after epoch {stop_epoch} (--stop-after); continue with --resume")
        return TrainResult({"stopped_after": stop_epoch}, model, run_dir, None, None)

    # -- final evaluation: last epoch on test; the val-selected epoch on test where val exists ---
    metrics: dict[str, Any] = {"test_top1": evaluate(model, eval_loaders["test"], device, amp_dtype)["top1"],
                               "epochs": cfg.epochs, "selection": "last epoch (never selected on test)"}
    if "val" in eval_loaders:
        metrics["val_top1"] = evaluate(model, eval_loaders["val"], device, amp_dtype)["top1"]
        last_state = _trainable_state(model)
        _load_trainable(model, best["state"])
        metrics.update(best_val_top1=best["val_top1"], best_val_epoch=best["epoch"],
                       test_top1_at_best_val=evaluate(model, eval_loaders["test"], device, amp_dtype)["top1"])
        _load_trainable(model, last_state)  # the adapter we store is the last epoch's, as reported
    n_seen = cfg.epochs * len(data.splits["train"])
    timing = {"train_seconds": round(train_seconds, 2), "images_per_second": round(n_seen / train_seconds, 1),
              "device": str(device), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _say("result " + json.dumps({**metrics, **timing}))
    metadata = {
        "task": task.name, "suite": task.suite, "metrics": metrics, "recipe": cfg.recipe(), "seed": cfg.seed,
        "timing": timing, "trainable_params": n_train, "total_params": n_total,
        "data": {"format": data.format, "splits": {k: len(v) for k, v in data.splits.items()},
                 "notes": data.notes},
        "backbone": {"name": cfg.backbone, "checkpoint": cfg.checkpoint, "model_kwargs": spec.model_kwargs},
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    metadata["training"] = _draw_pictures(model, rlrr_config, run_dir, log_path, title, metrics)
    (run_dir / "result.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")

    # -- output: the store holds adapters; full fine-tuning has none, so it writes a model file ---
    model.eval()
    if rlrr_config is None:
        from safetensors.torch import save_file

        export = run_dir / "model.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(export))
        kwargs = "".join(f", {k}={v!r}" for k, v in spec.model_kwargs.items())  # e.g. the trained img_size
        _say(f"--method full has no adapter: the store is not written; the fine-tuned model is {export} "
             f"(timm.create_model('{cfg.backbone.split('.')[0]}', checkpoint_path=..., num_classes={num_classes}"
             f"{kwargs}))")
        return TrainResult(metrics, model, run_dir, None, export)
    if store_dir.exists() and not cfg.overwrite:  # appeared while we trained
        raise StoreError(f"{store_dir} appeared during training; pass --overwrite to replace it")
    save_adapter(model, store_dir, base_model=cfg.backbone, config=rlrr_config, fingerprint=fingerprint,
                 num_classes=num_classes, labels=data.labels, data_config=data_config, metadata=metadata,
                 backbone_spec=spec)
    _say(f"adapter written to {store_dir}")
    return TrainResult(metrics, model, run_dir, store_dir, None)

