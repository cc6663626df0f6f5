"""python -m trainer --task NAME runs `train()` below: setup → resume → fit every epoch → checkpoint → store.

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

Setting up (paths, data, model, loaders, optimizer) is trainer/run.py; checkpoint and resume,
trainer/checkpoint.py; the schedule and decay groups, trainer/optim.py; writing the adapter,
trainer/publish.py; the configuration and its command line, trainer/config.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from adapters import adapter_state_dict

from . import checkpoint, plots
from .checkpoint import TrainState, load_trainable, trainable_state
from .config import METHODS, TrainConfig
from .errors import Interrupted
from .optim import MIN_LR, WARMUP_LR, lr_at, param_groups, set_lr
from .progress import Progress
from .publish import draw_pictures, publish, run_metadata
from .run import Run, RunPaths, announce, say, setup

__all__ = ["TrainConfig", "TrainResult", "train", "fit", "train_one_epoch", "train_step", "evaluate",
           "final_metrics", "lr_at", "param_groups", "METHODS", "MIN_LR", "WARMUP_LR"]


@dataclass
class TrainResult:
    """What a run produced."""

    metrics: dict[str, Any]
    model: nn.Module
    run_dir: Path
    adapter_dir: Path | None
    export_path: Path | None


def train(cfg: TrainConfig) -> TrainResult:
    """Train `cfg.task` and write its adapter to the store (or, for --method full, a model file).

    Args:
        cfg: The resolved run configuration.
    """
    run = setup(cfg)  # paths checked, data read, model, loaders and optimizer built
    announce(run)
    paths = run.paths
    state = TrainState()
    if cfg.resume:
        state = checkpoint.restore(paths.ckpt, run.model, run.optimizer, run.scaler, cfg.recipe(), run.fingerprint)
        say(f"resumed from {paths.ckpt} after epoch {state.epoch}")
    checkpoint.trim_log(paths.log, state.epoch, cfg.resume)
    if run.rlrr_config is not None and not cfg.resume:  # step 0, for the shift picture's "learned" panel
        plots.save_init(paths.run_dir, adapter_state_dict(run.model))
    try:
        return _train_and_publish(run, state)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(paths, cfg.epochs)) from None


def interrupted_message(paths: RunPaths, epochs: int) -> str:
    """What Ctrl-C leaves behind, in one line, from what is on disk.

    Args:
        paths: The run's paths.
        epochs: Epochs of the whole run.
    """
    # The checkpoint file, not the loop's counter: Ctrl-C may land between an epoch and its save.
    saved_epoch = torch.load(paths.ckpt, map_location="cpu", weights_only=True)["epoch"] if paths.ckpt.exists() else 0
    if saved_epoch == 0:
        return (f"interrupted in epoch 1 of {epochs}: no epoch finished, nothing was saved "
                f"(no adapter, no checkpoint); run the same command again to start over")
    return (f"interrupted: {paths.ckpt} holds epoch {saved_epoch} of {epochs}; run the same command with "
            f"--resume to continue")


def _train_and_publish(run: Run, state: TrainState) -> TrainResult:
    cfg, paths = run.cfg, run.paths
    # -- training loop: fit an epoch, log it, redraw the curves, checkpoint ----------------------
    progress = Progress(cfg.epochs, run.iters_per_epoch, done_iters=state.iter)  # a bar on a terminal, else lines
    title = f"{cfg.task.name} · {cfg.method} · {cfg.backbone}"
    curves = plots.CurveWriter(paths.run_dir, title, paths.log.name, say=progress.write)  # beside the growing log
    stop_epoch = min(cfg.epochs, cfg.stop_after) if cfg.stop_after else cfg.epochs
    started = (state.iter, time.perf_counter())  # for the time left
    for epoch in range(state.epoch, stop_epoch):
        record = fit(run, state, epoch, progress, started)
        progress.epoch(record)
        with open(paths.log, "a") as f:
            f.write(json.dumps(record) + "\n")
        curves.update(force=epoch + 1 == stop_epoch)  # at most every 30 s: a draw costs up to ~1 s
        checkpoint.save(paths.ckpt, run.model, run.optimizer, run.scaler, state, cfg.recipe(), run.fingerprint)
    progress.close()
    if stop_epoch < cfg.epochs:
        say(f"stopped after epoch {stop_epoch} (--stop-after); continue with --resume")
        return TrainResult({"stopped_after": stop_epoch}, run.model, paths.run_dir, None, None)

    # -- final evaluation, then the store ----------------------------------------------------------
    metrics = final_metrics(run, state.best)
    metadata = run_metadata(run, metrics, state.train_seconds)
    metadata["training"] = draw_pictures(run, title, metrics)
    adapter_dir, export_path = publish(run, metadata)
    return TrainResult(metrics, run.model, paths.run_dir, adapter_dir, export_path)


def fit(run: Run, state: TrainState, epoch: int, progress: Progress, started: tuple[int, float]) -> dict[str, Any]:
    """Train one epoch, then validate (never test), remembering the best epoch's trainable tensors.

    Args:
        run: The set-up run.
        state: The loop's counters, advanced here.
        epoch: Epoch index, from 0.
        progress: Where steps are reported.
        started: (iteration, perf_counter time) when this process started training, for the time left.

    Returns:
        The epoch's log record.
    """
    record = train_one_epoch(run, state, epoch, progress, started)
    if "val" in run.eval_loaders:
        val = evaluate(run.model, run.eval_loaders["val"], run.device, run.amp_dtype)
        record.update(val_top1=val["top1"], val_loss=val["loss"])
        if state.best is None or val["top1"] > state.best["val_top1"]:
            state.best = {"val_top1": val["top1"], "epoch": epoch + 1, "state": trainable_state(run.model)}
    state.epoch = epoch + 1
    return record


def train_one_epoch(run: Run, state: TrainState, epoch: int, progress: Progress,
                    started: tuple[int, float]) -> dict[str, Any]:
    """One pass over the training split, the lr set from the schedule before every step.

    Args:
        run: The set-up run.
        state: The loop's counters (iter, train_seconds), advanced here.
        epoch: Epoch index, from 0.
        progress: Where steps are reported.
        started: (iteration, perf_counter time) when this process started training, for the time left.

    Returns:
        The epoch's training figures (the start of its log record).
    """
    cfg, model = run.cfg, run.model
    model.train()
    run.shuffle_gen.manual_seed(cfg.seed * 1_000_003 + epoch)  # the epoch's order depends on (seed, epoch) only
    t0 = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    for step, (images, labels) in enumerate(run.train_loader):
        lr = lr_at(state.iter, run.total_iters, run.warmup_iters, cfg.lr)
        set_lr(run.optimizer, lr)
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        loss, logits = train_step(model, run.optimizer, run.scaler, images, labels, run.amp_dtype)
        state.iter += 1
        # .item() syncs with the GPU once per step; cheap next to a ViT forward/backward.
        loss_sum += loss.item() * labels.numel()
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += labels.numel()
        ips = seen / (time.perf_counter() - t0)
        eta = (time.perf_counter() - started[1]) / max(state.iter - started[0], 1) * (run.total_iters - state.iter)
        stats = {"loss": f"{loss_sum / seen:.4f}", "acc": f"{100.0 * correct / seen:.1f}%",
                 "img/s": f"{ips:.1f}", "lr": f"{lr:.2e}"}
        progress.step(epoch, step, stats, eta)
    seconds = time.perf_counter() - t0
    state.train_seconds += seconds
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen,
            "img_per_s": seen / seconds, "seconds": seconds}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: torch.Tensor, labels: torch.Tensor, amp_dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch: autocast forward, cross-entropy in fp32, scaled backward.

    Args:
        model: The model, in train mode.
        optimizer: Its optimizer (the lr already set).
        scaler: The loss scaler (`run.grad_scaler`; a no-op unless fp16).
        images: The batch, on the model's device.
        labels: Its class indices, on the same device.
        amp_dtype: Autocast dtype; None for fp32.

    Returns:
        (loss, logits), still on the device: no sync here.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


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


def final_metrics(run: Run, best: dict[str, Any] | None) -> dict[str, Any]:
    """Last epoch on test; where val exists, also the val-selected epoch on test (never selected on test).

    Args:
        run: The finished run.
        best: The best validation epoch (`TrainState.best`).
    """
    def top1(split: str) -> float:
        return evaluate(run.model, run.eval_loaders[split], run.device, run.amp_dtype)["top1"]

    metrics: dict[str, Any] = {"test_top1": top1("test"), "epochs": run.cfg.epochs,
                               "selection": "last epoch (never selected on test)"}
    if "val" in run.eval_loaders:
        metrics["val_top1"] = top1("val")
        last_state = trainable_state(run.model)
        load_trainable(run.model, best["state"])
        metrics.update(best_val_top1=best["val_top1"], best_val_epoch=best["epoch"],
                       test_top1_at_best_val=top1("test"))
        load_trainable(run.model, last_state)  # the adapter we store is the last epoch's, as reported
    return metrics
