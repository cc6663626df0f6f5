"""Fold a task's adapter into plain timm weights, functionally (the base is never written)."""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from . import rlrr
from .config import RLRRConfig
from .errors import AdapterShapeError, AdapterValueError
from .inject import adapter_state_dict, base_module, plan_targets, unwrap, wrapped_config
from .names import HEAD_NAMES, RLRR_C, RLRR_L, RLRR_S, SSF_SCALE, SSF_SHIFT, tensor_name

__all__ = ["fold_adapter", "check_bounds", "weight_bounds", "merge_rlrr", "VALUE_LIMIT"]


@torch.no_grad()
def fold_adapter(
        backbone: nn.Module,
        tensors: Mapping[str, torch.Tensor],
        config: RLRRConfig,
) -> dict[str, torch.Tensor]:
    """Merged tensors for one task, keyed by the plain backbone's parameter names.

    Only the tensors an adapter changes are returned (and the task head), so
    `torch.func.functional_call(backbone, folded, (images,))` runs the task on the untouched
    backbone, and `plain.load_state_dict(folded, strict=False)` makes it permanent on a copy.

    Args:
        backbone: Plain or wrapped timm ViT whose frozen weights are folded (read only).
        tensors: The adapter's tensors (`adapter_state_dict` / `load_adapter(...).tensors`).
        config: The adapter's configuration.

    Raises:
        AdapterShapeError: A tensor the config needs is missing.
        AdapterValueError: The result is not finite.
    """
    folded = dict(_iter_fold(backbone, tensors, config))
    bad = [k for k, v in folded.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterValueError(f"folding produced non-finite values in {bad[:5]}")
    return folded


def _iter_fold(
        backbone: nn.Module, tensors: Mapping[str, torch.Tensor], config: RLRRConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    for t in plan_targets(backbone, config):
        m = base_module(backbone.get_submodule(t.path))
        dev = m.weight.device
        get = lambda tag: _need(tensors, tensor_name(t.path, tag), dev)  # noqa: B023 - used in this iteration
        if t.kind == "ssf":
            w, b = rlrr.fold_ssf(m.weight, m.bias, get(SSF_SCALE), get(SSF_SHIFT))
        else:
            l = get(RLRR_L) if config.left else None
            c = get(RLRR_C) if config.right else None
            w = rlrr.rescale_weight(m.weight, l, c, config.residual)
            b = m.bias
            if b is not None and tensor_name(t.path, RLRR_S) in tensors:
                b = b + get(RLRR_S).to(b.dtype)
        yield f"{t.path}.weight", w
        if b is not None:
            yield f"{t.path}.bias", b
    ref = next(backbone.parameters())
    for name in HEAD_NAMES:
        yield name, _need(tensors, name, ref.device).to(ref.dtype)


def _need(tensors: Mapping[str, torch.Tensor], name: str, device: torch.device | None) -> torch.Tensor:
    if name not in tensors:
        raise AdapterShapeError(f"adapter tensor '{name}' is missing")
    return tensors[name].to(device) if device is not None else tensors[name]


def merge_rlrr(model: nn.Module) -> nn.Module:
    """A plain timm model of the same architecture with the adapter folded in exactly.

    The input model is not modified; the result owns all its tensors.

    Args:
        model: A model wrapped by `add_rlrr`.
    """
    config = wrapped_config(model)
    tensors = adapter_state_dict(model)
    plain = unwrap(copy.deepcopy(model))  # deep copy first: the input's wrappers stay in place
    folded = fold_adapter(plain, tensors, config)
    with torch.no_grad():
        for name, value in folded.items():
            plain.get_parameter(name).copy_(value)
    return plain.requires_grad_(True)


# Largest |value| a loaded adapter may hold. Trained RLRR vectors are O(1) (the reference init
# draws l from ±2.45, c from ±0.09; SSF γ ≈ 1); 1e4 already rescales a weight by ~1e8, which no
# training produces, and finite-but-huge values (1e30) give inf/NaN scores instead of an error.
VALUE_LIMIT = 1e4


def weight_bounds(backbone: nn.Module, config: RLRRConfig | None = None) -> dict[str, float]:
    """max |W| of every rescaled linear (what `check_bounds` needs; one pass over the backbone).

    Args:
        backbone: Plain or wrapped timm ViT.
        config: Widest target set to cover; the RLRR default when None.
    """
    return {t.path: base_module(backbone.get_submodule(t.path)).weight.detach().abs().max().item()
            for t in plan_targets(backbone, config or RLRRConfig()) if t.kind == "rescale"}


@torch.no_grad()
def check_bounds(
        tensors: Mapping[str, torch.Tensor],
        config: RLRRConfig,
        bounds: Mapping[str, float],
        dtype: torch.dtype = torch.float32,
        limit: float = VALUE_LIMIT,
) -> None:
    """Refuse an adapter that cannot produce finite outputs, without folding anything.

    Costs one pass over the adapter's own values (not the backbone's): every value must be finite
    and within `limit`, and every folded weight's bound max|W|·(1 + max|l|·max|c|) must leave
    `dtype` room for a dot product over the layer's inputs.

    Args:
        tensors: The adapter's tensors (head included).
        config: Its configuration.
        bounds: `weight_bounds` of the backbone.
        dtype: The serving dtype.
        limit: Largest |value| accepted.

    Raises:
        AdapterValueError: Naming the first offending tensor and why.
    """
    peaks = {}
    for name, value in tensors.items():
        if not value.is_floating_point():
            continue
        finite = bool(torch.isfinite(value).all())
        peak = value.abs().max().item() if value.numel() and finite else 0.0
        if not finite or peak > limit:
            what = "non-finite values" if not finite else f"|value| up to {peak:.3g}"
            raise AdapterValueError(f"adapter tensor '{name}' has {what}, beyond the {limit:g} a trained adapter stays "
                             "within: its outputs would not be finite")
        peaks[name] = peak
    room = torch.finfo(dtype).max
    for path, w_max in bounds.items():
        l_max = peaks.get(tensor_name(path, RLRR_L), 1.0) if config.left else 1.0
        c_max = peaks.get(tensor_name(path, RLRR_C), 1.0) if config.right else 1.0
        bound = w_max * ((1.0 if config.residual else 0.0) + l_max * c_max)
        if bound > room / 1e3:  # headroom for the dot product's sum (≤ in_features terms of order 1)
            raise AdapterValueError(f"folded weights of '{path}' could reach {bound:.3g}, beyond what {dtype} holds")
