"""Checkpoint and resume: everything needed to continue a run bit for bit after Ctrl-C or a crash.

A checkpoint holds the trainable tensors only (the frozen backbone is rebuilt from its spec), the
optimizer and loss-scaler state, the loop's counters, the best validation epoch's tensors, every
RNG state, and the recipe and backbone fingerprint it was made with (a resume with other settings
is refused).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

__all__ = ["CKPT_NAME", "LOG_NAME", "TrainState", "trainable_state", "load_trainable", "save", "restore",
           "trim_log"]

CKPT_NAME, LOG_NAME = "ckpt.pt", "log.jsonl"


@dataclass
class TrainState:
    """The loop's counters: what a checkpoint restores besides tensors and RNG states."""

    epoch: int = 0  # epochs finished
    iter: int = 0  # optimizer steps taken
    train_seconds: float = 0.0
    best: dict[str, Any] | None = None  # the best validation epoch: val_top1, epoch, trainable state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the parameters that train."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state` back, refusing one of another model."""
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


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
         state: TrainState, recipe: dict[str, Any], fingerprint: str) -> None:
    """Write the checkpoint of a finished epoch (atomically).

    Args:
        path: The run's checkpoint file.
        model: The model being trained (its trainable tensors are saved).
        optimizer: Its optimizer.
        scaler: Its loss scaler.
        state: The loop's counters after the epoch.
        recipe: `TrainConfig.recipe()`, checked on resume.
        fingerprint: The backbone's fingerprint, checked on resume.
    """
    _atomic_torch_save({"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "epoch": state.epoch, "iter": state.iter,
                        "train_seconds": state.train_seconds, "best": state.best, "rng": _rng_state(),
                        "recipe": recipe, "fingerprint": fingerprint}, path)


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            recipe: dict[str, Any], fingerprint: str) -> TrainState:
    """Load a checkpoint into the model, optimizer, scaler and the RNGs; returns the loop's counters.

    Args:
        path: The run's checkpoint file.
        model: The freshly built model.
        optimizer: Its optimizer.
        scaler: Its loss scaler.
        recipe: This run's `TrainConfig.recipe()`: must be the checkpoint's.
        fingerprint: This run's backbone fingerprint: must be the checkpoint's.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["recipe"] != recipe or ckpt["fingerprint"] != fingerprint:
        diff = sorted(k for k in recipe if ckpt["recipe"].get(k) != recipe[k])
        raise ConfigError(f"--resume: {path} was made with different settings ({diff or 'backbone'})")
    load_trainable(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    return TrainState(ckpt["epoch"], ckpt["iter"], ckpt["train_seconds"], ckpt["best"])


def trim_log(path: Path, epoch: int, resume: bool) -> None:
    """Start the run's log: empty for a new run; on resume, up to the checkpoint's epoch.

    Args:
        path: The run's log.jsonl.
        epoch: Epochs in the checkpoint.
        resume: Whether the run continues from the checkpoint.
    """
    old_log = path.read_text().splitlines() if resume and path.exists() else []
    # Drop epochs logged after the checkpoint was taken (a crash between the two writes).
    path.write_text("".join(line + "\n" for line in old_log if json.loads(line)["epoch"] <= epoch))
