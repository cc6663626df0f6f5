"""BitFit (Ben Zaken et al. 2022), the RLRR paper's baseline: every bias of every linear and norm shifts."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..config import RLRRConfig
from ..errors import AdapterConfigError
from ..inject import base_module, out_channels, plan_targets, set_module
from ..layers import BiasShift
from ..names import BITFIT_B, tensor_name
from .base import Forms, LinearForm, Method, NormForm, config_from_fields

__all__ = ["BitFit", "BitFitConfig"]


@dataclass(frozen=True)
class BitFitConfig:
    """BitFit's biases: the block linears (those that have a bias), the norms and the patch projection.

    The targets are RLRR's (`RLRRConfig` defaults): the shift of a linear is RLRR's s, the shift
    of a norm SSF's β with γ = 1, so BitFit serves through the same slots.
    """

    linear_targets: tuple[str, ...] = field(default=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
                                            metadata={"help": "Block linears whose bias shifts."})
    norm_targets: tuple[str, ...] = field(default=("patch_embed", "norm1", "norm2", "norm"),
                                          metadata={"help": "Norms (and the patch projection) whose bias shifts."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_targets", tuple(self.linear_targets))
        object.__setattr__(self, "norm_targets", tuple(self.norm_targets))
        self.as_rlrr()  # the same target rules and messages as RLRR's

    def as_rlrr(self) -> RLRRConfig:
        """The RLRR config with these targets (how the targets are found)."""
        if not all(isinstance(n, str) for n in self.linear_targets + self.norm_targets):
            raise AdapterConfigError("targets must be module paths (strings)")
        return RLRRConfig(rescale_targets=self.linear_targets, ssf_targets=self.norm_targets)

    def to_dict(self) -> dict[str, Any]:
        return {"linear_targets": list(self.linear_targets), "norm_targets": list(self.norm_targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BitFitConfig:
        return config_from_fields(cls, d)


def _targets(model: nn.Module, config: BitFitConfig) -> list[tuple[str, int, int]]:
    """(path, channels, channel_dim) of every bias BitFit shifts (linears without a bias have none)."""
    out = []
    for t in plan_targets(model, config.as_rlrr()):
        m = base_module(model.get_submodule(t.path))
        if getattr(m, "bias", None) is not None:
            out.append((t.path, out_channels(m), t.channel_dim, t.kind))
    return out


class BitFit(Method):
    """b' = b + δ on every targeted bias; δ starts at 0."""

    name = "bitfit"
    config_class = BitFitConfig

    def shapes(self, model: nn.Module, config: BitFitConfig) -> dict[str, tuple[int, ...]]:
        return {tensor_name(path, BITFIT_B): (d,) for path, d, _, _ in _targets(model, config)}

    def wrap(self, model: nn.Module, config: BitFitConfig) -> None:
        for path, d, channel_dim, _ in _targets(model, config):
            base = model.get_submodule(path)
            set_module(model, path, BiasShift(base, d, channel_dim).to(device=base.weight.device,
                                                                          dtype=base.weight.dtype))

    def forms(self, model: nn.Module, config: BitFitConfig, tensors: Mapping[str, torch.Tensor]) -> Forms:
        forms = Forms()
        for path, _, _, kind in _targets(model, config):
            if kind == "rescale":
                forms.linears[path] = LinearForm(s=tensor_name(path, BITFIT_B))
            else:
                forms.norms[path] = NormForm(shift=tensor_name(path, BITFIT_B))
        return forms
