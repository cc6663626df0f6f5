"""Hugging Face PEFT adapter folders in and out: LoRA and IA³ on a timm ViT.

A PEFT folder (`save_pretrained`) is adapter_config.json (with `peft_type`) and
adapter_model.safetensors (keys `base_model.model.<path>.lora_A.weight`, ...). `from_peft` turns it
into this library's config and tensor names after checking every field and shape against the
backbone it will run on (PEFT's timm configs say `base_model_name_or_path: null`), and refuses
what would not serve exactly, naming the field. `to_peft` writes the reverse, so
`peft.PeftModel.from_pretrained(timm_model, folder)` gives the served scores. `peft` itself is
not needed for either (it is the tests' oracle).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load

from .errors import AdapterConfigError, AdapterShapeError
from .inject import base_module, match_modules
from .methods import IA3Config, LoRAConfig
from .names import HEAD_NAMES, IA3_L, LORA_A, LORA_B
from .wrap import adapter_shapes

__all__ = ["is_peft_config", "read_peft", "from_peft", "to_peft", "check_exportable", "PEFT_TYPES"]

PEFT_TYPES = {"LORA": "lora", "IA3": "ia3"}
PREFIX = "base_model.model."
# LoRA inits that rewrite the base weights (the server's backbone is shared and frozen).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")
# LoRA fields that must keep PEFT's default: what each would need that a fold here does not do.
_LORA_UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vector rescales the column norms of W + BA (not a fold of this form)",
    "rank_pattern": "per-module ranks are not supported", "alpha_pattern": "per-module alphas are not supported",
    "layers_to_transform": "layer selection is not supported", "layers_pattern": "layer selection is not supported",
    "exclude_modules": "exclusions are not supported", "target_parameters": "parameter targets are not supported",
    "fan_in_fan_out": "transposed (Conv1D) weights do not occur in a timm ViT",
    "lora_bias": "a LoRA bias is not supported",
    "layer_replication": "layer replication changes the backbone", "use_qalora": "QA-LoRA is not supported",
    "trainable_token_indices": "token adapters do not apply to a ViT", "use_bdlora": "BD-LoRA is not supported",
}


def is_peft_config(doc: Any) -> bool:
    """Whether a parsed adapter_config.json is PEFT's (it names a `peft_type`)."""
    return isinstance(doc, dict) and "peft_type" in doc


def read_peft(config_bytes: bytes, weights_bytes: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's two files, parsed: (adapter_config.json, adapter_model.safetensors tensors).

    Raises:
        AdapterConfigError: Not JSON, or not a PEFT config. AdapterShapeError: unreadable safetensors.
    """
    try:
        doc = json.loads(config_bytes)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply for the parser
        raise AdapterConfigError(f"adapter_config.json is not valid JSON: {type(e).__name__}: {e}") from None
    if not is_peft_config(doc):
        raise AdapterConfigError("adapter_config.json has no peft_type: not a PEFT adapter")
    try:
        tensors = safetensors_load(weights_bytes)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise AdapterShapeError(f"adapter_model.safetensors is not a readable safetensors file: {e}") from None
    return doc, tensors


def _refuse_set(doc: dict[str, Any], rules: Mapping[str, str]) -> None:
    for name, why in rules.items():
        if doc.get(name) not in (None, False, {}, [], "none"):
            raise AdapterConfigError(f"{name}: {doc[name]!r} is refused: {why}")


def _paths(model: nn.Module, value: Any, field: str) -> tuple[str, ...]:
    # PEFT: a list matches by name or path suffix, a string is a regex matched against whole paths.
    if isinstance(value, str):
        if len(value) > 512:  # a regex from an upload: bounded, as every other field is
            raise AdapterConfigError(f"{field}: a pattern of {len(value)} characters; at most 512")
        paths = [p for p, _ in model.named_modules() if p and re.fullmatch(value, p)]
        if not paths:
            raise AdapterConfigError(f"{field}: the pattern {value!r} matches no module of this backbone")
        value = paths
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise AdapterConfigError(f"{field} must be a list of module names or a regex string, got {value!r}")
    return tuple(match_modules(model, tuple(value), field)) if value else ()


def _config(doc: dict[str, Any], model: nn.Module) -> LoRAConfig | IA3Config:
    kind = doc.get("peft_type")
    if kind not in PEFT_TYPES:
        raise AdapterConfigError(f"peft_type: {kind!r} is not supported; this server takes {sorted(PEFT_TYPES)}")
    saved = doc.get("modules_to_save") or []
    if list(saved) != ["head"]:
        raise AdapterConfigError(f"modules_to_save: {saved!r}; a task needs exactly ['head'] (its classifier)")
    targets = _paths(model, doc.get("target_modules"), "target_modules")
    if not targets:
        raise AdapterConfigError("target_modules: empty; the adapter would change nothing")
    if kind == "IA3":
        _refuse_set(doc, {"fan_in_fan_out": _LORA_UNSUPPORTED["fan_in_fan_out"],
                          "exclude_modules": _LORA_UNSUPPORTED["exclude_modules"]})
        ff = _paths(model, doc.get("feedforward_modules") or [], "feedforward_modules")
        return IA3Config(target_modules=targets, feedforward_modules=ff)
    init = doc.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterConfigError(f"init_lora_weights: {init!r} is refused: it rewrites the base weights, and this "
                                 "server's backbone is shared by every task")
    _refuse_set(doc, _LORA_UNSUPPORTED)
    if doc.get("bias", "none") != "none":
        raise AdapterConfigError(f"bias: {doc['bias']!r} is refused: only 'none' (biases stay frozen)")
    return LoRAConfig(target_modules=targets, r=doc.get("r", 8), lora_alpha=doc.get("lora_alpha", 8),
                      use_rslora=bool(doc.get("use_rslora", False)))


def _peft_shape(model: nn.Module, name: str, shape: tuple[int, ...], feedforward: set[str]) -> tuple[int, ...]:
    """The shape PEFT saves for one of our tensors (conv kernels and IA³'s broadcast vectors)."""
    path, tag = name.rsplit(".", 1)
    if tag in (LORA_A, LORA_B, IA3_L):
        w = base_module(model.get_submodule(path)).weight
        conv = w.dim() == 4
        if tag == LORA_A and conv:
            return (shape[0], *w.shape[1:])
        if tag == LORA_B and conv:
            return (*shape, 1, 1)
        if tag == IA3_L:
            if conv:
                return (1, shape[0], 1, 1)
            return (1, shape[0]) if path in feedforward else (shape[0], 1)
    return shape


def from_peft(doc: dict[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module,
              labels: list[str] | None) -> tuple[LoRAConfig | IA3Config, dict[str, torch.Tensor], int]:
    """A PEFT LoRA / IA³ adapter as (config, tensors, num_classes) for this backbone.

    Args:
        doc: PEFT's adapter_config.json, parsed.
        tensors: PEFT's adapter_model.safetensors, loaded.
        model: The plain backbone it is to run on.
        labels: Class names (PEFT stores none); their count must be the head's.

    Raises:
        AdapterConfigError: A field this server cannot serve exactly (named in the message).
        AdapterShapeError: Tensors missing, unexpected or of the wrong shape; labels that do not fit.
    """
    config = _config(doc, model)
    ours = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX).replace(".modules_to_save.default", "").replace(".default", "")
        ours[name.removesuffix(".weight") if name.endswith((".lora_A.weight", ".lora_B.weight")) else name] = value
    head = ours.get(HEAD_NAMES[0])
    if head is None or head.dim() != 2:
        raise AdapterShapeError(f"{HEAD_NAMES[0]}: missing or not a matrix (modules_to_save=['head'] saves it)")
    num_classes = head.shape[0]
    if labels is not None and len(labels) != num_classes:
        raise AdapterShapeError(f"labels: {len(labels)} names for a head of {num_classes} classes")
    shapes = adapter_shapes(model, config, num_classes)
    ff = set(config.feedforward_modules) if isinstance(config, IA3Config) else set()
    missing = sorted(set(shapes) - set(ours))
    extra = sorted(set(ours) - set(shapes))
    if missing or extra:
        raise AdapterShapeError(f"adapter_model.safetensors: missing {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for name, shape in shapes.items():
        want = _peft_shape(model, name, shape, ff)
        if tuple(ours[name].shape) != want:
            raise AdapterShapeError(f"tensor {name!r}: shape {tuple(ours[name].shape)}, this backbone needs {want}")
        out[name] = ours[name].detach().to(torch.float32).reshape(shape).contiguous()
    return config, out, num_classes


def check_exportable(config: Any) -> None:
    """Raise AdapterConfigError unless PEFT has a type for this adapter's method (LoRA, IA³)."""
    if not isinstance(config, LoRAConfig | IA3Config):
        raise AdapterConfigError(f"PEFT has no format for {type(config).__name__} adapters (LoRA and IA³ only)")


def to_peft(config: LoRAConfig | IA3Config, tensors: Mapping[str, torch.Tensor], model: nn.Module
            ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of a LoRA or IA³ adapter in PEFT's format.

    Args:
        config: The adapter's config.
        tensors: Its tensors (head included).
        model: The backbone (for the conv and IA³ shapes PEFT uses).

    Raises:
        AdapterConfigError: Another method (PEFT has no RLRR, SSF or BitFit type).
    """
    ff: set[str] = set()
    if isinstance(config, LoRAConfig):
        doc = {"peft_type": "LORA", "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
               "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "fan_in_fan_out": False}
    elif isinstance(config, IA3Config):
        ff = set(match_modules(model, config.feedforward_modules, "feedforward_modules")) \
            if config.feedforward_modules else set()
        doc = {"peft_type": "IA3", "feedforward_modules": sorted(ff), "fan_in_fan_out": False,
               "init_ia3_weights": True}
    else:
        check_exportable(config)
    # explicit paths, not our suffixes: PEFT matches a list entry by exact name or '.'-suffix too
    doc.update(target_modules=sorted(match_modules(model, config.target_modules)), modules_to_save=["head"],
               base_model_name_or_path=None, task_type=None, inference_mode=True,
               auto_mapping={"base_model_class": type(model).__name__, "parent_library": type(model).__module__})
    out = {}
    for name, value in tensors.items():
        if name in HEAD_NAMES:
            out[PREFIX + name] = value.contiguous()
            continue
        want = _peft_shape(model, name, tuple(value.shape), ff)
        suffix = ".weight" if name.endswith((LORA_A, LORA_B)) else ""
        out[PREFIX + name + suffix] = value.reshape(want).contiguous()
    return json.loads(json.dumps(doc)), out
