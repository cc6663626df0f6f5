"""mini-VTAB-1k: the paper's Table 2 in miniature, on the in-house backbone, on CPU.

    python -m trainer prepare                     # build the eight tasks into .cache/mini_vtab (~15 s)
    python bench/mini_vtab.py                     # 8 tasks x 5 runs, ~35 min on 2 CPU cores
    python bench/mini_vtab.py --quick             # 2 epochs each: a smoke run of the whole pipeline
    python bench/mini_vtab.py --export-store adapters/store   # also copy the rlrr adapters there

Every task trains with `linear`, `ssf`, `rlrr` and `full` on `vit_pico_patch4_32.cifar5` (pretrained
in-house on 5 CIFAR-10 classes), plus `rlrr` on a randomly initialised backbone of the same shape
as a control (does the adapter reuse pretrained features, or just train a small network?). Runs go
through `trainer.loop.train`, the same loop as `python -m trainer`; one fixed recipe per method
(METHOD_LR below), no selection on test. Finished runs are reused (their result.json), so an
interrupted benchmark continues where it stopped; `--fresh` retrains everything.

Writes `<out>/mini_vtab.json`, `<out>/mini_vtab.png` and `<out>/mini_vtab.md` (the table).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402

from trainer.loop import TrainConfig, train  # noqa: E402
from trainer.mini_vtab import CACHE, GROUPS, TASKS, prepare  # noqa: E402
from trainer.tasks import Task  # noqa: E402

BACKBONE = "vit_pico_patch4_32.cifar5"
# Peak lr per method (AdamW, bs 64). Adapters sit in the middle of the paper's VTAB range
# (1e-3 .. 1e-2); linear probing tolerates more; full fine-tuning of all 0.7M weights needs less.
METHOD_LR = {"linear": 1e-2, "ssf": 5e-3, "rlrr": 5e-3, "full": 5e-4}
RUNS = (("linear", "pretrained"), ("ssf", "pretrained"), ("rlrr", "pretrained"), ("full", "pretrained"),
        ("rlrr", "random"))


def run_name(method: str, backbone: str) -> str:
    return method if backbone == "pretrained" else f"{method}-{backbone}"


def random_checkpoint(out: Path) -> Path:
    """Seeded random weights of the same architecture: the control backbone."""
    import timm
    from safetensors.torch import save_file

    path = out / "vit_pico_random_seed0.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = timm.create_model(BACKBONE.split(".")[0], pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def train_one(task: str, method: str, backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = args.out / "runs" / f"{task}-{run_name(method, backbone)}"
    result_file = run_dir / "result.json"
    if result_file.exists() and not args.fresh:
        meta = json.loads(result_file.read_text())
        if meta["recipe"]["epochs"] == args.epochs:
            return meta
    recipe = Task(name=task, lr=METHOD_LR[method], weight_decay=5e-5, drop_path=0.1, hflip=False,
                  epochs=args.epochs, warmup_epochs=max(1, args.epochs // 10), batch_size=64,
                  transform="timm", format="imagefolder", suite="mini-vtab")
    cfg = TrainConfig(
        task=recipe, data_root=str(args.data / task), format="imagefolder", backbone=BACKBONE,
        checkpoint=str(random_checkpoint(args.out)) if backbone == "random" else None, method=method,
        epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay, batch_size=recipe.batch_size,
        warmup_epochs=recipe.warmup_epochs, drop_path=recipe.drop_path, seed=args.seed, workers=args.workers,
        store=str(args.out / "store" / run_name(method, backbone)), run_dir=str(run_dir), overwrite=True,
    )
    train(cfg)
    return json.loads(result_file.read_text())


def table(results: dict[str, dict[str, dict]], tasks: list[str]) -> str:
    """Markdown: accuracy per task, mean per group, overall mean, mean trainable parameters."""
    groups = {g: [t for t in ts if t in tasks] for g, ts in GROUPS.items()}
    head = ["method", "params", *tasks, *(f"{g} mean" for g in groups if groups[g]), "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per_task in results.items():
        acc = {t: per_task[t]["metrics"]["test_top1"] for t in tasks if t in per_task}
        if len(acc) < len(tasks):
            continue
        params = sum(per_task[t]["trainable_params"] for t in tasks) / len(tasks)
        means = [sum(acc[t] for t in ts) / len(ts) for ts in groups.values() if ts]
        row = [name, f"{params / 1e3:.1f}k", *(f"{acc[t]:.1f}" for t in tasks), *(f"{m:.1f}" for m in means),
               f"{sum(acc.values()) / len(acc):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(results)
    for i, (name, per_task) in enumerate(results.items()):
        accs = [per_task[t]["metrics"]["test_top1"] if t in per_task else 0.0 for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], accs, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"mini-VTAB-1k on {BACKBONE} (pretrained in-house on 5 CIFAR-10 classes)")
    ax.legend(fontsize=8, ncol=len(results))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", choices=sorted(TASKS), default=list(TASKS))
    ap.add_argument("--runs", nargs="*", choices=[run_name(*r) for r in RUNS], help="subset of the five runs")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="2 epochs per run (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=CACHE / "mini_vtab")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "mini_vtab")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already have results")
    ap.add_argument("--export-store", type=Path, help="copy the pretrained-backbone rlrr adapters here")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = 2
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.data, args.tasks)
    runs = [r for r in RUNS if args.runs is None or run_name(*r) in args.runs]

    t0 = time.time()
    results: dict[str, dict[str, dict]] = {run_name(*r): {} for r in runs}
    for task in args.tasks:
        for method, backbone in runs:
            meta = train_one(task, method, backbone, args)
            results[run_name(method, backbone)][task] = meta
            print(f"[mini-vtab] {task:14s} {run_name(method, backbone):12s} "
                  f"test top-1 {meta['metrics']['test_top1']:5.1f}  ({time.time() - t0:.0f}s so far)", flush=True)

    md = table(results, args.tasks)
    command = "python bench/mini_vtab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command.strip(), "backbone": BACKBONE, "epochs": args.epochs, "seed": args.seed,
               "method_lr": METHOD_LR, "minutes": round((time.time() - t0) / 60, 1),
               "results": {name: {t: {"test_top1": m["metrics"]["test_top1"], "trainable_params": m["trainable_params"],
                                      "train_seconds": m["timing"]["train_seconds"]} for t, m in per.items()}
                           for name, per in results.items()}}
    (args.out / "mini_vtab.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "mini_vtab.md").write_text(f"`{summary['command']}` ({args.epochs} epochs)\n\n{md}\n")
    plot(results, args.tasks, args.out / "mini_vtab.png")
    print(md)
    print(f"wrote {args.out}/mini_vtab.{{json,md,png}}")

    if args.export_store:
        src = args.out / "store" / "rlrr"
        args.export_store.mkdir(parents=True, exist_ok=True)
        for task in args.tasks:
            tmp = args.export_store / f".{task}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src / task, tmp)
            shutil.rmtree(args.export_store / task, ignore_errors=True)
            tmp.rename(args.export_store / task)  # whole-directory swap, as save_adapter does
        print(f"exported {len(args.tasks)} rlrr adapters to {args.export_store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
