"""Publishing a finished run: its metadata and pictures, then the adapter into the store.

The store holds adapters; `--method full` has none, so it writes the fine-tuned model to
<run dir>/model.safetensors and leaves the store alone.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch

from adapters import adapter_state_dict, save_adapter

from . import plots
from .errors import StoreError
from .run import Run, say

__all__ = ["run_metadata", "draw_pictures", "publish"]


def run_metadata(run: Run, metrics: dict[str, Any], train_seconds: float) -> dict[str, Any]:
    """What the adapter (and result.json) records about the run that made it.

    Args:
        run: The finished run.
        metrics: Its final metrics.
        train_seconds: Time spent in training epochs (evaluation excluded).
    """
    cfg, data = run.cfg, run.data
    n_train, n_total = run.trainable_params()
    n_seen = cfg.epochs * len(data.splits["train"])
    timing = {"train_seconds": round(train_seconds, 2), "images_per_second": round(n_seen / train_seconds, 1),
              "device": str(run.device), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    say("result " + json.dumps({**metrics, **timing}))
    return {
        "task": cfg.task.name, "suite": cfg.task.suite, "metrics": metrics, "recipe": cfg.recipe(),
        "seed": cfg.seed, "timing": timing, "trainable_params": n_train, "total_params": n_total,
        "data": {"format": data.format, "splits": {k: len(v) for k, v in data.splits.items()},
                 "notes": data.notes},
        "backbone": {"name": cfg.backbone, "checkpoint": cfg.checkpoint, "model_kwargs": run.spec.model_kwargs},
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def draw_pictures(run: Run, title: str, metrics: dict[str, Any]) -> dict[str, str | None]:
    """The final curves and (adapters only) the per-layer shift; their paths, for the adapter's metadata.

    Args:
        run: The finished run.
        title: The pictures' title.
        metrics: Its final metrics (the test points of the curves).
    """
    run_dir, log = run.paths.run_dir, run.paths.log
    curves = plots.draw_curves(run_dir, title, metrics, log_name=log.name, say=say)
    shift = None
    if run.rlrr_config is not None:
        shift = plots.draw_shift(run.model, adapter_state_dict(run.model), run.rlrr_config, run_dir, title, say=say,
                                 init=plots.read_init(run_dir))
    paths = {"run_dir": run_dir, "log": log, "curves": curves, "shift": shift}
    return {k: None if v is None else str(Path(v).resolve()) for k, v in paths.items()}


def _write_model(run: Run) -> Path:
    from safetensors.torch import save_file

    export = run.paths.run_dir / "model.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}, str(export))
    kwargs = "".join(f", {k}={v!r}" for k, v in run.spec.model_kwargs.items())  # e.g. the trained img_size
    say(f"--method full has no adapter: the store is not written; the fine-tuned model is {export} "
        f"(timm.create_model('{run.cfg.backbone.split('.')[0]}', checkpoint_path=..., "
        f"num_classes={run.data.num_classes}{kwargs}))")
    return export


def publish(run: Run, metadata: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """Write result.json, then the adapter into the store (or, for --method full, the model file).

    Args:
        run: The finished run.
        metadata: `run_metadata`, with the pictures' paths under "training".

    Returns:
        (adapter folder, model file): one of them is None.
    """
    cfg, store_dir = run.cfg, run.paths.store_dir
    (run.paths.run_dir / "result.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    run.model.eval()
    if run.rlrr_config is None:
        return None, _write_model(run)
    if store_dir.exists() and not cfg.overwrite:  # appeared while we trained
        raise StoreError(f"{store_dir} appeared during training; pass --overwrite to replace it")
    save_adapter(run.model, store_dir, base_model=cfg.backbone, config=run.rlrr_config, fingerprint=run.fingerprint,
                 num_classes=run.data.num_classes, labels=run.data.labels, data_config=run.data_config,
                 metadata=metadata, backbone_spec=run.spec)
    say(f"adapter written to {store_dir}")
    return store_dir, None
