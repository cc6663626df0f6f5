"""PEFT folders in and out of a store: `python -m trainer import-peft` and `export --format peft`.

    python -m trainer import-peft my_lora/ --task ants --labels '["ant", "bee"]' --checkpoint vit.safetensors
    python -m trainer export --task ants --format peft --out ants_peft/
    peft.PeftModel.from_pretrained(timm.create_model(name, num_classes=2, ...), "ants_peft/")

Import checks the PEFT folder against the backbone it will be served on (PEFT records none for timm
models) and writes this library's adapter folder; export writes LoRA and IA³ adapters back as PEFT
folders (PEFT has no RLRR, SSF or BitFit type).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from adapters import CONFIG_NAME, WEIGHTS_NAME, backbone_fingerprint, load_adapter, save_adapter
from adapters.peft_format import check_exportable, from_peft, read_peft, to_peft

from .backbone import DEFAULT_BACKBONE, backbone_spec, create_backbone
from .errors import ConfigError, StoreError

__all__ = ["import_peft", "export_peft", "read_labels", "ABOUT_NAME"]

ABOUT_NAME = "rlrr_serve.json"  # labels, class count and backbone of an exported PEFT folder


def read_labels(value: str | None) -> list[str] | None:
    """--labels: a JSON array, a file with one name per line, or comma-separated names.

    Args:
        value: The flag's value (None: '0', '1', ...).
    """
    if value is None:
        return None
    if value.lstrip().startswith("["):
        try:
            labels = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--labels is not a JSON array: {e}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ConfigError("--labels: expected a JSON array of strings")
        return labels
    if Path(value).is_file():
        return [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]
    return [x.strip() for x in value.split(",")]


def import_peft(directory: str | os.PathLike, task: str, labels: list[str] | None, store: str | os.PathLike = "store",
                backbone: str = DEFAULT_BACKBONE, checkpoint: str | os.PathLike | None = None,
                img_size: int | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA / IA³ folder into the store as task `task`, for the given backbone.

    Args:
        directory: PEFT's folder (adapter_config.json + adapter_model.safetensors).
        task: Task name (the folder in the store).
        labels: Class names; when None, those of a folder `export --format peft` wrote, else '0', '1', ...
        store: The adapter store.
        backbone: timm name of the backbone it will be served on.
        checkpoint: Local backbone weights (the fingerprint the server will check).
        img_size: timm img_size kwarg of the backbone, if not its default.
        overwrite: Replace an adapter already in the store.

    Raises:
        StoreError: Missing files, or the task exists. AdapterError: the folder cannot be served exactly.
    """
    directory, out = Path(directory), Path(store) / task
    files = [directory / CONFIG_NAME, directory / WEIGHTS_NAME]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise StoreError(f"{directory} is not a PEFT adapter folder: {missing} missing")
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; pass --overwrite to replace it")
    about = directory / ABOUT_NAME  # a folder this trainer exported: its class names come back
    if labels is None and about.is_file():
        labels = json.loads(about.read_text()).get("labels")
    spec = backbone_spec(backbone, checkpoint, img_size)
    model = create_backbone(spec)
    doc, tensors = read_peft(files[0].read_bytes(), files[1].read_bytes())
    config, tensors, num_classes = from_peft(doc, tensors, model, labels)
    meta = {"imported_from": {"format": "peft", "peft_type": doc["peft_type"], "peft_version": doc.get("peft_version"),
                              "folder": str(directory.resolve())}}
    return save_adapter(tensors, out, base_model=backbone, config=config, fingerprint=backbone_fingerprint(model),
                        num_classes=num_classes, labels=labels, metadata=meta, backbone_spec=spec)


def export_peft(task: str, out: str | os.PathLike, store: str | os.PathLike = "store",
                checkpoint: str | os.PathLike | None = None) -> Path:
    """Write `<store>/<task>` (a LoRA or IA³ adapter) as a PEFT folder at `out`, atomically.

    Args:
        task: Task name.
        out: The PEFT folder to write (replaced if it exists).
        store: The adapter store.
        checkpoint: Local backbone weights; default the adapter's recorded checkpoint.
    """
    directory = Path(store) / task
    if not directory.is_dir():
        raise StoreError(f"no adapter for task '{task}' in {store} ({directory} does not exist)")
    recorded = load_adapter(directory)
    check_exportable(recorded.config)  # before building a backbone
    spec = recorded.backbone_spec
    if checkpoint is not None:
        spec = backbone_spec(spec.name, checkpoint, spec.model_kwargs.get("img_size"))
    model = create_backbone(spec)
    adapter = load_adapter(directory, backbone=model)  # refuses other weights or shapes
    doc, tensors = to_peft(adapter.config, adapter.tensors, model)
    # PEFT stores no class names or backbone: beside its files, in a file PEFT does not read
    about = {"task": task, "labels": adapter.labels, "num_classes": adapter.num_classes, "backbone": spec.name,
             "model_kwargs": spec.model_kwargs}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        (tmp / ABOUT_NAME).write_text(json.dumps(about, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # a crash leaves the old folder or none, never half a new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
