"""Pictures of a training run: curves per epoch, and how far the adapter moved each backbone layer.

    python -m trainer --task dtd ...      # writes both into the run dir, beside log.jsonl
    python -m trainer report --task dtd   # redraws both for an adapter in the store

`training-curves.png`: loss, accuracy (train, val, and test where measured) and lr per epoch; the
test points are the run's final ones (the loop never evaluates test per epoch: model selection
does not look at it). `adapter-shift.png`: for every rescaled linear (blocks × attn.qkv, attn.proj,
mlp.fc1, mlp.fc2) the relative Frobenius change ‖W' − W‖ / ‖W‖, the change training made,
‖W' − W'₀‖ / ‖W‖ (W'₀: the adapter at step 0, kept in the run dir as adapter-init.safetensors; the
reference init is not the identity, so part of ‖W' − W‖ is there before any step), and the mean
relative change of the top-k singular values, mean_i (σ_i(W') − σ_i(W)) / σ_i(W). W' is folded
with `adapters.rlrr` exactly as the server folds it; the backbone is only read.

Drawing uses matplotlib's Agg canvas (no display, no pyplot state), imported on first use.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters import RLRRConfig, plan_targets
from adapters.inject import base_module
from adapters.rlrr import rescale_weight

__all__ = ["CURVES_NAME", "SHIFT_NAME", "SHIFT_JSON", "INIT_NAME", "TOP_K", "LayerShift", "weight_shift",
           "read_log", "plot_curves", "plot_shift", "draw_curves", "CurveWriter", "draw_shift", "write_shift",
           "save_init", "read_init"]

CURVES_NAME, SHIFT_NAME, SHIFT_JSON = "training-curves.png", "adapter-shift.png", "adapter-shift.json"
INIT_NAME = "adapter-init.safetensors"  # the rescaling vectors at step 0, in the run dir
TOP_K = 8  # singular values compared per layer: the dominant directions the paper's SVD lens looks at


@dataclass(frozen=True)
class LayerShift:
    """How far an adapter moved one frozen linear.

    Attributes:
        path: Module path, e.g. 'blocks.3.attn.qkv'.
        block: Block index.
        layer: Path inside the block, e.g. 'attn.qkv'.
        rel_frobenius: ‖W' − W‖_F / ‖W‖_F.
        sv_change: Mean over the top-k of (σ_i(W') − σ_i(W)) / σ_i(W); signed.
        sv_before: The top-k singular values of W.
        sv_after: The top-k singular values of W'.
        rel_from_init: ‖W' − W'₀‖_F / ‖W‖_F, what training moved (None: the step-0 adapter is unknown).
        rel_init: ‖W'₀ − W‖_F / ‖W‖_F, the shift already there at step 0 (None: unknown).
    """

    path: str
    block: int
    layer: str
    rel_frobenius: float
    sv_change: float
    sv_before: list[float]
    sv_after: list[float]
    rel_from_init: float | None = None
    rel_init: float | None = None


def save_init(run_dir: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Keep the adapter's step-0 rescaling vectors (l, c) in the run dir, for the shift picture.

    Args:
        run_dir: The run's directory.
        tensors: The adapter's tensors before the first step.
    """
    path = Path(run_dir) / INIT_NAME
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items() if k.endswith(("rlrr_l", "rlrr_c"))},
              str(path))
    return path


def read_init(run_dir: str | os.PathLike | None) -> dict[str, torch.Tensor] | None:
    """The step-0 vectors `save_init` kept, or None (no run dir, or a run from before they were kept)."""
    path = None if run_dir is None else Path(run_dir) / INIT_NAME
    return load_file(str(path)) if path is not None and path.is_file() else None


def _top_singular_values(w: torch.Tensor, k: int) -> torch.Tensor:
    w = w.float()
    return torch.linalg.svdvals(w if w.shape[0] >= w.shape[1] else w.T)[:k]  # tall: ~2x faster on CPU


def _fold(w: torch.Tensor, tensors: Mapping[str, torch.Tensor], path: str, config: RLRRConfig) -> torch.Tensor:
    get = lambda tag: tensors[f"{path}.{tag}"].to(w.device)
    return rescale_weight(w, get("rlrr_l") if config.left else None, get("rlrr_c") if config.right else None,
                          config.residual).float()


@torch.no_grad()
def weight_shift(model: nn.Module, tensors: Mapping[str, torch.Tensor], config: RLRRConfig,
                 k: int = TOP_K, init: Mapping[str, torch.Tensor] | None = None) -> list[LayerShift]:
    """Per rescaled linear, how far the adapter moves W (see `LayerShift`); SSF and the head are left out.

    Costs one fold and two SVDs per layer (about 20 s for ViT-B/16 on one CPU thread).

    Args:
        model: The backbone, plain or wrapped by `add_rlrr`; its weights are only read.
        tensors: The adapter's tensors (`adapter_state_dict` / `load_adapter(...).tensors`).
        config: The adapter's configuration.
        k: Singular values compared per layer.
        init: The adapter's step-0 l and c (`read_init`): adds the change from there.
    """
    shifts = []
    for t in plan_targets(model, config):
        if t.kind != "rescale":
            continue
        w = base_module(model.get_submodule(t.path)).weight
        w_new = _fold(w, tensors, t.path, config)
        w = w.float()
        norm = torch.linalg.norm(w)
        from_init = rel_init = None
        if init is not None:
            w_init = _fold(w, init, t.path, config)
            from_init = (torch.linalg.norm(w_new - w_init) / norm).item()
            rel_init = (torch.linalg.norm(w_init - w) / norm).item()
        before, after = _top_singular_values(w, k), _top_singular_values(w_new, k)
        _, block, layer = t.path.split(".", 2)
        shifts.append(LayerShift(
            path=t.path, block=int(block), layer=layer, rel_frobenius=(torch.linalg.norm(w_new - w) / norm).item(),
            sv_change=((after - before) / before).mean().item(), sv_before=before.tolist(),
            sv_after=after.tolist(), rel_from_init=from_init, rel_init=rel_init))
    return shifts


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of a run's log.jsonl, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out: str | os.PathLike) -> Path:
    # Written beside the target and renamed: a web page reading the PNG never sees half a file.
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out


def plot_curves(records: list[dict[str, Any]], out: str | os.PathLike, title: str = "",
                metrics: Mapping[str, Any] | None = None) -> Path:
    """Draw loss, accuracy and lr per epoch into a PNG.

    Args:
        records: log.jsonl records (epoch, train_loss, train_top1, lr; val_* and test_* when present).
        out: The PNG to write.
        title: Figure title (task, method, backbone).
        metrics: The run's final metrics (test_top1, best_val_epoch, test_top1_at_best_val), when done.
    """
    if not records:
        raise ValueError("no epochs logged yet")
    metrics = metrics or {}
    epochs = [r["epoch"] for r in records]
    col = lambda key: [r.get(key, float("nan")) for r in records]  # noqa: E731
    has = lambda key: any(key in r for r in records)  # noqa: E731
    fig = _figure(13, 3.8)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    marker = "o" if len(epochs) <= 30 else None

    ax_loss.plot(epochs, col("train_loss"), marker=marker, ms=3, label="train")
    if has("val_loss"):
        ax_loss.plot(epochs, col("val_loss"), marker=marker, ms=3, label="val")
    ax_loss.set(title="cross-entropy loss", xlabel="epoch", ylabel="loss")

    ax_acc.plot(epochs, col("train_top1"), marker=marker, ms=3, label="train")
    if has("val_top1"):
        ax_acc.plot(epochs, col("val_top1"), marker=marker, ms=3, label="val")
    if has("test_top1"):
        ax_acc.plot(epochs, col("test_top1"), marker=marker, ms=3, label="test")
    if "test_top1" in metrics:
        ax_acc.plot([metrics.get("epochs", epochs[-1])], [metrics["test_top1"]], "*", ms=12, color="C3",
                    label=f"test, last epoch: {metrics['test_top1']:.1f}%")
    if "test_top1_at_best_val" in metrics:
        best = metrics["best_val_epoch"]
        ax_acc.axvline(best, color="0.6", ls="--", lw=1)
        ax_acc.plot([best], [metrics["test_top1_at_best_val"]], "D", ms=7, color="C4",
                    label=f"test at best val (ep. {best}): {metrics['test_top1_at_best_val']:.1f}%")
    ax_acc.set(title="top-1 accuracy", xlabel="epoch", ylabel="accuracy (%)")

    ax_lr.plot(epochs, col("lr"), marker=marker, ms=3, color="C2")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr", yscale="log")

    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        if ax is not ax_lr:
            ax.legend(fontsize=8)
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    fig.suptitle(title or "training curves")
    return _save(fig, out)


def _heatmap(fig: Any, ax: Any, values: list[list[float]], layers: list[str], n_blocks: int,
             cmap: str, vmin: float, vmax: float, title: str, label: str) -> None:
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set(title=title, xlabel="block", ylabel="layer", xticks=range(n_blocks), yticks=range(len(layers)),
           yticklabels=layers)
    fig.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)
    if n_blocks > 16:
        return  # too many cells to label; the colorbar reads them
    span = (vmax - vmin) or 1.0
    reach = max(abs(vmin), abs(vmax))
    fmt = ".0f" if reach >= 10 else ".1f" if reach >= 1 else ".2f"
    for y, row in enumerate(values):
        for x, v in enumerate(row):
            if v != v:  # NaN: a layer this block does not have
                continue
            light = image.cmap((v - vmin) / span)
            dark_cell = 0.299 * light[0] + 0.587 * light[1] + 0.114 * light[2] < 0.5
            ax.text(x, y, f"{v:{fmt}}", ha="center", va="center", fontsize=8, color="w" if dark_cell else "k")


def _grid(shifts: list[LayerShift], layers: list[str], n_blocks: int, field: str) -> list[list[float]]:
    values = [[float("nan")] * n_blocks for _ in layers]  # NaN: a layer this block does not have
    for s in shifts:
        values[layers.index(s.layer)][s.block] = 100.0 * getattr(s, field)
    return values


def plot_shift(shifts: list[LayerShift], out: str | os.PathLike, title: str = "", k: int = TOP_K) -> Path:
    """Draw the per-layer change of the backbone (blocks × layers heatmaps) into a PNG.

    Args:
        shifts: `weight_shift` of the adapter.
        out: The PNG to write.
        title: Figure title (task, method, backbone).
        k: The number of singular values `shifts` compared (for the label).
    """
    if not shifts:
        raise ValueError("the adapter rescales no linear layer (nothing to draw)")
    layers = list(dict.fromkeys(s.layer for s in shifts))
    n_blocks = max(s.block for s in shifts) + 1
    grid = lambda field: _grid(shifts, layers, n_blocks, field)
    learned = shifts[0].rel_from_init is not None
    fig = _figure(max(6.5, 0.55 * n_blocks + 3.0), 1.2 + (2 + learned) * (0.45 * len(layers) + 0.9))
    axes = list(fig.subplots(2 + learned, 1))
    at_start = ""
    if learned:  # the reference init is not the identity: part of ‖W′ − W‖ is there before any step
        share = sum(s.rel_init for s in shifts) / max(sum(s.rel_frobenius for s in shifts), 1e-12)
        at_start = f"\n({100 * share:.0f}% of it already at step 0: the adapter's init is not the identity)"
    top = max(s.rel_frobenius for s in shifts) * 100.0 or 1.0
    _heatmap(fig, axes[0], grid("rel_frobenius"), layers, n_blocks, "viridis", 0.0, top,
             f"change from the frozen weight, ‖W′ − W‖ / ‖W‖{at_start}", "% of ‖W‖")
    if learned:  # its own scale: what training did is usually the smaller part
        top = max(s.rel_from_init for s in shifts) * 100.0 or 1.0
        _heatmap(fig, axes[1], grid("rel_from_init"), layers, n_blocks, "viridis", 0.0, top,
                 "learned: change from the adapter at step 0, ‖W′ − W′₀‖ / ‖W‖", "% of ‖W‖")
    ax_sv = axes[-1]
    reach = max(abs(s.sv_change) for s in shifts) * 100.0 or 1.0
    _heatmap(fig, ax_sv, grid("sv_change"), layers, n_blocks, "RdBu_r", -reach, reach,
             f"change of the top-{k} singular values: mean (σ′ᵢ − σᵢ) / σᵢ", "% (red: larger)")
    fig.suptitle(title or "how far the adapter moved the backbone")
    return _save(fig, out)


def draw_curves(run_dir: str | os.PathLike, title: str = "", metrics: Mapping[str, Any] | None = None,
                log_name: str = "log.jsonl", say: Callable[[str], None] = print) -> Path | None:
    """Redraw `<run_dir>/training-curves.png` from its log; a failure is reported, never raised.

    Training must not die for a picture, so any error becomes one warning line.

    Args:
        run_dir: The run directory holding the log.
        title: Figure title.
        metrics: Final metrics, once the run is done.
        log_name: The log's file name in run_dir.
        say: Where the warning goes.
    """
    run_dir = Path(run_dir)
    try:
        return plot_curves(read_log(run_dir / log_name), run_dir / CURVES_NAME, title, metrics)
    except Exception as e:  # noqa: BLE001 - see docstring
        say(f"warning: could not draw {run_dir / CURVES_NAME}: {e}")
        return None


class CurveWriter:
    """Redraws a running training's curves, at most once every `min_interval_s` unless forced.

    A draw costs 0.3-1 s of CPU, as much as a VTAB-1k epoch of ViT-B on a GPU: every epoch would
    slow such runs by a third. The first call always draws.

    Args:
        run_dir: The run directory holding the log.
        title: Figure title.
        log_name: The log's file name in run_dir.
        say: Where a warning goes.
        min_interval_s: Least seconds between two unforced draws.
    """

    def __init__(self, run_dir: str | os.PathLike, title: str = "", log_name: str = "log.jsonl",
                 say: Callable[[str], None] = print, min_interval_s: float = 30.0) -> None:
        self.run_dir, self.title, self.log_name, self.say = Path(run_dir), title, log_name, say
        self.min_interval_s = min_interval_s
        self._last = -float("inf")

    def update(self, force: bool = False) -> Path | None:
        """Redraw if forced or due; the PNG's path when drawn, else None."""
        if not force and time.monotonic() - self._last < self.min_interval_s:
            return None
        self._last = time.monotonic()
        return draw_curves(self.run_dir, self.title, log_name=self.log_name, say=self.say)


def draw_shift(model: nn.Module, tensors: Mapping[str, torch.Tensor], config: RLRRConfig,
               out_dir: str | os.PathLike, title: str = "", say: Callable[[str], None] = print,
               init: Mapping[str, torch.Tensor] | None = None) -> Path | None:
    """`write_shift`, with a failure reported as one line instead of raised (training must not die for it).

    Args:
        model: The backbone, plain or wrapped (read only).
        tensors: The adapter's tensors.
        config: The adapter's configuration.
        out_dir: Where the PNG and the JSON of the numbers go.
        title: Figure title.
        say: Where a warning goes.
        init: The adapter's step-0 l and c, when known.
    """
    out_dir = Path(out_dir)
    if not any(t.kind == "rescale" for t in plan_targets(model, config)):
        say("note: this adapter rescales no linear layer; no adapter-shift picture")
        return None
    try:
        return write_shift(model, tensors, config, out_dir, title, init)
    except Exception as e:  # noqa: BLE001 - a picture must not lose a finished training run
        say(f"warning: could not draw {out_dir / SHIFT_NAME}: {e}")
        return None


def write_shift(model: nn.Module, tensors: Mapping[str, torch.Tensor], config: RLRRConfig,
                out_dir: str | os.PathLike, title: str = "", init: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Compute `weight_shift`, write its numbers to adapter-shift.json and its picture to adapter-shift.png.

    Args:
        model: The backbone, plain or wrapped (read only).
        tensors: The adapter's tensors.
        config: The adapter's configuration.
        out_dir: Where both files go.
        title: Figure title.
        init: The adapter's step-0 l and c (`read_init`), when known.
    """
    shifts = weight_shift(model, tensors, config, init=init)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SHIFT_JSON).write_text(json.dumps([asdict(s) for s in shifts], indent=1) + "\n")
    return plot_shift(shifts, out_dir / SHIFT_NAME, title)
