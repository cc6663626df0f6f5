"""python -m trainer sweep: a learning-rate x weight-decay grid as Ray Tune trials, selected on validation.

    python -m trainer sweep --task dtd --data-root /data/vtab-1k --val --grid lr=1e-3,3e-3,1e-2,wd=1e-4,1e-3
    python -m trainer sweep --task ants --data-root data/hymenoptera --grid lr=1e-3,1e-2 wd=0,1e-4 \\
        --backbone test_vit --checkpoint test_vit.safetensors --img-size 32 --epochs 5 --cpus-per-trial 1
    python -m trainer sweep --address auto ...          # on a running Ray cluster: one GPU per trial

The paper picks lr and weight decay per task by grid search. Each grid point is a Ray Tune trial (one
GPU each where there are GPUs, else `--cpus-per-trial` CPUs) that runs the ordinary `train()` into
its own store and run folder under the sweep folder. The winner is the trial with the highest
last-epoch validation top-1 (the epoch whose adapter is stored); test accuracy is never looked at.
Its adapter is written to the real store atomically, with the whole grid in its metadata
(`metadata["sweep"]`). A task without a validation split is refused: ImageFolder data needs val/,
VTAB-1k and FGVC need --val (train on train800/train, validate on val200/val).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from adapters import AdapterError, load_adapter, save_adapter

from .config import TrainConfig, add_train_arguments, config_from_args
from .errors import ConfigError, StoreError, TrainerError

# Grid keys on the command line -> TrainConfig fields.
GRID_KEYS = {"lr": "lr", "wd": "weight_decay", "weight_decay": "weight_decay", "drop_path": "drop_path"}
METRIC = "val_top1"  # last-epoch validation accuracy: the epoch whose adapter train() stores
# val_loss (last epoch) breaks ties in val_top1, which small validation sets make common.
GRID_COLUMNS = ("val_top1", "val_loss", "best_val_top1", "best_val_epoch", "train_seconds")


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    """`["lr=1e-3,3e-3,wd=0,1e-4"]` or `["lr=1e-3,3e-3", "wd=0,1e-4"]` -> {"lr": [...], "weight_decay": [...]}.

    Args:
        items: The --grid words; a token with `=` starts a key, the tokens after it are its values.
    """
    grid: dict[str, list[float]] = {}
    key = None
    for token in ",".join(items).split(","):
        token = token.strip()
        if "=" in token:
            name, token = (s.strip() for s in token.split("=", 1))
            if name not in GRID_KEYS:
                raise ConfigError(f"--grid: unknown key {name!r}; use {', '.join(GRID_KEYS)}")
            key = GRID_KEYS[name]
            if key in grid:
                raise ConfigError(f"--grid: {name!r} given twice")
            grid[key] = []
        if not token:
            continue
        if key is None:
            raise ConfigError(f"--grid: value {token!r} before any key=")
        try:
            grid[key].append(float(token))
        except ValueError:
            raise ConfigError(f"--grid: {token!r} is not a number") from None
    empty = [k for k, v in grid.items() if not v]
    if not grid or empty:
        raise ConfigError(f"--grid needs values, e.g. lr=1e-3,3e-3,wd=1e-4,1e-3 (empty: {empty or 'all'})")
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer sweep",
                                description="Grid-search hyper-parameters as Ray Tune trials; keep the best on val.")
    add_train_arguments(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help=f"values to try, e.g. lr=1e-3,3e-3,wd=1e-4,1e-3 (keys: {', '.join(GRID_KEYS)})")
    g.add_argument("--gpus-per-trial", type=float, help="default: 1 where CUDA is available, else 0")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial")
    g.add_argument("--address", help="Ray cluster to join ('auto': the local one); default: start Ray here")
    return p


def grid_configs(base: TrainConfig, grid: dict[str, list[float]]) -> list[dict[str, float]]:
    """Every grid point, each checked as a TrainConfig now (not in a trial an hour later).

    Args:
        base: The TrainConfig the points override.
        grid: Field -> values.
    """
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    for point in points:
        dataclasses.replace(base, **point)  # __post_init__ validates
    return points


def _absolute(cfg: TrainConfig, root: Path) -> TrainConfig:
    # Trials run in their own working directories (and maybe on other nodes sharing these paths).
    def resolve(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    return dataclasses.replace(cfg, data_root=resolve(cfg.data_root), checkpoint=resolve(cfg.checkpoint),
                               store=str(root / "unused-store"), run_dir=None, resume=False, stop_after=None)


def _trial(point: dict[str, float], base: TrainConfig, root: Path) -> dict[str, Any]:
    """One Ray Tune trial: train the grid point into its own store and run folder; report val metrics.

    Args:
        point: TrainConfig overrides of this trial.
        base: The sweep's TrainConfig.
        root: The sweep folder.
    """
    from ray import tune

    from .loop import train

    name = "trial-" + "-".join(f"{k}{v:g}" for k, v in point.items())
    cfg = dataclasses.replace(base, **point, store=str(root / name / "store"), run_dir=str(root / name / "run"),
                              overwrite=True)
    result = train(cfg)
    last_epoch = json.loads((result.run_dir / "log.jsonl").read_text().splitlines()[-1])
    timing = json.loads((result.run_dir / "result.json").read_text())["timing"]
    metrics = {**{k: result.metrics.get(k) for k in ("val_top1", "best_val_top1", "best_val_epoch")},
               "val_loss": last_epoch.get("val_loss"), "train_seconds": timing["train_seconds"]}
    report = {**metrics, "adapter_dir": str(result.adapter_dir)}
    tune.report(report)
    return report


def run_grid(base: TrainConfig, points: list[dict[str, float]], root: Path, resources: dict[str, float]) -> list[dict]:
    """Run the trials on Ray Tune; one row per grid point: its values, val metrics, adapter folder.

    Args:
        base: The sweep's TrainConfig (absolute paths).
        points: Grid points.
        root: The sweep folder (trial folders and Tune's results go here).
        resources: Ray resources of one trial, e.g. {"cpu": 1, "gpu": 1}.
    """
    from ray import tune

    def trainable(config: dict[str, Any]) -> None:
        _trial(config["point"], base, root)

    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max"),
        run_config=tune.RunConfig(name="tune", storage_path=str(root), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    rows = []
    for result in tuner.fit():
        row: dict[str, Any] = {**result.config["point"]}
        if result.error is not None:
            row.update(status="error", error=str(result.error).strip().splitlines()[-1][:300])
        else:
            row.update({k: result.metrics.get(k) for k in (*GRID_COLUMNS, "adapter_dir")}, status="ok")
        rows.append(row)
    return sorted(rows, key=lambda r: points.index({k: r[k] for k in points[0]}))  # grid order


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The finished trial with the highest validation top-1 (ties: lower validation loss, then grid order).

    Args:
        rows: `run_grid` rows.
    """
    done = [r for r in rows if r["status"] == "ok" and r.get(METRIC) is not None and not math.isnan(r[METRIC])]
    if not done:
        raise TrainerError("every trial failed: " + "; ".join(r.get("error", "?") for r in rows))
    loss = [r["val_loss"] if r.get("val_loss") is not None else math.inf for r in done]
    return done[max(range(len(done)), key=lambda i: (done[i][METRIC], -loss[i]))]  # max keeps the first tie


def publish(rows: list[dict[str, Any]], best: dict[str, Any], store_dir: Path, keys: list[str]) -> Path:
    """Write the winning trial's adapter into the store (atomically), the grid in its metadata.

    Args:
        rows: Every trial's row.
        best: The winner.
        store_dir: `<store>/<task>`.
        keys: The grid's TrainConfig fields.
    """
    adapter = load_adapter(best["adapter_dir"])
    grid = [{k: v for k, v in r.items() if k != "adapter_dir"} for r in rows]
    sweep = {"selected_on": METRIC, "never_on": "test", "keys": keys,
             "best": {k: best[k] for k in keys}, "grid": grid}
    return save_adapter(adapter.tensors, store_dir, base_model=adapter.base_model, config=adapter.config,
                        fingerprint=adapter.fingerprint, num_classes=adapter.num_classes, labels=adapter.labels,
                        data_config=adapter.data_config, metadata={**adapter.metadata, "sweep": sweep},
                        backbone_spec=adapter.backbone_spec)


def format_table(rows: list[dict[str, Any]], keys: list[str], best: dict[str, Any] | None = None) -> str:
    """The grid as a fixed-width text table, the winner marked with `*`.

    Args:
        rows: `run_grid` rows.
        keys: The grid's TrainConfig fields.
        best: The winning row, if any.
    """
    head = [*keys, *GRID_COLUMNS, "status"]
    lines = ["  " + " ".join(f"{h:>14}" for h in head)]
    for r in rows:
        cells = [_cell(r.get(c)) for c in (*keys, *GRID_COLUMNS)] + [f"{r['status']:>14}"]
        lines.append(("* " if r is best else "  ") + " ".join(cells))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{'-':>14}" if value is None else f"{value:>14.4g}"


def _has_val(cfg: TrainConfig) -> bool:
    from .data import load_task_data

    return bool(load_task_data(cfg.task, cfg.data_root, cfg.format, cfg.holdout_val).splits.get("val"))


def sweep(args: argparse.Namespace) -> Path:
    """Check everything, run the grid, publish the winner; returns the adapter folder.

    Args:
        args: Parsed `build_parser` options.
    """
    import ray
    import torch

    if args.resume or args.stop_after:
        raise ConfigError("sweep trials always run to the end: --resume/--stop-after do not apply")
    base = config_from_args(args)
    if base.method == "full":
        raise ConfigError("sweep writes an adapter to the store; --method full has none")
    store_dir = Path(base.store) / base.task.name
    if store_dir.exists() and not base.overwrite:
        raise StoreError(f"{store_dir} already exists; pass --overwrite to replace it with the sweep's best")
    if not _has_val(base):
        raise ConfigError(f"task '{base.task.name}' has no validation split, and a sweep selects on validation "
                          "(never on test): give ImageFolder data a val/ folder, or pass --val for VTAB/FGVC")
    grid = parse_grid(args.grid)
    points = grid_configs(base, grid)
    root = Path(args.run_dir or Path("runs") / f"{base.task.name}-{base.method}-sweep").resolve()
    root.mkdir(parents=True, exist_ok=True)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else float(torch.cuda.is_available())
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, include_dashboard=False)
    try:
        rows = run_grid(_absolute(base, root), points, root, {"cpu": args.cpus_per_trial, "gpu": gpus})
    finally:
        if started:
            ray.shutdown()
    best = best_row(rows)
    print(f"sweep of {base.task.name} ({len(rows)} trials, selected on {METRIC}, never on test):")
    print(format_table(rows, list(grid), best))
    out = publish(rows, best, store_dir, list(grid))
    (root / "sweep.json").write_text(json.dumps({"best": {k: best[k] for k in grid}, "grid": rows}, indent=2) + "\n")
    chosen = ", ".join(f"{k}={best[k]:g}" for k in grid)
    print(f"best: {chosen} ({METRIC} {best[METRIC]:.2f}); adapter written to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run `sweep`; returns the process exit status.

    Args:
        argv: Arguments after `sweep` (default: sys.argv[1:]).
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sweep(args)
    except (TrainerError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: sweeps run on Ray Tune ({e}); install it with pip install -e '.[ray]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
