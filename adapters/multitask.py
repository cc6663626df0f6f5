"""MultiTaskViT: one frozen backbone, N task adapters of any methods, every row of a batch with its own task.

Each task's forms (`adapters.methods`) are brought to one canonical form per slot, so RLRR,
SSF, LoRA, BitFit and IA³ tasks share one batch:

    linear (block linears; the patch conv as a linear over patches):
        y = a · x Wᵀ + l ⊙ ((c ⊙ x) Wᵀ) + b + s + k · (x Aᵀ) Bᵀ
    norm: y · γ + β

A layer a task does not adapt gets a = 1, l = 0, s = 0 and no low-rank term; SSF it does not use
gets γ = 1, β = 0. That canonical form is a *plan* (slot path -> tag -> adapter tensor name, or a
shared constant), made once per adapter config and shared by its tasks; a task itself holds only
its adapter's `PackedTensors` (one buffer; on CPU in float32 the adapter's own, not a copy, unless
its method derives tensors, as IA³ does) and its head, so a loaded task costs its own bytes.
`add_task` returns the task's handle; a forward may be given handles, so removing or replacing a
task never touches a batch that holds the old one.

Per-batch state is one frozen `Batch` (the tasks present, their row segments, the mode, cached
weights, the kernel), built by `forward` and read by the slot wrappers. timm calls each layer with x
alone, so the batch reaches them through a context variable bound for the duration of the call;
nothing in it is written during the pass (the fold scratch buffers, a per-thread pool, are the only
mutable state, and hold no request data between layers).
"""
from __future__ import annotations

import contextvars
import copy
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rlrr
from .config import RLRRConfig
from .errors import AdapterModelError, AdapterShapeError, UnknownTaskError
from .inject import base_module, patch_conv_path, plan_targets
from .merge import adapter_forms
from .methods import Forms
from .names import HEAD_NAMES
from .packed import PackedTensors, shape_of
from .wrap import adapter_shapes

__all__ = ["MultiTaskViT", "TaskHandle", "Batch"]


@dataclass(frozen=True)
class _Entry:
    """Where one canonical vector of a task comes from: an adapter tensor, or a shared constant."""

    key: str | None  # adapter tensor name; None for a constant
    const: torch.Tensor | None = None  # on the model's device/dtype, shared by every task, never written
    expand: tuple[int, ...] | None = None  # broadcast to this shape (one c shared by the q/k/v slices)


_Plan = dict[str, dict[str, _Entry]]  # slot path -> tag -> entry; one per adapter config
Mode = Literal["unmerged", "segmented"]
Kernel = Callable[..., torch.Tensor]  # `triton_segmented.segmented_rescaled_linear`'s signature


@dataclass(frozen=True)
class _Fold:
    """How a segment builds one linear slot: W ⊙ (a + l cᵀ) + k · B A and b + s."""

    rescale: bool  # the l cᵀ term exists
    residual: bool  # a = 1
    shift: bool  # s is not the zero constant
    lora: tuple[str, str, float] | None  # (A, B, k)

    @property
    def identity(self) -> bool:
        """W is used as it is (the bias may still shift)."""
        return not self.rescale and self.lora is None


_Folds = dict[str, _Fold]  # linear slot path -> fold; one per adapter config


@dataclass(frozen=True, eq=False)
class TaskHandle:
    """One loaded task as `add_task` made it; immutable, so a batch holding it is never changed under it."""

    name: str
    source: PackedTensors  # the adapter's tensors (and derived ones) on the model's device/dtype
    plan: _Plan
    folds: _Folds
    num_classes: int
    all_residual: bool  # every linear slot of the task has a = 1
    rescaled: frozenset[str]  # linear slots where the task has an l cᵀ term with both sides varying
    shifted: frozenset[str] = frozenset()  # linear slots where the task shifts the bias (s ≠ 0)
    # One-sided rescaling (IA³): W ⊙ (a + l 1ᵀ) = diag(a + l) W scales each row's output, W ⊙ (a + 1 cᵀ)
    # = W diag(a + c) its input: the unmerged form needs no second GEMM for them.
    scaled_out: frozenset[str] = frozenset()
    scaled_in: frozenset[str] = frozenset()

    @property
    def rescales(self) -> bool:
        """Whether the two-matmul (unmerged) form costs this task a second GEMM anywhere."""
        return bool(self.rescaled)

    @property
    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = HEAD_NAMES
        return self.source[weight], self.source[bias]

    def value(self, path: str, tag: str) -> torch.Tensor:
        e = self.plan[path][tag]
        v = e.const if e.key is None else self.source[e.key]
        return v if e.expand is None else v.expand(e.expand)

    def row_scale(self, path: str, side: str) -> torch.Tensor | None:
        """This task's (out,) output or (in,) input multiplier at a one-sided slot; None where it has none."""
        if side == "out":
            return self.value(path, "a") + self.value(path, "l") if path in self.scaled_out else None
        return (self.value(path, "a") + self.value(path, "c")[0]) if path in self.scaled_in else None


_Task = TaskHandle  # the name from before handles were returned


@dataclass(frozen=True)
class _Snapshot:
    names: tuple[str, ...]
    tasks: tuple[TaskHandle, ...]


class _Scratch(threading.local):
    """Per-thread fold targets, one per weight shape, reused by every layer, segment and forward.

    A just-in-time fold never allocates (ViT-S: 4 buffers, 7 MB in fp32, whatever the task count).
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf


@dataclass(frozen=True, eq=False)
class Batch:
    """Everything one forward needs, fixed before the pass (vLLM's punica wrapper, LoRAX's batch metadata).

    Rows are sorted by task: task u (of `tasks`) owns images offsets[u]:offsets[u+1].

    Attributes:
        tasks: The U task handles present, in segment order.
        ids: (B,) each row's segment, on the images' device.
        offsets: U + 1 image offsets.
        mode: `unmerged` or `segmented`.
        merged: Per segment, the task's cached folded weights (segmented), or None.
        kernel: The fused segmented GEMM (CUDA), or None.
        stacked: (U, P) the tasks' buffers when they share one plan and layout, else None.
        residual_only: Every task has a = 1 everywhere.
        rescaled: Linear slots where some task of the batch has a two-sided l cᵀ term.
        scaled: Linear slots where some task of the batch scales rows' inputs or outputs only.
        shifted: Linear slots where some task of the batch shifts the bias.
        scratch: The calling thread's fold buffers.
    """

    tasks: tuple[TaskHandle, ...]
    ids: torch.Tensor
    offsets: tuple[int, ...]
    mode: Mode
    merged: tuple[Mapping[str, torch.Tensor] | None, ...]
    kernel: Kernel | None
    stacked: torch.Tensor | None
    residual_only: bool
    rescaled: frozenset[str]
    scaled: frozenset[str]
    shifted: frozenset[str]
    scratch: _Scratch

    @classmethod
    def build(cls, tasks: Sequence[TaskHandle], ids: torch.Tensor, offsets: Sequence[int], mode: Mode,
              scratch: _Scratch, merged: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
              kernel: Kernel | None = None) -> Batch:
        first = tasks[0]
        stacked = None
        if all(t.plan is first.plan and t.source.layout is first.source.layout for t in tasks):
            # one copy of U buffers (ViT-S: 0.7 MB each) instead of ~250 stacks of U small tensors; a view for one
            stacked = first.source.flat[None] if len(tasks) == 1 else torch.stack([t.source.flat for t in tasks])
        return cls(tuple(tasks), ids, tuple(offsets), mode, tuple(merged or (None,) * len(tasks)), kernel, stacked,
                   all(t.all_residual for t in tasks), frozenset().union(*(t.rescaled for t in tasks)),
                   frozenset().union(*(t.scaled_out | t.scaled_in for t in tasks)),
                   frozenset().union(*(t.shifted for t in tasks)), scratch)

    def per_task(self, path: str, tag: str) -> torch.Tensor:
        """(U, ...) one value per task present (the stacked form the fused kernel reads)."""
        if self.stacked is None:  # tasks of different layouts: stack this layer's U small vectors
            return torch.stack([t.value(path, tag) for t in self.tasks])
        first, u = self.tasks[0], self.stacked.shape[0]
        e = first.plan[path][tag]
        v = e.const.expand(u, *e.const.shape) if e.key is None else first.source.stacked_view(self.stacked, e.key)
        return v if e.expand is None else v.expand(u, *e.expand)

    def take(self, path: str, tag: str) -> torch.Tensor:
        return self.per_task(path, tag).index_select(0, self.ids)  # (B, ...): one row per image

    def take_scale(self, path: str, side: str, size: int, like: torch.Tensor) -> torch.Tensor | None:
        """(B, size) each row's one-sided multiplier at a slot (ones for rows without); None if no row has one."""
        per_task = [t.row_scale(path, side) for t in self.tasks]
        if all(v is None for v in per_task):
            return None
        ones = like.new_ones(size)
        return torch.stack([ones if v is None else v for v in per_task]).index_select(0, self.ids)

    def weights(self, u: int, path: str, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Task u's weight and bias for one linear slot: cached, as is, or folded into scratch now.

        Args:
            u: Segment (task present) index.
            path: The slot's path.
            base: The frozen linear or conv (read only).
        """
        merged = self.merged[u]
        if merged is not None and f"{path}.weight" in merged:
            return merged[f"{path}.weight"], merged.get(f"{path}.bias", base.bias)
        task = self.tasks[u]
        fold = task.folds[path]
        weight, bias = base.weight, base.bias
        if not fold.identity:
            w = weight.view(weight.shape[0], -1)  # (out, in); a conv as a linear over patches
            buf = self.scratch.buffer(w)
            if fold.rescale:
                rlrr.rescale_weight_into(buf, w, task.value(path, "l"), task.value(path, "c"), fold.residual)
            if fold.lora is not None:
                a, b, k = fold.lora
                if fold.rescale:
                    buf.addmm_(task.source[b], task.source[a], alpha=k)
                else:
                    torch.addmm(w, task.source[b], task.source[a], alpha=k, out=buf)  # W + k · B A
            weight = buf.view(weight.shape)
        if bias is not None and fold.shift:
            bias = torch.add(bias, task.value(path, "s"), out=self.scratch.buffer(bias))  # (out,)
        return weight, bias

    def add_lowrank(self, y: torch.Tensor, x: torch.Tensor, path: str) -> torch.Tensor:
        """y += k · (x Aᵀ) Bᵀ on each segment whose task has a low-rank term here (shrink, expand)."""
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])  # (B·N, in), (B·N, out): rows sorted by task
        per_image = x2.shape[0] // x.shape[0]
        for u, task in enumerate(self.tasks):
            fold = task.folds.get(path)
            if fold is None or fold.lora is None:
                continue
            lo, hi = self.offsets[u] * per_image, self.offsets[u + 1] * per_image
            a, b, k = fold.lora
            shrunk = torch.mm(x2[lo:hi], task.source[a].t())  # (n·N, r)
            y2[lo:hi].addmm_(shrunk, task.source[b].t(), alpha=k)  # += k · shrunk Bᵀ, scale and add inside the GEMM
        return y


_BATCH: contextvars.ContextVar[Batch | None] = contextvars.ContextVar("adapters_batch", default=None)


def _batch() -> Batch:
    batch = _BATCH.get()
    if batch is None:
        raise RuntimeError("a MultiTaskViT layer ran outside MultiTaskViT.forward")
    return batch


def _kernel(device: torch.device) -> Kernel | None:
    """The fused segmented GEMM where it runs (CUDA with Triton), else None (torch fold per segment)."""
    if device.type != "cuda":
        return None
    try:
        from . import triton_segmented
    except ImportError:  # pragma: no cover - depends on the install
        return None
    return triton_segmented.segmented_rescaled_linear if triton_segmented.AVAILABLE else None


def _rows_view(v: torch.Tensor, ndim: int, channel_dim: int = -1) -> torch.Tensor:
    """(B, ..., D) per-row tensor shaped to broadcast against an x of `ndim` dims."""
    if channel_dim == 1:  # NCHW conv output: (B, D) -> (B, D, 1, 1)
        return v.view(*v.shape, *([1] * (ndim - 2)))
    extra = ndim - 2 - (v.dim() - 2)  # singleton token dims between batch and the vector dims
    return v.view(v.shape[0], *([1] * extra), *v.shape[1:])


class _RowLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, path: str) -> None:
        super().__init__()
        self.base_layer, self.path = base_layer, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, N, in)
        r = _batch()
        if r.mode == "segmented":
            return self._segmented(x, r)
        b = self.base_layer
        if self.path in r.rescaled or self.path in r.shifted:
            s = _rows_view(r.take(self.path, "s"), x.dim())  # (B, 1, out)
        if self.path in r.rescaled:  # the second GEMM only where some task of the batch rescales
            l = _rows_view(r.take(self.path, "l"), x.dim())  # (B, 1, out)
            c = _rows_view(r.take(self.path, "c"), x.dim() + 1)  # (B, 1, g, in)
            a = True if r.residual_only else _rows_view(r.take(self.path, "a")[:, None], x.dim())  # (B, 1, 1)
            y = rlrr.rescaled_linear(x, b.weight, b.bias, l, c, s, residual=a)
        elif self.path in r.scaled:  # one-sided rescaling only (IA³): one GEMM, rows scaled before or after it
            y = self._scaled(x, r, s if self.path in r.shifted else None)
        elif self.path in r.shifted:  # one shared base GEMM for every row
            y = F.linear(x, b.weight, b.bias) + s
        else:  # no task shifts this bias (LoRA, IA³'s input scaling): skip a pass over y
            y = F.linear(x, b.weight, b.bias)
        return r.add_lowrank(y, x, self.path)

    def _scaled(self, x: torch.Tensor, r: Batch, s: torch.Tensor | None) -> torch.Tensor:
        # y = u ⊙ ((v ⊙ x) Wᵀ) + b + s: a row's u is a + l where its task scales outputs, its v = a + c where
        # it scales inputs, exactly 1 otherwise (so other tasks' rows pass through unchanged).
        b = self.base_layer
        out_f, in_f = b.weight.shape
        v = r.take_scale(self.path, "in", in_f, x)
        u = r.take_scale(self.path, "out", out_f, x)
        y = F.linear(x if v is None else x * _rows_view(v, x.dim()), b.weight)  # (B, N, out)
        shift = b.bias if s is None else (s if b.bias is None else s + b.bias)  # (out,) or (B, 1, out)
        if u is None:
            return y if shift is None else y.add_(shift)
        u = _rows_view(u, x.dim())  # (B, 1, out)
        return y.mul_(u) if shift is None else torch.addcmul(shift, y, u)

    def _segmented(self, x: torch.Tensor, r: Batch) -> torch.Tensor:
        # One matmul per task segment with that task's folded W (built just in time, or cached): the
        # same FLOPs as the plain layer plus one pass over W per segment.
        b = self.base_layer
        out_f, in_f = b.weight.shape
        x2 = x.reshape(-1, in_f)  # (B·N, in), images sorted by task
        per_image = x2.shape[0] // x.shape[0]
        offsets = [o * per_image for o in r.offsets]
        if r.kernel is not None:  # the rescale happens inside the GEMM, in registers; low-rank terms after
            y = r.kernel(x2, b.weight, b.bias, r.per_task(self.path, "l"), r.per_task(self.path, "c"),
                         r.per_task(self.path, "s"), r.per_task(self.path, "a"), offsets)
            return r.add_lowrank(y.view(*x.shape[:-1], out_f), x, self.path)
        y = x2.new_empty(x2.shape[0], out_f)  # (B·N, out)
        for u in range(len(r.tasks)):
            lo, hi = offsets[u], offsets[u + 1]
            weight, bias = r.weights(u, self.path, b)
            if bias is None:
                torch.mm(x2[lo:hi], weight.t(), out=y[lo:hi])
            else:
                torch.addmm(bias, x2[lo:hi], weight.t(), out=y[lo:hi])
        return y.view(*x.shape[:-1], out_f)


class _RowConv(nn.Module):
    """The patch-embedding conv: each segment whose task changes it runs its own folded kernel."""

    def __init__(self, base_layer: nn.Conv2d, path: str) -> None:
        super().__init__()
        self.base_layer, self.path = base_layer, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, H, W)
        r, base = _batch(), self.base_layer
        y = base(x)  # one conv for all rows; the few segments that change it are redone (it is ~1% of a ViT)
        for u, task in enumerate(r.tasks):
            fold = task.folds.get(self.path)
            if fold is None or (fold.identity and not fold.shift):
                continue
            lo, hi = r.offsets[u], r.offsets[u + 1]
            weight, bias = r.weights(u, self.path, base)
            y[lo:hi] = base._conv_forward(x[lo:hi], weight, bias)
        return y


class _RowSSF(nn.Module):
    def __init__(self, base_layer: nn.Module, path: str, channel_dim: int) -> None:
        super().__init__()
        self.base_layer, self.path, self.channel_dim = base_layer, path, channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = _batch()
        if r.mode == "segmented":
            return self._segmented(x, r)
        y = self.base_layer(x)
        scale = _rows_view(r.take(self.path, "scale"), y.dim(), self.channel_dim)
        shift = _rows_view(r.take(self.path, "shift"), y.dim(), self.channel_dim)
        return rlrr.ssf(y, scale, shift)

    def _segmented(self, x: torch.Tensor, r: Batch) -> torch.Tensor:
        # Per segment, not per row: no (B, ...) gather and no temporaries. One task: its γ, β fold into
        # a LayerNorm's affine (no pass at all); several: one in-place pass over each segment.
        base = self.base_layer
        scale, shift = r.per_task(self.path, "scale"), r.per_task(self.path, "shift")  # (U, D)
        if len(r.tasks) == 1 and isinstance(base, nn.LayerNorm) and base.weight is not None:
            w, b = rlrr.fold_ssf(base.weight, base.bias, scale[0], shift[0])
            return F.layer_norm(x, base.normalized_shape, w, b, base.eps)
        y = base(x)
        shape = (-1,) + (1,) * (y.dim() - 2) if self.channel_dim == 1 else (-1,)  # γ, β against one image
        for u in range(len(r.tasks)):
            seg = y[r.offsets[u]:r.offsets[u + 1]]
            torch.addcmul(shift[u].view(shape), seg, scale[u].view(shape), out=seg)
        return y


def _share_structure(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers ARE the original's (no weight copy)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class MultiTaskViT(nn.Module):
    """One frozen timm ViT serving many adapter tasks (any methods) in one pass, a task per row.

    The backbone's tensors are shared, never copied or written: move the backbone to its device
    and dtype before building this. Adding or removing a task is safe while other threads run
    forward.
    """

    def __init__(self, backbone: nn.Module, widest: RLRRConfig | None = None, fused: bool = True) -> None:
        """
        Args:
            backbone: A plain timm VisionTransformer (frozen; shared with the caller).
            widest: The RLRR targets that get slots (every method's linears and norms must be among
                them, or the patch conv); the RLRR default when None.
            fused: Segmented mode on CUDA uses the Triton kernel when it is importable.
        """
        super().__init__()
        self.fused = fused
        self.widest = widest or RLRRConfig()
        self._targets = {t.path: t for t in plan_targets(backbone, self.widest)}
        self.model = _share_structure(backbone).eval().requires_grad_(False)
        conv = patch_conv_path(backbone)
        if conv is not None:  # wrapped first: an SSF slot on the same path then wraps this wrapper
            self._set(conv, _RowConv(self.model.get_submodule(conv), conv))
        for t in self._targets.values():
            base = self.model.get_submodule(t.path)
            self._set(t.path, _RowLinear(base, t.path) if t.kind == "rescale" else _RowSSF(base, t.path, t.channel_dim))
        # linear slots: path -> (groups, out, flattened in, has bias); norm slots: path -> channels
        self._linears = {p: self._linear_slot(p, t.groups) for p, t in self._targets.items() if t.kind == "rescale"}
        if conv is not None:
            self._linears[conv] = self._linear_slot(conv, 1)
        self._norms = {p: base_module(self.model.get_submodule(p)).weight.shape[0]
                       for p, t in self._targets.items() if t.kind == "ssf"}
        self._tasks: dict[str, TaskHandle] = {}  # insertion order = task index order
        self._plans: dict[Any, tuple[_Plan, _Folds]] = {}
        self._lock = threading.Lock()
        self._snap = _Snapshot((), ())
        self._scratch = _Scratch()

    def _set(self, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, name, module)

    def _linear_slot(self, path: str, groups: int) -> tuple[int, int, int, bool]:
        m = base_module(self.model.get_submodule(path))
        return groups, m.weight.shape[0], m.weight[0].numel(), m.bias is not None

    @property
    def task_names(self) -> list[str]:
        return list(self._snap.names)

    def has_task(self, name: str) -> bool:
        return name in self._snap.names

    def task_index(self, name: str) -> int:
        try:
            return self._snap.names.index(name)
        except ValueError:
            raise UnknownTaskError(f"unknown task {name!r}; loaded: {list(self._snap.names)}") from None

    def handle(self, name: str) -> TaskHandle:
        """The handle of a loaded task."""
        return self._snap.tasks[self.task_index(name)]

    def add_task(self, name: str, tensors: Mapping[str, torch.Tensor], config: Any, num_classes: int,
                 register: bool = True) -> TaskHandle:
        """Add (or replace) a task; returns its handle.

        Args:
            name: Task name.
            tensors: The adapter's tensors (head included). A loaded adapter's `PackedTensors` on
                the model's device and dtype is kept as is (no copy) unless its method derives
                tensors; anything else is packed.
            config: The adapter's configuration (any method's); its slots must exist here.
            num_classes: Classes of its head.
            register: False makes a handle only (a batch may run it; `task_names` does not list it).
        """
        self._check(tensors, config, num_classes)
        ref = next(self.model.parameters())
        forms, full = adapter_forms(self.model, tensors, config)
        self._check_slots(forms)
        if forms.derived:
            tensors = PackedTensors.pack(dict(full.items()), dtype=torch.float32)
        source = (tensors if isinstance(tensors, PackedTensors) else PackedTensors.pack(tensors)).to(
            ref.device, ref.dtype)
        plan, folds = self._plan(config, forms)
        out_side, in_side = self._sides(forms, source)
        task = TaskHandle(name, source, plan, folds, num_classes, all(f.residual for f in folds.values()),
                          frozenset(p for p, f in folds.items() if f.rescale) - out_side - in_side,
                          frozenset(p for p, f in folds.items() if f.shift), out_side, in_side)
        if register:
            with self._lock:
                self._tasks[name] = task
                self._snap = _Snapshot(tuple(self._tasks), tuple(self._tasks.values()))
        return task

    def _sides(self, forms: Forms, source: PackedTensors) -> tuple[frozenset[str], frozenset[str]]:
        """Slots whose rescaling varies on one side only: (l only: output side, c only: input side)."""
        out_side, in_side = set(), set()
        for path, f in forms.linears.items():
            if not f.rescale:
                continue
            if f.c is None:  # W ⊙ (a + l 1ᵀ)
                out_side.add(path)
            elif f.l is None and source[f.c].numel() == self._linears[path][2]:  # one c for every q/k/v slice
                in_side.add(path)
        return frozenset(out_side), frozenset(in_side)

    def remove_task(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(f"unknown task {name!r}")
            del self._tasks[name]
            self._snap = _Snapshot(tuple(self._tasks), tuple(self._tasks.values()))

    @torch.inference_mode()
    def fold_segment(self, name: str | TaskHandle) -> None:
        """Fold every linear slot of one task into the scratch buffers, as one segment does.

        What a segment costs beyond its rows: a planner times this (the result is discarded).

        Args:
            name: A loaded task, or a handle.
        """
        task = name if isinstance(name, TaskHandle) else self.handle(name)
        batch = Batch.build([task], torch.zeros(1, dtype=torch.long), [0, 1], "segmented", self._scratch)
        for path in self._linears:
            batch.weights(0, path, base_module(self.model.get_submodule(path)))

    def _check(self, tensors: Mapping[str, torch.Tensor], config: Any, num_classes: int) -> None:
        shapes = adapter_shapes(self.model, config, num_classes)
        for key, shape in shapes.items():
            got = shape_of(tensors, key)
            if got != shape:
                raise AdapterShapeError(f"adapter tensor '{key}': expected shape {shape}, got {got}")

    def _check_slots(self, forms: Forms) -> None:
        outside = sorted(set(forms.linears) - set(self._linears)) + sorted(set(forms.norms) - set(self._norms))
        if outside:
            raise AdapterModelError(f"adapter targets {outside[:3]} are outside this server's widest targets")

    def _plan(self, config: Any, forms: Forms) -> tuple[_Plan, _Folds]:
        """The canonical form of a config's tasks (made once per config, shared by its tasks)."""
        with self._lock:
            found = self._plans.get(config)
        if found is not None:
            return found
        ref = next(self.model.parameters())
        const = lambda value, *shape: _Entry(None, torch.full(shape, value, device=ref.device, dtype=ref.dtype))
        plan: _Plan = {}
        folds: _Folds = {}
        for path, (groups, out_f, in_f, has_bias) in self._linears.items():
            f = forms.linears.get(path)
            rescale = f is not None and f.rescale
            shift = f is not None and f.s is not None and has_bias
            entries = {"a": const(1.0), "l": const(0.0, out_f), "c": const(1.0, groups, in_f),
                       "s": _Entry(f.s) if shift else const(0.0, out_f)}
            if rescale:  # a missing l or c is ones; a c of one group serves every q/k/v slice alike
                entries.update(a=const(1.0 if f.residual else 0.0),
                               l=_Entry(f.l) if f.l else const(1.0, out_f),
                               c=_Entry(f.c, expand=(groups, in_f)) if f.c else const(1.0, groups, in_f))
            plan[path] = entries
            lora = (f.lora_a, f.lora_b, f.lora_scale) if f is not None and f.lora_a is not None else None
            folds[path] = _Fold(rescale, f.residual if rescale else True, shift, lora)
        for path, d in self._norms.items():
            f = forms.norms.get(path)
            plan.setdefault(path, {}).update(
                scale=_Entry(f.scale) if f is not None and f.scale else const(1.0, d),
                shift=_Entry(f.shift) if f is not None and f.shift else const(0.0, d))
        with self._lock:
            return self._plans.setdefault(config, (plan, folds))

    @torch.inference_mode()
    def forward(
            self,
            images: torch.Tensor,
            task_ids: torch.Tensor | Sequence[str] | Sequence[TaskHandle],
            mode: Mode = "unmerged",
            merged: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Logits of every row under its own task.

        Args:
            images: (B, 3, H, W) on the backbone's device and dtype.
            task_ids: B task handles (`add_task`'s: unaffected by any later add or remove), B task
                names (resolved against the snapshot the forward uses), or (B,) task indices (see
                `task_index`; they shift when a task is removed).
            mode: `unmerged`: one pass, y = x Wᵀ + l ⊙ ((c ⊙ x) Wᵀ) + k (x Aᵀ) Bᵀ per row (a second
                GEMM only on slots some task rescales; low-rank terms per segment).
                `segmented`: each linear multiplies each task segment by its task's folded weight,
                built just in time into a reused buffer (or inside a fused kernel on CUDA), while every
                other op runs once for the batch. Rows already grouped by task skip the permutation.
            merged: Segmented mode: task name -> `fold_adapter` weights to use instead of folding
                (the caller's cache of hot tasks); tasks not in it are folded just in time.

        Returns:
            (B, max classes of the tasks present) logits; entries past a row's own classes are -inf.
        """
        if mode not in ("unmerged", "segmented"):
            raise ValueError(f"mode must be 'unmerged' or 'segmented', not {mode!r}")
        handles = self._resolve(self._snap, task_ids, images.shape[0])
        segment: dict[int, int] = {}
        local = torch.tensor([segment.setdefault(id(h), len(segment)) for h in handles])  # row -> 0..U-1
        tasks = list({id(h): h for h in handles}.values())
        counts = torch.bincount(local, minlength=len(tasks))
        offsets = [0, *itertools.accumulate(counts.tolist())]
        order = None
        if bool((local[1:] < local[:-1]).any()):  # not grouped by task yet: one gather of the images
            order = torch.argsort(local, stable=True)
            local = local[order]
            images = images.index_select(0, order.to(images.device))
        folded = [(merged or {}).get(t.name) for t in tasks] if mode == "segmented" else None
        kernel = _kernel(images.device) if mode == "segmented" and self.fused else None
        batch = Batch.build(tasks, local.to(images.device), offsets, mode, self._scratch, folded, kernel)
        token = _BATCH.set(batch)
        try:
            feats = self.model.forward_head(self.model.forward_features(images), pre_logits=True)  # (B, D)
        finally:
            _BATCH.reset(token)
        logits = feats.new_full((feats.shape[0], max(t.num_classes for t in tasks)), float("-inf"))
        for u, task in enumerate(tasks):  # heads differ in size: one small matmul per task present
            w, b = task.head
            logits[offsets[u]:offsets[u + 1], : task.num_classes] = F.linear(feats[offsets[u]:offsets[u + 1]], w, b)
        if order is not None:  # back to the caller's row order
            logits = torch.empty_like(logits).index_copy_(0, order.to(logits.device), logits)
        return logits

    @staticmethod
    def _resolve(snap: _Snapshot, task_ids: torch.Tensor | Sequence[Any], batch: int) -> list[TaskHandle]:
        if not isinstance(task_ids, torch.Tensor) and task_ids and isinstance(task_ids[0], TaskHandle):
            if len(task_ids) != batch:
                raise ValueError(f"task_ids must hold {batch} handles")
            return list(task_ids)
        if not snap.names:
            raise RuntimeError("no tasks loaded")
        if not isinstance(task_ids, torch.Tensor):
            index = {n: i for i, n in enumerate(snap.names)}
            unknown = sorted(set(task_ids) - set(index))
            if unknown:
                raise UnknownTaskError(f"unknown tasks {unknown}; loaded: {list(snap.names)}")
            task_ids = torch.tensor([index[n] for n in task_ids])
        ids_cpu = task_ids.to("cpu", torch.long)
        if ids_cpu.numel() != batch or ids_cpu.min() < 0 or ids_cpu.max() >= len(snap.names):
            raise ValueError(f"task_ids must hold {batch} indices in [0, {len(snap.names)})")
        return [snap.tasks[i] for i in ids_cpu.tolist()]
