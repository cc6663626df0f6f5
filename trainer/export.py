"""Export a stored adapter as a standalone timm checkpoint with the adapter folded into the weights.

    python -m trainer export --task dtd --out dtd.safetensors
    timm.create_model('vit_base_patch16_224', checkpoint_path='dtd.safetensors', num_classes=47)

An adapter trained with model_kwargs (e.g. --img-size 32) exports at that geometry: pass the same
kwargs to timm.create_model (they are in the file's metadata, `model_kwargs`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters import fold_adapter, load_adapter

from .backbone import create_backbone
from .errors import StoreError

__all__ = ["export_task"]


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
        meta = {"task": task, "base_model": name, "num_classes": str(adapter.num_classes),
                "labels": json.dumps(adapter.labels), "model_kwargs": json.dumps(spec.model_kwargs)}
        save_file(state, str(tmp), metadata=meta)
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)  # atomic: an interrupted export leaves no half file under the name
    return out
