"""RLRR and its ablations (SSF-like, one-sided, linear probe): `RLRRConfig` switches, one method."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ..config import RLRRConfig
from ..inject import base_module, out_channels, plan_targets, set_module
from ..layers import RLRRLinear, SSFLayer
from ..names import RLRR_C, RLRR_L, RLRR_S, SSF_SCALE, SSF_SHIFT, tensor_name
from .base import Forms, LinearForm, Method, NormForm

__all__ = ["RLRR"]


class RLRR(Method):
    """W' = W ⊙ (1 + l cᵀ) (or W ⊙ l cᵀ), b' = b + s on the block linears; SSF γ, β after norms."""

    name = "rlrr"
    config_class = RLRRConfig

    def shapes(self, model: nn.Module, config: RLRRConfig) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for t in plan_targets(model, config):
            m = base_module(model.get_submodule(t.path))
            if t.kind == "ssf":
                d = out_channels(m)
                shapes[tensor_name(t.path, SSF_SCALE)] = shapes[tensor_name(t.path, SSF_SHIFT)] = (d,)
                continue
            if config.left:
                shapes[tensor_name(t.path, RLRR_L)] = (m.out_features,)
            if config.right:
                shapes[tensor_name(t.path, RLRR_C)] = (t.groups, m.in_features)
            if config.bias_shift and m.bias is not None:
                shapes[tensor_name(t.path, RLRR_S)] = (m.out_features,)
        return shapes

    def wrap(self, model: nn.Module, config: RLRRConfig) -> None:
        for t in plan_targets(model, config):
            base = model.get_submodule(t.path)
            if t.kind == "rescale":
                wrapper = RLRRLinear(base, config, groups=t.groups)
            else:
                wrapper = SSFLayer(base, out_channels(base), config.init, channel_dim=t.channel_dim)
            set_module(model, t.path, wrapper.to(device=base.weight.device, dtype=base.weight.dtype))

    def forms(self, model: nn.Module, config: RLRRConfig, tensors: Mapping[str, torch.Tensor]) -> Forms:
        forms = Forms()
        for t in plan_targets(model, config):
            if t.kind == "ssf":
                forms.norms[t.path] = NormForm(tensor_name(t.path, SSF_SCALE), tensor_name(t.path, SSF_SHIFT))
                continue
            s = tensor_name(t.path, RLRR_S)
            forms.linears[t.path] = LinearForm(
                rescale=True, residual=config.residual,
                l=tensor_name(t.path, RLRR_L) if config.left else None,
                c=tensor_name(t.path, RLRR_C) if config.right else None,
                s=s if config.bias_shift and s in tensors else None)
        return forms
