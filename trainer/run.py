"""Setting a run up: refuse what would fail at the end, then data → model → loaders → optimizer.

`setup(cfg)` builds a `Run`, everything the loop (trainer/loop.py) and the publishing step
(trainer/publish.py) read; nothing here trains.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from adapters import add_rlrr, backbone_fingerprint
from adapters.backbones import BackboneSpec

from .backbone import backbone_spec, create_backbone
from .checkpoint import CKPT_NAME, LOG_NAME
from .config import SETTINGS_NAME, TrainConfig, default_run_dir
from .data import ImageDataset, TaskData, build_transform, load_task_data, task_data_config
from .errors import ConfigError, StoreError
from .optim import adamw
from .stem_cache import CachedStemDataset, frozen_stem

__all__ = ["Run", "RunPaths", "setup", "announce", "resolve_device", "grad_scaler", "say"]


def say(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: its folder (checkpoint, log, pictures) and its adapter in the store."""

    run_dir: Path
    store_dir: Path
    ckpt: Path
    log: Path

    @classmethod
    def of(cls, cfg: TrainConfig) -> RunPaths:
        run_dir = Path(cfg.run_dir or default_run_dir(cfg.task.name, cfg.method, cfg.seed))
        return cls(run_dir, Path(cfg.store) / cfg.task.name, run_dir / CKPT_NAME, run_dir / LOG_NAME)


@dataclass
class Run:
    """Everything a run is set up with; read by the loop and the publishing step."""

    cfg: TrainConfig
    paths: RunPaths
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype on CUDA; None: fp32
    data: TaskData
    spec: BackboneSpec
    model: nn.Module
    rlrr_config: Any  # the adapter config of any method (RLRRConfig, LoRAConfig, ...); None: full fine-tuning
    fingerprint: str
    data_config: dict[str, Any]
    train_loader: DataLoader
    shuffle_gen: torch.Generator  # the train loader's order, reseeded every epoch
    eval_loaders: dict[str, DataLoader]  # "val" (when the data has one) and "test"
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    @property
    def iters_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def total_iters(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch

    @property
    def warmup_iters(self) -> int:
        return round(self.cfg.warmup_epochs * self.iters_per_epoch)

    def trainable_params(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return n_train, sum(p.numel() for p in self.model.parameters())


def resolve_device(name: str) -> tuple[torch.device, torch.dtype | None]:
    """The device (`auto`: CUDA when there is one) and its autocast dtype (bf16, else fp16; fp32 on CPU).

    Args:
        name: auto | cpu | cuda | cuda:N.
    """
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                          else "cpu" if name == "auto" else name)
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, amp_dtype


def grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler: active for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def _check_paths(cfg: TrainConfig, paths: RunPaths) -> None:
    # Refuse what would fail at the end before spending any time.
    if cfg.method != "full" and paths.store_dir.exists() and not cfg.overwrite:
        raise StoreError(f"{paths.store_dir} already exists; pass --overwrite to replace it")
    if cfg.resume and not paths.ckpt.is_file():
        raise ConfigError(f"--resume: no checkpoint at {paths.ckpt}")
    if paths.ckpt.exists() and not (cfg.resume or cfg.overwrite):
        raise StoreError(f"{paths.ckpt} holds an earlier run: pass --resume to continue it or --overwrite "
                         "to start over")
    if paths.ckpt.exists() and cfg.overwrite and not cfg.resume:
        paths.ckpt.unlink()  # a fresh run: an interruption must not later --resume the old one


def _loaders(cfg: TrainConfig, data: TaskData, data_config: dict[str, Any], device: torch.device,
             model: nn.Module) -> tuple[DataLoader, torch.Generator, dict[str, DataLoader]]:
    task = cfg.task
    augment = task.hflip or task.transform == "fgvc"
    train_tf = build_transform(data_config, train=True, hflip=task.hflip, random_crop=task.transform == "fgvc")
    eval_tf = build_transform(data_config, train=False)
    # A frozen conv stem (the hybrid backbone) runs once per image, not once per epoch: its
    # features are cached, unless random augmentation makes every epoch's input new.
    stem = frozen_stem(model)
    wrap = (lambda ds, cache: CachedStemDataset(ds, stem) if cache else ds) if stem is not None \
        else (lambda ds, cache: ds)
    shuffle_gen = torch.Generator()
    loader_kw = {"batch_size": cfg.batch_size, "num_workers": cfg.workers,
                 "pin_memory": device.type == "cuda", "persistent_workers": cfg.workers > 0}
    train_loader = DataLoader(wrap(ImageDataset(data.splits["train"], train_tf), not augment), shuffle=True,
                              generator=shuffle_gen, drop_last=False, **loader_kw)
    eval_loaders = {s: DataLoader(wrap(ImageDataset(data.splits[s], eval_tf), True), shuffle=False, **loader_kw)
                    for s in ("val", "test") if data.splits.get(s)}
    return train_loader, shuffle_gen, eval_loaders


def setup(cfg: TrainConfig) -> Run:
    """Check the paths, seed, read every file list, build the model, loaders and optimizer.

    Args:
        cfg: The resolved run configuration.
    """
    paths = RunPaths.of(cfg)
    _check_paths(cfg, paths)
    rlrr_config = cfg.rlrr_config()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # also fixes the adapter's random ('reference') init
    # Data: every file list read and checked now, not in epoch 3.
    data = load_task_data(cfg.task, cfg.data_root, cfg.format, cfg.holdout_val)
    device, amp_dtype = resolve_device(cfg.device)
    # --img-size is the timm kwarg img_size (position grid resampled once at load). The spec goes
    # into the adapter, and a server built from the same spec has the same fingerprint.
    spec = backbone_spec(cfg.backbone, cfg.checkpoint, cfg.img_size)
    model = create_backbone(spec, drop_path=cfg.drop_path)
    fingerprint = backbone_fingerprint(model)  # ~0.5 s for ViT-B on CPU
    data_config = task_data_config(cfg.task, model, cfg.img_size)
    if rlrr_config is None:
        model.reset_classifier(data.num_classes)  # full fine-tuning: everything trains
    else:
        add_rlrr(model, rlrr_config, data.num_classes)
    model.to(device)
    train_loader, shuffle_gen, eval_loaders = _loaders(cfg, data, data_config, device, model)
    return Run(cfg, paths, device, amp_dtype, data, spec, model, rlrr_config, fingerprint, data_config,
               train_loader, shuffle_gen, eval_loaders, optimizer=adamw(model, cfg.lr, cfg.weight_decay),
               scaler=grad_scaler(device, amp_dtype))


def announce(run: Run) -> None:
    """Print the resolved config, the data's notes and the parameter counts; save config.json."""
    cfg, data = run.cfg, run.data
    n_train, n_total = run.trainable_params()
    run.paths.run_dir.mkdir(parents=True, exist_ok=True)
    summary = {**cfg.recipe(), "data_root": str(data.root), "format": data.format, "classes": data.num_classes,
               "splits": {k: len(v) for k, v in data.splits.items()}, "device": str(run.device),
               "precision": str(run.amp_dtype or "fp32"), "checkpoint": cfg.checkpoint,
               "run_dir": str(run.paths.run_dir), "store": None if cfg.method == "full" else str(run.paths.store_dir),
               "data_config": run.data_config}
    say("config " + json.dumps(summary, default=str))
    for note in data.notes:
        say(f"note: {note}")
    say(f"params: trainable {n_train:,} / total {n_total:,} ({100.0 * n_train / n_total:.3f}%)")
    (run.paths.run_dir / "config.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if cfg.settings:  # what --resume reuses
        (run.paths.run_dir / SETTINGS_NAME).write_text(json.dumps(cfg.settings, indent=2) + "\n")
