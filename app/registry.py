"""Task name -> loaded adapter: loading the store, validating uploads, replacing and deleting.

No HTTP here. Each loaded version gets a unique `key`; requests hold the `LoadedTask` they were
admitted with, so replacing or deleting a task never fails a request already in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    install_adapter,
    load_adapter,
    remove_adapter,
    remove_stale_uploads,
)
from app.engine import Engine
from app.errors import AppError, InsufficientMemory, InvalidAdapter, UnknownTask
from app.preprocess import Transform, make_transform, resolve_config
from app.tasks import LoadedTask

log = logging.getLogger("app")
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
NAME_MAX = 64
_OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
_keys = itertools.count()


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


class Registry:
    """The tasks being served, and the store they live in.

    Args:
        store: Adapter store directory (`<store>/<task>/...`).
        engine: The engine that runs the tasks.
    """

    def __init__(self, store: Path, engine: Engine) -> None:
        self.store = store
        self.engine = engine
        self.tasks: dict[str, LoadedTask] = {}
        self.skipped: dict[str, str] = {}
        self._lock = asyncio.Lock()  # one admin change at a time
        self._transforms: dict[str, Transform] = {}  # data config (JSON) -> its probed transform

    def get(self, name: str) -> LoadedTask:
        """The current version of a task.

        Args:
            name: Task name.
        """
        task = self.tasks.get(name)
        if task is None:
            raise UnknownTask(f"unknown task {name!r}", tasks=sorted(self.tasks))
        return task

    async def load_store(self) -> None:
        """Remove leftovers of interrupted changes, then load every adapter in the store; refuse (and
        remember why) those that do not fit."""
        self.store.mkdir(parents=True, exist_ok=True)
        for leftover in await asyncio.to_thread(remove_stale_uploads, self.store):
            log.warning("removed %s: left in the store by an interrupted upload, replace or delete", leftover)
        for directory in sorted(p for p in self.store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            name = directory.name
            try:
                check_name(name)
                self.tasks[name] = await self._load(name, directory)
                log.info("loaded task %s (version %s)", name, self.tasks[name].version)
            except (InvalidAdapter, InsufficientMemory) as exc:
                self.skipped[shown_name(name)] = exc.detail
                log.warning("skipped adapter %s: %s", directory, exc.detail)
        self._publish()

    async def install(self, name: str, config: bytes, weights: bytes) -> LoadedTask:
        """Validate an uploaded adapter fully, then write it into the store and serve it.

        Nothing changes (store or served tasks) unless every check passes.

        Args:
            name: Task name (already validated).
            config: Contents of adapter_config.json.
            weights: Contents of adapter_model.safetensors.
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
            await self._serve(task)
            log.info("installed task %s (version %s)", name, task.version)
            return task

    async def delete(self, name: str) -> None:
        """Stop serving a task and remove it from the store.

        Args:
            name: Task name (already validated).
        """
        async with self._lock:
            if name not in self.tasks and name not in self.skipped:
                raise UnknownTask(f"unknown task {name!r}", tasks=sorted(self.tasks))
            await asyncio.to_thread(remove_adapter, self.store, name)
            old = self.tasks.pop(name, None)
            self.skipped.pop(name, None)
            self._publish()
            if old is not None:
                await self.engine.retire(old)
            log.info("deleted task %s", name)

    async def load(self, name: str) -> LoadedTask:
        """Load one task from the store on demand and serve it (a Ray replica loads only the tasks it is sent).

        Args:
            name: Task name.
        """
        directory = self._stored(name)
        async with self._lock:
            task = await self._load(name, directory)
            await self._serve(task)
        return task

    async def inspect(self, name: str) -> LoadedTask:
        """Validate a stored task against the backbone without serving it (nothing reaches the engine).

        Args:
            name: Task name.
        """
        return await self._load(name, self._stored(name), prepare=False)

    async def unload(self, name: str, key: str | None = None) -> None:
        """Stop serving a task but leave it in the store.

        Args:
            name: Task name.
            key: Only unload this version (a newer one loaded meanwhile stays); None: any version.
        """
        async with self._lock:
            task = self.tasks.get(name)
            if task is None or (key is not None and task.key != key):
                return
            del self.tasks[name]
            self._publish()
            await self.engine.retire(task)

    def stored_names(self) -> list[str]:
        """Names of the task folders in the store (valid or not)."""
        if not self.store.is_dir():
            return []
        return sorted(shown_name(p.name) for p in self.store.iterdir() if p.is_dir() and not p.name.startswith("."))

    def signature(self, name: str) -> tuple[int, ...] | None:
        """What changes whenever the store's copy of a task does (None: the store has none).

        Args:
            name: Task name.
        """
        # Adapters are written by renaming a whole folder into place, so a new version has new inodes.
        try:
            stats = [os.stat(self.store / name / file) for file in (CONFIG_NAME, WEIGHTS_NAME)]
        except OSError:
            return None
        return tuple(x for st in stats for x in (st.st_ino, st.st_mtime_ns, st.st_size))

    async def _serve(self, task: LoadedTask) -> None:
        # Requests admitted with the version it replaces still finish with it (see Engine.retire).
        old = self.tasks.get(task.name)
        self.tasks[task.name] = task
        self.skipped.pop(task.name, None)
        self._publish()
        if old is not None:
            await self.engine.retire(old)

    def _stored(self, name: str) -> Path:
        directory = self.store / name
        if not valid_name(name) or not (directory / CONFIG_NAME).is_file():
            raise UnknownTask(f"unknown task {name!r}", tasks=self.stored_names())
        return directory

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
        # (1,000 tasks load in seconds, not one transform build and probe each).
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

    def _publish(self) -> None:
        metrics = self.engine.metrics
        metrics.adapters_loaded.set(len(self.tasks))
        metrics.adapters_skipped.set(len(self.skipped))
