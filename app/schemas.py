"""Request and response models of the HTTP API."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field
from timm.models import get_pretrained_cfg

from adapters.backbones import WEIGHTS_DIR

if TYPE_CHECKING:
    from app.engine import Engine
    from app.registry import Entry
    from app.settings import Settings
    from app.tasks import LoadedTask


class Prediction(BaseModel):
    """One class of a top-k answer."""

    label: str
    index: int
    score: float = Field(description="Softmax probability.")


class ImageResult(BaseModel):
    """The top-k classes of one image, best first."""

    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    """Answer to POST /classify: one result per image, in request order."""

    task: str
    adapter_version: str = Field(description="First 12 hex digits of the adapter weights' sha256.")
    backbone_fingerprint: str
    time_ms: float = Field(description="Time spent in the server for this request.")
    results: list[ImageResult]


class BackboneInfo(BaseModel):
    """The frozen backbone shared by every task."""

    name: str
    fingerprint: str
    random_weights: bool = Field(description="True when the backbone is a random init: predictions are noise.")
    device: str
    dtype: str
    input_size: list[int]
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="timm kwargs it was built with (RLRR_BACKBONE_KWARGS); adapters must match.")
    strategy: str
    source: Literal["in-house", "hub", "local file", "random"] = Field(
        description="Where the weights came from: shipped in the package, a model hub, a local checkpoint, or none.")
    weights: str | None = Field(None, description="The checkpoint path, hub id or packaged file of the weights.")


class TaskInfo(BaseModel):
    """A task in the store: servable (`loaded`, in whichever tier) or refused (`skipped`, with the reason)."""

    name: str
    state: Literal["loaded", "skipped"]
    reason: str | None = None
    tier: Literal["stored", "resident", "folded"] | None = Field(
        None, description="Where a servable task is: only in the store (read on its next request), its tensors "
        "in memory, or also folded into the merged-weights cache.")
    pinned: bool = Field(False, description="Loaded at start-up (or upload) and never evicted.")
    version: str | None = None
    method: str | None = Field(None, description="The adapter's method: rlrr, lora, bitfit or ia3.")
    num_classes: int | None = None
    labels: list[str] = Field(default_factory=list, description="Class names, by class index.")
    parameters: int | None = None
    bytes: int | None = None
    base_model: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="Metrics recorded by the trainer.")
    loaded_at: float | None = None


class TaskDetail(TaskInfo):
    """One task with its labels and configuration."""

    config: dict[str, Any] = Field(default_factory=dict)
    data_config: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class TaskList(BaseModel):
    """Answer to GET /tasks: one page of tasks, in name order."""

    backbone: BackboneInfo
    tasks: list[TaskInfo]
    total: int = Field(0, description="Tasks matching the filter, over all pages.")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


class Health(BaseModel):
    """Answer to /healthz and /readyz."""

    status: str
    tasks: int | None = None


def backbone_info(engine: Engine, settings: Settings) -> BackboneInfo:
    """The served backbone, as GET /tasks shows it.

    Args:
        engine: The engine holding it.
        settings: The settings it was built from (where its weights came from).
    """
    source, weights = backbone_source(settings)
    return BackboneInfo(name=engine.name, fingerprint=engine.fingerprint, random_weights=engine.random_weights,
                        device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
                        input_size=list(engine.input_size), strategy=engine.strategy, source=source, weights=weights,
                        # the spec build_backbone attached to the model (adapters check theirs against it)
                        model_kwargs=dict(getattr(getattr(engine.backbone, "backbone_spec", None), "model_kwargs", {})))


def backbone_source(settings: Settings) -> tuple[Literal["in-house", "hub", "local file", "random"], str | None]:
    """Where the backbone's weights come from, and the file or hub id.

    Args:
        settings: Backbone name, checkpoint and pretrained flag.
    """
    if settings.checkpoint is not None:
        return "local file", str(settings.checkpoint)
    if not settings.pretrained:
        return "random", None
    cfg = get_pretrained_cfg(settings.backbone, allow_unregistered=True)
    if cfg is not None and cfg.file and Path(cfg.file).resolve().is_relative_to(WEIGHTS_DIR.resolve()):
        return "in-house", Path(cfg.file).name
    return "hub", (cfg.hf_hub_id or cfg.url or None) if cfg is not None else None


def task_info(task: LoadedTask) -> TaskInfo:
    """Summary of a served task.

    Args:
        task: The loaded task.
    """
    a = task.adapter
    return TaskInfo(name=task.name, state="loaded", version=task.version, method=a.method,
                    num_classes=a.num_classes, labels=a.labels,
                    parameters=a.num_params, bytes=a.nbytes, base_model=a.base_model,
                    metrics=dict(a.metadata.get("metrics") or {}), loaded_at=task.loaded_at)


def task_detail(task: LoadedTask) -> TaskDetail:
    """Everything about a served task.

    Args:
        task: The loaded task.
    """
    a = task.adapter
    return TaskDetail(**task_info(task).model_dump(), config=a.config.to_dict(),
                      data_config=task.data_config, metadata=_no_paths(a.metadata))


def entry_info(entry: Entry, folded: bool) -> TaskInfo:
    """Summary of a task of the store, in whichever tier, without reading its tensors.

    Args:
        entry: The registry's entry.
        folded: Whether its resident version is in the merged-weights cache.
    """
    if entry.reason is not None or entry.stored is None:
        return TaskInfo(name=entry.name, state="skipped", reason=entry.reason, pinned=entry.pinned)
    if entry.resident is not None:
        return task_info(entry.resident).model_copy(update={"tier": "folded" if folded else "resident",
                                                            "pinned": entry.pinned})
    s = entry.stored
    return TaskInfo(name=entry.name, state="loaded", tier="stored", pinned=entry.pinned, version=s.version,
                    num_classes=s.num_classes, labels=s.labels, parameters=s.parameters, bytes=s.nbytes,
                    base_model=s.base_model, metrics=dict(s.metadata.get("metrics") or {}))


def entry_detail(entry: Entry, folded: bool) -> TaskDetail:
    """Everything about a task of the store, without reading its tensors.

    Args:
        entry: The registry's entry.
        folded: Whether its resident version is in the merged-weights cache.
    """
    info = entry_info(entry, folded).model_dump()
    if entry.resident is not None:
        return task_detail(entry.resident).model_copy(update={k: info[k] for k in ("tier", "pinned")})
    s = entry.stored
    if s is None:
        return TaskDetail(**info)
    return TaskDetail(**info, config=s.config, data_config=s.data_config, metadata=_no_paths(s.metadata))


def _no_paths(value: Any) -> Any:
    # The trainer records e.g. its --checkpoint; an unauthenticated GET shows the file name, not where it lives.
    if isinstance(value, dict):
        return {k: _no_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_paths(v) for v in value]
    if isinstance(value, str) and (PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()):
        return PureWindowsPath(value).name if "\\" in value else PurePosixPath(value).name
    return value


def classify_response(task: LoadedTask, fingerprint: str, seconds: float,
                      predictions: list[list[tuple[int, float]]]) -> ClassifyResponse:
    """The /classify answer from the engine's (index, score) lists.

    Args:
        task: The task version that produced them.
        fingerprint: The backbone's fingerprint.
        seconds: Time spent on the request.
        predictions: One best-first list per image.
    """
    labels = task.adapter.labels
    results = [ImageResult(predictions=[Prediction(label=labels[i], index=i, score=s) for i, s in image])
               for image in predictions]
    return ClassifyResponse(task=task.name, adapter_version=task.version, backbone_fingerprint=fingerprint,
                            time_ms=round(seconds * 1000, 3), results=results)
