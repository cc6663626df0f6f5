"""Task name -> its tiers: stored (config known), resident (tensors in memory), folded (engine cache).

No HTTP here. The store is the source and memory a cache (docs/architecture.md, "The life of a
task"): start-up reads every adapter's config, not its tensors; a task's first request makes it
resident (off the engine thread; concurrent requests share one load), and resident tasks beyond
`RLRR_RESIDENT_BYTES` are evicted least recently used first, pinned ones never. Each resident
version gets a unique `key`; requests hold the `LoadedTask` they were admitted with, so replacing,
deleting or evicting a task never fails a request already in flight.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import functools
import itertools
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    AdapterError,
    install_adapter,
    load_adapter,
    read_adapter_config,
    remove_adapter,
    remove_stale_uploads,
)
from app.engine import Engine
from app.errors import AppError, InsufficientMemory, InvalidAdapter, UnknownTask
from app.preprocess import Transform, make_transform, resolve_config
from app.runtime import trim_heap
from app.tasks import LoadedTask

log = logging.getLogger("app")
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
NAME_MAX = 64
NAMES_SHOWN = 50  # a 404 lists this many task names (GET /tasks pages through all of them)
TRIM_EVERY_BYTES = 64 * 2**20  # evictions hand heap pages back after freeing this much, not each time
_OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
_keys = itertools.count()
Signature = tuple[int, ...]


def check_name(name: str) -> None:
    """Refuse a store folder whose name cannot be a task name.

    Args:
        name: The folder's name.
    """
    if not valid_name(name):
        raise InvalidAdapter(
            f"folder name {shown_name(name)!r} is not a task name (at most {NAME_MAX} characters matching "
            f"{NAME_PATTERN}), so the API can neither serve nor delete it: rename the folder in the store to a "
            "valid name (then reload or restart), or remove it there")


def shown_name(name: str) -> str:
    """A store folder's name as answers can carry it: bytes that are not UTF-8 (surrogate escapes
    from the file system) become `\\xNN`.

    Args:
        name: The folder's name, as `os.listdir` gives it.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def valid_name(name: str) -> bool:
    """Whether a task name is safe as a single path component (no traversal, no hidden files).

    Args:
        name: The task name.
    """
    return len(name) <= NAME_MAX and re.fullmatch(NAME_PATTERN, name) is not None


@dataclass(eq=False)
class Stored:
    """What is known of a stored adapter without reading its tensors: its config and the size of its tensors.

    Attributes:
        version: First 12 hex digits of the weights file's sha256 (as its config records it).
        num_classes: Classes of its head.
        labels: Class names.
        base_model: timm name it was trained on.
        metadata: What the trainer recorded.
        method: Its method (rlrr, lora, bitfit, ia3).
        config: The method's configuration, as a dict.
        data_config: Resolved eval data config.
        transform: Eval transform built from it (shared by tasks with the same data config).
        nbytes: Bytes of its tensors (what it costs resident).
        parameters: Number of its parameters.
    """

    version: str
    num_classes: int
    labels: list[str]
    base_model: str
    metadata: dict[str, Any]
    method: str
    config: dict[str, Any]
    data_config: dict[str, Any]
    transform: Transform
    nbytes: int
    parameters: int


@dataclass(eq=False)
class Entry:
    """One task of the store, in whichever tier it is.

    Replaced whole when the store's copy changes (upload, delete, a new folder), so a load that
    finishes for an entry no longer current knows its result is stale.

    Attributes:
        name: Task name.
        signature: What changes whenever its files do (`Registry.signature`).
        stored: Its config, when readable and for this backbone.
        reason: Why it cannot be served (refused at start-up or at its first load); None if it can.
        resident: Its version in memory, if any.
        pinned: Never evicted.
        busy: Requests holding its resident version right now (not evicted while > 0).
        loading: The load in progress, which every concurrent request for the task awaits.
    """

    name: str
    signature: Signature | None
    stored: Stored | None = None
    reason: str | None = None
    resident: LoadedTask | None = None
    pinned: bool = False
    busy: int = 0
    loading: asyncio.Task[LoadedTask] | None = None

    @property
    def tier(self) -> str:
        """`resident` or `stored` (the engine knows which resident ones are also folded)."""
        return "resident" if self.resident is not None else "stored"


class Registry:
    """The tasks of a store and the tier each one is in.

    Args:
        store: Adapter store directory (`<store>/<task>/...`).
        engine: The engine that runs the tasks.
        budget: Byte budget of resident tensors (`RLRR_RESIDENT_BYTES`).
        pinned: Tasks loaded at start-up and never evicted (`RLRR_PINNED_TASKS`).
        startup_configs: Configs read before `load_store` returns; the rest are read by a background scan
            (`RLRR_STARTUP_CONFIGS`).
    """

    def __init__(self, store: Path, engine: Engine, budget: int = 2**30, pinned: Iterable[str] = (),
                 startup_configs: int = 500) -> None:
        self.store = store
        self.startup_configs = startup_configs
        self.engine = engine
        self.budget = budget
        self.pinned = set(pinned)
        self.entries: dict[str, Entry] = {}
        self._lru: collections.OrderedDict[str, Entry] = collections.OrderedDict()  # resident, unpinned, oldest first
        self._bytes = 0  # resident tensors, pinned included
        self._freed = 0  # evicted since the last heap trim
        self._names: list[str] | None = None  # sorted entry names, rebuilt after a change
        # Listed at start-up, config not read yet: the background scan reads them, and anything that needs
        # one sooner (a request, a page of the list) reads it at once. A name leaves this set when its entry
        # is read or changed by anyone, so a scan's read never overwrites a newer entry or revives a deleted one.
        self._pending: set[str] = set()
        self.scan: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one admin change at a time
        self._transforms: dict[str, Transform] = {}  # data config (JSON) -> its probed transform
        self._gauges()

    # -- the tiers ----------------------------------------------------------------------------------

    @property
    def tasks(self) -> dict[str, LoadedTask]:
        """The resident tasks (name -> version in memory)."""
        return {name: e.resident for name, e in self.entries.items() if e.resident is not None}

    @property
    def skipped(self) -> dict[str, str]:
        """The refused tasks (name -> reason)."""
        return {name: e.reason for name, e in self.entries.items() if e.reason is not None}

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def names(self) -> list[str]:
        """Every task of the store (servable or refused; configs not read yet included), sorted."""
        if self._names is None:
            self._names = sorted(self.entries.keys() | self._pending)
        return self._names

    def known(self, name: str) -> Entry | None:
        """A listed task's entry, reading its config now if the background scan has not yet (None: unlisted).

        Args:
            name: Task name.
        """
        if name in self._pending:
            self._settle(self._read_entry(name))  # ~1 ms, on the caller's thread: only while the scan runs
        return self.entries.get(name)

    @property
    def pending(self) -> int:
        """Listed tasks whose configs the background scan has not read yet."""
        return len(self._pending)

    def page(self, after: str | None, limit: int, contains: str | None = None) -> tuple[list[Entry], int]:
        """A page of entries in name order, and how many match in all.

        Args:
            after: Names up to this one are skipped (the previous page's cursor).
            limit: Most entries returned.
            contains: Only names containing this (case-insensitive).
        """
        names = self.names()
        if contains:
            needle = contains.lower()
            names = [n for n in names if needle in n.lower()]
        start = bisect.bisect_right(names, after) if after else 0
        page = [self.known(n) for n in names[start:start + limit]]
        return [e for e in page if e is not None], len(names)

    def check(self, name: str) -> None:
        """Refuse an unknown or refused task before anything is read, and start loading a stored one.

        A task whose folder appeared (or changed) since start-up is known from here on (read on its load).

        Args:
            name: Task name.
        """
        entry = self.known(name)
        if entry is not None and entry.reason is not None and self.signature(name) != entry.signature:
            del self.entries[name]  # its files changed since it was refused: read them again
            self._names = None
            entry = None
        if entry is None:
            if valid_name(name) and (self.store / name / CONFIG_NAME).is_file():
                return  # new in the store: `resident` reads it
            raise self._unknown(name)
        if entry.reason is not None:
            raise UnknownTask(f"task {name!r} is not served: {entry.reason}", tasks=self._shown())
        if entry.resident is None and entry.loading is None:
            self._start_load(entry)  # prefetch: it loads while the request's body is read and decoded

    async def resident(self, name: str, refresh: bool = False) -> LoadedTask:
        """The task's version in memory, loading it (once, however many ask) if it is only stored.

        Args:
            name: Task name.
            refresh: First compare the store's copy with the known one and reread it if it changed
                (a Ray replica: other processes write the store).
        """
        entry = await self.describe(name, refresh)
        if entry.reason is not None:
            raise UnknownTask(f"task {name!r} is not served: {entry.reason}", tasks=self._shown())
        if entry.resident is not None:
            if not entry.pinned:
                self._lru.move_to_end(name)
            return entry.resident
        if entry.loading is None:
            self._start_load(entry)
        assert entry.loading is not None
        # shielded: a request that goes away does not cancel the load the others wait for
        return await asyncio.shield(entry.loading)

    async def describe(self, name: str, refresh: bool = False) -> Entry:
        """A task's entry, read from the store if its folder is new, or changed since it was refused (or
        changed at all, with `refresh`).

        Args:
            name: Task name.
            refresh: Compare the store's copy with the known one first (see `resident`).
        """
        entry = self.entries.get(name)
        if entry is None and name in self._pending:
            entry = await self._read_pending(name)
        if entry is not None and (refresh or entry.reason is not None) and self.signature(name) != entry.signature:
            await self._forget(entry)
            entry = None
        if entry is None:
            entry = await self._discover(name)
        return entry

    def hold(self, task: LoadedTask, delta: int) -> None:
        """Count a request holding a version (+1 before its batch, -1 after): busy versions are not evicted.

        Args:
            task: The version.
            delta: +1 or -1.
        """
        entry = self.entries.get(task.name)
        if entry is not None and entry.resident is task:
            entry.busy += delta

    async def load_store(self) -> None:
        """Remove leftovers of interrupted changes, read the adapters' configs (not their tensors; beyond
        `startup_configs`, in a background scan), then load the pinned tasks; refuse (and remember why)
        those that do not fit."""
        self.store.mkdir(parents=True, exist_ok=True)
        for leftover in await asyncio.to_thread(remove_stale_uploads, self.store):
            log.warning("removed %s: left in the store by an interrupted upload, replace or delete", leftover)
        names = await asyncio.to_thread(self.stored_names)
        self._pending.update(names)
        self._names = None
        now = sorted(self.pinned & self._pending) + [n for n in names[:self.startup_configs] if n not in self.pinned]
        start = time.perf_counter()
        # Chunks on the default pool's threads: their file reads overlap (a start-up with 10,000
        # tasks is ~5 file operations each, bound by the disk's latency more than by the CPU), and
        # the loop answers /healthz meanwhile.
        chunks = [now[c:c + 64] for c in range(0, len(now), 64)]
        for entries in await asyncio.gather(*(asyncio.to_thread(self._read_entries, c) for c in chunks)):
            for entry in entries:
                self._settle(entry)
        log.info("read %d of %d adapter configs in %.1f s%s", len(now), len(names), time.perf_counter() - start,
                 f"; the other {len(self._pending)} are read in the background" if self._pending else "")
        self._log_refused(now)
        for name in sorted(self.pinned):
            await self._pin_at_start(name)
        if self._pending:
            self.scan = asyncio.get_running_loop().create_task(self._scan())

    async def close(self) -> None:
        """Stop the background scan (if it still runs)."""
        if self.scan is not None and not self.scan.done():
            self.scan.cancel()
            await asyncio.gather(self.scan, return_exceptions=True)

    async def _scan(self) -> None:
        # One chunk at a time on one worker thread: the default pool stays free for the loads and
        # uploads that requests start meanwhile, and those read their own task first (`known`).
        start, count = time.perf_counter(), len(self._pending)
        while self._pending:
            chunk = sorted(self._pending)[:256]
            entries = await asyncio.to_thread(self._read_entries, chunk)
            for entry in entries:
                self._settle(entry)
            self._log_refused(chunk)  # each refusal logged once: the start-up read logged its own
        log.info("background scan read %d adapter configs in %.1f s", count, time.perf_counter() - start)

    def _settle(self, entry: Entry) -> None:
        # A read entry becomes the task's, unless someone else read or changed the task meanwhile.
        if entry.name in self._pending:
            self._pending.discard(entry.name)
            self.entries[entry.name] = entry
            self._names = None

    async def _read_pending(self, name: str) -> Entry | None:
        entry = await asyncio.to_thread(self._read_entry, name)
        self._settle(entry)
        return self.entries.get(name)

    def _log_refused(self, names: Iterable[str]) -> None:
        for name in names:
            entry = self.entries.get(name)
            if entry is not None and entry.reason is not None:
                log.warning("skipped adapter %s: %s", name, entry.reason)

    async def warm_task(self) -> LoadedTask | None:
        """A resident task to warm up with (a pinned one, else the first servable one made resident)."""
        if self.tasks:
            return next(iter(self.tasks.values()))
        first = next((n for n in self.names() if (e := self.known(n)) is not None and e.reason is None), None)
        if first is None:
            return None
        try:
            return await self.resident(first)
        except UnknownTask:
            return await self.warm_task()  # refused at its load (and marked so): the next one
        except InsufficientMemory:
            return None

    # -- admin changes ------------------------------------------------------------------------------

    async def install(self, name: str, config: bytes, weights: bytes, pinned: bool = False) -> LoadedTask:
        """Validate an uploaded adapter fully, then write it into the store and serve it (resident).

        Nothing changes (store or served tasks) unless every check passes.

        Args:
            name: Task name (already validated).
            config: Contents of adapter_config.json.
            weights: Contents of adapter_model.safetensors.
            pinned: Never evict it (until restart, or an upload without the flag).
        """
        async with self._lock:
            loop = asyncio.get_running_loop()
            validated: list[LoadedTask] = []

            def validate(tmp: Path) -> None:  # on install_adapter's thread, before it renames tmp into place
                validated.append(asyncio.run_coroutine_threadsafe(self._load_probed(name, tmp), loop).result())

            try:
                directory = await asyncio.to_thread(install_adapter, self.store, name, config, weights,
                                                    validate=validate)
            except BaseException:
                if validated:  # validated and prepared, but never installed
                    await self.engine.retire(validated[0])
                raise
            task = validated[0]
            task.adapter.path = directory
            entry = Entry(name, self.signature(name), _stored_of(task), pinned=pinned or name in self.pinned)
            await self._replace(name, entry)
            self._admit(entry, task)
            await self._evict(keep=entry)
            log.info("installed task %s (version %s%s)", name, task.version, ", pinned" if entry.pinned else "")
            return task

    async def delete(self, name: str) -> None:
        """Stop serving a task and remove it from the store.

        Args:
            name: Task name (already validated).
        """
        async with self._lock:
            if name not in self.entries and not (self.store / name).is_dir():
                raise self._unknown(name)
            await asyncio.to_thread(remove_adapter, self.store, name)
            await self._replace(name, None)
            log.info("deleted task %s", name)

    async def unload(self, name: str, key: str | None = None) -> None:
        """Make a task stored again (out of memory) but leave it in the store.

        Args:
            name: Task name.
            key: Only unload this version (a newer one loaded meanwhile stays); None: any version.
        """
        entry = self.entries.get(name)
        if entry is None or entry.resident is None or (key is not None and entry.resident.key != key):
            return
        await self._drop(entry, trim=True)

    async def inspect(self, name: str) -> LoadedTask:
        """Validate a stored task against the backbone without serving it (nothing reaches the engine).

        Args:
            name: Task name.
        """
        return await self._load(name, self._folder(name), prepare=False)

    def stored_names(self) -> list[str]:
        """Names of the task folders in the store now (valid or not)."""
        if not self.store.is_dir():
            return []
        with os.scandir(self.store) as found:  # file types from the listing: no stat per folder
            return sorted(shown_name(e.name) for e in found if e.is_dir() and not e.name.startswith("."))

    def signature(self, name: str) -> Signature | None:
        """What changes whenever the store's copy of a task does (None: the store has none).

        Args:
            name: Task name.
        """
        # Adapters are written by renaming a whole folder into place, so a new version has new inodes.
        try:
            stats = [os.stat(self.store / name / file) for file in (CONFIG_NAME, WEIGHTS_NAME)]
        except (OSError, ValueError):
            return None
        return tuple(x for st in stats for x in (st.st_ino, st.st_mtime_ns, st.st_size))

    # -- stored -> resident -------------------------------------------------------------------------

    def _start_load(self, entry: Entry) -> None:
        entry.loading = asyncio.get_running_loop().create_task(self._load_entry(entry))
        # a prefetch nobody awaited (its request failed first) must not log "exception never retrieved"
        entry.loading.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _load_entry(self, entry: Entry) -> LoadedTask:
        name, start = entry.name, time.perf_counter()
        try:
            task = await self._load(name, self.store / name)
        except InvalidAdapter as exc:
            if self.entries.get(name) is entry and self.signature(name) == entry.signature:
                entry.reason = exc.detail  # broken files: refused from now on (until they change)
                self.engine.metrics.load_failures.inc()
                log.warning("refused adapter %s at its first load: %s", name, exc.detail)
                raise UnknownTask(f"task {name!r} is not served: {exc.detail}", tasks=self._shown()) from exc
            return await self._superseded(entry)  # its files changed while they were read: read them again
        finally:
            entry.loading = None
        if self.entries.get(name) is not entry:  # replaced or deleted meanwhile: serve what is there now
            await self.engine.retire(task, trim=False)
            return await self._superseded(entry)
        self.engine.metrics.load_seconds.observe(time.perf_counter() - start)
        self._admit(entry, task)
        await self._evict(keep=entry)
        return task

    async def _superseded(self, entry: Entry) -> LoadedTask:
        await self._forget(entry)
        return await self.resident(entry.name)

    def _admit(self, entry: Entry, task: LoadedTask) -> None:
        entry.resident = task
        self._bytes += task.adapter.nbytes
        if not entry.pinned:
            self._lru[entry.name] = entry
            self._lru.move_to_end(entry.name)

    async def _evict(self, keep: Entry | None = None) -> None:
        # Least recently used first; pinned tasks are not in the LRU, and a version a request holds
        # stays (it would be re-added for that batch anyway); so the budget may be exceeded briefly.
        victims = []
        excess = self._bytes - self.budget
        for entry in self._lru.values():
            if excess <= 0:
                break
            if entry is not keep and entry.busy == 0 and entry.resident is not None:
                victims.append(entry)
                excess -= entry.resident.adapter.nbytes
        for entry in victims:
            await self._drop(entry, trim=False)
            self.engine.metrics.evictions.inc()
        if self._freed >= TRIM_EVERY_BYTES:
            self._freed = 0
            await asyncio.to_thread(trim_heap)

    async def _drop(self, entry: Entry, trim: bool) -> None:
        task = entry.resident
        if task is None:
            return
        entry.resident = None
        if self._lru.get(entry.name) is entry:  # (a newer entry of the same name keeps its place)
            del self._lru[entry.name]
        self._bytes -= task.adapter.nbytes
        self._freed += task.adapter.nbytes
        await self.engine.retire(task, trim=trim)

    async def _replace(self, name: str, entry: Entry | None) -> None:
        # Requests admitted with the version it replaces still finish with it (see Engine.retire).
        self._pending.discard(name)  # a scan's read of the old files must not come back
        old = self.entries.pop(name, None)
        if entry is not None:
            self.entries[name] = entry
        if old is not None:
            await self._drop(old, trim=True)
        self._names = None

    async def _forget(self, entry: Entry) -> None:
        # Its files changed under it: the entry goes (a resident version is freed), the folder is read again.
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
            self._names = None
        await self._drop(entry, trim=False)

    async def _discover(self, name: str) -> Entry:
        self._folder(name)  # 404 unless the store holds it
        entry = await asyncio.to_thread(self._read_entry, name)
        self._pending.discard(name)
        current = self.entries.setdefault(name, entry)  # two requests may discover it at once: one wins
        self._names = None
        if current is entry:
            log.info("found task %s in the store", name)
        return current

    async def _pin_at_start(self, name: str) -> None:
        entry = self.known(name)
        if entry is None:
            log.warning("pinned task %s is not in the store %s", name, self.store)
            return
        entry.pinned = True
        try:
            await self.resident(name)
        except (UnknownTask, InsufficientMemory) as exc:
            log.warning("pinned task %s cannot be loaded: %s", name, exc.detail)

    # -- reading the store --------------------------------------------------------------------------

    def _read_entries(self, names: list[str]) -> list[Entry]:
        return [self._read_entry(name) for name in names]

    def _read_entry(self, name: str) -> Entry:
        # On a worker thread: the config, the size of the tensors (the safetensors header), no tensor.
        entry = Entry(name, self.signature(name), pinned=name in self.pinned)
        directory = self.store / name
        try:
            check_name(name)
            engine = self.engine
            doc, config = read_adapter_config(directory, engine.fingerprint,
                                              getattr(engine.backbone, "backbone_spec", None), base_model=engine.name)
            entry.stored = self._stored_of_doc(doc, config, directory)
        except InvalidAdapter as exc:
            entry.reason = exc.detail
        except Exception as exc:  # noqa: BLE001 - any failure to read it means: refused, say why
            entry.reason = f"adapter {name!r} refused: {self._reason(exc, name, directory)}"
        return entry

    def _stored_of_doc(self, doc: dict[str, Any], config: Any, directory: Path) -> Stored:
        nbytes, parameters = _tensor_sizes(directory / WEIGHTS_NAME)
        data_config = resolve_config(doc.get("data_config", {}), self.engine.backbone)
        return Stored(version=doc["weights_sha256"][:12], num_classes=doc["num_classes"], labels=list(doc["labels"]),
                      base_model=doc["base_model"], metadata=doc.get("metadata") or {}, method=doc["method"],
                      config=config.to_dict(), data_config=data_config,
                      transform=self._transform(data_config), nbytes=nbytes, parameters=parameters)

    def _folder(self, name: str) -> Path:
        directory = self.store / name
        if not valid_name(name) or not (directory / CONFIG_NAME).is_file():
            raise self._unknown(name)
        return directory

    def _unknown(self, name: str) -> UnknownTask:
        return UnknownTask(f"unknown task {name!r}", tasks=self._shown())

    def _shown(self) -> list[str]:
        return [n for n in itertools.islice(self.names(), NAMES_SHOWN * 2)
                if (e := self.known(n)) is not None and e.reason is None][:NAMES_SHOWN]

    async def _load(self, name: str, directory: Path, prepare: bool = True) -> LoadedTask:
        engine = self.engine
        try:
            task = await self._validate(name, directory)
        except AppError:
            raise
        except Exception as exc:  # any failure to read or preprocess with it means: refuse this adapter, say why
            raise InvalidAdapter(f"adapter {name!r} refused: {self._reason(exc, name, directory)}") from exc
        if prepare:
            try:
                await engine.prepare(task)
            except _OUT_OF_MEMORY as exc:  # the server's limit, not the adapter's fault
                raise InsufficientMemory(f"not enough memory to load adapter {name!r}; retry later or free tasks",
                                         headers={"Retry-After": "5"}) from exc
            except ValueError as exc:  # the engine's "cannot run here" (e.g. non-finite folded weights)
                raise InvalidAdapter(f"adapter {name!r} refused: {self._reason(exc, name, directory)}") from exc
        return task

    async def _load_probed(self, name: str, directory: Path) -> LoadedTask:
        # An upload is also run once (`Engine.probe`): what cannot produce finite scores is refused
        # now, not answered with errors later. Not at start-up: a forward per stored task would cost
        # 1,000 tasks minutes; what the store holds was probed when it was uploaded.
        task = await self._load(name, directory)
        try:
            await self.engine.probe(task)
        except ValueError as exc:
            await self.engine.retire(task)
            raise InvalidAdapter(f"adapter {name!r} refused: {exc}") from exc
        return task

    async def _validate(self, name: str, directory: Path) -> LoadedTask:
        engine = self.engine
        # Reading the backbone's structure (shapes) is safe beside a running batch.
        adapter = await asyncio.to_thread(load_adapter, directory, engine.backbone, engine.fingerprint,
                                          base_model=engine.name)
        version = adapter.version  # load_adapter verified the file against this checksum
        data_config = resolve_config(adapter.data_config, engine.backbone)
        transform = self._transform(data_config)
        return LoadedTask(name, f"{name}@{version}#{next(_keys)}", adapter, version, data_config, transform)

    def _transform(self, data_config: dict[str, Any]) -> Transform:
        # Tasks trained with one recipe share one data config: build and probe its transform once
        # (10,000 tasks are read in seconds, not one transform build and probe each).
        key = json.dumps(data_config, sort_keys=True, default=str)
        found = self._transforms.get(key)
        if found is not None:
            return found
        expected = self.engine.input_size
        if tuple(data_config["input_size"]) != expected:
            got = tuple(data_config["input_size"])
            raise AdapterError(f"input_size {got} differs from the backbone's {expected}")
        transform = make_transform(data_config)
        # A data config that builds but cannot run would fail every request: try it once now.
        probe = transform(Image.new("RGB", expected[:0:-1]))
        if tuple(probe.shape) != expected:
            raise AdapterError(f"its preprocessing yields {tuple(probe.shape)}, not {expected}")
        return self._transforms.setdefault(key, transform)

    def _reason(self, exc: Exception, name: str, directory: Path) -> str:
        # Clients see task names only, never server paths; a bare KeyError or empty message says nothing.
        text = f"missing or unknown key {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
        text = text or f"{type(exc).__name__} while reading it"
        for path, shown in ((directory.resolve(), name), (directory, name), (self.store.resolve(), "<store>"),
                            (self.store, "<store>")):
            text = text.replace(str(path), shown)
        return text.replace(directory.name, name)

    def _gauges(self) -> None:
        # Read at scrape time: the tiers change on the event loop and the engine thread (folds).
        m, entries = self.engine.metrics, self.entries
        m.adapters_loaded.set_function(lambda: sum(e.reason is None for e in entries.values()))
        m.adapters_skipped.set_function(lambda: sum(e.reason is not None for e in entries.values()))
        # listed tasks not read yet count as stored (servable until their config says otherwise)
        m.tasks_stored.set_function(lambda: sum(e.reason is None for e in entries.values()) + len(self._pending))
        m.tasks_resident.set_function(lambda: sum(e.resident is not None for e in entries.values()))
        m.tasks_folded.set_function(lambda: len(self.engine.cache))
        m.tasks_pinned.set_function(lambda: sum(e.pinned for e in entries.values()))
        m.tasks_unread.set_function(lambda: len(self._pending))
        m.resident_bytes.set_function(lambda: self._bytes)
        m.resident_budget.set(self.budget)


HEADER_MAX = 100 * 2**20  # safetensors' own limit on its JSON header


def _tensor_sizes(path: Path) -> tuple[int, int]:
    # Bytes and parameters of a safetensors file from its header alone (8-byte little-endian length,
    # then JSON: name -> dtype, shape, data_offsets). `safe_open` costs ~4 ms a file (it maps the
    # whole file); reading the header is ~0.02 ms, parsing it ~0.5 ms: adapters of one method,
    # config and class count share their header byte for byte, so parsed headers are memoised.
    if not path.is_file():
        raise AdapterError(f"{WEIGHTS_NAME} is missing")
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > HEADER_MAX:
                raise ValueError(f"header of {length} bytes")
            return _header_sizes(f.read(length))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError,
            struct.error) as e:
        raise AdapterError(f"{WEIGHTS_NAME} is not a readable safetensors file: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=1024)  # failures raise, and are not remembered
def _header_sizes(raw: bytes) -> tuple[int, int]:
    header = json.loads(raw)
    header.pop("__metadata__", None)
    nbytes = sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for v in header.values())
    return nbytes, sum(math.prod(v["shape"]) for v in header.values())


def _stored_of(task: LoadedTask) -> Stored:
    a: Adapter = task.adapter
    return Stored(version=task.version, num_classes=a.num_classes, labels=a.labels, base_model=a.base_model,
                  metadata=a.metadata, method=a.method, config=a.config.to_dict(), data_config=task.data_config,
                  transform=task.transform, nbytes=a.nbytes, parameters=a.num_params)
