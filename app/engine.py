"""The engine thread: owns the frozen backbone, every task's life on it, and how a batch runs.

A task is *prepared* (added to the multi-task model after a cheap bound check: no fold; its handle
kept beside its `LoadedTask`), runs in batches planned by `app.planner`, and is *retired* when
replaced or deleted. A batch runs its tasks by handle, so a retirement never touches a batch that
still holds the old version (it runs, then the version is freed with its last reference). All
model work runs on one worker thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import nn
from torch.func import functional_call

from adapters import (
    MultiTaskViT,
    PackedTensors,
    TaskHandle,
    adapter_forms,
    backbone_fingerprint,
    check_bounds,
    fold_adapter,
    weight_bounds,
)
from app.cache import MergedCache, Weights
from app.costs_file import machine_key, read_costs, write_costs
from app.errors import AdapterFailure
from app.metrics import Metrics
from app.planner import Costs, Form, Planner
from app.runtime import flush_denormals, load_backbone, resolve_device, resolve_dtype, trim_heap
from app.settings import Settings
from app.tasks import BatchItem, LoadedTask, TopK

__all__ = ["Engine", "BatchItem", "TopK", "load_backbone"]

log = logging.getLogger("app")
T = TypeVar("T")
BatchKind = Literal["merged", "segmented", "unmerged", "hybrid"]  # the label a batch is counted under
# Logits of the fused kernel vs the torch fold, relative to their largest: both round W' and
# activations to fp16/bf16 once per layer in a different order; 12 blocks of bf16 (8-bit mantissa)
# stay well under 5e-2, while a wrong segment, c group or missing bias moves logits by O(1).
KERNEL_TOLERANCE = 5e-2


class Engine:
    """Runs batches of `BatchItem`s on the frozen backbone, each task group in its cheapest form.

    Args:
        backbone: Plain timm ViT, frozen, already on `device` in `dtype`; never written.
        name: The backbone's timm name.
        fingerprint: `backbone_fingerprint` of its weights.
        random_weights: True when the weights are a random init (said in logs and /tasks).
        strategy: `auto`, or a form forced for every group (`merged`, `segmented`, `unmerged`).
        cache_bytes: Budget of the merged-weights cache (hot tasks only; speed does not need it).
        metrics: The app's metrics.
        calibration_batch: Batch size `warm_up` times each form at (the batcher's largest).
        costs_file: Where measured plan costs are kept for the next start (app.costs_file); None: measure
            on every start.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        name: str,
        fingerprint: str,
        random_weights: bool,
        strategy: str,
        cache_bytes: int,
        metrics: Metrics,
        calibration_batch: int = 8,
        costs_file: Path | None = None,
    ) -> None:
        ref = next(backbone.parameters())
        self.backbone = backbone
        self.name = name
        self.fingerprint = fingerprint
        self.random_weights = random_weights
        self.device, self.dtype = ref.device, ref.dtype
        self.input_size: tuple[int, ...] = tuple(resolve_data_config({}, model=backbone)["input_size"])
        self.strategy = strategy
        self.metrics = metrics
        self.planner = Planner(strategy)
        self.cache = MergedCache(cache_bytes, metrics)
        self.multi = MultiTaskViT(backbone)
        self.calibration_batch = calibration_batch
        self.costs_file = costs_file
        self.costs_source = "prior"  # then "measured" or "file" after warm-up
        self._bounds = weight_bounds(backbone)  # max|W| per adaptable layer, for the load-time check
        # A task version's handle lives exactly as long as its LoadedTask (the registry's, or a queued batch's).
        self._handles: weakref.WeakKeyDictionary[LoadedTask, TaskHandle] = weakref.WeakKeyDictionary()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine", initializer=flush_denormals)

    @property
    def costs(self) -> Costs:
        return self.planner.costs

    @costs.setter
    def costs(self, value: Costs) -> None:
        self.planner.costs = value

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> Engine:
        """Load the backbone, fingerprint it on CPU in float32, then move it to its device.

        Args:
            settings: The app settings.
            metrics: The app's metrics.
        """
        backbone, random_weights = load_backbone(settings)
        fingerprint = backbone_fingerprint(backbone)  # before the cast: fingerprints are of fp32 weights
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        backbone = backbone.to(device=device, dtype=dtype)
        return cls(backbone, name=settings.backbone, fingerprint=fingerprint, random_weights=random_weights,
                   strategy=settings.strategy, cache_bytes=settings.merged_cache_bytes, metrics=metrics,
                   calibration_batch=settings.max_batch_size, costs_file=settings.costs_file)

    # -- called from the event loop -------------------------------------------------------------

    async def run(self, items: list[BatchItem]) -> list[TopK | AdapterFailure]:
        """Classify a batch on the engine thread; one prediction list per item, in order.

        Args:
            items: The batch.
        """
        return await self._call(self._run_batch, items)

    async def prepare(self, task: LoadedTask) -> None:
        """Make a task runnable; raises ValueError if it cannot produce finite outputs here.

        Runs beside the engine thread, not on it: an upload does not wait for the running batch
        (adding a task swaps the multi-task snapshot atomically; a running forward keeps its own).

        Args:
            task: A freshly loaded task version.
        """
        await asyncio.to_thread(self._prepare, task)

    async def probe(self, task: LoadedTask) -> None:
        """Refuse a prepared task whose logits are not finite on a noise image (one unmerged forward):
        value bounds alone cannot rule out an overflow through 12 blocks.

        Args:
            task: A task version `prepare` accepted.

        Raises:
            ValueError: Naming the image that gave non-finite logits.
        """
        # Beside the engine thread, as `prepare`: on the engine thread an upload waited for the running
        # batch and the queued ones (5.6 s on 2 cores with 16-image ViT-S batches). A forward reads the
        # shared modules only; its batch state and fold buffers are the calling thread's own.
        await asyncio.to_thread(self._probe, task)

    async def retire(self, task: LoadedTask, trim: bool = True) -> None:
        """Stop serving a replaced, deleted or evicted task version: out of the task table and the cache now.

        A batch already running or still queued holds the version's handle and runs it unchanged;
        its memory goes with the last such batch.

        Args:
            task: The old version.
            trim: Hand freed heap pages back to the OS now (evictions trim in bulk instead).
        """
        self._prune([task.key])
        if trim:
            await asyncio.to_thread(trim_heap)

    async def warm_up(self, tasks: list[LoadedTask]) -> None:
        """Run each form once (kernels, allocator, lazy init), then time them for `auto`.

        Args:
            tasks: Loaded tasks; the plain backbone is run when there are none.
        """
        await self._call(self._warm_up, tasks)

    def close(self) -> None:
        """Stop the engine thread after the running batch."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the engine thread: task life ------------------------------------------------------------

    def _prepare(self, task: LoadedTask) -> None:
        # O(adapter bytes): shapes (add_task) and value bounds; nothing is folded, so loading 1,000
        # tasks costs their file reads, not 1,000 passes over the backbone.
        adapter = task.adapter
        forms, tensors = adapter_forms(self.backbone, adapter.tensors, adapter.config)
        check_bounds(tensors, adapter.config, self._bounds, self.dtype, forms=forms)
        self._handles[task] = self.multi.add_task(task.key, adapter.tensors, adapter.config, adapter.num_classes)

    def _probe(self, task: LoadedTask) -> None:
        # One uniform-noise image, not four (black, white, grey, noise): four images in two forms cost
        # ~4 s an upload on a slow CPU (CPU taken from the running batch), and in every overflowing
        # case of tests/app/test_hostile_classes.py noise overflowed whenever a plain image did (and
        # alone where three saturated blocks let the plain images through). One form, not both: the
        # folded weights the segmented and merged forms use were bounded at `prepare`, and what they
        # compute is this one's sum without its intermediate l ⊙ ((c ⊙ x) Wᵀ), so an overflow in them
        # overflows here first. The second forward made an upload take 1.2-1.6 s beside ViT-S batches.
        h, w = self.input_size[1:]
        noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = task.transform(Image.fromarray(noise))[None].to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.multi(x, [self._handle(task)], mode="unmerged")[:, :task.adapter.num_classes]
        if not torch.isfinite(out).all():
            raise ValueError("its logits are not finite on the probe image (uniform noise): the adapter's values "
                             f"overflow {str(self.dtype).removeprefix('torch.')}")

    def _prune(self, keys: list[str]) -> None:
        # Keys are unique per loaded version, so a retired key never comes back.
        loaded = set(self.multi.task_names)
        for key in keys:
            if key in loaded:
                self.multi.remove_task(key)
            self.cache.pop(key)

    def _handle(self, task: LoadedTask) -> TaskHandle:
        handle = self._handles.get(task)
        if handle is None:  # never prepared here (a direct caller): a handle outside the task table
            a = task.adapter
            handle = self._handles[task] = self.multi.add_task(task.key, a.tensors, a.config, a.num_classes,
                                                               register=False)
        return handle

    # -- the engine thread: warm-up and costs ----------------------------------------------------

    def _warm_up(self, tasks: list[LoadedTask]) -> None:
        image = torch.zeros(self.input_size)
        if not tasks:
            with torch.inference_mode():
                self.backbone(image[None].to(self.device, self.dtype))
            return
        # Two rows whatever the task count: the same warm-up work (and allocator state) for 1 task as for
        # 1,000, so what a server holds after start-up differs only by what its tasks themselves take.
        items = [BatchItem(tasks[i % len(tasks)], image, 1) for i in range(2)]
        self._check_kernel(tasks[0], image)
        for form in ("segmented", "unmerged"):
            self._run_batch(items, force=form, record=False)
        self._calibrate(tasks, image)

    def _check_kernel(self, task: LoadedTask, image: torch.Tensor) -> None:
        # The fused Triton GEMM (CUDA only) must agree with the torch fold before it serves: a kernel
        # that fails to compile or disagrees on this GPU is switched off with a warning, not served.
        if self.device.type != "cuda" or not self.multi.fused:
            return
        x = torch.randn(3, *image.shape, generator=torch.Generator().manual_seed(0)).to(self.device, self.dtype)
        keys = [task.key] * 3
        try:
            with torch.inference_mode():
                fused = self.multi(x, keys, mode="segmented").float()
                self.multi.fused = False
                plain = self.multi(x, keys, mode="segmented").float()
            error = ((fused - plain).abs().max() / plain.abs().max().clamp_min(1e-6)).item()
            self.multi.fused = error <= KERNEL_TOLERANCE
            if not self.multi.fused:
                log.warning("fused segmented kernel disagrees with the torch fold (relative error %.2g): "
                            "using the torch fold", error)
        except Exception as exc:  # noqa: BLE001 - any compile/launch failure: fall back, say why
            self.multi.fused = False
            log.warning("fused segmented kernel unavailable (%s: %s): using the torch fold", type(exc).__name__, exc)

    def _calibrate(self, tasks: list[LoadedTask], image: torch.Tensor) -> None:
        # Time a task's batch of 1 and of a few images in the two forms `auto` chooses between for
        # mixed batches (a one-task cached batch always runs merged); the two points give a per-row and
        # a per-call cost (on CPU the call cost is ~0; on a GPU small batches are all call). The
        # unmerged form is timed for a rescaling task (two GEMMs) and for a task without a two-sided l cᵀ
        # term (LoRA, BitFit, IA³: one GEMM plus per-segment work) when such tasks are loaded; the other
        # gets a prior (or what an earlier start measured). It is most of a server's start-up time on
        # CPU, so what it measured is kept in `costs_file` and read back by the next start.
        pairs = [(t, self._handle(t)) for t in tasks]
        handles = [h for _, h in pairs]
        rescaling_task, rescaling = next(((t, h) for t, h in pairs if h.rescales), (None, None))
        plain_task, plain = next(((t, h) for t, h in pairs if not h.rescales), (None, None))
        big = max(1, min(self.calibration_batch, 4))
        key = machine_key(self.fingerprint, self.device, self.dtype, big)
        stored = read_costs(self.costs_file, key)
        needed = {k for k, h in (("rescaling", rescaling), ("plain", plain)) if h is not None}
        if stored is not None and needed <= set(stored["kinds"]):
            self.costs, self.costs_source = Costs(**stored["costs"]), "file"
            self._announce_costs(f"read from {self.costs_file}")
            return
        x = image[None].to(self.device, self.dtype).expand(big, *image.shape).contiguous()
        c = self.costs
        c.segmented_row, c.segmented_call = self._time_form("segmented", handles[0], x)
        if rescaling is not None:
            c.unmerged_row, c.unmerged_call = self._time_form("unmerged", rescaling, x)
        if plain is not None:
            c.plain_row, call = self._time_form("unmerged", plain, x)
            c.unmerged_call = call if rescaling is None else c.unmerged_call
        known = set(stored["kinds"]) if stored is not None else set()
        if rescaling is None:  # an earlier start's measurement, else the prior: the two-matmul form is ~2x
            c.unmerged_row = stored["costs"]["unmerged_row"] if "rescaling" in known else 2 * c.segmented_row
        if plain is None:  # ... else one GEMM plus thin shrink/expand
            c.plain_row = stored["costs"]["plain_row"] if "plain" in known else 1.05 * c.segmented_row
        c.merged_row, c.merged_call = c.segmented_row, c.segmented_call  # priced as a segmented pass (upper bound)
        c.segment = max(self._segment_cost(t, x) for t in (rescaling_task, plain_task) if t is not None)
        self.costs_source = "measured"
        write_costs(self.costs_file, key, c, sorted(needed | known))
        self._announce_costs("measured")

    def _segment_cost(self, task: LoadedTask, x: torch.Tensor) -> float:
        """Seconds one more task group adds to a segmented pass.

        Timed as it happens: the same rows as one group, then as one group each (the task's adapter
        under other keys, handles outside the task table), so the just-in-time fold, the split
        matmuls and the per-group work all count. Timing the fold alone priced a LoRA group at a
        quarter of what it costs in a pass (bench/grouped_calls.py: 47 ms vs ~200 ms for ViT-S on
        this CPU), and the planner then chose segmented where unmerged was faster. Never below the
        fold alone (a busy machine's noise can only add time).
        """
        handle, big = self._handle(task), x.shape[0]
        fold = self._best(lambda: self.multi.fold_segment(handle), 3)
        if big < 2:
            return fold
        a = task.adapter
        clones = [self.multi.add_task(f"{task.key}#segment-{i}", a.tensors, a.config, a.num_classes, register=False)
                  for i in range(big)]
        # A group is ~5% of a pass of 2 rows: one timing of each priced it anywhere from 18 to 40 ms for
        # the same mixed store and flipped the plan (uniform-50 0.83 vs 0.92 of `single`), so the
        # fastest of 3, interleaved (drift hits both alike).
        one = spread = math.inf
        for _ in range(3):
            one = min(one, self._best(lambda: self.multi(x, [handle] * big, mode="segmented"), 1))
            spread = min(spread, self._best(lambda: self.multi(x, clones, mode="segmented"), 1))
        return max(fold, (spread - one) / (big - 1))

    def _announce_costs(self, source: str) -> None:
        c = self.costs
        for name, value in vars(c).items():
            self.metrics.auto_cost.labels(name).set(value)
        log.info("plan costs (ms, %s): segmented %.1f/row + %.1f/call + %.1f/group, unmerged %.1f/row (%.1f "
                 "without a rescale) + %.1f/call", source, *(1e3 * v for v in (
                     c.segmented_row, c.segmented_call, c.segment, c.unmerged_row, c.plain_row, c.unmerged_call)))

    def _time_form(self, form: Form, handle: TaskHandle, x: torch.Tensor) -> tuple[float, float]:
        """(per row, per call) seconds of one task's rows in a form."""
        big = x.shape[0]
        one = self._best(lambda: self.multi(x[:1], [handle], mode=form), 2)
        many = self._best(lambda: self.multi(x, [handle] * big, mode=form), 1) if big > 1 else one
        row = (many - one) / (big - 1) if big > 1 else one
        row = max(row, many / big / 4)  # noise guard: a row is never nearly free
        return row, max(0.0, one - row)

    def _best(self, fn: Callable[[], object], repeats: int) -> float:
        best = math.inf  # the fastest of a few: a busy machine only adds time
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            best = min(best, self._sync_time(start))
        return best

    def _sync_time(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # -- the engine thread: one batch ------------------------------------------------------------

    def _run_batch(self, items: list[BatchItem], force: Form | None = None,
                   record: bool = True) -> list[TopK | AdapterFailure]:
        # Rows sorted by task: each task's rows form one segment and no permutation is needed later.
        order = sorted(range(len(items)), key=lambda i: items[i].task.key)
        items = [items[i] for i in order]
        tasks = {item.task.key: item.task for item in items}
        counts = collections.Counter(item.task.key for item in items)
        plan = self._admit_and_plan(counts, tasks, force)
        kinds = set(plan.values())
        kind: BatchKind = "hybrid" if len(kinds) > 1 else next(iter(kinds))
        start = time.perf_counter()
        images = torch.stack([item.image for item in items]).to(self.device, self.dtype)
        with torch.inference_mode():
            width = max(t.adapter.num_classes for t in tasks.values())
            logits = images.new_full((len(items), width), float("-inf"))
            for form in ("merged", "segmented", "unmerged"):
                keys = [k for k, f in plan.items() if f == form]
                if keys:
                    self._forward(form, images, items, [tasks[k] for k in keys], logits)
            predictions = _top_k(logits, items)
        if record:
            self._record(kind, items, time.perf_counter() - start)
        out: list[TopK | AdapterFailure] = [[] for _ in items]
        for position, i in enumerate(order):
            out[i] = predictions[position]
        return out

    def _admit_and_plan(self, counts: dict[str, int], tasks: Mapping[str, LoadedTask],
                        force: Form | None) -> dict[str, Form]:
        # Only a task holding at least half of a batch earns heat: the cache pays off where a task runs
        # (nearly) alone, as one plain forward. Inside a mixed segmented pass cached weights save a ~7 ms
        # just-in-time fold (ViT-S, CPU) but an admission costs a whole fold and a fresh backbone-sized
        # allocation (bench/README.md: admitting zipf's head cost zipf-1000 ~4%).
        total = sum(counts.values())
        self.cache.seen([k for k, n in counts.items() if 2 * n >= total])
        forced = force or (None if self.strategy == "auto" else self.strategy)
        for key in counts:  # one hit or miss per group; hot tasks (every task, if merged is forced) are cached
            if self.cache.get(key) is None and self.multi.has_task(key) and (  # a retired version is not cached
                    forced == "merged" or (forced is None and self.cache.admits(key))):
                self.cache.put(key, self._fold(tasks[key]))
        plain_rows = {k for k in counts if not self._handle(tasks[k]).rescales}  # unmerged costs them no second GEMM
        return self.planner.plan(counts, {k for k in counts if k in self.cache}, force, plain_rows)

    def _forward(self, form: Form, images: torch.Tensor, items: list[BatchItem], tasks: list[LoadedTask],
                 logits: torch.Tensor) -> None:
        keys = {task.key for task in tasks}
        rows = [i for i, item in enumerate(items) if item.task.key in keys]  # contiguous runs: items are sorted
        x = self._select(images, rows)
        if form == "merged":
            for task in tasks:  # one plain forward per group (a single group in `auto`)
                sel = [j for j, i in enumerate(rows) if items[i].task.key == task.key]
                weights = self.cache.peek(task.key) or self._fold(task)
                out = functional_call(self.backbone, weights, (x[sel[0]:sel[-1] + 1],))
                logits[rows[sel[0]]:rows[sel[-1]] + 1, : out.shape[1]] = out
            return
        handles = [self._handle(items[i].task) for i in rows]
        merged = {k: w for k in keys if (w := self.cache.peek(k)) is not None} if form == "segmented" else None
        out = self.multi(x, handles, mode=form, merged=merged)
        width = min(out.shape[1], logits.shape[1])  # `multi` pads to its widest LOADED head: past ours is -inf
        logits[torch.tensor(rows, device=self.device), :width] = out[:, :width]

    def _select(self, images: torch.Tensor, rows: list[int]) -> torch.Tensor:
        # Sorted items make a form's rows one run in most batches: a view then, a gather otherwise.
        if rows[-1] - rows[0] + 1 == len(rows):
            return images[rows[0]:rows[-1] + 1]
        return images.index_select(0, torch.tensor(rows, device=self.device))

    def _fold(self, task: LoadedTask) -> Weights:
        start = time.perf_counter()
        folded = fold_adapter(self.backbone, _float32(task, self.device), task.adapter.config)
        folded = {k: v.to(self.dtype) for k, v in folded.items()}
        # fold_adapter's finiteness check reads every value back, so the time is complete on CUDA too
        self.costs.fold = 0.7 * self.costs.fold + 0.3 * (time.perf_counter() - start)  # moving average
        return folded

    def _record(self, kind: BatchKind, items: list[BatchItem], seconds: float) -> None:
        self.metrics.batches.labels(kind).inc()
        self.metrics.inference.labels(kind).observe(seconds)


def _float32(task: LoadedTask, device: torch.device) -> Mapping[str, torch.Tensor]:
    # Fold against float32 adapter tensors, then cast once: rounding happens a single time.
    tensors = task.adapter.tensors
    if isinstance(tensors, PackedTensors):  # one transfer of the whole buffer (a no-op on CPU in float32)
        return tensors.to(device, torch.float32)
    return {k: v.to(device, torch.float32) for k, v in tensors.items()}


def _top_k(logits: torch.Tensor, items: list[BatchItem]) -> list[TopK | AdapterFailure]:
    # Each row over its own classes only: columns past them (-inf padding, up to the batch's widest
    # head) rank below every real class whatever the logits hold, so they are never indexed. A row
    # whose own logits are not all finite has no meaningful answer: it fails alone, never `null`.
    classes = torch.tensor([item.task.adapter.num_classes for item in items], device=logits.device)
    own = torch.arange(logits.shape[1], device=logits.device)[None, :] < classes[:, None]
    logits = logits.float()
    finite = (torch.isfinite(logits) | ~own).all(dim=1).cpu().tolist()
    probs = torch.where(own, logits, float("-inf")).softmax(dim=-1)
    probs = torch.where(own & torch.isfinite(probs), probs, -1.0)
    k = min(max(item.top_k for item in items), probs.shape[1])
    scores, indices = probs.topk(k, dim=-1)
    scores_l, indices_l = scores.cpu().tolist(), indices.cpu().tolist()
    out: list[TopK | AdapterFailure] = []
    for item, ok, s, i in zip(items, finite, scores_l, indices_l, strict=True):
        if not ok:
            log.warning("task %s (version %s) produced non-finite logits for an image", item.task.name,
                        item.task.version)
            out.append(AdapterFailure(f"task {item.task.name!r} (version {item.task.version}) produced non-finite "
                                      "scores for this image: its adapter cannot classify it"))
            continue
        n = min(item.top_k, item.task.adapter.num_classes)
        out.append(list(zip(i[:n], s[:n], strict=True)))
    return out
