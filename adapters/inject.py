"""Find the RLRR targets in a timm VisionTransformer, wrap them, freeze the rest."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .config import MODEL_LEVEL_SSF, RLRRConfig
from .errors import AdapterModelError
from .layers import RLRRLinear, SSFLayer
from .names import HEAD_NAMES, RLRR_C, RLRR_L, RLRR_S, SSF_SCALE, SSF_SHIFT, is_adapter_key, tensor_name

__all__ = [
    "Target", "plan_targets", "add_rlrr", "adapter_state_dict", "adapter_shapes", "unwrap",
    "base_module", "backbone_fingerprint", "wrapped_config",
]

_WRAPPERS = (RLRRLinear, SSFLayer)
_SSF_BASES = (nn.LayerNorm, nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """One module an adapter touches.

    Attributes:
        path: Module path in the plain backbone, e.g. 'blocks.3.attn.qkv'.
        kind: 'rescale' (RLRRLinear) or 'ssf' (SSFLayer).
        groups: Column-vector groups (rescale only).
        channel_dim: Channel axis of the module's output (ssf only).
    """

    path: str
    kind: str
    groups: int = 1
    channel_dim: int = -1


def base_module(module: nn.Module) -> nn.Module:
    """The frozen module inside a wrapper (any module with a `base_layer`), or the module itself."""
    return getattr(module, "base_layer", module)


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise AdapterModelError(
            f"RLRR supports timm VisionTransformer models, got {type(model).__name__}; "
            "use e.g. timm.create_model('vit_base_patch16_224')"
        )
    if hasattr(model, "head_dist"):
        raise AdapterModelError("distilled ViTs (two heads, e.g. deit_*_distilled_*) are not supported")


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _resolve_model_ssf(model: nn.Module, name: str) -> tuple[str, int]:
    """Model-level SSF targets: after the patch embedding, after the final norm."""
    if name == "patch_embed":
        pe = model.patch_embed
        if not _is_identity(getattr(pe, "norm", None)):
            return "patch_embed.norm", -1
        return "patch_embed.proj", 1  # Conv2d output is NCHW
    for path in ("norm", "fc_norm"):  # avg-pool ViTs put the final norm after pooling
        if not _is_identity(getattr(model, path, None)):
            return path, -1
    raise AdapterModelError("the model has neither a final 'norm' nor an 'fc_norm' to scale and shift")


def plan_targets(model: nn.Module, config: RLRRConfig) -> list[Target]:
    """Every module the config touches in this model, in a fixed order.

    Args:
        model: A timm VisionTransformer, plain or already wrapped.
        config: The adapter configuration.
    """
    _check_supported(model)
    targets: list[Target] = []
    if "patch_embed" in config.ssf_targets:
        path, dim = _resolve_model_ssf(model, "patch_embed")
        targets.append(Target(path, "ssf", channel_dim=dim))
    for i, block in enumerate(model.blocks):
        for name in config.rescale_targets:
            module = _get(block, name, f"blocks.{i}")
            if not isinstance(base_module(module), nn.Linear):
                raise AdapterModelError(f"blocks.{i}.{name} is {type(module).__name__}, not nn.Linear")
            groups = 3 if config.split_qkv and name.endswith("qkv") else 1
            targets.append(Target(f"blocks.{i}.{name}", "rescale", groups=groups))
        for name in config.ssf_targets:
            if name in MODEL_LEVEL_SSF:
                continue
            module = base_module(_get(block, name, f"blocks.{i}"))
            if not isinstance(module, _SSF_BASES):
                raise AdapterModelError(f"blocks.{i}.{name} is {type(module).__name__}; SSF needs a norm or linear")
            targets.append(Target(f"blocks.{i}.{name}", "ssf", channel_dim=-1))
    if "norm" in config.ssf_targets:
        targets.append(Target(_resolve_model_ssf(model, "norm")[0], "ssf", channel_dim=-1))
    return targets


def _get(root: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise AdapterModelError(f"{where} has no module '{path}' (not a standard timm ViT block?)") from None


def _feature_dim(model: nn.Module) -> int:
    return model.num_features if hasattr(model, "num_features") else model.embed_dim


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return module.weight.shape[0]


def adapter_shapes(model: nn.Module, config: RLRRConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor an adapter for this model and config holds (head included).

    Args:
        model: The backbone (plain or wrapped).
        config: The adapter configuration.
        num_classes: Classes of the task head.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan_targets(model, config):
        m = base_module(model.get_submodule(t.path))
        if t.kind == "ssf":
            d = _out_channels(m)
            shapes[tensor_name(t.path, SSF_SCALE)] = shapes[tensor_name(t.path, SSF_SHIFT)] = (d,)
            continue
        if config.left:
            shapes[tensor_name(t.path, RLRR_L)] = (m.out_features,)
        if config.right:
            shapes[tensor_name(t.path, RLRR_C)] = (t.groups, m.in_features)
        if config.bias_shift and m.bias is not None:
            shapes[tensor_name(t.path, RLRR_S)] = (m.out_features,)
    head_weight, head_bias = HEAD_NAMES
    shapes[head_weight] = (num_classes, _feature_dim(model))
    shapes[head_bias] = (num_classes,)
    return shapes


def add_rlrr(model: nn.Module, config: RLRRConfig | None = None, num_classes: int = 1000) -> nn.Module:
    """Turn a timm ViT into an RLRR model, in place: frozen backbone, adapter tensors, new head.

    Args:
        model: A plain timm VisionTransformer.
        config: What to adapt; the paper's default when None.
        num_classes: Classes of the new zero-initialised task head.

    Returns:
        The same model object, wrapped; `model.rlrr_config` holds the config.
    """
    config = config or RLRRConfig()
    if hasattr(model, "rlrr_config"):
        raise AdapterModelError("model already has an RLRR adapter; start from a plain timm model")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    targets = plan_targets(model, config)
    model.requires_grad_(False)
    model.reset_classifier(num_classes)
    nn.init.zeros_(model.head.weight)  # reference init: head = 0
    nn.init.zeros_(model.head.bias)
    for t in targets:
        base = model.get_submodule(t.path)
        if t.kind == "rescale":
            wrapper = RLRRLinear(base, config, groups=t.groups)
        else:
            wrapper = SSFLayer(base, _out_channels(base), config.init, channel_dim=t.channel_dim)
        ref = base.weight
        _set(model, t.path, wrapper.to(device=ref.device, dtype=ref.dtype))
    model.rlrr_config = config
    return model


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def wrapped_config(model: nn.Module) -> RLRRConfig:
    """The config `add_rlrr` gave a model.

    Raises:
        AdapterModelError: The model has no adapter.
    """
    config = getattr(model, "rlrr_config", None)
    if config is None:
        raise AdapterModelError("model has no RLRR adapter (add_rlrr was not called on it)")
    return config


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every wrapper by its base layer, in place; returns the plain model."""
    for path, module in list(model.named_modules()):
        if isinstance(module, _WRAPPERS):
            _set(model, path, module.base_layer)
    if hasattr(model, "rlrr_config"):
        del model.rlrr_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter and head tensors of a wrapped model (detached CPU copies), nothing else."""
    return {
        name: t.detach().to("cpu", copy=True).contiguous()
        for name, t in model.state_dict().items()
        if is_adapter_key(name) or name in HEAD_NAMES
    }


@torch.no_grad()
def backbone_fingerprint(model: nn.Module) -> str:
    """sha256 of the frozen backbone weights (names, shapes, fp32 values); the head is excluded.

    A wrapped model and the plain model it came from give the same fingerprint. Cost: one pass
    over the weights (about 0.5 s for ViT-B/16 on CPU).
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if is_adapter_key(name) or name.startswith("head.") or name.startswith("head_dist."):
            continue
        name = name.replace(".base_layer", "")
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
