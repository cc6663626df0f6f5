"""Redraw a stored adapter's pictures: training curves from its run's log, per-layer shift from its tensors.

    python -m trainer report --task dtd                         # into the run dir recorded in the adapter
    python -m trainer report --task mnist --store demo/store --out /tmp/mnist   # no run dir known: shift only
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from adapters import load_adapter, plan_targets

from . import plots
from .backbone import create_backbone
from .errors import StoreError

__all__ = ["report_task"]


def report_task(task: str, store: str | os.PathLike = "store", backbone: str | None = None,
                checkpoint: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None,
                out: str | os.PathLike | None = None, say: Callable[[str], None] = print) -> dict[str, Path | None]:
    """Draw training-curves.png and adapter-shift.png for `<store>/<task>`; returns their paths (None: not drawn).

    Args:
        task: Task name (the adapter's folder in the store).
        store: The adapter store.
        backbone: timm name; default the adapter's base model.
        checkpoint: Local backbone weights; must be the ones the adapter was trained on.
        run_dir: The run's directory (its log.jsonl); default the one recorded in the adapter.
        out: Output folder; default the run directory when it exists, else reports/<task>.
        say: Where notes go.

    Raises:
        StoreError: No such adapter, or --run-dir without a log. AdapterError: invalid or for other weights.
    """
    directory = Path(store) / task
    if not directory.is_dir():
        raise StoreError(f"no adapter for task '{task}' in {store} ({directory} does not exist)")
    adapter = load_adapter(directory)  # reads the base model name; validated against the weights below
    meta = adapter.metadata
    recorded = meta.get("training") or {}
    log = Path(run_dir) / "log.jsonl" if run_dir else Path(recorded["log"]) if recorded.get("log") else None
    if run_dir and not log.is_file():
        raise StoreError(f"--run-dir {run_dir} holds no log.jsonl")
    out_dir = Path(out) if out else log.parent if log and log.is_file() else Path("reports") / task
    name = backbone or adapter.base_model
    title = f"{task} · {meta.get('recipe', {}).get('method', 'rlrr')} · {name}"

    curves = None
    if log is not None and log.is_file():
        curves = plots.plot_curves(plots.read_log(log), out_dir / plots.CURVES_NAME, title, meta.get("metrics"))
    else:
        why = f"{log} is gone" if log else "the adapter records no run directory"
        say(f"note: no training curves for '{task}': {why}; pass --run-dir")

    model = create_backbone(name, checkpoint, 0.0, **meta.get("backbone", {}).get("model_kwargs", {}))
    adapter = load_adapter(directory, backbone=model)  # refuses other weights (fingerprint) or shapes
    shift = None
    if any(t.kind == "rescale" for t in plan_targets(model, adapter.config)):
        init = plots.read_init(log.parent if log is not None else None)  # kept in the run dir at step 0
        shift = plots.write_shift(model, adapter.tensors, adapter.config, out_dir, title, init)
    else:
        say(f"note: '{task}' rescales no linear layer (method {meta.get('recipe', {}).get('method')}): no shift")
    return {"curves": curves, "shift": shift}
