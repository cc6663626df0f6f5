"""The on-disk adapter: a folder with adapter_config.json + adapter_model.safetensors.

This module owns that folder: `save_adapter` (the trainer) and `install_adapter` (an upload) write
it, `load_adapter` reads it, `remove_adapter` deletes it, and `stale_uploads` finds what a crash
left beside it. Every write goes through one helper: the folder is built under a hidden temporary
name beside the target, fsynced, and renamed into place, so a crash leaves either the old adapter
or the new one, never a mix. No pickle anywhere.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import save_file

from .backbones import BackboneSpec
from .errors import AdapterError, AdapterModelError, AdapterShapeError, AdapterValueError
from .inject import adapter_state_dict, backbone_fingerprint, wrapped_config
from .methods import METHODS, config_from_dict, method_of
from .names import HEAD_NAMES
from .packed import PackedTensors, shape_of
from .wrap import adapter_shapes

__all__ = ["Adapter", "AdapterError", "AdapterConfigFile", "DataConfigFile", "save_adapter", "load_adapter",
           "install_adapter", "remove_adapter", "stale_uploads", "remove_stale_uploads", "same_model",
           "check_backbone_spec", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT_VERSION = 1
METHOD = "rlrr"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_REQUIRED = ("format_version", "method", "base_model", "backbone_fingerprint", "num_classes", "labels",
             "weights_sha256")
# Where a method's config lives in adapter_config.json: RLRR's as before other methods existed.
_CONFIG_KEY = {METHOD: "rlrr_config"}
METHOD_CONFIG = "method_config"
# Hidden names beside the adapter folders: a write in progress (save / upload), an old adapter moved
# aside by a replace, a removed one on its way out. What a crash leaves of them is stale.
_SAVING, _UPLOAD, _OLD, _DELETED = "tmp", "upload", "old", "deleted"


_HEX64 = r"^[0-9a-f]{64}$"
_Positive = Field(gt=0)


class DataConfigFile(BaseModel):
    """The `data_config` of adapter_config.json: timm's eval preprocessing, every field optional."""

    model_config = ConfigDict(extra="ignore")  # resolve_data_config ignores unknown keys too

    input_size: tuple[StrictInt, StrictInt, StrictInt] | None = Field(None, description="(C, H, W).")
    interpolation: Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"] | None = None
    mean: list[float] | None = Field(None, min_length=1, max_length=3, description="Per-channel mean.")
    std: list[float] | None = Field(None, min_length=1, max_length=3, description="Per-channel std, > 0.")
    # A tiny crop_pct would resize every image to (size / crop_pct) pixels a side before cropping.
    crop_pct: float | None = Field(None, ge=0.1, le=1.0, description="Center-crop fraction.")
    crop_mode: Literal["center", "squash", "border"] | None = None

    @model_validator(mode="after")
    def _check(self) -> DataConfigFile:
        if self.input_size is not None and min(self.input_size) < 1:
            raise ValueError(f"input_size must be positive, got {list(self.input_size)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        for key in ("mean", "std"):  # timm broadcasts one value, or takes one per channel: nothing between
            values = getattr(self, key)
            if values is not None and len(values) not in (1, 3):
                raise ValueError(f"{key} must hold 1 value or 3 (one per channel), got {len(values)}: {values}")
        return self


class AdapterConfigFile(BaseModel):
    """The format rules of adapter_config.json (format_version 1); extra fields pass through."""

    model_config = ConfigDict(extra="allow")

    format_version: StrictInt
    method: StrictStr
    rlrr_config: dict[str, Any] | None = Field(None, description="method 'rlrr': its RLRRConfig.")
    method_config: dict[str, Any] | None = Field(None, description="any other method: its config.")
    base_model: StrictStr = Field(min_length=1, max_length=256, description="timm name of the backbone.")
    backbone_fingerprint: StrictStr = Field(pattern=_HEX64, description="sha256 of the frozen weights.")
    num_classes: StrictInt = Field(ge=1, le=1_000_000)
    labels: list[StrictStr] = Field(description="One class name per class.")
    weights_sha256: StrictStr = Field(pattern=_HEX64)
    data_config: DataConfigFile = Field(default_factory=DataConfigFile)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels_usable(cls, labels: list[str]) -> list[str]:
        check_labels(labels)
        return labels

    @model_validator(mode="after")
    def _labels_match(self) -> AdapterConfigFile:
        if len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")
        return self


LABEL_MAX = 1000  # characters; WordNet-style class names ("tench, Tinca tinca") stay far below
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_labels(labels: list[str]) -> None:
    """Refuse class names a client could not tell apart or display: blank, over `LABEL_MAX`
    characters, holding control characters, or repeated.

    Args:
        labels: One class name per class.

    Raises:
        ValueError: Naming the first offending label by index.
    """
    if _plain_ascii(labels):
        return
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if _blank(label):
            raise ValueError(f"labels[{i}] is empty or blank")
        if len(label) > LABEL_MAX:
            raise ValueError(f"labels[{i}] has {len(label)} characters; at most {LABEL_MAX}")
        if _CONTROL.search(label):
            raise ValueError(f"labels[{i}] holds a control character")
        if not _encodable(label):
            raise ValueError(f"labels[{i}] is not valid Unicode text (a lone surrogate)")
        key = unicodedata.normalize("NFC", label.strip())  # "cat", "cat " and a decomposed "cat" read alike
        if key in seen:
            raise ValueError(f"labels[{seen[key]}] and labels[{i}] are the same ({_shown(key)})")
        seen[key] = i


def _plain_ascii(labels: list[str]) -> bool:
    # The common case in one pass of builtins (a 10,000-task start-up checks ~1M labels): printable
    # ASCII (no control character, encodable, NFC already), not blank, short, unique once stripped.
    # Anything else takes check_labels' loop, which names the offending label.
    stripped = [label.strip() for label in labels]
    return (all(s and label.isascii() and label.isprintable() for label, s in zip(labels, stripped, strict=True))
            and max(map(len, labels), default=0) <= LABEL_MAX and len(set(stripped)) == len(labels))


def _blank(text: str) -> bool:
    # Only separators (Z*), format characters (Cf) or whitespace. An ASCII string's only such
    # characters are whitespace, so the per-character lookup runs for non-ASCII labels alone
    # (a 10,000-task start-up checks ~1M labels).
    if text.isascii():
        return not text or text.isspace()
    return all(unicodedata.category(c)[0] == "Z" or unicodedata.category(c) == "Cf" or c.isspace() for c in text)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(text: str, limit: int = 40) -> str:
    # A client's string quoted in a message: ASCII only (encodable whatever it holds), and short.
    return ascii(text if len(text) <= limit else text[:limit] + "...")


def explain(error: ValidationError, limit: int = 5) -> str:
    """One line naming each invalid field of a pydantic error (never the whole input).

    Args:
        error: The validation error.
        limit: Most problems named.
    """
    problems = [f"{'.'.join(str(x) for x in e['loc']) or 'document'}: {e['msg']}" for e in error.errors()]
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


@dataclass
class Adapter:
    """A loaded adapter: its tensors and everything needed to serve them."""

    config: Any  # its method's config: RLRRConfig, LoRAConfig, BitFitConfig, IA3Config
    tensors: Mapping[str, torch.Tensor]  # a `PackedTensors` when loaded: one buffer, views by name
    num_classes: int
    labels: list[str]
    base_model: str
    fingerprint: str
    data_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: Path | None = None
    weights_sha256: str = ""
    backbone_spec: BackboneSpec | None = None  # always set by load_adapter (derived for older files)

    @property
    def version(self) -> str:
        """Short content hash of the tensors file: changes whenever the adapter is retrained."""
        return self.weights_sha256[:12]

    @property
    def method(self) -> str:
        return method_of(self.config).name

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if not arch:
        raise AdapterModelError("cannot tell the model's timm name; pass base_model=")
    return f"{arch}.{tag}" if tag else arch


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _from_model(model: nn.Module, config: Any, fingerprint: str | None, num_classes: int | None,
                base_model: str | None, data_config: dict[str, Any] | None) -> tuple:
    # Everything `save_adapter` was not told, read from a model wrapped by add_rlrr.
    own = wrapped_config(model)  # raises for a model without an adapter
    if data_config is None:
        from timm.data import resolve_model_data_config
        data_config = resolve_model_data_config(model)
    return (adapter_state_dict(model), config or own, fingerprint or backbone_fingerprint(model),
            num_classes or model.head.out_features, base_model or _model_name(model), data_config)


def _from_tensors(tensors: Mapping[str, torch.Tensor], **needed: Any) -> dict[str, torch.Tensor]:
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise ValueError(f"saving raw tensors needs {', '.join(missing)}")
    # clone: views of one buffer (a loaded adapter's PackedTensors) share memory, which safetensors refuses
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}


def save_adapter(
        model_or_tensors: nn.Module | Mapping[str, torch.Tensor],
        directory: str | os.PathLike,
        *,
        base_model: str | None = None,
        config: Any = None,
        fingerprint: str | None = None,
        num_classes: int | None = None,
        labels: list[str] | None = None,
        data_config: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        backbone_spec: BackboneSpec | None = None,
) -> Path:
    """Write an adapter folder atomically (replacing any adapter already there).

    Args:
        model_or_tensors: A model wrapped by `add_rlrr` (everything else is read from it), or the
            adapter's tensors (then config, fingerprint and num_classes are required).
        directory: The adapter folder, e.g. `store/dtd`.
        base_model: timm name of the backbone (with pretrained tag).
        config: The adapter configuration.
        fingerprint: `backbone_fingerprint` of the frozen backbone.
        num_classes: Classes of the head.
        labels: Class names, one per class; '0', '1', ... when None.
        data_config: Preprocessing (timm data config) the task expects.
        metadata: Free-form training metadata (metrics, recipe, seed, timing ...).
        backbone_spec: How the frozen backbone was built; default the model's `backbone_spec`
            (set by `build_backbone`), else derived from `metadata["backbone"]` / `base_model`.
    """
    if isinstance(model_or_tensors, nn.Module):
        backbone_spec = backbone_spec or getattr(model_or_tensors, "backbone_spec", None)
        tensors, config, fingerprint, num_classes, base_model, data_config = _from_model(
            model_or_tensors, config, fingerprint, num_classes, base_model, data_config)
    else:
        tensors = _from_tensors(model_or_tensors, config=config, fingerprint=fingerprint,
                                num_classes=num_classes, base_model=base_model)
    labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
    _check_tensors(tensors, num_classes, labels)
    spec = backbone_spec or _derived_spec(base_model, metadata or {})

    method = method_of(config).name
    doc = {"format_version": FORMAT_VERSION, "method": method, "library": "rlrr-serve",
           _CONFIG_KEY.get(method, METHOD_CONFIG): config.to_dict(), "base_model": base_model,
           "backbone_fingerprint": fingerprint,
           "backbone_spec": spec.to_dict(), "num_classes": num_classes, "labels": labels,
           "data_config": _jsonable(data_config or {}), "metadata": _jsonable(metadata or {})}

    def write(tmp: Path) -> None:
        weights = tmp / WEIGHTS_NAME
        save_file(tensors, str(weights), metadata={"format": "pt"})
        text = json.dumps({**doc, "weights_sha256": _sha256(weights)}, indent=2, sort_keys=True)
        (tmp / CONFIG_NAME).write_text(text + "\n")

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return _write_folder(directory, write, _hidden(directory.name, _SAVING))


def install_adapter(
        store: str | os.PathLike,
        name: str,
        config_bytes: bytes,
        weights_bytes: bytes,
        *,
        validate: Callable[[Path], object] | None = None,
) -> Path:
    """Write an uploaded adapter into the store as `store/name`, atomically, once it passes `validate`.

    The two files are written into a hidden `.upload-NAME-*` folder in the store and fsynced; then
    `validate` is called on that folder, and only when it returns is the folder renamed into place
    (an adapter already there is replaced). A failed validation leaves nothing behind; a crash
    leaves the old adapter and a stale upload that `stale_uploads` lists.

    Args:
        store: The folder holding one adapter folder per task.
        name: Task name: one plain folder name, not hidden.
        config_bytes: Contents of adapter_config.json.
        weights_bytes: Contents of adapter_model.safetensors.
        validate: Raises if the adapter in the folder it is given must not be installed (e.g. a
            `load_adapter` against the served backbone); its result is ignored.

    Returns:
        The adapter folder, `store/name`.
    """
    directory = _task_folder(store, name)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_bytes(config_bytes)
        (tmp / WEIGHTS_NAME).write_bytes(weights_bytes)

    return _write_folder(directory, write, f".{_UPLOAD}-{name}-", validate)


def remove_adapter(store: str | os.PathLike, name: str) -> bool:
    """Remove `store/name` atomically; returns whether there was anything to remove.

    A folder is renamed to a hidden trash name first (readers see it whole or not at all), then
    deleted. A task folder that is a symlink loses the link only: what it points to is kept.

    Args:
        store: The folder holding one adapter folder per task.
        name: Task name.
    """
    directory = _task_folder(store, name)
    if not os.path.lexists(directory):
        return False
    _discard(directory if directory.is_symlink() else _move_aside(directory, _DELETED))
    _fsync(directory.parent)
    return True


def stale_uploads(store: str | os.PathLike) -> list[Path]:
    """What interrupted writes left in a store, for a server to clean at start-up.

    Hidden `.upload-*` (uploads), `.*.tmp-*` (saves), `.*.old-*` (adapters being replaced) and
    `.*.deleted-*` (adapters being removed) entries, sorted. Only meaningful while nothing else
    writes into the store: a write in progress looks the same.

    Args:
        store: The folder holding one adapter folder per task.
    """
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(p for p in store.iterdir() if _is_stale(p.name))


def remove_stale_uploads(store: str | os.PathLike) -> list[Path]:
    """Delete what `stale_uploads` lists (a link, not what it points to); returns the paths removed.

    Args:
        store: The folder holding one adapter folder per task.
    """
    stale = stale_uploads(store)
    for path in stale:
        _discard(path)
    return stale


def _is_stale(name: str) -> bool:
    patterns = [f".{_UPLOAD}-*"] + [f"{_hidden('*', why)}*" for why in (_SAVING, _OLD, _DELETED)]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _task_folder(store: str | os.PathLike, name: str) -> Path:
    if not name or name != Path(name).name or name.startswith(".") or name != name.strip():
        raise ValueError(f"task name {name!r} must be one plain, visible folder name")
    return Path(store) / name


def _hidden(name: str, why: str) -> str:
    """Prefix of a hidden entry beside folder `name`: `.NAME.WHY-`."""
    return f".{name}.{why}-"


def _write_folder(directory: Path, write: Callable[[Path], None], prefix: str,
                  validate: Callable[[Path], object] | None = None) -> Path:
    """The one atomic write: fill a temporary folder beside `directory`, fsync, validate, rename into place.

    Args:
        directory: The folder to (re)place; its parent exists.
        write: Writes the files into the folder it is given.
        prefix: Name prefix of the temporary folder (hidden).
        validate: Raises if the written folder must not replace `directory`.
    """
    with _staged(directory.parent, prefix) as tmp:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if validate is not None:
            validate(tmp)
        _replace_folder(tmp, directory)
    return directory


def _folder_mode() -> int:
    """What `mkdir` gives a new folder here: 0777 less the process's umask (read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o755


_FOLDER_MODE = _folder_mode()


@contextmanager
def _staged(parent: Path, prefix: str) -> Iterator[Path]:
    """A new empty folder in `parent`; deleted on the way out unless it was renamed away."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, _FOLDER_MODE)  # mkdtemp makes it 0700; renamed into place it is a task folder like the others
    try:
        yield tmp
    finally:
        _discard(tmp)


def _replace_folder(tmp: Path, directory: Path) -> None:
    """Rename the finished folder into place; an old folder (or link) is moved aside, then removed."""
    old = _move_aside(directory, _OLD) if os.path.lexists(directory) else None
    os.replace(tmp, directory)
    _fsync(directory.parent)
    if old is not None:
        _discard(old)


def _move_aside(path: Path, why: str) -> Path:
    """Rename `path` to a hidden, unique name beside it (one atomic step); returns the new path."""
    aside = path.parent / f"{_hidden(path.name, why)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(path, aside)
    return aside


def _discard(path: Path) -> None:
    """Delete a folder, file or link (never what a link points to); nothing if it is gone."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_tensors(tensors: dict[str, torch.Tensor], num_classes: int, labels: list[str]) -> None:
    if len(labels) != num_classes:
        raise AdapterError(f"{len(labels)} labels for {num_classes} classes")
    try:
        check_labels(labels)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    head_name = HEAD_NAMES[0]
    head = tensors.get(head_name)
    if head is None or head.dim() != 2 or head.shape[0] != num_classes:
        got = None if head is None else tuple(head.shape)
        raise AdapterShapeError(f"{head_name} must have shape ({num_classes}, D), got {got}")
    # A packed buffer is checked in one pass (~200 tiny isfinite calls are most of a ViT-S load); the
    # per-tensor walk runs on its separate tensors, or on all when one is bad, to name the offender.
    packed = isinstance(tensors, PackedTensors) and tensors.flat.is_floating_point() and bool(
        torch.isfinite(tensors.flat).all())
    for name, t in (tensors.separate if packed else tensors).items():
        if not t.is_floating_point():
            raise AdapterShapeError(f"tensor '{name}' has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise AdapterValueError(f"tensor '{name}' holds non-finite values (NaN or inf)")


def _derived_spec(base_model: str, metadata: dict[str, Any]) -> BackboneSpec:
    """The spec of an adapter written before `backbone_spec` existed (or without one).

    The trainer used to record only `metadata.backbone` (name, checkpoint, model_kwargs); files
    without even that were built from `base_model` with timm's defaults.
    """
    meta = metadata.get("backbone") if isinstance(metadata.get("backbone"), dict) else {}
    return BackboneSpec(name=meta.get("name") or base_model, checkpoint=meta.get("checkpoint"),
                        model_kwargs=meta.get("model_kwargs") or {})


def check_backbone_spec(adapter: BackboneSpec, backbone: BackboneSpec, where: str) -> None:
    """Refuse an adapter whose backbone was built with other timm kwargs than the given backbone.

    Only `model_kwargs` is compared: name, checkpoint, seed and pretrained flag all end up in the
    weights, which the fingerprint compares exactly (a renamed copy of the same weights still fits).

    Args:
        adapter: The adapter's recorded spec.
        backbone: The spec of the backbone it is to run on.
        where: The adapter's name, for the message.

    Raises:
        AdapterError: The kwargs differ; the message shows both as JSON (what RLRR_BACKBONE_KWARGS takes).
    """
    if adapter.model_kwargs != backbone.model_kwargs:
        raise AdapterError(
            f"adapter {where} was trained on backbone '{adapter.name}' with model_kwargs "
            f"{json.dumps(adapter.model_kwargs, sort_keys=True)}, but this backbone '{backbone.name}' "
            f"has model_kwargs {json.dumps(backbone.model_kwargs, sort_keys=True)}")


def _read_config(directory: Path) -> dict[str, Any]:
    # Messages name files, never the folder: a server passes them on to its clients.
    if not directory.is_dir():
        raise AdapterError(f"no adapter at {directory.name!r}: not a directory")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{CONFIG_NAME} is missing")
    doc = _parse_config(path.read_bytes())
    if not isinstance(doc, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    if doc.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{CONFIG_NAME}: unknown format_version {doc.get('format_version')!r} "
            f"(this library reads {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise AdapterError(f"{CONFIG_NAME} lacks the fields {missing}")
    if doc["method"] not in METHODS:
        raise AdapterError(f"{CONFIG_NAME}: unknown method {doc['method']!r}; this library reads {sorted(METHODS)}")
    key = _CONFIG_KEY.get(doc["method"], METHOD_CONFIG)
    if key not in doc:
        raise AdapterError(f"{CONFIG_NAME} lacks the field {key!r} (the {doc['method']} config)")
    try:
        AdapterConfigFile.model_validate(doc)
    except ValidationError as e:
        raise AdapterError(f"{CONFIG_NAME} is invalid: {explain(e)}") from None
    return doc


JSON_DEPTH_MAX = 64  # nesting of arrays and objects in adapter_config.json; the trainer writes 4
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_config(raw: bytes) -> Any:
    """adapter_config.json's document, refused unless every value can be stored and echoed as JSON:
    no NaN/Infinity, no string that is not valid Unicode, no nesting deeper than `JSON_DEPTH_MAX`."""
    # Brackets anywhere (inside strings too) bound the depth: most files need no exact count.
    depth = _json_depth(raw) if raw.count(b"[") + raw.count(b"{") > JSON_DEPTH_MAX else 0
    if depth > JSON_DEPTH_MAX:
        raise AdapterError(f"{CONFIG_NAME} nests arrays/objects {depth} deep; at most {JSON_DEPTH_MAX}")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, an over-long integer, NaN/Infinity
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    # A lone surrogate can only come from a \uD800-\uDFFF escape (the UTF-8 decoder refuses encoded
    # ones), so documents without such an escape need no walk.
    where = _unencodable(doc, "") if _SURROGATE_ESCAPE.search(raw) else None
    if where is not None:
        raise AdapterError(f"{CONFIG_NAME}: {where} is not valid Unicode text (it holds a lone surrogate "
                           "escape such as \\ud800); every string must be encodable as UTF-8")
    return doc


def _json_depth(raw: bytes) -> int:
    # Brackets outside strings, summed: the nesting json.loads would recurse into (it raises
    # RecursionError, with no useful message, near 1,000).
    brackets = re.sub(rb"[^\[\]{}]", b"", _JSON_STRING.sub(b"", raw))
    if not brackets:
        return 0
    steps = np.frombuffer(brackets, dtype=np.uint8)
    return int(np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max())


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _unencodable(node: Any, where: str) -> str | None:
    """The path of the first string (key or value) in a JSON document that UTF-8 cannot encode."""
    if isinstance(node, str):
        return None if _encodable(node) else where or "the document"
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(key, str) and _unencodable(key, where) is not None:
            return f"a key in {where or 'the document'}"
        name = key if isinstance(key, int) or (key.isascii() and key.isprintable()) else ascii(key)
        here = f"{where}[{name}]" if isinstance(key, int) else f"{where}.{name}" if where else str(name)
        found = _unencodable(value, here)
        if found is not None:
            return found
    return None


def same_model(a: str, b: str) -> bool:
    """Whether two timm names denote the same model: same architecture, and same tag when both have one.

    Args:
        a: A timm name, e.g. `vit_base_patch16_224.augreg_in21k`.
        b: Another.
    """
    arch_a, _, tag_a = a.partition(".")
    arch_b, _, tag_b = b.partition(".")
    return arch_a == arch_b and (not tag_a or not tag_b or tag_a == tag_b)


def load_adapter(
        directory: str | os.PathLike,
        backbone: nn.Module | None = None,
        fingerprint: str | None = None,
        backbone_spec: BackboneSpec | None = None,
        base_model: str | None = None,
) -> Adapter:
    """Read and validate an adapter folder.

    Args:
        directory: The adapter folder.
        backbone: When given, the adapter must have been trained on exactly these frozen weights,
            and its tensors must have the shapes this backbone needs.
        fingerprint: The backbone's fingerprint, if already computed (skips hashing it again).
        backbone_spec: The backbone's spec; default `backbone.backbone_spec` (set by `build_backbone`).
            When known, the adapter's recorded spec must have the same `model_kwargs` (checked first:
            it names the cause that a fingerprint mismatch would only hint at).
        base_model: timm name of the served backbone; the adapter's `base_model` must name the
            same model (architecture, and pretrained tag when both give one).

    Raises:
        AdapterError: Missing or corrupt files, unknown format version, another backbone (other
            model_kwargs or weights), wrong shapes or non-finite values; the message names the problem.
    """
    directory = Path(directory)
    doc = _read_config(directory)
    config = _method_config(doc)
    if backbone_spec is None and backbone is not None:
        backbone_spec = getattr(backbone, "backbone_spec", None)
    spec = _check_backbone(doc, directory.name, backbone, fingerprint, backbone_spec, base_model)
    num_classes = doc["num_classes"]
    tensors = _read_weights(directory / WEIGHTS_NAME, doc["weights_sha256"])
    _check_tensors(tensors, num_classes, list(doc["labels"]))
    if backbone is not None:
        _check_shapes(tensors, adapter_shapes(backbone, config, num_classes))
    return Adapter(
        config=config, tensors=tensors, num_classes=num_classes, labels=list(doc["labels"]),
        base_model=doc["base_model"], fingerprint=doc["backbone_fingerprint"],
        data_config=doc.get("data_config", {}), metadata=doc.get("metadata", {}),
        format_version=doc["format_version"], path=directory, weights_sha256=doc["weights_sha256"],
        backbone_spec=spec,
    )


def _check_backbone(doc: dict[str, Any], where: str, backbone: nn.Module | None, fingerprint: str | None,
                    backbone_spec: BackboneSpec | None, base_model: str | None) -> BackboneSpec:
    # The adapter's recorded spec, after refusing another backbone: kwargs first (they name the
    # cause a fingerprint mismatch would only hint at), then the model name, then the weights.
    try:
        spec = (BackboneSpec.from_dict(doc["backbone_spec"]) if "backbone_spec" in doc
                else _derived_spec(doc["base_model"], doc.get("metadata") or {}))
    except (TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"{CONFIG_NAME}: invalid backbone_spec: {e}") from None
    if backbone_spec is not None:
        check_backbone_spec(spec, backbone_spec, where)
    if base_model is not None and not same_model(doc["base_model"], base_model):
        raise AdapterError(f"adapter was trained for base_model '{doc['base_model']}', but this backbone is "
                           f"'{base_model}'")
    if backbone is not None or fingerprint is not None:
        expected = fingerprint or backbone_fingerprint(backbone)
        if doc["backbone_fingerprint"] != expected:
            raise AdapterError(
                f"adapter was trained on backbone '{doc['base_model']}' with fingerprint "
                f"{str(doc['backbone_fingerprint'])[:12]}…, but the given backbone's is {expected[:12]}…")
    return spec


def _read_weights(weights: Path, sha256: str) -> PackedTensors:
    if not weights.is_file():
        raise AdapterError(f"{WEIGHTS_NAME} is missing")
    if _sha256(weights) != sha256:
        raise AdapterError(f"{WEIGHTS_NAME} does not match the checksum in {CONFIG_NAME} (corrupt or truncated)")
    try:
        return PackedTensors.load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{WEIGHTS_NAME} is not a readable safetensors file: {_no_path(str(e), weights)}") from None


def _no_path(message: str, path: Path) -> str:
    return message.replace(str(path), path.name).replace(str(path.parent), ".")


def _check_shapes(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    wrong = [f"{k}: {shape_of(tensors, k)} != {shapes[k]}" for k in shapes
             if k in tensors and shape_of(tensors, k) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:5]}{' …' if len(extra) > 5 else ''}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:5]}")
    if problems:
        raise AdapterShapeError("adapter does not fit this backbone: " + "; ".join(problems))



def _method_config(doc: dict[str, Any]) -> Any:
    # The method's config object of a document `_read_config` accepted (its method is known).
    key = _CONFIG_KEY.get(doc["method"], METHOD_CONFIG)
    try:
        return config_from_dict(doc["method"], doc[key])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{CONFIG_NAME}: invalid {key}: {e}") from None


def read_adapter_config(
        directory: str | os.PathLike,
        fingerprint: str | None = None,
        backbone_spec: BackboneSpec | None = None,
        base_model: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """Read and validate an adapter folder's config, and refuse another backbone, without reading its tensors.

    What a server with thousands of adapters reads at start-up; `load_adapter` reads and checks the
    tensors (checksum, shapes, values) when the adapter is first used.

    Args:
        directory: The adapter folder.
        fingerprint: The served backbone's fingerprint; the adapter must have been trained on it.
        backbone_spec: The served backbone's spec; its `model_kwargs` must match the adapter's.
        base_model: timm name of the served backbone (see `load_adapter`).

    Returns:
        The config document and its method's configuration object.

    Raises:
        AdapterError: Missing or invalid config, or an adapter for another backbone.
    """
    directory = Path(directory)
    doc = _read_config(directory)
    config = _method_config(doc)
    _check_backbone(doc, directory.name, None, fingerprint, backbone_spec, base_model)
    return doc, config
