"""Layer wrappers: keep `base_layer` untouched, add the task's vectors, call rlrr.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rlrr
from .config import RLRRConfig
from .names import ADAPTER_PARAM_TAGS, is_adapter_key  # noqa: F401 - re-exported: the wrappers' attribute names

__all__ = ["AdapterWrapper", "RLRRLinear", "SSFLayer", "LoRALayer", "IA3Layer", "BiasShift", "ADAPTER_PARAM_TAGS",
           "FORWARD_MODES", "is_adapter_key", "set_forward_mode"]

FORWARD_MODES = ("fold", "unmerged")


def set_forward_mode(model: nn.Module, mode: str) -> nn.Module:
    """Choose how every RLRRLinear in `model` computes (same result up to fp32 rounding).

    Args:
        model: A model with RLRR wrappers.
        mode: 'fold' (default): build W' = W ⊙ (1 + l cᵀ) functionally and do one matmul;
            'unmerged': x Wᵀ + l ⊙ ((c ⊙ x) Wᵀ), two matmuls (the mixed-batch form, for checks).
    """
    if mode not in FORWARD_MODES:
        raise ValueError(f"forward mode must be one of {FORWARD_MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, RLRRLinear | LoRALayer):
            m.forward_mode = mode
    return model


class AdapterWrapper(nn.Module):
    """What every training wrapper is: a frozen `base_layer` plus the task's tensors (`unwrap` finds these)."""

    base_layer: nn.Module


class RLRRLinear(AdapterWrapper):
    """A frozen nn.Linear with RLRR rescaling: W ⊙ (1 + l cᵀ), b + s."""

    def __init__(self, base_layer: nn.Linear, config: RLRRConfig, groups: int = 1) -> None:
        """
        Args:
            base_layer: The frozen linear; its tensors are never written.
            config: Which vectors exist and how they start.
            groups: Column vectors, one per block of out/groups rows (3 for a fused qkv).
        """
        super().__init__()
        out_f, in_f = base_layer.out_features, base_layer.in_features
        if out_f % groups:
            raise ValueError(f"{out_f} output rows do not split into {groups} groups")
        self.base_layer = base_layer
        self.residual = config.residual
        self.rlrr_l = nn.Parameter(torch.empty(out_f)) if config.left else None
        self.rlrr_c = nn.Parameter(torch.empty(groups, in_f)) if config.right else None
        # No base bias means no slot to fold a shift into, so no shift (keeps merge exact).
        has_s = config.bias_shift and base_layer.bias is not None
        self.rlrr_s = nn.Parameter(torch.zeros(out_f)) if has_s else None
        self.forward_mode = "fold"
        self.reset_parameters(config.init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        l, c, s = self.rlrr_l, self.rlrr_c, self.rlrr_s
        if not self.residual:
            # W ⊙ (l cᵀ): ones are the identity. 'reference' adds SSF's N(1, .02) / N(0, .02) noise.
            noisy = init == "reference"
            for v in (l, c):
                if v is not None:
                    v.normal_(1.0, 0.02) if noisy else v.fill_(1.0)
            if s is not None:
                s.normal_(0.0, 0.02) if noisy else s.zero_()
            return
        # Reference code: nn.init.kaiming_uniform_(scale_col) and (scale_line) with the defaults
        # (a = 0, gain √2), so the bound is √(6 / fan_in). Not nn.Linear's a = √5 (bound 1/√fan_in):
        # that is ~2.4x smaller on both sides and starts W ⊙ (1 + l cᵀ) ~6x closer to W.
        if c is not None:
            nn.init.kaiming_uniform_(c)  # each (1, in) row: fan_in = in, U(±√(6/in)); ±0.088 for in = 768
        if l is not None:
            nn.init.kaiming_uniform_(l.view(-1, 1))  # (out, 1): fan_in = 1, U(±√6) = U(±2.449)
        if s is not None:
            s.zero_()
        if init == "identity":
            # l cᵀ = 0 with one side zero; the other stays random so the zero side gets gradients.
            (l if l is not None else c).zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if self.forward_mode == "unmerged":
            return rlrr.rescaled_linear(x, b.weight, b.bias, self.rlrr_l, self.rlrr_c, self.rlrr_s, self.residual)
        # Fold, then one matmul. The fold is O(out·in) elementwise work while the unmerged form's
        # second matmul is O(tokens·out·in); backward needs one weight-sized gradient either way.
        # On vit_pico (bs 64, CPU) this makes a training step ~1.8x faster and close to full FT.
        weight = b.weight
        if self.rlrr_l is not None or self.rlrr_c is not None:
            weight = rlrr.rescale_weight(weight, self.rlrr_l, self.rlrr_c, self.residual)  # (out, in), new tensor
        bias = b.bias
        if self.rlrr_s is not None:
            bias = (bias.float() + self.rlrr_s).to(weight.dtype)
        return F.linear(x, weight, bias)


class SSFLayer(AdapterWrapper):
    """A frozen norm / patch projection followed by SSF scale and shift."""

    def __init__(self, base_layer: nn.Module, dim: int, init: str, channel_dim: int = -1) -> None:
        """
        Args:
            base_layer: The frozen module (LayerNorm, Linear or Conv2d).
            dim: Channels it outputs.
            init: 'reference' (γ ~ N(1, .02), β ~ N(0, .02)) or 'identity' (1, 0).
            channel_dim: Where the channels are in its output: -1 (tokens) or 1 (NCHW conv).
        """
        super().__init__()
        self.base_layer = base_layer
        self.channel_dim = channel_dim
        self.ssf_scale = nn.Parameter(torch.ones(dim))
        self.ssf_shift = nn.Parameter(torch.zeros(dim))
        if init == "reference":
            with torch.no_grad():
                self.ssf_scale.normal_(1.0, 0.02)
                self.ssf_shift.normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        shape = (-1, 1, 1) if self.channel_dim == 1 else (-1,)
        return rlrr.ssf(y, self.ssf_scale.view(shape), self.ssf_shift.view(shape))


def _channel_view(v: torch.Tensor, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return v.view(-1, 1, 1) if channel_dim == 1 and y.dim() == 4 else v


class LoRALayer(AdapterWrapper):
    """A frozen nn.Linear (or the patch-embedding Conv2d) plus k · B A, PEFT's LoRA.

    A conv's A is (r, in·kh·kw): the conv is a linear over its patches, so ΔW = k · (B A) viewed
    as the kernel.
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float) -> None:
        """
        Args:
            base_layer: The frozen linear or conv; never written.
            rank: r.
            scale: k = α / r (α / √r with rsLoRA).
        """
        super().__init__()
        self.base_layer, self.scale = base_layer, scale
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, w[0].numel()))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank))  # (out, r): zero, so the start is W
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # PEFT's (and nn.Linear's) init of A
        self.forward_mode = "unmerged"

    def delta(self) -> torch.Tensor:
        """k · B A in the base weight's shape."""
        w = self.base_layer.weight
        return (self.scale * (self.lora_B @ self.lora_A)).view(w.shape).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if isinstance(b, nn.Conv2d) or self.forward_mode == "fold":
            weight = b.weight + self.delta()
            if isinstance(b, nn.Conv2d):
                return b._conv_forward(x, weight, b.bias)
            return F.linear(x, weight, b.bias)
        # x Wᵀ + k (x Aᵀ) Bᵀ: two thin matmuls instead of an out×in fold (r << in, out)
        return b(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class IA3Layer(AdapterWrapper):
    """A frozen linear (or conv) with PEFT's IA³: output scaling s ⊙ (W x + b), or W (s ⊙ x) + b."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        """
        Args:
            base_layer: The frozen linear or conv; never written.
            feedforward: Scale the input (PEFT's `feedforward_modules`) instead of the output.
        """
        super().__init__()
        self.base_layer, self.feedforward = base_layer, feedforward
        w = base_layer.weight
        self.ia3_l = nn.Parameter(torch.ones(w.shape[1] if feedforward else w.shape[0]))  # PEFT's init: ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base_layer(x * self.ia3_l)
        y = self.base_layer(x)
        return y * _channel_view(self.ia3_l, y, 1 if isinstance(self.base_layer, nn.Conv2d) else -1)


class BiasShift(AdapterWrapper):
    """A frozen linear, norm or conv whose bias learns a shift (BitFit): base(x) + δ."""

    def __init__(self, base_layer: nn.Module, dim: int, channel_dim: int = -1) -> None:
        """
        Args:
            base_layer: The frozen module; never written.
            dim: Channels it outputs.
            channel_dim: Where the channels are in its output: -1 (tokens) or 1 (NCHW conv).
        """
        super().__init__()
        self.base_layer, self.channel_dim = base_layer, channel_dim
        self.bitfit_b = nn.Parameter(torch.zeros(dim))  # the pretrained bias at step 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + _channel_view(self.bitfit_b, y, self.channel_dim)
