"""RLRR vs SSF (and any other trainer method: linear, lora, bitfit, ia3, full) on mini-VTAB, lr selected on val.

    python bench/mini_vtab_val.py                                  # 8 tasks x 2 methods x 3 lr, 2-3 min a run
    python bench/mini_vtab_val.py --tasks mnist --inits reference identity --lrs 1e-3 3e-3 1e-2
    python bench/mini_vtab_val.py --methods lora bitfit          # LoRA (r = 8, alpha 16) and BitFit rows
    python bench/mini_vtab_val.py --refit --export-store demo/store   # + retrain the selected lr on all 1,000
    python bench/mini_vtab_val.py --backbone vit_hybrid_efflite0_128.distilled --train-cap 400 --test-cap 300 \
        --cache-only                                               # the hybrid's stem features, once per image

For each task the 1,000 training images are split 800 / 200 (seeded, per class) into train and
val; every grid point trains on the 800 and is scored on the 200 (last epoch; ants-bees,
243 images, splits 20% per class the same way). Per method, the grid
point with the best val accuracy (ties: the lower val loss) is selected, and only then is its
test accuracy read. Default grid: ssf and rlrr over lr {1e-2, 3e-2, 1e-1}, run in that order (see
LRS). rlrr's init: 'reference' (the paper's code: c ~ U(±√(6/in)), l ~ U(±√6), so W ⊙ (1 + l cᵀ)
does not start at W) and/or 'identity' (starts exactly at W).

`--refit` then retrains each method once more on all 1,000 training images (train + val) with its
selected lr and reads that run's test: the paper's protocol (select on val, refit on train + val).
`--export-store DIR` copies the selected rlrr adapters into DIR (the demo store): the refit ones
with `--refit`, else the val-selected grid runs themselves.

Every finished run is appended to `<out>/mini_vtab_val.jsonl` at once, so an interrupted run keeps
what it finished (finished runs are also reused from their result.json; `--fresh` retrains).
Writes `<out>/mini_vtab_val.json` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trainer.config import METHODS as ALL_METHODS  # noqa: E402
from trainer.loop import TrainConfig, train  # noqa: E402
from trainer.mini_vtab import CACHE, TASKS, prepare  # noqa: E402
from trainer.tasks import Task  # noqa: E402

BACKBONE = "vit_pico_patch4_32.cifar5"  # --backbone; the served default is vit_hybrid_efflite0_128.distilled
METHODS = ("ssf", "rlrr")  # the default pair; --methods takes any of the trainer's (ALL_METHODS)
# {1e-3, 3e-3, 1e-2} selected its top for both methods (2026-11-25); so did {1e-2, 3e-2} on most tasks
# (2026-11-30), while 3e-3 never won. See bench/README.md.
LRS = (1e-2, 3e-2, 1e-1)


def parse_method_lrs(items: list[str]) -> dict[str, list[float]]:
    """`METHOD=LR,LR` items (e.g. `full=3e-4,1e-3`) -> {method: grid}; a method not named uses --lrs.

    Why: one grid cannot suit every method. Full fine-tuning at an adapter's lr (1e-2) wrecks the
    backbone in a few steps, and LoRA's B A product wants a smaller step than a rescaling vector.
    """
    out: dict[str, list[float]] = {}
    for item in items:
        method, sep, lrs = item.partition("=")
        if not sep or method not in ALL_METHODS or not lrs:
            raise SystemExit(f"--method-lrs wants METHOD=LR[,LR...] with a trainer method, got {item!r}")
        out[method] = [float(x) for x in lrs.split(",")]
    return out


def selections(path: Path, tasks: list[str], methods: list[str]) -> dict[str, list[tuple[str, float, str]]]:
    """Per task, the (method, lr, init) that another run's grid selected on val (its mini_vtab_val.json).

    For a second seed at the first seed's selection: it measures how far test accuracy moves with the
    seed (data subset, split, init, order) at a fixed lr, at a fraction of a full grid's cost.
    """
    rows = json.loads(path.read_text())["rows"]
    out: dict[str, list[tuple[str, float, str]]] = {}
    for task in tasks:
        out[task] = []
        for method in methods:
            best = select(rows, task, method)
            if best is None:
                raise SystemExit(f"{path} has no {method} run of {task} to take the lr from")
            out[task].append((method, best["lr"], best["init"]))
    return out


def grid(methods: list[str], lrs: list[float], inits: list[str],
         method_lrs: dict[str, list[float]] | None = None) -> list[tuple[str, float, str]]:
    """(method, lr, init) points in run order: lr outermost, in the order given, so that an interrupted
    run has compared the methods at the lrs listed first. Only rlrr has an init choice (SSF's is
    fixed: N(1, .02) / N(0, .02)). `method_lrs` replaces `lrs` for the methods it names (the i-th lr
    of each method's grid runs in the i-th round)."""
    per = {m: (method_lrs or {}).get(m, lrs) for m in methods}
    return [(m, per[m][i], init) for i in range(max(len(v) for v in per.values())) for m in methods
            if i < len(per[m]) for init in (inits if m == "rlrr" else ["reference"])]


def _link_all(files: list[Path], dest: Path) -> None:
    for f in files:
        link = dest / f.parent.name / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(f.resolve(), link)


def capped(src: Path, dest: Path, train_cap: int | None, test_cap: int | None, seed: int = 0) -> Path:
    """`src` itself, or `dest/{train,test}` as symlinks to a class-balanced seeded subset of each split.

    The hybrid backbone's stem costs ~0.25 s per image on this 2-core machine: a cap keeps a whole
    table inside the time there is (the cap is stated beside every number it produced).

    Args:
        src: A prepared task.
        dest: Where the subset goes (reused once complete).
        train_cap: Images kept of the train split (None: all), split evenly over the classes.
        test_cap: The same for the test split.
        seed: Subset seed.
    """
    if train_cap is None and test_cap is None:
        return src
    if (dest / ".done").exists():
        return dest
    rng = random.Random(seed)
    for split, cap in (("train", train_cap), ("test", test_cap)):
        classes = sorted(p for p in (src / split).iterdir() if p.is_dir())
        for cls in classes:
            files = sorted(cls.iterdir())
            rng.shuffle(files)
            _link_all(sorted(files[:cap // len(classes)] if cap else files), dest / split)
    (dest / ".done").touch()
    return dest


def holdout(src: Path, dest: Path, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """`dest/{train,val,test}` as symlinks: each class's train images split (1 - f) / f into train and val.

    Args:
        src: A prepared task (`train/`, `test/`).
        dest: Where the symlinked split goes (reused once complete).
        val_fraction: Share of each class held out: 0.2 gives 800 / 200 on the 1,000-image tasks
            and ~195 / 48 on ants-bees (243 images; a fixed 200 would leave it 43 to train on).
        seed: Shuffle seed.
    """
    if (dest / ".done").exists():
        return dest
    rng = random.Random(seed)
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    for cls in classes:
        files = sorted((src / "train" / cls).iterdir())
        rng.shuffle(files)
        n_val = round(len(files) * val_fraction)
        for split, chunk in (("val", files[:n_val]), ("train", files[n_val:])):
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                link = dest / split / cls / f.name
                if not link.exists():
                    os.symlink(f.resolve(), link)
    for f in sorted((src / "test").rglob("*.png")):
        link = dest / "test" / f.parent.name / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(f.resolve(), link)
    (dest / ".done").touch()
    return dest


def run(task: str, method: str, lr: float, init: str, args: argparse.Namespace,
        refit: bool = False) -> dict[str, Any] | None:
    """Train one point (or, with `refit`, the selected point on all 1,000 training images); its result.json.

    Args:
        task: mini-VTAB task.
        method: 'ssf' or 'rlrr'.
        lr: Peak learning rate.
        init: rlrr's init policy.
        args: Parsed command line (epochs, seed, workers, out, fresh).
        refit: Train on the task's full train split (no val) instead of the 800 of the holdout.

    Returns:
        result.json plus `reused` and `last_epoch`; None under --report-only when the run has no result.
    """
    name = f"{task}-{method}-lr{lr:g}-{init}" + ("-refit" if refit else "")
    run_dir = args.out / "runs" / name
    if (run_dir / "result.json").exists() and not args.fresh:
        meta = json.loads((run_dir / "result.json").read_text())
        if meta["recipe"]["epochs"] == args.epochs:
            return {**meta, "reused": True, "last_epoch": _last_epoch(run_dir)}
    if args.report_only:
        return None
    recipe = Task(name=task, lr=lr, weight_decay=5e-5, drop_path=0.1, hflip=False, epochs=args.epochs,
                  warmup_epochs=max(1, args.epochs // 10), batch_size=64, format="imagefolder", suite="mini-vtab")
    overrides = {"init": init} if method == "rlrr" else {}  # SSF's init is fixed: N(1, .02) / N(0, .02)
    data_root = args.out / "capped" / task if refit and args.train_cap else args.data / task if refit \
        else args.out / "data" / task
    store = args.out / "store" / (f"refit-{method}" if refit else name)  # train() adds /<task>
    cfg = TrainConfig(task=recipe, data_root=str(data_root), format="imagefolder", backbone=args.backbone,
                      method=method, rlrr_overrides=overrides, epochs=args.epochs, lr=lr, weight_decay=5e-5,
                      batch_size=64, warmup_epochs=recipe.warmup_epochs, drop_path=0.1, seed=args.seed,
                      workers=args.workers, store=str(store), run_dir=str(run_dir), overwrite=True)
    train(cfg)
    return {**json.loads((run_dir / "result.json").read_text()), "reused": False, "last_epoch": _last_epoch(run_dir)}


def fill_stem_cache(src: Path, backbone: str) -> None:
    """Run every image of a (capped) task through the backbone's frozen stem once, as training would."""
    import timm

    from trainer.data import ImageDataset, build_transform, load_task_data, task_data_config
    from trainer.stem_cache import CachedStemDataset, frozen_stem

    model = timm.create_model(backbone, pretrained=False)  # the stem is the same either way
    stem = frozen_stem(model)
    if stem is None:
        return
    recipe = Task(name=src.name, format="imagefolder", suite="mini-vtab")
    data = load_task_data(recipe, src, "imagefolder", False)
    tf = build_transform(task_data_config(recipe, model), train=False)
    for split in ("train", "test"):
        t0 = time.time()
        ds = CachedStemDataset(ImageDataset(data.splits[split], tf), stem)
        print(f"stem cache: {src.name}/{split} {len(ds)} images in {time.time() - t0:.0f}s", flush=True)


def _last_epoch(run_dir: Path) -> dict[str, Any]:
    """The run's last per-epoch record (train/val loss and accuracy) from its log.jsonl."""
    return json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])


def _row(task: str, method: str, lr: float, init: str, meta: dict[str, Any], phase: str) -> dict[str, Any]:
    m = meta["metrics"]
    return {"phase": phase, "task": task, "method": method, "lr": lr, "init": init, "val_top1": m.get("val_top1"),
            "val_loss": meta["last_epoch"].get("val_loss"),
            "test_top1": m["test_top1"], "train_seconds": meta["timing"]["train_seconds"],
            "trainable_params": meta["trainable_params"]}


def select(rows: list[dict[str, Any]], task: str, method: str) -> dict[str, Any] | None:
    """The grid row with the best val accuracy, ties broken by the lower val loss; None if none ran.

    Ties are common on small val splits (ants-bees: 48 images, 2.1 points each); the loss is still val.
    """
    mine = [r for r in rows if r["phase"] == "grid" and r["task"] == task and r["method"] == method]
    return max(mine, key=lambda r: (r["val_top1"], -r["val_loss"])) if mine else None


def tables(rows: list[dict[str, Any]], tasks: list[str], methods: list[str], n_points: dict[str, int]) -> str:
    """Markdown: one line per task with each method's selected lr, val and test; then every grid point.

    Args:
        rows: Grid (and refit) rows.
        tasks: Task order.
        methods: Method order.
        n_points: Grid points per method; a task with fewer is marked as selected on a partial grid.
    """
    head = ["task", *(f"{m} {k}" for m in methods for k in ("lr", "val", "test", "refit test")), "grid"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sums: dict[str, list[float]] = {m: [] for m in methods}
    for task in tasks:
        cells, partial = [], []
        for method in methods:
            best = select(rows, task, method)
            n = sum(r["phase"] == "grid" and r["task"] == task and r["method"] == method for r in rows)
            if n < n_points[method]:
                partial.append(f"{method} {n}/{n_points[method]}")
            refit = next((r for r in rows if r["phase"] == "refit" and r["task"] == task and r["method"] == method),
                         None)
            if best is None:
                cells += ["-"] * 4
                continue
            sums[method].append(best["test_top1"])
            cells += [f"{best['lr']:g}", f"{best['val_top1']:.1f}", f"{best['test_top1']:.1f}",
                      f"{refit['test_top1']:.1f}" if refit else "-"]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {', '.join(partial) or 'full'} |")
    if all(len(v) == len(tasks) for v in sums.values()):
        mean = [x for m in methods for x in ("", "", f"{sum(sums[m]) / len(tasks):.1f}", "")]
        lines.append("| mean | " + " | ".join(mean) + " | |")
    lines += ["", "| task | method | lr | init | val top-1 | val loss | test top-1 | selected on val |",
              "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for method in methods:
            best = select(rows, task, method)
            for r in sorted((r for r in rows if r["phase"] == "grid" and r["task"] == task and r["method"] == method),
                            key=lambda r: (r["lr"], r["init"])):
                lines.append(f"| {task} | {method} | {r['lr']:g} | {r['init']} | {r['val_top1']:.1f} "
                             f"| {r['val_loss']:.3f} | {r['test_top1']:.1f} | {'**yes**' if r is best else ''} |")
    return "\n".join(lines)


def combine(paths: list[Path], methods: list[str], tasks: list[str]) -> str:
    """Markdown: each method's val-selected test accuracy per task, the mean over runs (seeds) and their spread.

    Args:
        paths: mini_vtab_val.json of runs with different seeds (a full grid, or `--selected-from` the first).
        methods: Method order.
        tasks: Task order.
    """
    runs = [json.loads(p.read_text()) for p in paths]
    seeds = [r["seed"] for r in runs]
    head = ["method", *tasks, "mean", f"mean per seed ({', '.join(map(str, seeds))})"]
    lines = [f"Test top-1 at the lr selected on val, mean over seeds {seeds} (± half the range where both ran).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells, per_seed = [], [[] for _ in runs]
        for task in tasks:
            got = [b["test_top1"] for b in (select(r["rows"], task, method) for r in runs) if b is not None]
            for i, r in enumerate(runs):
                b = select(r["rows"], task, method)
                if b is not None:
                    per_seed[i].append(b["test_top1"])
            cells.append(f"{sum(got) / len(got):.1f}" + (f" ± {(max(got) - min(got)) / 2:.1f}" if len(got) > 1 else "")
                         if got else "-")
        means = [sum(v) / len(v) for v in per_seed if len(v) == len(tasks)]
        total = f"{sum(means) / len(means):.1f}" if means else "-"
        seeds_cell = " / ".join(f"{m:.1f}" for m in means)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {total} | {seeds_cell} |")
    return "\n".join(lines)


def _drop_run_paths(config: Path) -> None:
    # metadata["training"] names this machine's run folder (curves, log): meaningless in a shipped
    # store, and `trainer report` would draw another machine's files if the same path existed there.
    doc = json.loads(config.read_text())
    doc.get("metadata", {}).pop("training", None)
    config.write_text(json.dumps(doc, indent=2) + "\n")  # inside export's temporary copy: swapped in whole


def export(adapters: dict[str, Path], dest: Path) -> None:
    """Copy each task's adapter folder to `dest/<task>`, one whole-directory swap each (as save_adapter does)."""
    dest.mkdir(parents=True, exist_ok=True)
    for task, src in adapters.items():
        tmp = dest / f".{task}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        _drop_run_paths(tmp / "adapter_config.json")
        shutil.rmtree(dest / task, ignore_errors=True)
        tmp.rename(dest / task)
        print(f"exported {src} -> {dest / task}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", choices=sorted(TASKS), default=list(TASKS), help="in run order")
    ap.add_argument("--methods", nargs="*", choices=ALL_METHODS, default=list(METHODS))
    ap.add_argument("--lrs", nargs="*", type=float, default=list(LRS), help="grid, in run order")
    ap.add_argument("--method-lrs", nargs="*", default=[], metavar="METHOD=LR,LR",
                    help="a method's own grid instead of --lrs, e.g. full=3e-4,1e-3 lora=3e-3,1e-2")
    ap.add_argument("--selected-from", type=Path, metavar="JSON",
                    help="train only the lr each task and method selected in another run (its mini_vtab_val.json)")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                    help="train nothing: the table over runs of several seeds (their mini_vtab_val.json)")
    ap.add_argument("--inits", nargs="*", choices=("reference", "identity"), default=["reference"],
                    help="rlrr init policies to grid over")
    ap.add_argument("--backbone", default=BACKBONE, help="timm name of the frozen backbone")
    ap.add_argument("--train-cap", type=int, help="train on a class-balanced subset of this many images")
    ap.add_argument("--test-cap", type=int, help="test on a class-balanced subset of this many images")
    ap.add_argument("--cache-only", action="store_true",
                    help="only fill the hybrid backbone's stem-feature cache for the tasks' images")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="loader processes (0: load in the training thread)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: the machine is shared; 0 keeps torch's default)")
    ap.add_argument("--refit", action="store_true", help="retrain each selected lr on all 1,000 images")
    ap.add_argument("--export-store", type=Path,
                    help="copy the selected rlrr adapters here: the refit ones with --refit, else the val-selected "
                         "grid run's (trained on the 800)")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already have a result.json")
    ap.add_argument("--report-only", action="store_true", help="train nothing: the table of the runs already done")
    ap.add_argument("--data", type=Path, default=CACHE / "mini_vtab")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "mini_vtab_val")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Grid (and refits) on the val split, the table, and the export of the selected adapters."""
    args = parse_args(argv)
    if args.combine:
        print(combine(args.combine, args.methods, args.tasks))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.data, args.tasks)
    jsonl = args.out / "mini_vtab_val.jsonl"
    t0 = time.time()
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], trained: bool) -> None:
        rows.append(row)
        if trained:  # one line per run trained, at once: partial results survive; reused runs are there already
            with open(jsonl, "a") as f:
                f.write(json.dumps({**row, "epochs": args.epochs, "seed": args.seed}) + "\n")
        print(f"[val] {row['phase']:5s} {row['task']:14s} {row['method']:5s} lr {row['lr']:<6g} {row['init']:9s} "
              f"val {row['val_top1'] if row['val_top1'] is not None else float('nan'):5.1f} "
              f"test {row['test_top1']:5.1f}  ({time.time() - t0:.0f}s so far)", flush=True)

    points = grid(args.methods, args.lrs, args.inits, parse_method_lrs(args.method_lrs))
    n_points = {m: sum(p[0] == m for p in points) for m in args.methods}
    chosen = selections(args.selected_from, args.tasks, args.methods) if args.selected_from else None
    if chosen is not None:
        n_points = dict.fromkeys(args.methods, 1)
    for task in args.tasks:
        src = capped(data / task, args.out / "capped" / task, args.train_cap, args.test_cap, args.seed)
        holdout(src, args.out / "data" / task, seed=args.seed)
        if args.cache_only:
            fill_stem_cache(src, args.backbone)
            continue
        for method, lr, init in (chosen[task] if chosen is not None else points):
            meta = run(task, method, lr, init, args)
            if meta is not None:
                record(_row(task, method, lr, init, meta, "grid"), not meta["reused"])
    if args.refit:
        # After the whole grid, so every task has its selection before any refit spends time.
        for method in sorted(args.methods, key=lambda m: m != "rlrr"):  # rlrr first: the demo store needs it
            for task in args.tasks:
                best = select(rows, task, method)
                if best is None or len([r for r in rows if r["phase"] == "grid" and r["task"] == task
                                        and r["method"] == method]) < n_points[method]:
                    continue  # refit only a selection made on the whole grid
                meta = run(task, method, best["lr"], best["init"], args, refit=True)
                if meta is not None:
                    record(_row(task, method, best["lr"], best["init"], meta, "refit"), not meta["reused"])
            if method == "rlrr" and args.export_store:  # before ssf's refits
                export({t: args.out / "store" / "refit-rlrr" / t for t in args.tasks}, args.export_store)
    elif args.export_store:
        chosen = {t: select(rows, t, "rlrr") for t in args.tasks}
        export({t: args.out / "store" / f"{t}-rlrr-lr{b['lr']:g}-{b['init']}" / t for t, b in chosen.items() if b},
               args.export_store)

    md = tables(rows, args.tasks, args.methods, n_points)
    print("\n" + md)
    (args.out / "mini_vtab_val.md").write_text(md + "\n")
    (args.out / "mini_vtab_val.json").write_text(json.dumps({"epochs": args.epochs, "seed": args.seed, "lrs": args.lrs,
                                                             "method_lrs": args.method_lrs,
                                                             "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
