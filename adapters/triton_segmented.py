"""Segmented rescaled linear: one RLRR task per segment of rows, W' never materialised.

Rows of x are sorted into U task segments; segment u (rows offsets[u] .. offsets[u+1]-1) computes

    y = x (W ⊙ (a_u + l_u c_uᵀ))ᵀ + b + s_u,    W'[n, k] = W[n, k] · (a_u + l_u[n] · c_u[n // (out/g), k])

The Triton kernel rescales each W tile in registers before the dot product, so a mixed batch of
U tasks reads W once per M-tile instead of folding U weights (U extra passes over W and U × out × in
bytes). Each M-tile belongs to exactly one segment: the host builds a small int32 table of
(row start, row end, segment) per tile from `offsets` (host ints, no device sync).

Cost: each M-tile re-reads and re-rescales its W tiles (one fp32 FMA per W element per M-tile), so
short segments pay for padding and W traffic; BLOCK_M is picked per batch layout to bound both.
Pointer offsets are int32: M × in and out × in must stay below 2^31.

Empty segments (offsets[u] == offsets[u+1]) are allowed, a task with no rows in this batch: they
get no tiles. Triton is optional: without it `AVAILABLE` is False and only the torch reference runs.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F

from .rlrr import rescale_weight

try:  # optional dependency: keep the module importable (and the reference usable) without it
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    AVAILABLE = False

__all__ = ["AVAILABLE", "segmented_rescaled_linear", "segmented_rescaled_linear_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_MS = (64, 32, 16)  # tl.dot needs every block dim >= 16
# One config under TRITON_INTERPRET: autotuning would run every config through the (slow) interpreter.
# BLOCK_N 32 / BLOCK_K 16 keep small test shapes spread over several N-blocks and K-steps (masking).
_INTERPRET_META = dict(BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)


# Read once, like triton.jit does when it decorates the kernel: set TRITON_INTERPRET=1 before import.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor, c: torch.Tensor,
                s: torch.Tensor | None, a: torch.Tensor, offsets: Sequence[int]) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes, devices and offsets; return (M, in, out, U, g)."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x and weight must be 2-D, got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    m, in_f = x.shape
    out_f = weight.shape[0]
    if weight.shape[1] != in_f:
        raise ValueError(f"x has {in_f} features but weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported, use one of {_DTYPES}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must be ({out_f},), got {tuple(bias.shape)}")
    if l.dim() != 2 or l.shape[1] != out_f:
        raise ValueError(f"l must be (U, {out_f}), got {tuple(l.shape)}")
    u = l.shape[0]
    if c.dim() != 3 or c.shape[0] != u or c.shape[2] != in_f or c.shape[1] < 1:
        raise ValueError(f"c must be ({u}, g, {in_f}), got {tuple(c.shape)}")
    g = c.shape[1]
    if out_f % g:
        raise ValueError(f"{out_f} rows do not split into {g} column-vector groups")
    if s is not None and tuple(s.shape) != (u, out_f):
        raise ValueError(f"s must be ({u}, {out_f}), got {tuple(s.shape)}")
    if tuple(a.shape) != (u,):
        raise ValueError(f"a must be ({u},), got {tuple(a.shape)}")
    if len(offsets) != u + 1:
        raise ValueError(f"offsets must have U + 1 = {u + 1} entries, got {len(offsets)}")
    if offsets[0] != 0 or offsets[-1] != m:
        raise ValueError(f"offsets must run from 0 to M = {m}, got {offsets[0]} .. {offsets[-1]}")
    if any(lo > hi for lo, hi in pairwise(offsets)):
        raise ValueError(f"offsets must be non-decreasing, got {list(offsets)}")
    for name, t in (("weight", weight), ("bias", bias), ("l", l), ("c", c), ("s", s), ("a", a)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return m, in_f, out_f, u, g


def segmented_rescaled_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                        l: torch.Tensor, c: torch.Tensor, s: torch.Tensor | None, a: torch.Tensor,
                                        offsets: Sequence[int]) -> torch.Tensor:
    """The oracle: fold W' per segment in fp32 with `rescale_weight`, then F.linear in fp32.

    One fold (out × in) per non-empty segment and a host sync per segment to read a_u: a test
    oracle, not a serving path. Same arguments as `segmented_rescaled_linear`; a must be 0 or 1.
    """
    m, _, out_f, u, _ = _check_args(x, weight, bias, l, c, s, a, offsets)
    y = x.new_empty(m, out_f)  # (M, out)
    w32 = weight.float()  # fp32 fold and matmul: the oracle should not round W' to fp16
    for seg in range(u):
        lo, hi = offsets[seg], offsets[seg + 1]
        if lo == hi:
            continue
        residual = float(a[seg])
        if residual not in (0.0, 1.0):
            raise ValueError(f"a[{seg}] must be 0 or 1, got {residual}")
        w = rescale_weight(w32, l[seg], c[seg], residual=residual == 1.0)  # (out, in) fp32
        b = torch.zeros(out_f, device=x.device) if bias is None else bias.float()
        b = b if s is None else b + s[seg].float()  # (out,)
        y[lo:hi] = F.linear(x[lo:hi].float(), w, b).to(x.dtype)
    return y


def _padded_rows(offsets: Sequence[int], block_m: int) -> int:
    return sum(-(-(hi - lo) // block_m) * block_m for lo, hi in pairwise(offsets))


def _pick_block_m(offsets: tuple[int, ...]) -> int:
    """Largest BLOCK_M whose masked (padding) rows cost at most 25% more than BLOCK_M 16's.

    A bigger tile reuses each rescaled W tile over more rows (W is re-read and re-rescaled once
    per M-tile), but every segment pads up to a multiple of BLOCK_M: many short segments
    (one image per task) want 16, a few long ones want 64.
    """
    floor = _padded_rows(offsets, _BLOCK_MS[-1])
    return next(bm for bm in _BLOCK_MS if _padded_rows(offsets, bm) <= 1.25 * floor)


@functools.lru_cache(maxsize=256)
def _tile_table(offsets: tuple[int, ...], block_m: int, device: torch.device) -> torch.Tensor:
    """(tiles, 3) int32 rows (row start, row end, segment): no tile crosses a segment boundary.

    Cached per batch layout: serving repeats the same few layouts, and a hit skips both the Python
    loop and the small host-to-device copy.
    """
    rows = [
        (start, min(start + block_m, hi), seg)
        for seg, (lo, hi) in enumerate(pairwise(offsets))
        for start in range(lo, hi, block_m)
    ]
    return torch.tensor(rows, dtype=torch.int32).to(device)  # (tiles, 3)


if AVAILABLE:

    @triton.jit
    def _segmented_rescaled_linear_kernel(
            x_ptr, w_ptr, bias_ptr, l_ptr, c_ptr, s_ptr, a_ptr, tiles_ptr, y_ptr,
            N, K, rows_per_group,
            stride_xm, stride_wn, stride_lu, stride_cu, stride_cg, stride_su, stride_ym,
            HAS_BIAS: tl.constexpr, HAS_S: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Inner strides are 1: the host makes every tensor contiguous.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        row_start = tl.load(tiles_ptr + pid_m * 3)
        row_end = tl.load(tiles_ptr + pid_m * 3 + 1)
        seg = tl.load(tiles_ptr + pid_m * 3 + 2)

        offs_m = row_start + tl.arange(0, BLOCK_M)  # (BM,)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        mask_m = offs_m < row_end
        mask_n = offs_n < N
        group = offs_n // rows_per_group  # (BN,) which column vector c_u[j] row n uses

        a = tl.load(a_ptr + seg).to(tl.float32)
        lv = tl.load(l_ptr + seg * stride_lu + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
        c_base = c_ptr + seg * stride_cu + group[None, :] * stride_cg  # (1, BN)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
            wk_mask = mask_k[:, None] & mask_n[None, :]
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=wk_mask, other=0.0)  # (BK, BN) = Wᵀ
            # c is (g, in) per task: g × BK values shared by all BN rows, so these loads hit cache.
            cv = tl.load(c_base + offs_k[:, None], mask=wk_mask, other=0.0)  # (BK, BN)
            # Rescale in fp32 registers, then round once to x's dtype for the tensor-core dot.
            w = (w.to(tl.float32) * (a + lv[None, :] * cv.to(tl.float32))).to(x.dtype)
            if UPCAST_DOT:
                # Same numbers (bf16 products are exact in fp32): the interpreter's bf16 dot is wrong.
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_S:
            acc += tl.load(s_ptr + seg * stride_su + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    # CUDA only: BLOCK_M is fixed by the host (it shapes the tile table), the rest is tuned per
    # (N, K, BLOCK_M) and the tensors' dtypes, once per process.
    _autotuned_kernel = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4)]
        ],
        key=["N", "K", "BLOCK_M"],
    )(_segmented_rescaled_linear_kernel)


def segmented_rescaled_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        l: torch.Tensor,
        c: torch.Tensor,
        s: torch.Tensor | None,
        a: torch.Tensor,
        offsets: Sequence[int],
) -> torch.Tensor:
    """y = x (W ⊙ (a_u + l_u c_uᵀ))ᵀ + b + s_u for each row segment u, in one Triton launch.

    Accumulates in fp32; fp32 inputs use IEEE fp32 dot products unless
    `torch.backends.cuda.matmul.allow_tf32` is set (then TF32, like F.linear).

    Args:
        x: Input (M, in), rows sorted by segment.
        weight: Frozen weight (out, in).
        bias: Frozen bias (out,), or None.
        l: Row vectors (U, out), one per segment.
        c: Column vectors (U, g, in); row n of W uses c[u, n // (out / g)].
        s: Bias shifts (U, out), or None.
        a: Residual switch (U,): 1.0 keeps W's identity term, 0.0 drops it.
        offsets: U + 1 non-decreasing host ints, offsets[0] = 0, offsets[-1] = M; empty segments allowed.

    Returns:
        (M, out) in x's dtype.
    """
    m, in_f, out_f, _, g = _check_args(x, weight, bias, l, c, s, a, offsets)
    if not AVAILABLE:
        raise RuntimeError("triton is not installed; use segmented_rescaled_linear_reference")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got x on {x.device}")
    y = torch.empty(m, out_f, device=x.device, dtype=x.dtype)  # (M, out)
    if m == 0 or out_f == 0:
        return y
    offsets = tuple(int(o) for o in offsets)
    block_m = _pick_block_m(offsets)
    tiles = _tile_table(offsets, block_m, x.device)  # (tiles, 3)
    x, weight, l, c, a = (t.contiguous() for t in (x, weight, l, c, a))
    bias = bias.contiguous() if bias is not None else None
    s = s.contiguous() if s is not None else None
    tf32 = x.dtype == torch.float32 and not _INTERPRET and torch.backends.cuda.matmul.allow_tf32
    args = (
        x, weight, bias if bias is not None else weight, l, c, s if s is not None else l, a, tiles, y,
        out_f, in_f, out_f // g,
        x.stride(0), weight.stride(0), l.stride(0), c.stride(0), c.stride(1), 0 if s is None else s.stride(0),
        y.stride(0),
    )
    meta = dict(HAS_BIAS=bias is not None, HAS_S=s is not None, INPUT_PRECISION="tf32" if tf32 else "ieee",
                UPCAST_DOT=_INTERPRET and x.dtype == torch.bfloat16, BLOCK_M=block_m)
    if _INTERPRET:
        grid = (tiles.shape[0], triton.cdiv(out_f, _INTERPRET_META["BLOCK_N"]))
        _segmented_rescaled_linear_kernel[grid](*args, **meta, **_INTERPRET_META)
    else:
        grid = lambda meta: (tiles.shape[0], triton.cdiv(out_f, meta["BLOCK_N"]))  # noqa: E731
        _autotuned_kernel[grid](*args, **meta)
    return y
