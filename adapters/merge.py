"""Fold a task's adapter into plain timm weights, functionally (the base is never written).

Every method folds through its forms (`adapters.methods`): W' = W ⊙ (a + l cᵀ) + k · B A,
b' = b + s on linears (the patch conv as a linear over patches), γ, β into the layer before an SSF.
"""
from __future__ import annotations

import collections
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import rlrr
from .config import RLRRConfig
from .errors import AdapterShapeError, AdapterValueError
from .inject import adapter_state_dict, base_module, patch_conv_path, unwrap, wrapped_config
from .methods import Forms, LinearForm, method_of
from .names import HEAD_NAMES
from .packed import PackedTensors

__all__ = ["fold_adapter", "fold_linear", "check_bounds", "weight_bounds", "merge_rlrr", "merge_adapter",
           "adapter_forms", "VALUE_LIMIT"]


def adapter_forms(backbone: nn.Module, tensors: Mapping[str, torch.Tensor], config: Any
                  ) -> tuple[Forms, Mapping[str, torch.Tensor]]:
    """A task's forms, and its tensors with the forms' derived tensors beside them.

    Args:
        backbone: Plain or wrapped timm ViT (read only).
        tensors: The adapter's tensors.
        config: Any method's config.
    """
    forms = method_of(config).forms(backbone, config, tensors)
    return forms, (collections.ChainMap(forms.derived, tensors) if forms.derived else tensors)


@torch.no_grad()
def fold_adapter(
        backbone: nn.Module,
        tensors: Mapping[str, torch.Tensor],
        config: Any,
) -> dict[str, torch.Tensor]:
    """Merged tensors for one task, keyed by the plain backbone's parameter names.

    Only the tensors an adapter changes are returned (and the task head), so
    `torch.func.functional_call(backbone, folded, (images,))` runs the task on the untouched
    backbone, and `plain.load_state_dict(folded, strict=False)` makes it permanent on a copy.

    Args:
        backbone: Plain or wrapped timm ViT whose frozen weights are folded (read only).
        tensors: The adapter's tensors (`adapter_state_dict` / `load_adapter(...).tensors`).
        config: The adapter's configuration (any method's).

    Raises:
        AdapterShapeError: A tensor the config needs is missing.
        AdapterValueError: The result is not finite.
    """
    forms, tensors = adapter_forms(backbone, tensors, config)
    folded = dict(_iter_fold(backbone, tensors, forms))
    bad = [k for k, v in folded.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterValueError(f"folding produced non-finite values in {bad[:5]}")
    return folded


def fold_linear(weight: torch.Tensor, form: LinearForm, get: Any) -> torch.Tensor:
    """W ⊙ (a + l cᵀ) + k · B A for one linear (a conv as a linear over patches), in W's dtype.

    Args:
        weight: Frozen (out, in) or (out, in, kh, kw) weight; read, never written.
        form: The task's form for it.
        get: Tensor name -> tensor on W's device.
    """
    flat = weight.reshape(weight.shape[0], -1)  # (out, in·kh·kw); a view
    w = flat
    if form.rescale:
        l = get(form.l) if form.l else None
        c = get(form.c) if form.c else None
        w = rlrr.rescale_weight(flat, l, c, form.residual) if l is not None or c is not None \
            else flat * (2.0 if form.residual else 1.0)  # l = c = 1: W ⊙ (a + 1)
    if form.lora_a is not None:
        delta = get(form.lora_b).float() @ get(form.lora_a).float()  # (out, in): rank r
        w = (w.float() + form.lora_scale * delta).to(weight.dtype)
    return w.reshape(weight.shape)


def _iter_fold(backbone: nn.Module, tensors: Mapping[str, torch.Tensor], forms: Forms
               ) -> Iterator[tuple[str, torch.Tensor]]:
    for path, form in forms.linears.items():
        m = base_module(backbone.get_submodule(path))
        get = lambda name: _need(tensors, name, m.weight.device)  # noqa: B023 - used in this iteration
        if form.changes_weight:
            yield f"{path}.weight", fold_linear(m.weight, form, get)
        if form.s is not None and m.bias is not None:
            yield f"{path}.bias", m.bias + get(form.s).to(m.bias.dtype)
    for path, form in forms.norms.items():
        m = base_module(backbone.get_submodule(path))
        get = lambda name: _need(tensors, name, m.weight.device)  # noqa: B023
        d = m.weight.shape[0]
        scale = get(form.scale) if form.scale else torch.ones(d, device=m.weight.device)
        shift = get(form.shift) if form.shift else torch.zeros(d, device=m.weight.device)
        w, b = rlrr.fold_ssf(m.weight, m.bias, scale, shift)
        if form.scale:
            yield f"{path}.weight", w
        if b is not None:
            yield f"{path}.bias", b
    ref = next(backbone.parameters())
    for name in HEAD_NAMES:
        yield name, _need(tensors, name, ref.device).to(ref.dtype)


def _need(tensors: Mapping[str, torch.Tensor], name: str, device: torch.device | None) -> torch.Tensor:
    if name not in tensors:
        raise AdapterShapeError(f"adapter tensor '{name}' is missing")
    return tensors[name].to(device) if device is not None else tensors[name]


def merge_adapter(model: nn.Module) -> nn.Module:
    """A plain timm model of the same architecture with the adapter (any method's) folded in exactly.

    The input model is not modified; the result owns all its tensors.

    Args:
        model: A model wrapped by `add_adapter` / `add_rlrr`.
    """
    config = wrapped_config(model)
    tensors = adapter_state_dict(model)
    plain = unwrap(copy.deepcopy(model))  # deep copy first: the input's wrappers stay in place
    folded = fold_adapter(plain, tensors, config)
    with torch.no_grad():
        for name, value in folded.items():
            plain.get_parameter(name).copy_(value)
    return plain.requires_grad_(True)


merge_rlrr = merge_adapter  # the name from before other methods existed


# Largest |value| a loaded adapter may hold. Trained RLRR vectors are O(1) (the reference init
# draws l from ±2.45, c from ±0.09; SSF γ ≈ 1; LoRA's A from ±1/√in, B small); 1e4 already rescales a
# weight by ~1e8, which no training produces, and finite-but-huge values (1e30) give inf/NaN scores
# instead of an error.
VALUE_LIMIT = 1e4


def weight_bounds(backbone: nn.Module, config: RLRRConfig | None = None) -> dict[str, float]:
    """max |W| of every linear an adapter may change (what `check_bounds` needs; one pass over them).

    Args:
        backbone: Plain or wrapped timm ViT.
        config: Unused (kept for callers from before): every block linear and the patch conv are covered.
    """
    paths = [f"blocks.{i}.{n}" for i, b in enumerate(backbone.blocks) for n, m in b.named_modules()
             if isinstance(base_module(m), nn.Linear) and not n.endswith("base_layer")]
    paths += [p for p in (patch_conv_path(backbone),) if p is not None]
    return {p: base_module(backbone.get_submodule(p)).weight.detach().abs().max().item() for p in paths}


def _peaks(tensors: Mapping[str, torch.Tensor], limit: float) -> dict[str, float]:
    packed = _packed_peaks(tensors, limit)
    if packed is not None:
        return packed
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
    return peaks


def _packed_peaks(tensors: Mapping[str, torch.Tensor], limit: float) -> dict[str, float] | None:
    # One pass over a PackedTensors' flat buffer instead of ~4 tiny ops per tensor: ~200 tensors of a
    # ViT-S task cost ~10 ms one by one, most of a task's load. None (the per-tensor path, which also
    # names the offender) when the tensors are not packed or a value is out of bounds.
    if not isinstance(tensors, PackedTensors) or not tensors.flat.is_floating_point():
        return None
    flat = tensors.flat.detach().abs().float()  # (P,)
    if not bool(torch.isfinite(flat).all()) or (flat.numel() and flat.max().item() > limit):
        return None
    spans = [(name, offset, numel) for name, (offset, numel, _) in tensors.layout.items()]
    starts = [offset for _, offset, numel in spans if numel]
    maxima = np.maximum.reduceat(flat.cpu().numpy(), starts).tolist() if starts else []  # one max per tensor
    found = iter(maxima)
    peaks = {name: (next(found) if numel else 0.0) for name, _, numel in spans}
    separate = _peaks(tensors.separate, limit) if tensors.separate else {}
    return {**peaks, **separate}


def _rlrr_forms(config: RLRRConfig, bounds: Mapping[str, float], tensors: Mapping[str, torch.Tensor]) -> Forms:
    # RLRR's forms from its tensor names alone (callers that have no backbone at hand)
    from .names import RLRR_C, RLRR_L, tensor_name
    return Forms(linears={p: LinearForm(rescale=True, residual=config.residual,
                                        l=tensor_name(p, RLRR_L) if config.left else None,
                                        c=tensor_name(p, RLRR_C) if config.right else None)
                          for p in bounds if any(k.startswith(p + ".rlrr_") for k in tensors)})


@torch.no_grad()
def check_bounds(
        tensors: Mapping[str, torch.Tensor],
        config: Any,
        bounds: Mapping[str, float],
        dtype: torch.dtype = torch.float32,
        limit: float = VALUE_LIMIT,
        forms: Forms | None = None,
) -> None:
    """Refuse an adapter that cannot produce finite outputs, without folding anything.

    Costs one pass over the adapter's own values (not the backbone's): every value must be finite
    and within `limit`, and every folded weight's bound max|W|·(a + max|l|·max|c|) + k·r·max|B|·max|A|
    must leave `dtype` room for a dot product over the layer's inputs.

    Args:
        tensors: The adapter's tensors (head included; with the forms' derived tensors, if any).
        config: Its configuration.
        bounds: `weight_bounds` of the backbone.
        dtype: The serving dtype.
        limit: Largest |value| accepted.
        forms: The adapter's forms (`adapter_forms`); needed for any method but RLRR.

    Raises:
        AdapterValueError: Naming the first offending tensor and why.
    """
    peaks = _peaks(tensors, limit)
    if forms is None:
        if not isinstance(config, RLRRConfig):
            raise ValueError(f"check_bounds needs the forms of a {type(config).__name__} adapter")
        forms = _rlrr_forms(config, bounds, tensors)
    room = torch.finfo(dtype).max
    for path, form in forms.linears.items():
        w_max = bounds.get(path, 0.0)
        bound = w_max
        if form.rescale:
            l_max = peaks.get(form.l, 1.0) if form.l else 1.0
            c_max = peaks.get(form.c, 1.0) if form.c else 1.0
            bound = w_max * ((1.0 if form.residual else 0.0) + l_max * c_max)
        if form.lora_a is not None:
            rank = tensors[form.lora_a].shape[0]
            bound += abs(form.lora_scale) * rank * peaks.get(form.lora_a, 0.0) * peaks.get(form.lora_b, 0.0)
        if bound > room / 1e3:  # headroom for the dot product's sum (≤ in_features terms of order 1)
            raise AdapterValueError(f"folded weights of '{path}' could reach {bound:.3g}, beyond what {dtype} holds")
