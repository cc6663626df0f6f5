"""Export a stored adapter as a standalone timm checkpoint with the adapter folded into the weights.

    python -m trainer export --task dtd --out dtd.safetensors

The file loads with plain timm, no import of this project; its metadata says how:

    meta = safetensors.safe_open("dtd.safetensors", "pt").metadata()
    model = timm.create_model(meta["timm_model"], checkpoint_path="dtd.safetensors", **json.loads(meta["timm_kwargs"]))

`timm_kwargs` holds num_classes, the trained geometry (e.g. img_size from --img-size) and
`pretrained_cfg_overlay` with the input size and normalization trained with, so
`timm.data.resolve_data_config(model=model)` preprocesses as trained. For a hub backbone
`timm_model` is its timm name; for an in-house one (not registered in stock timm) it is a stock
entrypoint whose geometry the kwargs override (adapters.backbones.STOCK_TIMM).
Other suffixes than .safetensors get a plain torch.save state dict (no metadata).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adapters import fold_adapter, load_adapter
from adapters.backbones import STOCK_TIMM, BackboneSpec

from .backbone import create_backbone
from .errors import StoreError

__all__ = ["export_task", "stock_timm"]

# The parts of a pretrained config that preprocessing reads (timm.data.resolve_data_config).
DATA_CFG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def stock_timm(spec: BackboneSpec, model: nn.Module, num_classes: int) -> tuple[str, dict[str, Any]]:
    """The name and kwargs with which stock `timm.create_model` builds the exported architecture.

    Args:
        spec: The adapter's backbone.
        model: That backbone, built (its pretrained_cfg has the trained input size).
        num_classes: The task's classes.
    """
    # The built model's data config: timm keeps the pretrained input size when img_size changes it.
    overlay = {k: model.pretrained_cfg[k] for k in DATA_CFG_KEYS if k in model.pretrained_cfg}
    name, geometry = STOCK_TIMM.get(spec.name.split(".")[0], (spec.name, {}))
    return name, {**geometry, **spec.model_kwargs, "num_classes": num_classes, "pretrained_cfg_overlay": overlay}


def export_task(task: str, out: str | os.PathLike, store: str | os.PathLike = "store",
                backbone: str | None = None, checkpoint: str | os.PathLike | None = None) -> Path:
    """Fold `<store>/<task>` into its backbone and write the plain timm state dict to `out`.

    Args:
        task: Task name (the adapter's folder in the store).
        out: Output file: .safetensors, or anything else for torch.save.
        store: The adapter store.
        backbone: timm name; default the one in the adapter's recorded backbone spec.
        checkpoint: Local backbone weights; default the spec's checkpoint path, else timm's pretrained
            weights (offline: required). Must give the adapter's fingerprint.

    Raises:
        StoreError: No such adapter. AdapterError: the adapter is invalid or for other weights.
    """
    directory = Path(store) / task
    if not directory.is_dir():
        raise StoreError(f"no adapter for task '{task}' in {store} ({directory} does not exist)")
    adapter = load_adapter(directory)  # reads the recorded backbone spec; validated again below
    spec = adapter.backbone_spec
    # The recorded spec, with the command line's overrides: model_kwargs (img_size ...) always come
    # from the adapter, so the merged checkpoint has the geometry it was trained at.
    spec = dataclasses.replace(spec, name=backbone or spec.name,
                               checkpoint=str(checkpoint) if checkpoint is not None else spec.checkpoint)
    name = spec.name
    model = create_backbone(spec)
    adapter = load_adapter(directory, backbone=model)  # refuses other kwargs, weights (fingerprint) or shapes
    folded = fold_adapter(model, adapter.tensors, adapter.config)
    model.reset_classifier(adapter.num_classes)
    model.load_state_dict(folded, strict=False)  # fold_adapter returns only the tensors it changed
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if out.suffix == ".safetensors":
        timm_model, timm_kwargs = stock_timm(spec, model, adapter.num_classes)
        meta = {"task": task, "base_model": name, "num_classes": str(adapter.num_classes),
                "labels": json.dumps(adapter.labels), "model_kwargs": json.dumps(spec.model_kwargs),
                "timm_model": timm_model, "timm_kwargs": json.dumps(timm_kwargs)}
        save_file(state, str(tmp), metadata=meta)
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)  # atomic: an interrupted export leaves no half file under the name
    return out
