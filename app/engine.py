"""The frozen backbone on its device, and how one batch runs on it.

Per batch: a single-task batch runs the task's merged weights (`fold_adapter`, kept in a
byte-bounded LRU) through `torch.func.functional_call`; a mixed batch runs the unmerged
`MultiTaskViT` in one pass. `Settings.strategy` can force either. All model work happens on one
worker thread, so the event loop never blocks and the multi-task table is only changed between
batches (a task's row index is never shifted under a running forward).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import timm
import torch
from timm.data import resolve_data_config
from timm.models import load_state_dict
from torch import nn
from torch.func import functional_call

from adapters import MultiTaskViT, backbone_fingerprint, fold_adapter
from app.metrics import Metrics
from app.settings import Settings

if TYPE_CHECKING:
    from app.registry import LoadedTask

log = logging.getLogger("app")
T = TypeVar("T")
Strategy = Literal["merged", "unmerged"]
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

    Args:
        settings: Backbone name, optional checkpoint, pretrained flag and seed.
    """
    # Seeded init: a random backbone then has the same fingerprint in every process (and in the
    # trainer, if it seeds the same way), so adapters trained on it still load.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = timm.create_model(settings.backbone, pretrained=settings.pretrained and not settings.checkpoint)
    random_weights = not settings.pretrained and settings.checkpoint is None
    if settings.checkpoint is not None:
        _load_checkpoint(model, settings.checkpoint)
    return model.eval().requires_grad_(False), random_weights


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    state = {k: v for k, v in load_state_dict(str(path)).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit {type(model).__name__}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")


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
                   strategy=settings.strategy, cache_bytes=settings.merged_cache_bytes, metrics=metrics)

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
        """Run each strategy once (kernels, allocator, lazy init) before reporting ready.

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
        try:
            self.cache.put(task.key, self._fold(task))  # also proves the folded weights are finite
        except Exception:
            self.multi.remove_task(task.key)
            raise

    def _retire(self, task: LoadedTask) -> None:
        # Keys are unique per loaded version, so a retired key never comes back; remembering it
        # lets a batch that still held the old version free it again afterwards.
        self._retired.add(task.key)
        self._prune([task.key])

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
        items = [BatchItem(t, image, 1) for t in tasks[:2]]
        for strategy in ("merged", "unmerged"):
            self._run_batch(items, force=strategy, record=False)

    def _choose(self, n_tasks: int) -> Strategy:
        if self.strategy == "merged" or (self.strategy == "auto" and n_tasks == 1):
            return "merged"
        return "unmerged"

    def _run_batch(
        self, items: list[BatchItem], force: Strategy | None = None, record: bool = True
    ) -> list[TopK]:
        tasks = list({item.task.key: item.task for item in items}.values())
        strategy = force or self._choose(len(tasks))
        start = time.perf_counter()
        images = torch.stack([item.image for item in items]).to(self.device, self.dtype)
        with torch.inference_mode():
            if strategy == "merged":
                logits = self._forward_merged(images, items, tasks)
            else:
                logits = self._forward_unmerged(images, items, tasks)
            predictions = _top_k(logits, items)
        stale = [t.key for t in tasks if t.key in self._retired]
        if stale:  # this batch still used a replaced/deleted version: free it again
            self._prune(stale)
        if record:
            self.metrics.batches.labels(strategy).inc()
            self.metrics.inference.labels(strategy).observe(time.perf_counter() - start)
            for item in items:
                self.metrics.images.labels(item.task.name).inc()
        return predictions

    def _forward_merged(self, images: torch.Tensor, items: list[BatchItem], tasks: list[LoadedTask]) -> torch.Tensor:
        width = max(t.adapter.num_classes for t in tasks)
        logits = images.new_full((len(items), width), float("-inf"))
        for task in tasks:  # one pass per task present (one pass in the single-task case)
            rows = torch.tensor([i for i, item in enumerate(items) if item.task.key == task.key], device=self.device)
            out = functional_call(self.backbone, self._merged(task), (images.index_select(0, rows),))
            logits[rows, : out.shape[1]] = out
        return logits

    def _forward_unmerged(self, images: torch.Tensor, items: list[BatchItem], tasks: list[LoadedTask]) -> torch.Tensor:
        names = set(self.multi.task_names)
        for task in tasks:
            if task.key not in names:  # retired meanwhile but still queued: serve it once more
                self.multi.add_task(task.key, task.adapter.tensors, task.adapter.config, task.adapter.num_classes)
        ids = torch.tensor([self.multi.task_index(item.task.key) for item in items], dtype=torch.long)
        return self.multi(images, ids)

    def _merged(self, task: LoadedTask) -> dict[str, torch.Tensor]:
        weights = self.cache.get(task.key)
        if weights is None:
            weights = self._fold(task)
            self.cache.put(task.key, weights)
        return weights

    def _fold(self, task: LoadedTask) -> dict[str, torch.Tensor]:
        # Fold against float32 adapter tensors, then cast once: rounding happens a single time.
        tensors = {k: v.to(self.device, torch.float32) for k, v in task.adapter.tensors.items()}
        folded = fold_adapter(self.backbone, tensors, task.adapter.config)
        return {k: v.to(self.dtype) for k, v in folded.items()}


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
