"""Find an adapter's targets in a timm VisionTransformer; the helpers every method's wrapping uses.

`plan_targets` is RLRR's target rule, `match_modules` PEFT's (LoRA, IA³); `adapters.wrap` puts a
method's wrappers in (`add_adapter`).
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .config import MODEL_LEVEL_SSF, RLRRConfig
from .errors import AdapterConfigError, AdapterModelError
from .layers import AdapterWrapper
from .names import HEAD_NAMES, is_adapter_key

__all__ = [
    "Target", "plan_targets", "adapter_state_dict", "unwrap", "feature_dim",
    "base_module", "backbone_fingerprint", "wrapped_config", "match_modules", "out_channels", "set_module",
    "patch_conv_path",
]
_SSF_BASES = (nn.LayerNorm, nn.Linear, nn.Conv2d)


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Any]] = weakref.WeakKeyDictionary()
_MISSING = object()
T = TypeVar("T")
_PLANS_LOCK = threading.Lock()  # plans are read on loader threads and the engine thread at once


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
    """The frozen module inside a wrapper (any module with a `base_layer`, nested too), or the module itself."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def check_supported(model: nn.Module) -> None:
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
    """Every module an RLRR-family config touches in this model, in a fixed order.

    Args:
        model: A timm VisionTransformer, plain or already wrapped.
        config: The adapter configuration; another method's config touches no RLRR target ([]).
    """
    check_supported(model)
    if not isinstance(config, RLRRConfig):
        return []
    # Memoised per (model, config): a server validates thousands of tasks of one config against one
    # frozen backbone, and each plan walks every block (~2 ms for ViT-S, 3 times per task load).
    return list(memoised(model, ("targets", config), lambda: tuple(_plan_targets(model, config))))


def memoised(model: nn.Module, key: Hashable, build: Callable[[], T]) -> T:
    """`build()` once per (model, key) until `set_module` changes the model's structure.

    For what depends only on a model's structure (targets, tensor shapes): a server checks thousands
    of tasks of one config against one frozen backbone. Return values are shared: callers copy.

    Args:
        model: The model the value describes.
        key: What else the value depends on (hashable, e.g. a frozen config).
        build: Computes the value (raising: nothing is remembered).
    """
    with _PLANS_LOCK:
        found = _PLANS.get(model, {}).get(key, _MISSING)
    if found is _MISSING:
        found = build()
        with _PLANS_LOCK:
            _PLANS.setdefault(model, {})[key] = found
    return found  # type: ignore[return-value]


def _plan_targets(model: nn.Module, config: RLRRConfig) -> list[Target]:
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


def patch_conv_path(model: nn.Module) -> str | None:
    """Path of the patch-embedding Conv2d (a linear over patches), or None when there is none."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return "patch_embed.proj" if isinstance(base_module(proj) if proj is not None else None, nn.Conv2d) else None


def match_modules(model: nn.Module, names: tuple[str, ...], what: str = "target_modules") -> list[str]:
    """The linears PEFT's rule picks: a module whose path is a name or ends with '.' + name.

    Only the block linears and the patch-embedding conv can be adapted (they are what the fold and
    the mixed batch handle); a name matching nothing, or matching another module, is refused.

    Args:
        model: A timm ViT, plain or wrapped.
        names: Module names or path suffixes, e.g. ('qkv', 'proj') or ('attn.qkv',).
        what: The config field, for messages.

    Raises:
        AdapterConfigError: A name matches nothing, or matches a module that is not adaptable.
    """
    check_supported(model)
    allowed = {f"blocks.{i}.{n}" for i, block in enumerate(model.blocks) for n, m in block.named_modules()
               if isinstance(base_module(m), nn.Linear) and "base_layer" not in n}
    allowed |= {patch_conv_path(model)} - {None}
    paths = list(dict.fromkeys(p.replace(".base_layer", "") for p, _ in model.named_modules() if p))
    found: list[str] = []
    for name in names:
        hits = [p for p in paths if p == name or p.endswith("." + name)]
        if not hits:
            raise AdapterConfigError(f"{what}: {name!r} matches no module of this backbone")
        bad = [p for p in hits if p not in allowed]
        if bad:
            raise AdapterConfigError(f"{what}: {name!r} matches {bad[:3]}, which is not a block linear or the "
                                     "patch-embedding conv (the modules an adapter here can change)")
        found += [p for p in hits if p not in found]
    order = {p: i for i, p in enumerate(paths)}
    return sorted(found, key=order.__getitem__)


def _get(root: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise AdapterModelError(f"{where} has no module '{path}' (not a standard timm ViT block?)") from None


def feature_dim(model: nn.Module) -> int:
    return model.num_features if hasattr(model, "num_features") else model.embed_dim


def out_channels(module: nn.Module) -> int:
    """Channels a norm, linear or conv outputs."""
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return module.weight.shape[0]


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    with _PLANS_LOCK:
        _PLANS.pop(root, None)
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def wrapped_config(model: nn.Module) -> Any:
    """The config `add_rlrr` gave a model.

    Raises:
        AdapterModelError: The model has no adapter.
    """
    config = getattr(model, "rlrr_config", None)
    if config is None:
        raise AdapterModelError("model has no adapter (add_adapter / add_rlrr was not called on it)")
    return config


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every wrapper by its base layer, in place; returns the plain model."""
    for path, module in list(model.named_modules()):
        if isinstance(module, AdapterWrapper):
            set_module(model, path, module.base_layer)
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
