"""IA³ (Liu et al. 2022) as PEFT defines it: output scaling s ⊙ (W x + b), input scaling W (s ⊙ x) + b.

Both are RLRR's rescaling with one side fixed, so IA³ serves through RLRR's GEMM and kernel:
output, W' = W ⊙ (1 + (s − 1) 1ᵀ), b' = b + (s − 1) ⊙ b; input, W' = W ⊙ (1 + 1 (s − 1)ᵀ).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import AdapterConfigError
from ..inject import base_module, match_modules, set_module
from ..layers import IA3Layer
from ..names import IA3_L, tensor_name
from .base import Forms, LinearForm, Method, config_from_fields

__all__ = ["IA3", "IA3Config"]


@dataclass(frozen=True)
class IA3Config:
    """Which linears IA³ scales, and which of them on the input side (PEFT's field names)."""

    target_modules: tuple[str, ...] = field(default=("attn.qkv", "mlp.fc2"),
                                            metadata={"help": "Module names or path suffixes IA³ scales."})
    feedforward_modules: tuple[str, ...] = field(default=("mlp.fc2",),
                                                 metadata={"help": "Of those, the ones scaled on the input."})

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(n, str) and n for n in value):
                raise AdapterConfigError(f"{name} must be a list of module names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.target_modules:
            raise AdapterConfigError("target_modules is empty: IA³ would scale nothing")

    def to_dict(self) -> dict[str, Any]:
        return {"target_modules": list(self.target_modules), "feedforward_modules": list(self.feedforward_modules)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IA3Config:
        return config_from_fields(cls, d)


def _targets(model: nn.Module, config: IA3Config) -> list[tuple[str, bool]]:
    """(path, feedforward) of every scaled module."""
    paths = match_modules(model, config.target_modules)
    ff = set(match_modules(model, config.feedforward_modules, "feedforward_modules")) if config.feedforward_modules \
        else set()
    if not ff <= set(paths):
        raise AdapterConfigError(f"feedforward_modules {sorted(ff - set(paths))[:3]} are not in target_modules")
    return [(p, p in ff) for p in paths]


class IA3(Method):
    """PEFT's IA³: one vector per module, ones at the start."""

    name = "ia3"
    config_class = IA3Config

    def shapes(self, model: nn.Module, config: IA3Config) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for path, ff in _targets(model, config):
            w = base_module(model.get_submodule(path)).weight
            shapes[tensor_name(path, IA3_L)] = (w.shape[1] if ff else w.shape[0],)
        return shapes

    def wrap(self, model: nn.Module, config: IA3Config) -> None:
        for path, ff in _targets(model, config):
            base = model.get_submodule(path)
            set_module(model, path, IA3Layer(base, ff).to(device=base.weight.device, dtype=base.weight.dtype))

    def forms(self, model: nn.Module, config: IA3Config, tensors: Mapping[str, torch.Tensor]) -> Forms:
        forms = Forms()
        for path, ff in _targets(model, config):
            m = base_module(model.get_submodule(path))
            v = tensors[tensor_name(path, IA3_L)].detach().to("cpu", torch.float32) - 1.0  # s − 1
            name = tensor_name(path, IA3_L)
            if ff:  # W (s ⊙ x): c = s − 1 over the inputs (a conv's inputs repeat over its kernel window)
                window = m.weight[0, 0].numel() if m.weight.dim() == 4 else 1
                forms.derived[f"{name}:c"] = v.repeat_interleave(window)[None]  # (1, in·kh·kw)
                forms.linears[path] = LinearForm(rescale=True, c=f"{name}:c")
                continue
            forms.derived[f"{name}:l"] = v  # (out,)
            shift = None
            if m.bias is not None:  # s ⊙ b = b + (s − 1) ⊙ b
                shift = f"{name}:s"
                forms.derived[shift] = v * m.bias.detach().to("cpu", torch.float32)
            forms.linears[path] = LinearForm(rescale=True, l=f"{name}:l", s=shift)
        return forms
