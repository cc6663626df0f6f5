"""What the registry hands the engine: one loaded task version, and one image waiting to run.

Both the registry (which loads tasks) and the engine (which runs them) import this module; neither
imports the other for these types.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters import Adapter
from app.preprocess import Transform

TopK = list[tuple[int, float]]  # (class index, probability), best first


@dataclass(eq=False)
class LoadedTask:
    """One version of a task's adapter, ready to serve.

    Attributes:
        name: Task name.
        key: Unique per loaded version (the engine's name for it).
        adapter: The loaded adapter.
        version: First 12 hex digits of the weights file's sha256.
        data_config: Resolved eval data config.
        transform: Eval transform built from it.
        loaded_at: Unix time it was loaded.
    """

    name: str
    key: str
    adapter: Adapter
    version: str
    data_config: dict[str, Any]
    transform: Transform
    loaded_at: float = field(default_factory=time.time)


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
