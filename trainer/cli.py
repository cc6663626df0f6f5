"""python -m trainer [train] --task NAME ... | export --task NAME --out FILE | report --task NAME | tasks | ...

    python -m trainer --task dtd --data-root /data/vtab-1k --backbone vit_base_patch16_224.augreg_in21k  # paper
    python -m trainer --task dtd --backbone vit_base_patch16_224 --checkpoint vit_b16.safetensors  # local weights
    python -m trainer --task flowers --data-root ~/flowers               # your ImageFolder, the server's backbone
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
alone. Data root: --data-root or RLRR_DATA; store: --store or RLRR_STORE (default store/); backbone:
--backbone or RLRR_BACKBONE (default: the server's), so a server on the same store serves the result.
--resume reuses the run's recorded settings (a typed option that differs is refused). Errors
the user can fix (missing data, malformed lists, offline without --checkpoint, an existing
adapter) print one line and exit with status 2. Beside its log.jsonl a run writes training-curves.png
(while it trains) and adapter-shift.png (at the end; see trainer/plots.py); the adapter's metadata.training
records their paths.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from adapters import AdapterError

from .config import add_train_arguments, config_from_args, typed_options
from .errors import Interrupted, TrainerError
from .tasks import BUILTIN_TASKS

__all__ = ["main", "build_parser"]

COMMANDS = ("train", "export", "report", "tasks", "import-peft")
DELEGATED = ("pretrain", "prepare", "sweep")  # sibling modules with their own `main(argv) -> int`


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="the adapter's name in the store")
    p.add_argument("--out", required=True, help="output file (.safetensors, else torch.save)")
    p.add_argument("--store", default=os.environ.get("RLRR_STORE", "store"))
    p.add_argument("--backbone", help="timm name (default: the adapter's base model)")
    p.add_argument("--checkpoint", help="local backbone weights; must be the ones the adapter was trained on")
    p.add_argument("--format", choices=("timm", "peft"), default="timm",
                   help="timm: one merged checkpoint file; peft: a PEFT folder (LoRA and IA³ adapters) for "
                        "peft.PeftModel.from_pretrained(timm_model, OUT)")


def _import_peft_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="the PEFT folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--task", required=True, help="task name: the adapter's folder in the store")
    p.add_argument("--labels", help="class names: a JSON array, a file (one per line) or comma-separated; "
                                    "default 0, 1, ...")
    p.add_argument("--store", default=os.environ.get("RLRR_STORE", "store"))
    p.add_argument("--backbone", default=None, help="timm name of the backbone it will be served on")
    p.add_argument("--checkpoint", help="local backbone weights (the server's)")
    p.add_argument("--img-size", type=int, help="the backbone's img_size, if not its default")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in the store")


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
    _import_peft_parser(sub.add_parser("import-peft", help="write a PEFT LoRA / IA³ folder into the store"))
    return parser


def _train(args: argparse.Namespace, argv: list[str]) -> None:
    from .loop import train

    train(config_from_args(args, typed_options(argv)))


def _export(args: argparse.Namespace) -> None:
    if args.format == "peft":
        from .peft_io import export_peft

        out = export_peft(args.task, args.out, store=args.store, checkpoint=args.checkpoint)
    else:
        from .export import export_task

        out = export_task(args.task, args.out, store=args.store, backbone=args.backbone, checkpoint=args.checkpoint)
    print(f"wrote {out}")


def _import_peft(args: argparse.Namespace) -> None:
    from .backbone import DEFAULT_BACKBONE
    from .peft_io import import_peft, read_labels

    out = import_peft(args.directory, args.task, read_labels(args.labels), store=args.store,
                      backbone=args.backbone or DEFAULT_BACKBONE, checkpoint=args.checkpoint, img_size=args.img_size,
                      overwrite=args.overwrite)
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


def _delegated(command: str) -> Callable[[list[str]], int]:
    # Imported on use: `tasks` and `--help` stay fast, and Ray is only needed by `sweep`.
    if command == "pretrain":
        from .pretrain import main
    elif command == "prepare":
        from .mini_vtab import main
    else:
        from .sweep import main
    return main


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status.

    Args:
        argv: Arguments without the program name (default: sys.argv[1:]).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegated(argv[0])(argv[1:])
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
        elif args.command == "import-peft":
            _import_peft(args)
        else:
            _train(args, argv[1:])
    except (TrainerError, AdapterError) as e:
        # Problems the user can fix: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # during a run: it says what was saved
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before training started: nothing was saved", file=sys.stderr)
        return 130
    return 0
