"""MultiTaskViT: one frozen backbone, N task adapters, every row of a batch with its own task.

Each task's vectors are brought to one canonical form per target layer, (a, l, c, s) for
rescaled linears and (γ, β) for SSF, so tasks of different configurations (RLRR, SSF-like,
one-sided, linear probe) share one batch:

    y = a · x Wᵀ + l ⊙ ((c ⊙ x) Wᵀ) + b + s

A layer a task does not adapt gets a = 1, l = 0, s = 0; SSF it does not use gets γ = 1, β = 0.
That canonical form is a *plan* (target path -> tag -> adapter tensor name, or a shared constant),
made once per adapter config and shared by its tasks; a task itself holds only its adapter's
`PackedTensors` (one buffer; on CPU in float32 the adapter's own, not a copy) and its head, so a
loaded task costs its own bytes. A forward stacks only the tasks its batch contains: when they
share one layout (the usual case) with one copy of their buffers, from which every layer's
(U, ...) vectors are views. The tasks live in an immutable snapshot that is swapped whole on
add/remove, so a forward running in another thread always sees one consistent set of tasks.
"""
from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rlrr
from .config import RLRRConfig
from .errors import AdapterModelError, AdapterShapeError, UnknownTaskError
from .inject import Target, adapter_shapes, base_module, plan_targets
from .names import HEAD_NAMES, RLRR_C, RLRR_L, RLRR_S, SSF_SCALE, SSF_SHIFT, tensor_name
from .packed import PackedTensors

__all__ = ["MultiTaskViT"]


@dataclass(frozen=True)
class _Entry:
    """Where one canonical vector of a task comes from: an adapter tensor, or a shared constant."""

    key: str | None  # adapter tensor name; None for a constant
    const: torch.Tensor | None = None  # on the model's device/dtype, shared by every task, never written
    expand: tuple[int, ...] | None = None  # broadcast to this shape (one c shared by the q/k/v slices)


_Plan = dict[str, dict[str, _Entry]]  # target path -> tag -> entry; one per adapter config
Mode = Literal["unmerged", "segmented"]
Kernel = Callable[..., torch.Tensor]  # `triton_segmented.segmented_rescaled_linear`'s signature


@dataclass(frozen=True)
class _Fold:
    """How a segment builds one rescaled linear's weight: as is (not adapted), or W ⊙ (a + l cᵀ)."""

    identity: bool  # the task leaves this layer alone: W and b are used as they are
    residual: bool  # a = 1


_Folds = dict[str, _Fold]  # rescaled target path -> fold; one per adapter config


@dataclass(frozen=True)
class _Task:
    source: PackedTensors  # the adapter's tensors on the model's device/dtype
    plan: _Plan
    folds: _Folds
    num_classes: int
    all_residual: bool  # every layer of the task has a = 1

    @property
    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = HEAD_NAMES
        return self.source[weight], self.source[bias]

    def value(self, path: str, tag: str) -> torch.Tensor:
        e = self.plan[path][tag]
        v = e.const if e.key is None else self.source[e.key]
        return v if e.expand is None else v.expand(e.expand)


@dataclass(frozen=True)
class _Snapshot:
    names: tuple[str, ...]
    tasks: tuple[_Task, ...]

    @property
    def num_classes(self) -> tuple[int, ...]:
        return tuple(t.num_classes for t in self.tasks)


class _Rows(threading.local):
    """Per-thread forward state: the tasks present (snapshot indices) and each row's position among them."""

    tasks: list[_Task] | None = None
    ids: torch.Tensor | None = None  # (B,) index into `tasks`
    residual_only: bool = True
    stacked: torch.Tensor | None = None  # (U, P) the tasks' buffers, when they share one plan and layout
    mode: Mode = "unmerged"
    offsets: list[int] | None = None  # segmented: task u owns images offsets[u]:offsets[u+1] (rows sorted)
    merged: list[Mapping[str, torch.Tensor] | None] | None = None  # segmented: a task's folded weights, if cached
    kernel: Kernel | None = None  # segmented: a fused GEMM (CUDA) instead of a fold per segment

    def __init__(self) -> None:
        # Fold targets, one per weight shape, reused by every layer, segment and forward of this thread:
        # a just-in-time fold never allocates (ViT-S: 4 buffers, 7 MB in fp32, whatever the task count).
        self.scratch: dict[tuple, torch.Tensor] = {}

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.device)
        buf = self.scratch.get(key)
        if buf is None:
            buf = self.scratch[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf

    def per_task(self, path: str, tag: str) -> torch.Tensor:
        """(U, ...) one value per task present (the stacked form the fused kernel reads)."""
        if self.stacked is None:  # tasks of different configs: stack this layer's U small vectors
            return torch.stack([t.value(path, tag) for t in self.tasks])
        # one shared layout: a view of the stacked buffers, no per-task work
        first, u = self.tasks[0], self.stacked.shape[0]
        e = first.plan[path][tag]
        v = e.const.expand(u, *e.const.shape) if e.key is None else first.source.stacked_view(self.stacked, e.key)
        return v if e.expand is None else v.expand(u, *e.expand)

    def take(self, path: str, tag: str) -> torch.Tensor:
        return self.per_task(path, tag).index_select(0, self.ids)  # (B, ...): one row per image

    def begin(self, tasks: list[_Task], ids: torch.Tensor, mode: Mode = "unmerged", offsets: list[int] | None = None,
              merged: list[Mapping[str, torch.Tensor] | None] | None = None, kernel: Kernel | None = None) -> None:
        self.tasks, self.ids = tasks, ids
        self.mode, self.offsets, self.merged, self.kernel = mode, offsets, merged, kernel
        self.residual_only = all(t.all_residual for t in tasks)
        first = tasks[0]
        shared = all(t.plan is first.plan and t.source.layout is first.source.layout for t in tasks)
        if not shared:
            self.stacked = None
        elif len(tasks) == 1:
            self.stacked = first.source.flat[None]  # (1, P): a view, no copy
        else:  # one copy of U buffers (ViT-S: 0.7 MB each) instead of ~250 stacks of U small tensors
            self.stacked = torch.stack([t.source.flat for t in tasks])  # (U, P)

    def end(self) -> None:
        self.tasks = self.ids = self.stacked = self.offsets = self.merged = self.kernel = None
        self.mode = "unmerged"

    def weights(self, u: int, path: str, base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Task u's weight and bias for one rescaled linear: cached, as is, or folded into scratch now.

        Args:
            u: Segment (task present) index.
            path: The linear's target path.
            base: The frozen linear (read only).
        """
        merged = self.merged[u] if self.merged is not None else None
        if merged is not None and f"{path}.weight" in merged:
            return merged[f"{path}.weight"], merged.get(f"{path}.bias", base.bias)
        task = self.tasks[u]
        fold = task.folds[path]
        if fold.identity:
            return base.weight, base.bias
        weight = rlrr.rescale_weight_into(self.buffer(base.weight), base.weight, task.value(path, "l"),
                                          task.value(path, "c"), fold.residual)  # (out, in)
        bias = base.bias
        if bias is not None:
            bias = torch.add(bias, task.value(path, "s"), out=self.buffer(bias))  # (out,)
        return weight, bias


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
    def __init__(self, base_layer: nn.Linear, path: str, rows: _Rows) -> None:
        super().__init__()
        self.base_layer, self.path, self.rows = base_layer, path, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, N, in)
        if self.rows.mode == "segmented":
            return self._segmented(x)
        r, b = self.rows, self.base_layer
        l = _rows_view(r.take(self.path, "l"), x.dim())  # (B, 1, out)
        c = _rows_view(r.take(self.path, "c"), x.dim() + 1)  # (B, 1, g, in)
        s = _rows_view(r.take(self.path, "s"), x.dim())  # (B, 1, out)
        a = True if r.residual_only else _rows_view(r.take(self.path, "a")[:, None], x.dim())  # (B, 1, 1)
        return rlrr.rescaled_linear(x, b.weight, b.bias, l, c, s, residual=a)

    def _segmented(self, x: torch.Tensor) -> torch.Tensor:
        # One matmul per task segment with that task's W ⊙ (a + l cᵀ), built just in time (or cached):
        # the same FLOPs as the plain layer plus one pass over W per segment.
        r, b = self.rows, self.base_layer
        out_f, in_f = b.weight.shape
        x2 = x.reshape(-1, in_f)  # (B·N, in), images sorted by task
        per_image = x2.shape[0] // x.shape[0]
        offsets = [o * per_image for o in r.offsets]
        if r.kernel is not None:  # the fold happens inside the GEMM, in registers
            y = r.kernel(x2, b.weight, b.bias, r.per_task(self.path, "l"), r.per_task(self.path, "c"),
                         r.per_task(self.path, "s"), r.per_task(self.path, "a"), offsets)
            return y.view(*x.shape[:-1], out_f)
        y = x2.new_empty(x2.shape[0], out_f)  # (B·N, out)
        for u in range(len(r.tasks)):
            lo, hi = offsets[u], offsets[u + 1]
            weight, bias = r.weights(u, self.path, b)
            if bias is None:
                torch.mm(x2[lo:hi], weight.t(), out=y[lo:hi])
            else:
                torch.addmm(bias, x2[lo:hi], weight.t(), out=y[lo:hi])
        return y.view(*x.shape[:-1], out_f)


class _RowSSF(nn.Module):
    def __init__(self, base_layer: nn.Module, path: str, rows: _Rows, channel_dim: int) -> None:
        super().__init__()
        self.base_layer, self.path, self.rows, self.channel_dim = base_layer, path, rows, channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows.mode == "segmented":
            return self._segmented(x)
        y = self.base_layer(x)
        scale = _rows_view(self.rows.take(self.path, "scale"), y.dim(), self.channel_dim)
        shift = _rows_view(self.rows.take(self.path, "shift"), y.dim(), self.channel_dim)
        return rlrr.ssf(y, scale, shift)

    def _segmented(self, x: torch.Tensor) -> torch.Tensor:
        # Per segment, not per row: no (B, ...) gather and no temporaries. One task: its γ, β fold into
        # a LayerNorm's affine (no pass at all); several: one in-place pass over each segment.
        r, base = self.rows, self.base_layer
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
    """One frozen timm ViT serving many RLRR tasks in one pass, a task per row.

    The backbone's tensors are shared, never copied or written: move the backbone to its device
    and dtype before building this. Adding or removing a task is safe while other threads run
    forward.
    """

    def __init__(self, backbone: nn.Module, widest: RLRRConfig | None = None, fused: bool = True) -> None:
        """
        Args:
            backbone: A plain timm VisionTransformer (frozen; shared with the caller).
            widest: The widest set of targets a task may use; the RLRR default when None.
            fused: Segmented mode on CUDA uses the Triton kernel when it is importable.
        """
        super().__init__()
        self.fused = fused
        self.widest = widest or RLRRConfig()
        self._targets = {t.path: t for t in plan_targets(backbone, self.widest)}
        self._rows = _Rows()
        self.model = _share_structure(backbone).eval().requires_grad_(False)
        for t in self._targets.values():
            base = self.model.get_submodule(t.path)
            wrapper = (_RowLinear(base, t.path, self._rows) if t.kind == "rescale"
                       else _RowSSF(base, t.path, self._rows, t.channel_dim))
            parent, _, name = t.path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, name, wrapper)
        self._tasks: dict[str, _Task] = {}  # insertion order = task index order
        self._plans: dict[RLRRConfig, tuple[_Plan, _Folds]] = {}
        self._lock = threading.Lock()
        self._snap = _Snapshot((), ())

    @property
    def task_names(self) -> list[str]:
        return list(self._snap.names)

    def task_index(self, name: str) -> int:
        try:
            return self._snap.names.index(name)
        except ValueError:
            raise UnknownTaskError(f"unknown task {name!r}; loaded: {list(self._snap.names)}") from None

    def add_task(self, name: str, tensors: Mapping[str, torch.Tensor], config: RLRRConfig, num_classes: int) -> None:
        """Add (or replace) a task.

        Args:
            name: Task name.
            tensors: The adapter's tensors (head included). A loaded adapter's `PackedTensors` on
                the model's device and dtype is kept as is (no copy); anything else is packed.
            config: The adapter's configuration; its targets must be within `widest`.
            num_classes: Classes of its head.
        """
        self._check(tensors, config, num_classes)
        ref = next(self.model.parameters())
        source = (tensors if isinstance(tensors, PackedTensors) else PackedTensors.pack(tensors)).to(
            ref.device, ref.dtype)
        own = plan_targets(self.model, config)
        all_residual = config.residual or not any(t.kind == "rescale" for t in own)
        plan, folds = self._plan(config)
        task = _Task(source, plan, folds, num_classes, all_residual)
        with self._lock:
            self._tasks[name] = task
            self._snap = _Snapshot(tuple(self._tasks), tuple(self._tasks.values()))

    def remove_task(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(f"unknown task {name!r}")
            del self._tasks[name]
            self._snap = _Snapshot(tuple(self._tasks), tuple(self._tasks.values()))

    @torch.inference_mode()
    def fold_segment(self, name: str) -> None:
        """Fold every rescaled layer of one task into the scratch buffers, as one segment does.

        What a segment costs beyond its rows: a planner times this (the result is discarded).

        Args:
            name: A loaded task.
        """
        task = self._snap.tasks[self.task_index(name)]
        rows = self._rows
        rows.begin([task], torch.zeros(1, dtype=torch.long), "segmented", [0, 1])
        try:
            for path, t in self._targets.items():
                if t.kind == "rescale":
                    rows.weights(0, path, base_module(self.model.get_submodule(path)))
        finally:
            rows.end()

    def _check(self, tensors: Mapping[str, torch.Tensor], config: RLRRConfig, num_classes: int) -> None:
        shapes = adapter_shapes(self.model, config, num_classes)
        for key, shape in shapes.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = None if key not in tensors else tuple(tensors[key].shape)
                raise AdapterShapeError(f"adapter tensor '{key}': expected shape {shape}, got {got}")
        own = {t.path: t for t in plan_targets(self.model, config)}
        outside = [p for p, t in own.items() if self._targets.get(p, Target("", "")).kind != t.kind]
        if outside:
            raise AdapterModelError(f"adapter targets {outside[:3]} are outside this server's widest targets")

    def _plan(self, config: RLRRConfig) -> tuple[_Plan, _Folds]:
        """The canonical form of a config's tasks (made once per config, shared by its tasks)."""
        with self._lock:
            found = self._plans.get(config)
        if found is not None:
            return found
        ref = next(self.model.parameters())
        const = lambda value, *shape: _Entry(None, torch.full(shape, value, device=ref.device, dtype=ref.dtype))
        own = {t.path: t for t in plan_targets(self.model, config)}
        plan: _Plan = {}
        folds: _Folds = {}
        for path, t in self._targets.items():
            m = base_module(self.model.get_submodule(path))
            if t.kind == "ssf":
                d = m.weight.shape[0]
                used = path in own
                plan[path] = {"scale": _Entry(tensor_name(path, SSF_SCALE)) if used else const(1.0, d),
                              "shift": _Entry(tensor_name(path, SSF_SHIFT)) if used else const(0.0, d)}
                continue
            out_f, in_f = m.out_features, m.in_features
            folds[path] = _Fold(identity=path not in own, residual=config.residual or path not in own)
            if path not in own:  # not adapted: y = x Wᵀ + b exactly
                plan[path] = {"a": const(1.0), "l": const(0.0, out_f), "c": const(1.0, t.groups, in_f),
                              "s": const(0.0, out_f)}
                continue
            c = const(1.0, t.groups, in_f)
            if config.right:  # one shared column vector (split_qkv off) serves every q/k/v slice alike
                c = _Entry(tensor_name(path, RLRR_C), expand=(t.groups, in_f) if own[path].groups != t.groups else None)
            plan[path] = {
                "a": const(1.0 if config.residual else 0.0),
                "l": _Entry(tensor_name(path, RLRR_L)) if config.left else const(1.0, out_f),
                "c": c,
                "s": (_Entry(tensor_name(path, RLRR_S)) if config.bias_shift and m.bias is not None
                      else const(0.0, out_f)),
            }
        with self._lock:
            return self._plans.setdefault(config, (plan, folds))

    @torch.inference_mode()
    def forward(
            self,
            images: torch.Tensor,
            task_ids: torch.Tensor | Sequence[str],
            mode: Mode = "unmerged",
            merged: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Logits of every row under its own task.

        Args:
            images: (B, 3, H, W) on the backbone's device and dtype.
            task_ids: (B,) task indices (see `task_index`), or B task names. Names are resolved
                against the same snapshot the forward uses, so they stay right while another
                thread adds or removes tasks; indices shift when a task is removed.
            mode: `unmerged`: one pass, y = x Wᵀ + l ⊙ ((c ⊙ x) Wᵀ) per row (two matmuls).
                `segmented`: rows sorted into task segments; each rescaled linear multiplies each
                segment by its task's W ⊙ (a + l cᵀ), folded just in time into a reused buffer
                (or inside a fused kernel on CUDA), while every other op runs once for the batch.
                Rows already sorted by task skip the permutation.
            merged: Segmented mode: task name -> `fold_adapter` weights to use instead of folding
                (the caller's cache of hot tasks); tasks not in it are folded just in time.

        Returns:
            (B, max classes) logits; entries past a row's own class count are -inf.
        """
        snap = self._snap  # one consistent view even if a task is added meanwhile
        if mode not in ("unmerged", "segmented"):
            raise ValueError(f"mode must be 'unmerged' or 'segmented', not {mode!r}")
        ids_cpu = self._resolve(snap, task_ids, images.shape[0])
        present, local = ids_cpu.unique(return_inverse=True)  # the U tasks of this batch; row -> 0..U-1
        tasks = [snap.tasks[t] for t in present.tolist()]
        order = offsets = folded = None
        if mode == "segmented":
            counts = torch.bincount(local, minlength=len(tasks))
            offsets = [0, *itertools.accumulate(counts.tolist())]
            if bool((local[1:] < local[:-1]).any()):  # not sorted by task yet: one gather of the images
                order = torch.argsort(local, stable=True)
                local = local[order]
                images = images.index_select(0, order.to(images.device))
            merged = merged or {}
            folded = [merged.get(snap.names[t]) for t in present.tolist()]
        rows = self._rows
        rows.begin(tasks, local.to(images.device), mode, offsets, folded,
                   _kernel(images.device) if mode == "segmented" and self.fused else None)
        try:
            feats = self.model.forward_head(self.model.forward_features(images), pre_logits=True)  # (B, D)
        finally:
            rows.end()
        logits = feats.new_full((feats.shape[0], max(snap.num_classes)), float("-inf"))
        for u, task in enumerate(tasks):  # heads differ in size: one small matmul per task present
            w, b = task.head
            if offsets is not None:
                logits[offsets[u]:offsets[u + 1], : task.num_classes] = F.linear(feats[offsets[u]:offsets[u + 1]], w, b)
            else:
                sel = (local == u).nonzero().squeeze(1).to(feats.device)
                logits[sel, : task.num_classes] = F.linear(feats.index_select(0, sel), w, b)
        if order is not None:  # back to the caller's row order
            logits = torch.empty_like(logits).index_copy_(0, order.to(logits.device), logits)
        return logits

    @staticmethod
    def _resolve(snap: _Snapshot, task_ids: torch.Tensor | Sequence[str], batch: int) -> torch.Tensor:
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
        return ids_cpu
