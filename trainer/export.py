"""Export a stored adapter as a standalone timm checkpoint with the adapter folded into the weights.

    python -m trainer export --task dtd --out dtd.safetensors
    timm.create_model('vit_base_patch16_224', checkpoint_path='dtd.safetensors', num_classes=47)
"""
from __future__ import annotations

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
        backbone: timm name; default the adapter's base model.
        checkpoint: Local backbone weights (required offline); must match the adapter's fingerprint.

    Raises:
        StoreError: No such adapter. AdapterError: the adapter is invalid or for other weights.
    """
    directory = Path(store) / task
    if not directory.is_dir():
        raise StoreError(f"no adapter for task '{task}' in {store} ({directory} does not exist)")
    adapter = load_adapter(directory)  # reads the base model name; validated again below
    name = backbone or adapter.base_model
    kwargs = adapter.metadata.get("backbone", {}).get("model_kwargs", {})
    model = create_backbone(name, checkpoint, 0.0, **kwargs)
    adapter = load_adapter(directory, backbone=model)  # refuses other weights (fingerprint) or shapes
    folded = fold_adapter(model, adapter.tensors, adapter.config)
    model.reset_classifier(adapter.num_classes)
    model.load_state_dict(folded, strict=False)  # fold_adapter returns only the tensors it changed
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if out.suffix == ".safetensors":
        meta = {"task": task, "base_model": name, "num_classes": str(adapter.num_classes),
                "labels": json.dumps(adapter.labels)}
        save_file(state, str(tmp), metadata=meta)
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)  # atomic: an interrupted export leaves no half file under the name
    return out
