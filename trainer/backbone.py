"""The frozen backbone: a timm name with its pretrained tag, or local weights from --checkpoint.

Offline (HF_HUB_OFFLINE=1, or the hub unreachable) without --checkpoint is an immediate error that
says to pass --checkpoint, instead of huggingface_hub's minute of retries.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlparse

import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from .errors import BackboneError

__all__ = ["DEFAULT_BACKBONE", "create_backbone", "load_weights", "hub_offline"]

DEFAULT_BACKBONE = "vit_base_patch16_224.augreg_in21k"
_TRUE = ("1", "true", "yes", "on")


def hub_offline(timeout_s: float = 2.0) -> bool:
    """True when hub downloads cannot work: HF_HUB_OFFLINE is set, or the endpoint does not answer.

    Args:
        timeout_s: How long to wait for a TCP connection to the hub.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # a proxy may reach what a direct probe cannot; let huggingface_hub try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        # Without this probe a host with no route spends ~50 s in huggingface_hub's retries.
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return False
    except OSError:
        return True


@contextlib.contextmanager
def _local_files_only(offline: bool) -> Iterator[None]:
    """Make huggingface_hub use its cache only (what HF_HUB_OFFLINE=1 does) while `offline`."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    # huggingface_hub reads the variable once at import; its offline check reads this constant.
    with mock.patch.object(constants, "HF_HUB_OFFLINE", True):
        yield


def _has_pretrained_source(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            # weights_only: a checkpoint is data, never code.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise BackboneError(f"cannot read checkpoint {path}: {e}") from None
    for key in ("state_dict", "model", "module"):  # common wrappers around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load local weights into a timm model; the classifier head may differ (it is replaced anyway).

    Args:
        model: The timm model.
        path: A .safetensors file or a torch checkpoint (.pth/.pt/.bin), loaded without pickle code.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint {path} does not exist")
    state = _read_state_dict(path)
    own = model.state_dict()
    head = {k for k in state if k.startswith(("head.", "head_dist."))}
    for k in head:
        if k not in own or own[k].shape != state[k].shape:
            del state[k]  # another class count: the task gets a new head
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape[-1] == own["pos_embed"].shape[-1] \
            and pos.shape != own["pos_embed"].shape:
        # A resolution override (--img-size): resample the position grid as timm's pretrained loader does.
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                                    num_prefix_tokens=prefix)
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(("head.", "head_dist."))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or wrong:
        raise BackboneError(
            f"checkpoint {path} does not fit this backbone: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {wrong[:5]}")
    model.load_state_dict(state, strict=False)  # only head keys may be absent (checked above)


def create_backbone(name: str, checkpoint: str | os.PathLike | None = None, drop_path: float = 0.0,
                    **kwargs: Any) -> nn.Module:
    """A timm model with pretrained weights: from --checkpoint, else from the hub via timm.

    Args:
        name: timm model name with optional pretrained tag, e.g. 'vit_base_patch16_224.augreg_in21k'.
        checkpoint: Local weights; no network is touched when given.
        drop_path: Stochastic depth at the last block (timm rises linearly from 0 at block 0).
        kwargs: Extra timm.create_model arguments (e.g. img_size).
    """
    if not timm.is_model(name.split(".")[0]):
        raise BackboneError(f"unknown timm model '{name}' (see timm.list_models('vit_*'))")
    try:
        if checkpoint is not None:
            model = timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **kwargs)
            load_weights(model, checkpoint)
            return model
        if not _has_pretrained_source(name):
            raise BackboneError(f"timm has no pretrained weights for '{name}'; pass --checkpoint FILE")
        offline = hub_offline()
        try:
            with _local_files_only(offline):
                return timm.create_model(name, pretrained=True, drop_path_rate=drop_path, **kwargs)
        except OSError as e:  # huggingface_hub's not-found / connection errors are OSErrors
            why = ("offline (HF_HUB_OFFLINE set or the hub unreachable) and not in the local cache"
                   if offline else f"download failed ({e})")
            raise BackboneError(f"cannot load pretrained weights for '{name}': {why}; "
                                "pass --checkpoint FILE (safetensors or .pth)") from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneError(f"unknown timm model '{name}'") from None
        raise
