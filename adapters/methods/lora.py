"""LoRA (Hu et al. 2021) as PEFT defines it: W' = W + k · B A, k = α / r (rsLoRA: α / √r)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import AdapterConfigError
from ..inject import base_module, match_modules, set_module
from ..layers import LoRALayer
from ..names import LORA_A, LORA_B, tensor_name
from .base import Forms, LinearForm, Method, config_from_fields

__all__ = ["LoRA", "LoRAConfig"]


@dataclass(frozen=True)
class LoRAConfig:
    """Which linears get a rank-r update, and its scale (PEFT's field names).

    `target_modules` match as in PEFT: a module whose path is the name or ends with '.' + name, so
    'proj' also catches `patch_embed.proj` (a Conv2d, linear over patches: it folds like a linear).
    """

    target_modules: tuple[str, ...] = field(
        default=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        metadata={"help": "Module names or path suffixes that get B A."})
    r: int = field(default=8, metadata={"help": "Rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "α: the update is scaled by α / r."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by α / √r instead (rsLoRA)."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules or not all(isinstance(n, str) and n for n in self.target_modules):
            raise AdapterConfigError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= 4096:
            raise AdapterConfigError(f"r must be an integer in [1, 4096], got {self.r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha == 0:
            raise AdapterConfigError(f"lora_alpha must be a finite non-zero number, got {alpha!r}")
        object.__setattr__(self, "lora_alpha", float(alpha))
        if not isinstance(self.use_rslora, bool):
            raise AdapterConfigError(f"use_rslora must be true or false, got {self.use_rslora!r}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        return config_from_fields(cls, d)


class LoRA(Method):
    """PEFT's LoRA: A kaiming-uniform (a = √5), B = 0; any block linear and the patch conv."""

    name = "lora"
    config_class = LoRAConfig

    def shapes(self, model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for path in match_modules(model, config.target_modules):
            w = base_module(model.get_submodule(path)).weight
            shapes[tensor_name(path, LORA_A)] = (config.r, w[0].numel())
            shapes[tensor_name(path, LORA_B)] = (w.shape[0], config.r)
        return shapes

    def wrap(self, model: nn.Module, config: LoRAConfig) -> None:
        for path in match_modules(model, config.target_modules):
            base = model.get_submodule(path)
            wrapper = LoRALayer(base, config.r, config.scale)
            set_module(model, path, wrapper.to(device=base.weight.device, dtype=base.weight.dtype))

    def forms(self, model: nn.Module, config: LoRAConfig, tensors: Mapping[str, torch.Tensor]) -> Forms:
        return Forms(linears={
            path: LinearForm(lora_a=tensor_name(path, LORA_A), lora_b=tensor_name(path, LORA_B),
                             lora_scale=config.scale)
            for path in match_modules(model, config.target_modules)})
