"""The PEFT branch of `PUT /tasks/NAME`: a PEFT folder becomes this server's adapter folder, then the usual upload.

PEFT's adapter_config.json (recognised by its `peft_type`) and adapter_model.safetensors, plus a
`labels` form field (PEFT stores no class names), are checked against the served backbone
(`adapters.peft_format.from_peft`) and written as an adapter folder for this backbone; the
registry then validates and installs that folder exactly as any other upload.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError, save_adapter
from adapters.peft_format import from_peft, read_peft
from app.errors import InvalidAdapter

__all__ = ["is_peft_upload", "peft_to_adapter", "parse_labels"]


def is_peft_upload(config: bytes) -> bool:
    """Whether an uploaded adapter_config.json is PEFT's (cheap: parsed again later either way)."""
    try:
        doc = json.loads(config)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply: the usual path says which, as a 422
        return False
    return isinstance(doc, dict) and "peft_type" in doc


def parse_labels(raw: bytes | None) -> list[str] | None:
    """The `labels` form field: a JSON array of class names (None when not sent).

    Raises:
        InvalidAdapter: Not a JSON array of strings.
    """
    if raw is None:
        return None
    try:
        labels = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        labels = None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise InvalidAdapter('labels: expected a JSON array of class names, e.g. ["ant", "bee"]')
    return labels


def peft_to_adapter(engine: object, config: bytes, weights: bytes, labels: list[str] | None) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of this server's format for a PEFT upload.

    Args:
        engine: The `Engine` (its backbone, name and fingerprint make the folder's backbone fields).
        config: PEFT's adapter_config.json.
        weights: PEFT's adapter_model.safetensors.
        labels: Class names; '0', '1', ... when None.

    Raises:
        InvalidAdapter: The PEFT adapter cannot be served here exactly; the reason names the field.
    """
    backbone = engine.backbone
    try:
        doc, tensors = read_peft(config, weights)
        method_config, tensors, num_classes = from_peft(doc, tensors, backbone, labels)
    except AdapterError as exc:
        raise InvalidAdapter(f"PEFT adapter refused: {exc}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(tensors, Path(tmp) / "adapter", base_model=engine.name, config=method_config,
                              fingerprint=engine.fingerprint, num_classes=num_classes, labels=labels,
                              backbone_spec=getattr(backbone, "backbone_spec", None),
                              metadata={"imported_from": {"format": "peft", "peft_type": doc["peft_type"],
                                                          "peft_version": doc.get("peft_version")}})
        return (folder / CONFIG_NAME).read_bytes(), (folder / WEIGHTS_NAME).read_bytes()
