"""The trainer's view of the frozen backbone: `adapters.build_backbone` with the CLI's wording.

There is one backbone loader in the project (`adapters.backbones`), shared with the server, so a
backbone the trainer builds is the one the server builds from the same `BackboneSpec`. This module
only maps its errors onto the trainer's `BackboneError` and names the CLI flag that fixes them.
Offline (HF_HUB_OFFLINE=1, or the hub unreachable) without --checkpoint is an immediate error that
says to pass --checkpoint, instead of huggingface_hub's minute of retries.
"""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from adapters import backbones
from adapters.backbones import DEFAULT_BACKBONE, BackboneSpec, hub_offline, load_weights

from .errors import BackboneError

__all__ = ["DEFAULT_BACKBONE", "backbone_spec", "create_backbone", "load_weights", "hub_offline"]


def backbone_spec(name: str, checkpoint: str | os.PathLike | None = None, img_size: int | None = None) -> BackboneSpec:
    """The spec of a training run's backbone (what the adapter records and the server must match).

    Args:
        name: timm model name with optional pretrained tag.
        checkpoint: Local weights (--checkpoint); timm's pretrained weights when None.
        img_size: Input resolution (--img-size): a real `img_size` model kwarg, so the position grid
            is resampled once at load, as timm's pretrained loader does, and the server builds the
            same backbone from the recorded spec.
    """
    return BackboneSpec(name=name, checkpoint=None if checkpoint is None else str(checkpoint),
                        model_kwargs={"img_size": img_size} if img_size else {})


def create_backbone(spec: BackboneSpec | str, checkpoint: str | os.PathLike | None = None, drop_path: float = 0.0,
                    **kwargs: Any) -> nn.Module:
    """A timm model with pretrained weights: from --checkpoint, else from the hub via timm.

    Args:
        spec: The backbone, or a timm name (then `checkpoint` and `kwargs` complete the spec).
        checkpoint: Local weights; no network is touched when given. Only with a name.
        drop_path: Stochastic depth at the last block (timm rises linearly from 0 at block 0).
        kwargs: Extra timm.create_model arguments (e.g. img_size). Only with a name.

    Raises:
        BackboneError: The message names the problem and, for missing weights, --checkpoint.
    """
    if not isinstance(spec, str) and (checkpoint is not None or kwargs):
        raise TypeError("create_backbone: checkpoint and kwargs complete a name; a BackboneSpec already has them")
    try:
        if isinstance(spec, str):
            spec = BackboneSpec(name=spec, checkpoint=None if checkpoint is None else str(checkpoint),
                                model_kwargs=kwargs)
        return backbones.build_backbone(spec, drop_path_rate=drop_path)[0]
    except backbones.BackboneError as e:
        hint = "; pass --checkpoint FILE (safetensors or .pth)" if e.needs_weights else ""
        raise BackboneError(f"{e}{hint}") from None
    except ValueError as e:  # model_kwargs that cannot be recorded
        raise BackboneError(str(e)) from None
