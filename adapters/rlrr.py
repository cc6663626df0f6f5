"""The RLRR math as small pure functions.

Rescaled linear, W ∈ R^{out×in}, row vector l ∈ R^out, column vectors c ∈ R^{g×in} (one per
group of out/g rows: g = 3 for a fused qkv), bias shift s ∈ R^out:

    merged:    W' = W ⊙ (1 + l cᵀ)  (residual)   or   W ⊙ (l cᵀ)  (no residual);   b' = b + s
    unmerged:  y  = a · x Wᵀ + l ⊙ ((c ⊙ x) Wᵀ) + b + s,   a = 1 (residual) or 0

A missing l or c (`None`) is a fixed vector of ones. The unmerged form only needs l, c, s to
broadcast against x, so the same functions serve one task (l: (out,)) and a mixed batch with one
task per row (l: (B, 1, out)). SSF is x·γ + β and folds into the layer before it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rescale_weight", "rescale_weight_into", "grouped_linear", "rescaled_linear", "ssf", "fold_ssf"]


def rescale_weight(
        weight: torch.Tensor,
        l: torch.Tensor | None,
        c: torch.Tensor | None,
        residual: bool = True,
) -> torch.Tensor:
    """Merged weight W ⊙ (1 + l cᵀ) (or W ⊙ l cᵀ), computed in fp32, returned in W's dtype.

    Computed as (W ⊙ l) ⊙ c (+ W) on a (g, out/g, in) view, broadcasting l and c: the rank-one
    factor l cᵀ is never materialised, and outside autograd the products reuse one buffer. This
    is what folding a task costs at serving time (a cache miss), so passes over W matter: 3 here
    instead of ~5 with the (out, in) factor.

    Args:
        weight: Frozen weight (out, in); read, never written.
        l: Row vector (out,) or None.
        c: Column vectors (g, in) or None.
        residual: Keep the identity term.
    """
    if l is None and c is None:
        raise ValueError("at least one of l and c is needed")
    out_f, in_f = weight.shape
    groups = 1 if c is None else c.shape[0]
    if out_f % groups:
        raise ValueError(f"{out_f} rows do not split into {groups} column-vector groups")
    w = weight.float().view(groups, out_f // groups, in_f)  # fp32 for the fold: fp16 loses the small l cᵀ terms
    # In place only on our own buffer and only where autograd does not need the intermediates.
    inplace = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, l, c)))
    scaled = None
    if l is not None:
        scaled = w * l.float().to(w.device).view(groups, out_f // groups, 1)
    if c is not None:
        cv = c.float().to(w.device).view(groups, 1, in_f)
        scaled = w * cv if scaled is None else (scaled.mul_(cv) if inplace else scaled * cv)
    if residual:
        scaled = scaled.add_(w) if inplace else scaled + w
    return scaled.view(out_f, in_f).to(weight.dtype)


def rescale_weight_into(
        out: torch.Tensor,
        weight: torch.Tensor,
        l: torch.Tensor,
        c: torch.Tensor,
        residual: bool = True,
) -> torch.Tensor:
    """W ⊙ (1 + l cᵀ) (or W ⊙ l cᵀ) written into `out`, in W's dtype: the just-in-time fold.

    Two passes over W and no allocation (`out` is a reused scratch buffer), so folding a layer for
    one task segment costs well under 1% of that layer's matmul of one 197-token image on CPU
    (ViT-S fc1: ~0.05 ms vs ~9 ms, bench/README.md). Serving only: no autograd.

    Args:
        out: (out, in) buffer, contiguous, same dtype and device as W; overwritten.
        weight: Frozen weight (out, in); read, never written.
        l: Row vector (out,).
        c: Column vectors (g, in).
        residual: Keep the identity term.
    """
    out_f, in_f = weight.shape
    groups = c.shape[0]
    if out_f % groups:
        raise ValueError(f"{out_f} rows do not split into {groups} column-vector groups")
    w = weight.view(groups, out_f // groups, in_f)
    buf = out.view(groups, out_f // groups, in_f)
    torch.mul(w, c.view(groups, 1, in_f), out=buf)  # W ⊙ c
    lv = l.view(groups, out_f // groups, 1)
    if residual:
        torch.addcmul(w, buf, lv, out=buf)  # W + (W ⊙ c) ⊙ l, elementwise in place
    else:
        buf.mul_(lv)
    return out


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """(c_g ⊙ x) W_gᵀ for every row group g of W, without bias.

    Same FLOPs as one x Wᵀ: each group multiplies x by its own slice of rows.

    Args:
        x: Input (..., in).
        weight: (out, in).
        c: Column vectors (..., g, in) broadcastable against x's leading dims, or None.
    """
    if c is None:
        return F.linear(x, weight)
    groups = c.shape[-2]
    if groups == 1:
        return F.linear(x * c[..., 0, :], weight)
    slices = weight.chunk(groups, dim=0)  # g × (out/g, in), views
    return torch.cat([F.linear(x * c[..., j, :], w) for j, w in enumerate(slices)], dim=-1)  # (..., out)


def rescaled_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        l: torch.Tensor | None,
        c: torch.Tensor | None,
        s: torch.Tensor | None,
        residual: bool | torch.Tensor = True,
) -> torch.Tensor:
    """y = a · x Wᵀ + l ⊙ ((c ⊙ x) Wᵀ) + b + s, the unmerged RLRR linear.

    Args:
        x: Input (..., in).
        weight: Frozen weight (out, in).
        bias: Frozen bias (out,) or None.
        l: Row vector broadcastable to (..., out), or None for ones.
        c: Column vectors (..., g, in), or None for ones.
        s: Bias shift broadcastable to (..., out), or None.
        residual: True/False, or a per-row 0/1 tensor broadcastable to (..., 1) for mixed batches.
    """
    rescaled = grouped_linear(x, weight, c)  # (..., out)
    if l is not None:
        rescaled = l * rescaled
    if residual is True:
        y = F.linear(x, weight, bias) + rescaled
    elif residual is False:
        y = rescaled if bias is None else rescaled + bias
    else:
        # Mixed batch with some non-residual rows: one extra matmul, paid only for such batches.
        y = residual * F.linear(x, weight) + rescaled
        y = y if bias is None else y + bias
    return y if s is None else y + s


def ssf(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """SSF scale and shift x·γ + β; γ and β must broadcast against x."""
    return x * scale + shift


def fold_ssf(
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scale: torch.Tensor,
        shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold SSF into the layer before it: γ·(W x + b) + β = (γ W) x + (γ b + β).

    Works for any layer whose weight's dim 0 is the output channel (Linear, Conv2d, LayerNorm).

    Args:
        weight: (D, ...) frozen weight; read, never written.
        bias: (D,) or None.
        scale: γ (D,).
        shift: β (D,).
    """
    shape = (-1,) + (1,) * (weight.dim() - 1)
    w = weight.float() * scale.float().view(shape)
    b = shift.float() if bias is None else bias.float() * scale.float() + shift.float()
    return w.to(weight.dtype), b.to(weight.dtype)
