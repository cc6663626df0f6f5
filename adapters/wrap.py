"""Put an adapter of any method into a timm ViT (`add_adapter`), and the shapes its tensors have."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .config import RLRRConfig
from .errors import AdapterModelError
from .inject import check_supported, feature_dim, memoised
from .methods import method_of
from .names import HEAD_NAMES

__all__ = ["add_adapter", "add_rlrr", "adapter_shapes"]


def adapter_shapes(model: nn.Module, config: Any, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an adapter for this model and config holds (head included).

    Args:
        model: The backbone (plain or wrapped).
        config: The adapter configuration (any method's).
        num_classes: Classes of the task head.
    """
    shapes = dict(memoised(model, ("shapes", config), lambda: method_of(config).shapes(model, config)))
    head_weight, head_bias = HEAD_NAMES
    shapes[head_weight] = (num_classes, feature_dim(model))
    shapes[head_bias] = (num_classes,)
    return shapes


def add_adapter(model: nn.Module, config: Any = None, num_classes: int = 1000) -> nn.Module:
    """Turn a timm ViT into an adapted model, in place: frozen backbone, adapter tensors, new head.

    Args:
        model: A plain timm VisionTransformer.
        config: Any method's config (`RLRRConfig`, `LoRAConfig`, ...); the RLRR paper's when None.
        num_classes: Classes of the new zero-initialised task head.

    Returns:
        The same model object, wrapped; `model.rlrr_config` holds the config (any method's).
    """
    config = config if config is not None else RLRRConfig()
    method = method_of(config)
    if hasattr(model, "rlrr_config"):
        raise AdapterModelError("model already has an adapter; start from a plain timm model")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_supported(model)
    method.shapes(model, config)  # refuses targets the model lacks before anything changes
    model.requires_grad_(False)
    model.reset_classifier(num_classes)
    nn.init.zeros_(model.head.weight)  # reference init: head = 0
    nn.init.zeros_(model.head.bias)
    method.wrap(model, config)
    model.rlrr_config = config
    return model


add_rlrr = add_adapter  # the name from before other methods existed
