"""The frozen backbone on its device, and how one batch runs on it.

Per batch, the rows are grouped by task and each group runs one of two ways:

- merged: the task's folded weights (`fold_adapter`, kept in a byte-bounded LRU) through
  `torch.func.functional_call`, one call per task group;
- unmerged: every such row in ONE pass of `MultiTaskViT` (the two-matmul form, a task per row).

`Settings.strategy` can force either for every group. `auto` prices both per group with costs it
measured at warm-up (per-row and per-call time of each form at the batcher's batch size, and the
time of a fold) and picks the cheaper plan for what the batch contains: how many rows each task
has and whether its folded weights are cached. A fold is counted as free when the cache can hold
every loaded task (it is paid once, then reused). The numbers behind the rule are in
bench/README.md: on CPU the unmerged form costs 2-3x a merged row, so every group runs merged;
where per-call overhead dominates (many small groups on a fast device such as a GPU; not measured
there yet) the same prices send the batch through one unmerged pass instead.

All model work happens on one worker thread, so the event loop never blocks and the multi-task
table is only changed between batches (a task's row index is never shifted under a running forward).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from timm.data import resolve_data_config
from torch import nn
from torch.func import functional_call

from adapters import MultiTaskViT, PackedTensors, backbone_fingerprint, build_backbone, check_fold, fold_adapter
from app.metrics import Metrics
from app.settings import Settings

if TYPE_CHECKING:
    from app.registry import LoadedTask

log = logging.getLogger("app")
T = TypeVar("T")
Strategy = Literal["merged", "unmerged"]
BatchKind = Literal["merged", "unmerged", "hybrid"]  # the label a batch is counted under
TopK = list[tuple[int, float]]  # (class index, probability), best first


@dataclass
class BatchItem:
    """One image waiting to be classified.

    Attributes:
        task: The task (and exact adapter version) the image is classified under.
        image: Preprocessed (3, H, W) float32 CPU tensor.
        top_k: How many classes to return.
    """

    task: LoadedTask
    image: torch.Tensor
    top_k: int


def resolve_device(setting: str) -> torch.device:
    """The device for `auto|cuda|cpu`; asking for CUDA where there is none is an error.

    Args:
        setting: `Settings.device`.
    """
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RLRR_DEVICE=cuda but CUDA is not available")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """Half precision on CUDA, float32 on CPU (CPU half matmuls are slow and less accurate).

    Args:
        setting: `Settings.dtype`.
        device: The resolved device.
    """
    if device.type != "cuda":
        if setting not in ("auto", "float32"):
            log.warning("dtype %s ignored on %s: using float32", setting, device)
        return torch.float32
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, setting)


def load_backbone(settings: Settings) -> tuple[nn.Module, bool]:
    """Build the frozen backbone on CPU in float32; returns it and whether its weights are random.

    The trainer's loader too (`adapters.build_backbone`), so the fingerprints agree; the model
    carries its spec, against which every adapter's recorded spec is checked at load.

    Args:
        settings: Backbone name, optional checkpoint, model kwargs, pretrained flag and seed.

    Raises:
        BackboneError: The backbone cannot be built or its weights loaded (the message says why).
    """
    model, random_weights = build_backbone(settings.backbone_spec())
    return model.eval().requires_grad_(False), random_weights


class MergedCache:
    """LRU of folded task weights, bounded by bytes. Only touched on the engine thread.

    Args:
        max_bytes: Budget; an entry larger than it is never cached.
        metrics: Where hits, misses, evictions and bytes go.
    """

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._metrics = metrics
        self._entries: collections.OrderedDict[str, tuple[dict[str, torch.Tensor], int]] = collections.OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached weights (now most recent), or None; counts a hit or a miss.

        Args:
            key: The task version's key.
        """
        entry = self._entries.get(key)
        if entry is None:
            self._metrics.cache_misses.inc()
            return None
        self._entries.move_to_end(key)
        self._metrics.cache_hits.inc()
        return entry[0]

    def put(self, key: str, weights: dict[str, torch.Tensor]) -> None:
        """Insert, evicting least recently used entries until it fits.

        Args:
            key: The task version's key.
            weights: Output of `fold_adapter`.
        """
        size = sum(t.numel() * t.element_size() for t in weights.values())
        if size > self.max_bytes:
            return
        self.pop(key)
        while self.nbytes + size > self.max_bytes:
            self._evict(next(iter(self._entries)))
        self._entries[key] = (weights, size)
        self.nbytes += size
        self._metrics.cache_bytes.set(self.nbytes)

    def pop(self, key: str) -> None:
        """Drop an entry (a replaced or deleted task), if present.

        Args:
            key: The task version's key.
        """
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]
            self._metrics.cache_bytes.set(self.nbytes)

    def _evict(self, key: str) -> None:
        # Dropping the only reference frees the tensors (CUDA memory returns to torch's allocator).
        self.pop(key)
        self._metrics.cache_evictions.inc()


@dataclass
class Costs:
    """Seconds the `auto` rule prices a plan with; `Engine.warm_up` measures them.

    The defaults are priors from ViT-S/16 on 2 CPU cores (bench/README.md), used only until the
    warm-up has measured this backbone on this device (`fold` is re-measured at every fold).

    Attributes:
        merged_row: Merged forward, per image.
        merged_call: Merged forward, fixed cost per call (one call per task group).
        unmerged_row: Unmerged forward, per image.
        unmerged_call: Unmerged forward, fixed cost per call (one call per batch).
        fold: Folding one task's weights (a merged-cache miss).
    """

    merged_row: float = 0.05
    merged_call: float = 0.002
    unmerged_row: float = 0.15
    unmerged_call: float = 0.002
    fold: float = 0.1

    def merged(self, rows: int, folds: int) -> float:
        """Cost of one merged call of `rows` images that first folds `folds` (0 or 1) tasks."""
        return self.merged_call + rows * self.merged_row + folds * self.fold

    def unmerged(self, rows: int) -> float:
        """Cost of one unmerged pass of `rows` images (0 when there are none)."""
        return self.unmerged_call + rows * self.unmerged_row if rows else 0.0


class Engine:
    """Runs batches of `BatchItem`s on the frozen backbone with the right strategy.

    Args:
        backbone: Plain timm ViT, frozen, already on `device` in `dtype`; never written.
        name: The backbone's timm name.
        fingerprint: `backbone_fingerprint` of its weights.
        random_weights: True when the weights are a random init (said in logs and /tasks).
        strategy: `auto`, or a forced `merged` / `unmerged`.
        cache_bytes: Budget of the merged-weights cache.
        metrics: The app's metrics.
        calibration_batch: Batch size `warm_up` times both forms at (the batcher's largest).
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
        self.cache = MergedCache(cache_bytes, metrics)
        self.multi = MultiTaskViT(backbone)
        self.costs = Costs()
        self.calibration_batch = calibration_batch
        self._entry_bytes = 0  # size of one task's folded weights, once one was folded
        self._retired: set[str] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine", initializer=_flush_denormals)

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
                   calibration_batch=settings.max_batch_size)

    # -- called from the event loop -------------------------------------------------------------

    async def run(self, items: list[BatchItem]) -> list[TopK]:
        """Classify a batch on the engine thread; one prediction list per item, in order.

        Args:
            items: The batch.
        """
        return await self._call(self._run_batch, items)

    async def prepare(self, task: LoadedTask) -> None:
        """Make a task runnable in both forms; raises ValueError if it cannot run here.

        Args:
            task: A freshly loaded task version.
        """
        await self._call(self._prepare, task)

    async def retire(self, task: LoadedTask) -> None:
        """Free a replaced or deleted task version once the current batch is done.

        Args:
            task: The old version.
        """
        await self._call(self._retire, task)

    async def warm_up(self, tasks: list[LoadedTask]) -> None:
        """Run each strategy once (kernels, allocator, lazy init), then time both for `auto`.

        Args:
            tasks: Loaded tasks; the plain backbone is run when there are none.
        """
        await self._call(self._warm_up, tasks)

    def close(self) -> None:
        """Stop the engine thread after the running batch."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the engine thread -----------------------------------------------------------------------

    def _prepare(self, task: LoadedTask) -> None:
        self.multi.add_task(task.key, task.adapter.tensors, task.adapter.config, task.adapter.num_classes)
        try:  # both also prove the folded weights are finite
            if self.cache.max_bytes == 0 or self._entry_bytes > self.cache.max_bytes:
                # It would not be cached: validate one tensor at a time. Folding whole backbones only
                # to drop them leaves backbone-sized holes in the heap (+90 MiB RSS for 50 ViT-S tasks).
                start = time.perf_counter()
                nbytes = check_fold(self.backbone, _float32(task, self.device), task.adapter.config)
                self._note_fold(time.perf_counter() - start, nbytes)
            else:
                self.cache.put(task.key, self._fold(task))
        except Exception:
            self.multi.remove_task(task.key)
            raise
        finally:
            _trim_heap()

    def _retire(self, task: LoadedTask) -> None:
        # Keys are unique per loaded version, so a retired key never comes back; remembering it
        # lets a batch that still held the old version free it again afterwards.
        self._retired.add(task.key)
        self._prune([task.key])
        _trim_heap()

    def _prune(self, keys: list[str]) -> None:
        loaded = set(self.multi.task_names)
        for key in keys:
            if key in loaded:
                self.multi.remove_task(key)
            self.cache.pop(key)

    def _warm_up(self, tasks: list[LoadedTask]) -> None:
        image = torch.zeros(self.input_size)
        if not tasks:
            with torch.inference_mode():
                self.backbone(image[None].to(self.device, self.dtype))
            return
        # Two rows whatever the task count: the same warm-up work (and allocator state) for 1 task as for
        # 50, so what a server holds after start-up differs only by what its tasks themselves take.
        items = [BatchItem(tasks[i % len(tasks)], image, 1) for i in range(2)]
        for strategy in ("merged", "unmerged"):
            self._run_batch(items, force=strategy, record=False)
        self._calibrate(tasks[0], image)

    def _calibrate(self, task: LoadedTask, image: torch.Tensor) -> None:
        # Time one task's batch of 1 and of B images in each form; the two points give a per-row
        # and a per-call cost (on CPU the call cost is ~0; on a GPU small batches are all call).
        big = max(1, self.calibration_batch)
        x = image[None].to(self.device, self.dtype).expand(big, *image.shape).contiguous()
        weights = self._merged(task)  # fetched once: a fold is priced separately
        ids = torch.full((big,), self.multi.task_index(task.key), dtype=torch.long)
        forms = {"merged": lambda n: functional_call(self.backbone, weights, (x[:n],)),
                 "unmerged": lambda n: self.multi(x[:n], ids[:n])}
        measured: dict[str, tuple[float, float]] = {}
        for strategy, forward in forms.items():
            times = []
            for n, repeats in ((1, 3), (big, 2)):  # the fastest of a few: a busy machine only adds time
                best = math.inf
                for _ in range(repeats):
                    start = time.perf_counter()
                    with torch.inference_mode():
                        forward(n)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    best = min(best, time.perf_counter() - start)
                times.append(best)
            row = (times[1] - times[0]) / (big - 1) if big > 1 else times[0]
            row = max(row, times[1] / big / 4)  # noise guard: a row is never nearly free
            measured[strategy] = (row, max(0.0, times[0] - row))
        c = self.costs
        (c.merged_row, c.merged_call), (c.unmerged_row, c.unmerged_call) = measured["merged"], measured["unmerged"]
        for name, value in vars(c).items():
            self.metrics.auto_cost.labels(name).set(value)
        log.info("auto strategy costs (ms): merged %.1f/row + %.1f/call, unmerged %.1f/row + %.1f/call, "
                 "fold %.1f; cache holds every task: %s", 1e3 * c.merged_row, 1e3 * c.merged_call,
                 1e3 * c.unmerged_row, 1e3 * c.unmerged_call, 1e3 * c.fold, self._cache_holds_all())

    def _cache_holds_all(self) -> bool:
        # When every loaded task's folded weights fit, a fold is paid once and then reused, so
        # `auto` counts it as free; otherwise the LRU churns and each miss pays a full fold.
        loaded = max(1, len(self.multi.task_names))
        return self._entry_bytes > 0 and loaded * self._entry_bytes <= self.cache.max_bytes

    def _plan(self, counts: dict[str, int], force: Strategy | None) -> dict[str, Strategy]:
        """The form each task group of a batch runs in.

        Args:
            counts: Task key -> rows of the batch with that task.
            force: A strategy for every group (forced by settings or by the caller).
        """
        force = force or (None if self.strategy == "auto" else self.strategy)  # type: ignore[assignment]
        if force is not None:
            return dict.fromkeys(counts, force)
        c, free = self.costs, self._cache_holds_all()
        folds = {key: 0 if free or key in self.cache else 1 for key in counts}
        if len(counts) == 1 and not sum(folds.values()):
            # One task, weights at hand: the same single call with half the FLOPs, on any device.
            return dict.fromkeys(counts, "merged")
        # Three candidate plans, cheapest wins (ties go to merged): every group merged; every row in
        # one unmerged pass; and merged only for the groups that beat their rows' unmerged cost.
        greedy: dict[str, Strategy] = {
            k: "merged" if c.merged(n, folds[k]) <= n * c.unmerged_row else "unmerged" for k, n in counts.items()}
        plans = [dict.fromkeys(counts, "merged"), greedy, dict.fromkeys(counts, "unmerged")]

        def cost(plan: dict[str, Strategy]) -> float:
            rows = sum(n for k, n in counts.items() if plan[k] == "unmerged")
            return sum(c.merged(n, folds[k]) for k, n in counts.items() if plan[k] == "merged") + c.unmerged(rows)

        return min(plans, key=cost)

    def _run_batch(
        self, items: list[BatchItem], force: Strategy | None = None, record: bool = True
    ) -> list[TopK]:
        tasks = {item.task.key: item.task for item in items}
        plan = self._plan(collections.Counter(item.task.key for item in items), force)
        kinds = set(plan.values())
        kind: BatchKind = "hybrid" if len(kinds) > 1 else next(iter(kinds))
        start = time.perf_counter()
        images = torch.stack([item.image for item in items]).to(self.device, self.dtype)
        with torch.inference_mode():
            width = max(t.adapter.num_classes for t in tasks.values())
            logits = images.new_full((len(items), width), float("-inf"))
            for key, task in tasks.items():  # one call per task group that runs merged
                if plan[key] == "merged":
                    self._forward_merged(images, items, task, logits)
            unmerged = [key for key, strategy in plan.items() if strategy == "unmerged"]
            if unmerged:  # every other row in one pass
                self._forward_unmerged(images, items, [tasks[k] for k in unmerged], logits)
            predictions = _top_k(logits, items)
        stale = [key for key in tasks if key in self._retired]
        if stale:  # this batch still used a replaced/deleted version: free it again
            self._prune(stale)
        if record:
            self.metrics.batches.labels(kind).inc()
            self.metrics.inference.labels(kind).observe(time.perf_counter() - start)
            for item in items:
                self.metrics.images.labels(item.task.name).inc()
        return predictions

    def _forward_merged(self, images: torch.Tensor, items: list[BatchItem], task: LoadedTask,
                        logits: torch.Tensor) -> None:
        rows = [i for i, item in enumerate(items) if item.task.key == task.key]
        weights = self._merged(task)
        x = images if len(rows) == len(items) else images.index_select(0, torch.tensor(rows, device=self.device))
        out = functional_call(self.backbone, weights, (x,))
        if len(rows) == len(items):
            logits[:, : out.shape[1]] = out
        else:
            logits[torch.tensor(rows, device=self.device), : out.shape[1]] = out

    def _forward_unmerged(self, images: torch.Tensor, items: list[BatchItem], tasks: list[LoadedTask],
                          logits: torch.Tensor) -> None:
        names = set(self.multi.task_names)
        for task in tasks:
            if task.key not in names:  # retired meanwhile but still queued: serve it once more
                self.multi.add_task(task.key, task.adapter.tensors, task.adapter.config, task.adapter.num_classes)
        keys = {task.key for task in tasks}
        rows = [i for i, item in enumerate(items) if item.task.key in keys]
        ids = torch.tensor([self.multi.task_index(items[i].task.key) for i in rows], dtype=torch.long)
        index = torch.tensor(rows, device=self.device)
        out = self.multi(images if len(rows) == len(items) else images.index_select(0, index), ids)
        width = min(out.shape[1], logits.shape[1])  # `multi` pads to its widest LOADED head: past ours is -inf
        logits[index, :width] = out[:, :width]

    def _merged(self, task: LoadedTask) -> dict[str, torch.Tensor]:
        weights = self.cache.get(task.key)
        if weights is None:
            weights = self._fold(task)
            self.cache.put(task.key, weights)
        return weights

    def _fold(self, task: LoadedTask) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        folded = fold_adapter(self.backbone, _float32(task, self.device), task.adapter.config)
        folded = {k: v.to(self.dtype) for k, v in folded.items()}
        # fold_adapter's finiteness check reads every value back, so this time is complete on CUDA too.
        self._note_fold(time.perf_counter() - start, sum(t.numel() * t.element_size() for t in folded.values()))
        return folded

    def _note_fold(self, seconds: float, nbytes: int) -> None:
        # A moving average: folds at start-up (every task) and on cache misses keep `auto` current.
        self.costs.fold = seconds if self._entry_bytes == 0 else 0.7 * self.costs.fold + 0.3 * seconds
        self.metrics.auto_cost.labels("fold").set(self.costs.fold)
        self._entry_bytes = nbytes


def _float32(task: LoadedTask, device: torch.device) -> Mapping[str, torch.Tensor]:
    # Fold against float32 adapter tensors, then cast once: rounding happens a single time.
    tensors = task.adapter.tensors
    if isinstance(tensors, PackedTensors):  # one transfer of the whole buffer (a no-op on CPU in float32)
        return tensors.to(device, torch.float32)
    return {k: v.to(device, torch.float32) for k, v in tensors.items()}


def _trim_heap() -> None:
    # Loading a task allocates and frees layer-sized temporaries (validation fold, file reads);
    # glibc keeps such freed heap pages resident. Handing them back after each (rare) load/delete
    # keeps resident memory at what the tasks really hold. No-op where there is no glibc.
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _flush_denormals() -> None:
    # Tiny attention probabilities underflow to denormals, which run 10-100x slower on x86 CPUs;
    # flushing them to zero changes results by < 1e-37.
    torch.set_flush_denormal(True)


def _top_k(logits: torch.Tensor, items: list[BatchItem]) -> list[TopK]:
    # Entries past a row's own classes are -inf, so they get probability 0 and sort last.
    probs = logits.float().softmax(dim=-1)
    k = min(max(item.top_k for item in items), probs.shape[1])
    scores, indices = probs.topk(k, dim=-1)
    scores_l, indices_l = scores.cpu().tolist(), indices.cpu().tolist()
    out = []
    for item, s, i in zip(items, scores_l, indices_l, strict=True):
        n = min(item.top_k, item.task.adapter.num_classes)
        out.append(list(zip(i[:n], s[:n], strict=True)))
    return out
