"""Why does RLRR trail SSF on some mini-VTAB tasks? A validation-split look at lr and init.

    python bench/mini_vtab_val.py --tasks mnist fashion-mnist      # ~20 min on 2 CPU cores

For each task the 1,000 training images are split 800 / 200 (seeded, per class) into train and
val; every grid point trains on the 800 and is scored on the 200. Per method, the grid point with
the best val accuracy is selected, and only then is its test accuracy read (never selected on
test). Grid: ssf and rlrr over lr {1e-3, 3e-3, 1e-2}; rlrr also with init 'identity' (starts
exactly at the pretrained model) vs 'reference' (the paper's code: l ~ U(-1, 1), c kaiming-uniform,
so W ⊙ (1 + l cᵀ) starts up to ~10% away from W on this 96-wide model).

Writes `<out>/mini_vtab_val.json` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.loop import TrainConfig, train  # noqa: E402
from trainer.mini_vtab import CACHE, TASKS, prepare  # noqa: E402
from trainer.tasks import Task  # noqa: E402

BACKBONE = "vit_pico_patch4_32.cifar5"
GRID: list[tuple[str, float, str]] = [(m, lr, init) for m in ("ssf", "rlrr") for lr in (1e-3, 3e-3, 1e-2)
                                      for init in (("reference", "identity") if m == "rlrr" else ("reference",))]


def holdout(src: Path, dest: Path, n_val: int = 200, seed: int = 0) -> Path:
    """`dest/{train,val,test}` as symlinks: train split per class into train and val (n_val in all)."""
    if (dest / ".done").exists():
        return dest
    rng = random.Random(seed)
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    per_class = n_val // len(classes)
    for cls in classes:
        files = sorted((src / "train" / cls).iterdir())
        rng.shuffle(files)
        for split, chunk in (("val", files[:per_class]), ("train", files[per_class:])):
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


def run(task: str, method: str, lr: float, init: str, args: argparse.Namespace) -> dict[str, Any]:
    name = f"{task}-{method}-lr{lr:g}-{init}"
    run_dir = args.out / "runs" / name
    if (run_dir / "result.json").exists():
        return json.loads((run_dir / "result.json").read_text())
    recipe = Task(name=task, lr=lr, weight_decay=5e-5, drop_path=0.1, hflip=False, epochs=args.epochs,
                  warmup_epochs=max(1, args.epochs // 10), batch_size=64, format="imagefolder", suite="mini-vtab")
    overrides = {"init": init} if method == "rlrr" else {}  # SSF's init is fixed: N(1, .02) / N(0, .02)
    cfg = TrainConfig(task=recipe, data_root=str(args.out / "data" / task), format="imagefolder", backbone=BACKBONE,
                      method=method, rlrr_overrides=overrides, epochs=args.epochs, lr=lr, weight_decay=5e-5,
                      batch_size=64, warmup_epochs=recipe.warmup_epochs, drop_path=0.1, seed=args.seed,
                      workers=args.workers, store=str(args.out / "store" / name), run_dir=str(run_dir),
                      overwrite=True)
    train(cfg)
    return json.loads((run_dir / "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", choices=sorted(TASKS), default=["mnist", "fashion-mnist"])
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "mini_vtab_val")
    args = ap.parse_args(argv)
    data = prepare(CACHE / "mini_vtab", args.tasks)
    rows = []
    for task in args.tasks:
        holdout(data / task, args.out / "data" / task, seed=args.seed)
        for method, lr, init in GRID:
            m = run(task, method, lr, init, args)["metrics"]
            rows.append({"task": task, "method": method, "lr": lr, "init": init, "val_top1": m["val_top1"],
                         "test_top1": m["test_top1"]})
            print(f"[val] {task:14s} {method:5s} lr {lr:<6g} {init:9s} val {m['val_top1']:5.1f} "
                  f"test {m['test_top1']:5.1f}", flush=True)
    print("\n| task | method | lr | init | val top-1 | test top-1 | selected on val |\n|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for method in ("ssf", "rlrr"):
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            best = max(mine, key=lambda r: r["val_top1"])
            for r in mine:
                print(f"| {task} | {method} | {r['lr']:g} | {r['init']} | {r['val_top1']:.1f} | {r['test_top1']:.1f} "
                      f"| {'**yes**' if r is best else ''} |")
    (args.out / "mini_vtab_val.json").write_text(json.dumps({"epochs": args.epochs, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
