"""Plan costs measured at warm-up, kept on disk per (backbone, device, dtype, threads, torch) and reused.

Timing the forms is most of a CPU server's start-up (~7 s of ViT-S/16 on 2 slow cores), and it
measures the same thing on every start of the same backbone on the same machine. As cuDNN's and
TensorRT's timing caches do, the first start measures and writes; later starts read. The costs only
steer the planner between forms that are all exact, so a stale entry can cost speed, never a
wrong answer. `RLRR_COSTS_FILE=off` measures on every start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from app.planner import Costs

log = logging.getLogger("app")
VERSION = 3  # bump when what Engine._calibrate measures changes (2: segment = a group's cost in a pass; 3: best of 3)


def machine_key(fingerprint: str, device: torch.device, dtype: torch.dtype, batch: int) -> str:
    """What the measured costs depend on: the backbone's weights' fingerprint, the device model, the
    dtype, torch's intra-op threads and version, and the calibration batch.

    Args:
        fingerprint: `backbone_fingerprint` of the served backbone.
        device: Serving device.
        dtype: Compute dtype.
        batch: Rows the many-row timing used.
    """
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{_cpu_model()} x{os.cpu_count()}"
    return "|".join((f"v{VERSION}", fingerprint, where, str(dtype).removeprefix("torch."),
                     f"threads={torch.get_num_threads()}", f"torch={torch.__version__}", f"batch={batch}"))


def read_costs(path: Path | None, key: str) -> dict[str, Any] | None:
    """The entry stored under `key` (`{"costs": {...}, "kinds": [...]}`), or None.

    An unreadable or malformed file is a miss (logged), never an error: the server measures again.

    Args:
        path: The costs file; None when disabled.
        key: `machine_key` of this server.
    """
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text()).get(key)
        if entry is None:
            return None
        costs = entry["costs"]
        fields = {f.name for f in dataclasses.fields(Costs)}
        if not (isinstance(costs, dict) and set(costs) == fields and all(
                isinstance(v, (int, float)) and v >= 0 for v in costs.values())):
            raise ValueError("costs are not the planner's fields as non-negative numbers")
        return {"costs": costs, "kinds": list(entry.get("kinds", []))}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("plan costs file %s unusable (%s): measuring", path, exc)
        return None


def write_costs(path: Path | None, key: str, costs: Costs, kinds: list[str]) -> None:
    """Store this server's measured costs under `key`, keeping other keys; atomic (temp file + rename).

    A failure to write (read-only disk) is logged; the server runs on with what it measured.

    Args:
        path: The costs file; None when disabled.
        key: `machine_key` of this server.
        costs: What `Engine._calibrate` measured.
        kinds: Which unmerged kinds were measured, not priced by a prior: `rescaling`, `plain`.
    """
    if path is None:
        return
    try:
        doc: dict[str, Any] = {}
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
                doc = doc if isinstance(doc, dict) else {}
            except (OSError, ValueError):
                doc = {}
        doc[key] = {"costs": dataclasses.asdict(costs), "kinds": sorted(kinds)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".plan-costs-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        log.warning("could not write plan costs to %s (%s)", path, exc)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
