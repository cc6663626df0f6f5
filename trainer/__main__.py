"""python -m trainer [train] --task NAME ... | export --task NAME --out FILE | report --task NAME | tasks | ...

    python -m trainer --task dtd --data-root /data/vtab-1k               # recipe defaults, GPU + internet
    python -m trainer --task dtd --checkpoint vit_b16_in21k.safetensors  # offline: local backbone weights
    python -m trainer --task ants --data-root data/hymenoptera --backbone test_vit \\
        --checkpoint test_vit.safetensors --img-size 32 --epochs 5       # a user ImageFolder task on CPU
    python -m trainer --task dtd --resume                                # continue an interrupted run
    python -m trainer --task cub --method linear --run-dir runs/cub-lin  # baselines: ssf | linear | full
    python -m trainer --task cub --no-residual --init identity           # ablations (paper Table 6)
    python -m trainer export --task dtd --out dtd.safetensors            # merged standalone checkpoint
    python -m trainer report --task dtd                                  # redraw curves + per-layer shift
    python -m trainer sweep --task dtd --val --grid lr=1e-3,3e-3,wd=1e-4,1e-3  # Ray Tune grid, best on val
    python -m trainer tasks                                              # the built-in task table
    python -m trainer train --help                                       # every training option

Training (the default command) writes the task's adapter to the store; `--method full` has no
adapter, so it writes the fine-tuned model to <run dir>/model.safetensors and leaves the store
alone. Data root: --data-root or RLRR_DATA; store: --store or RLRR_STORE (default store/). Errors
the user can fix (missing data, malformed lists, offline without --checkpoint, an existing
adapter) print one line and exit with status 2. Beside its log.jsonl a run writes training-curves.png
(while it trains) and adapter-shift.png (at the end; see trainer/plots.py); the adapter's metadata.training
records their paths.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from adapters import AdapterError

from .backbone import DEFAULT_BACKBONE
from .errors import TrainerError
from .tasks import BUILTIN_TASKS, FORMATS, get_task

if TYPE_CHECKING:
    from .loop import TrainConfig

COMMANDS = ("train", "export", "report", "tasks")
# Subcommands implemented in sibling modules with their own `main(argv) -> int`, imported on use.
DELEGATED = {"pretrain": "trainer.pretrain", "prepare": "trainer.mini_vtab", "sweep": "trainer.sweep"}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add every training option (shared by `train` and `sweep`).

    Args:
        p: The parser to extend.
    """
    g = p.add_argument_group("task and data")
    g.add_argument("--task", required=True, help="built-in task (see `tasks`) or a new name for your data")
    g.add_argument("--tasks-file", help="TOML file of user tasks and overrides (see trainer/tasks.py)")
    g.add_argument("--data-root", default=os.environ.get("RLRR_DATA"), help="data root (env RLRR_DATA)")
    g.add_argument("--format", choices=FORMATS, help="data layout; detected from the files when omitted")
    g.add_argument("--val", action="store_true",
                   help="VTAB/FGVC: train on train800/train, validate on val200/val (recipe: train on both)")
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm name with pretrained tag")
    g.add_argument("--checkpoint", help="local backbone weights (.safetensors or .pth); no network")
    g.add_argument("--img-size", type=int,
                   help="input resolution: timm's img_size (position grid resampled); recorded in the "
                        "adapter's backbone_spec, serve with RLRR_BACKBONE_KWARGS='{\"img_size\": N}'")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="rlrr", choices=("rlrr", "ssf", "linear", "full"))
    g.add_argument("--no-left", action="store_true", help="ablation: no left (row) scaling l")
    g.add_argument("--no-right", action="store_true", help="ablation: no right (column) scaling c")
    g.add_argument("--no-residual", action="store_true", help="ablation: W ⊙ (l cᵀ) instead of W ⊙ (1 + l cᵀ)")
    g.add_argument("--init", choices=("reference", "identity"), help="adapter init policy")
    g = p.add_argument_group("recipe overrides (default: the task's)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float,
                   help="default: the task's (10), at most a fifth of --epochs")
    g.add_argument("--drop-path", type=float)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader workers")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--store", default=os.environ.get("RLRR_STORE", "store"), help="adapter store (env RLRR_STORE)")
    g.add_argument("--run-dir", help="checkpoints and logs (default runs/<task>-<method>-s<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir where it stopped")
    g.add_argument("--overwrite", action="store_true", help="replace an existing adapter / run checkpoint")
    g.add_argument("--stop-after", type=int, help="stop (resumably) after this many epochs in total")


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="the adapter's name in the store")
    p.add_argument("--out", required=True, help="output file (.safetensors, else torch.save)")
    p.add_argument("--store", default=os.environ.get("RLRR_STORE", "store"))
    p.add_argument("--backbone", help="timm name (default: the adapter's base model)")
    p.add_argument("--checkpoint", help="local backbone weights; must be the ones the adapter was trained on")


def _report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="the adapter's name in the store")
    p.add_argument("--store", default=os.environ.get("RLRR_STORE", "store"))
    p.add_argument("--run-dir", help="the run's directory with its log.jsonl (default: recorded in the adapter)")
    p.add_argument("--out", help="output folder (default: the run dir when known, else reports/<task>)")
    p.add_argument("--backbone", help="timm name (default: the adapter's base model)")
    p.add_argument("--checkpoint", help="local backbone weights; must be the ones the adapter was trained on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description="Train, export and list RLRR task adapters.",
        epilog="also: sweep (Ray Tune grid, best on val), prepare (build mini-VTAB-1k), pretrain (the in-house "
               "backbone); `python -m trainer COMMAND --help` for each")
    sub = parser.add_subparsers(dest="command")
    add_train_arguments(sub.add_parser("train", help="train a task (default command)"))
    _export_parser(sub.add_parser("export", help="write the merged standalone timm checkpoint"))
    _report_parser(sub.add_parser("report", help="redraw training curves and the per-layer shift of an adapter"))
    sub.add_parser("tasks", help="list the built-in tasks")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The resolved run configuration: the task's recipe with the command line's overrides.

    Args:
        args: Parsed `add_train_arguments` options.
    """
    from .loop import TrainConfig  # imported here: `tasks` and `--help` stay fast

    task = get_task(args.task, args.tasks_file)
    epochs = args.epochs or task.epochs
    warmup = args.warmup_epochs if args.warmup_epochs is not None else min(task.warmup_epochs, epochs / 5)
    ablation = {"left": not args.no_left, "right": not args.no_right, "residual": not args.no_residual,
                "init": args.init}
    defaults = {"left": True, "right": True, "residual": True, "init": None}
    return TrainConfig(
        task=task, data_root=args.data_root, format=args.format, holdout_val=args.val,
        backbone=args.backbone, checkpoint=args.checkpoint, img_size=args.img_size, method=args.method,
        rlrr_overrides={k: v for k, v in ablation.items() if v != defaults[k]},
        epochs=epochs, lr=args.lr or task.lr,
        weight_decay=task.weight_decay if args.weight_decay is None else args.weight_decay,
        batch_size=args.batch_size or task.batch_size, warmup_epochs=warmup,
        drop_path=task.drop_path if args.drop_path is None else args.drop_path, seed=args.seed,
        workers=args.workers, device=args.device, store=args.store, run_dir=args.run_dir,
        resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
    )


def _train(args: argparse.Namespace) -> None:
    from .loop import train

    train(config_from_args(args))


def _export(args: argparse.Namespace) -> None:
    from .export import export_task

    out = export_task(args.task, args.out, store=args.store, backbone=args.backbone, checkpoint=args.checkpoint)
    print(f"wrote {out}")


def _report(args: argparse.Namespace) -> None:
    from .report import report_task

    paths = report_task(args.task, store=args.store, backbone=args.backbone, checkpoint=args.checkpoint,
                        run_dir=args.run_dir, out=args.out)
    for path in paths.values():
        if path is not None:
            print(f"wrote {path}")


def _tasks() -> None:
    print(f"{'task':22} {'suite':8} {'classes':>7} {'lr':>7} {'wd':>7} {'dp':>4} {'hflip':>5} {'epochs':>6}")
    for t in BUILTIN_TASKS.values():
        print(f"{t.name:22} {t.suite:8} {t.num_classes:>7} {t.lr:>7.0e} {t.weight_decay:>7.0e} "
              f"{t.drop_path:>4.1f} {'yes' if t.hflip else 'no':>5} {t.epochs:>6}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status.

    Args:
        argv: Arguments without the program name (default: sys.argv[1:]).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]  # `python -m trainer --task dtd` means train
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            _export(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "tasks":
            _tasks()
        else:
            _train(args)
    except (TrainerError, AdapterError) as e:
        # Problems the user can fix: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is in the run's ckpt.pt; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
