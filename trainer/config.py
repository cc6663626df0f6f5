"""TrainConfig: everything a run depends on, and the training command line generated from it.

Each option is defined once, as a field: its type is the annotation, its default the field's, its
help the field's metadata. The recipe fields (lr, epochs, ...) default to None, "the task's": their
types and help come from `Task`, and `__post_init__` resolves them, so a config is always complete.
The adapter ablations (--no-left, --init, ...) come from `RLRRConfig`'s fields the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from adapters import BitFitConfig, IA3Config, LoRAConfig, RLRRConfig
from adapters.config import INIT_POLICIES

from .backbone import DEFAULT_BACKBONE
from .errors import ConfigError
from .optim import MIN_LR, WARMUP_LR
from .tasks import FORMATS, Task, get_task

__all__ = ["TrainConfig", "METHODS", "RECIPE_FIELDS", "ABLATIONS", "SETTINGS_NAME", "add_train_arguments",
           "config_from_args", "typed_options", "default_run_dir"]

METHODS = ("rlrr", "ssf", "linear", "lora", "bitfit", "ia3", "full")
LORA_DEFAULTS = {"lora_rank": 8, "lora_alpha": 16.0}  # r = 8, α = 16: PEFT's common choice, the paper's LoRA rank
# Task fields a run may override; None in TrainConfig means the task's value.
RECIPE_FIELDS = ("epochs", "lr", "weight_decay", "batch_size", "warmup_epochs", "drop_path")
# RLRRConfig switches the command line turns off (--no-NAME), and its init policy.
ABLATIONS = ("left", "right", "residual")
RECIPE_GROUP = "recipe overrides (default: the task's)"
# A run's command-line settings, written into its run dir; --resume reads them back.
SETTINGS_NAME = "settings.json"
# Options a resumed run may change: how and how far it runs, not what it trains.
RESUME_FREE = ("resume", "overwrite", "stop_after", "workers", "device", "run_dir")


def option(group: str, help: str | None = None, flag: str | None = None, env: str | None = None,
           **argparse_kw: Any) -> dict[str, Any]:
    """Field metadata of a command-line option.

    Args:
        group: The --help section it is listed in.
        help: What it means (None: taken from the Task field of the same name).
        flag: The flag (default: --field-name).
        env: Environment variable that replaces the default on the command line.
        argparse_kw: More `add_argument` keywords (choices, ...).
    """
    return {"group": group, "help": help, "flag": flag, "env": env, "argparse": argparse_kw}


def _recipe() -> Any:
    return field(default=None, metadata=option(RECIPE_GROUP))


@dataclass
class TrainConfig:
    """Everything a run depends on, resolved (task recipe + command-line overrides)."""

    task: Task = field(metadata=option("task and data", "built-in task (see `tasks`) or a new name for your data"))
    data_root: str | None = field(default=None, metadata=option("task and data", "data root", env="RLRR_DATA"))
    format: str | None = field(
        default=None, metadata=option("task and data", "data layout; detected from the files when omitted",
                                      choices=FORMATS))
    holdout_val: bool = field(default=False, metadata=option(
        "task and data", "VTAB/FGVC: train on train800/train, validate on val200/val (recipe: train on both)",
        flag="--val"))
    backbone: str = field(default=DEFAULT_BACKBONE, metadata=option(
        "backbone", "timm name with pretrained tag (default: the one the server serves)", env="RLRR_BACKBONE"))
    checkpoint: str | None = field(default=None, metadata=option(
        "backbone", "local backbone weights (.safetensors or .pth); no network", env="RLRR_CHECKPOINT"))
    img_size: int | None = field(default=None, metadata=option(
        "backbone", "input resolution: timm's img_size (position grid resampled); recorded in the adapter's "
                    "backbone_spec, serve with RLRR_BACKBONE_KWARGS='{\"img_size\": N}'"))
    method: str = field(default="rlrr", metadata=option(
        "method", "an adapter (rlrr, ssf, linear, lora, bitfit, ia3) or full fine-tuning", choices=METHODS))
    lora_rank: int | None = field(default=None, metadata=option("method", "--method lora: rank r (default 8)"))
    lora_alpha: float | None = field(default=None, metadata=option(
        "method", "--method lora: α, the update is scaled by α / r (default 16)"))
    rlrr_overrides: dict[str, Any] = field(default_factory=dict)  # RLRRConfig fields: the ablation flags
    epochs: int | None = _recipe()
    lr: float | None = _recipe()
    weight_decay: float | None = _recipe()
    batch_size: int | None = _recipe()
    warmup_epochs: float | None = field(default=None, metadata=option(
        RECIPE_GROUP, "default: the task's (10), at most a fifth of --epochs"))
    drop_path: float | None = _recipe()
    seed: int = field(default=42, metadata=option(RECIPE_GROUP, "seed of the init, data order and augmentation"))
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1),
                         metadata=option("run", "data loader workers"))
    device: str = field(default="auto", metadata=option("run", "auto | cpu | cuda | cuda:N"))
    store: str = field(default="store", metadata=option("run", "adapter store", env="RLRR_STORE"))
    run_dir: str | None = field(
        default=None, metadata=option("run", "checkpoints and logs (default runs/<task>-<method>-s<seed>)"))
    resume: bool = field(default=False, metadata=option("run", "continue the run in --run-dir where it stopped"))
    overwrite: bool = field(default=False, metadata=option("run", "replace an existing adapter / run checkpoint"))
    stop_after: int | None = field(
        default=None, metadata=option("run", "stop (resumably) after this many epochs in total"))
    # The command line's settings (option dest -> value), written to the run dir for --resume.
    settings: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._resolve_recipe()
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.rlrr_overrides and self.method != "rlrr":
            raise ConfigError(f"the ablation switches {sorted(self.rlrr_overrides)} apply to --method rlrr only")
        given = [f"--{k.replace('_', '-')}" for k in LORA_DEFAULTS if getattr(self, k) is not None]
        if given and self.method != "lora":
            raise ConfigError(f"{', '.join(given)} apply to --method lora only")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs ({self.warmup_epochs}) must be in [0, --epochs={self.epochs})")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError("--stop-after must be >= 1")
        self.rlrr_config()  # invalid ablation combinations fail here, before anything is built

    def _resolve_recipe(self) -> None:
        # Overrides are checked as the task's own fields would be (lr > 0, drop_path in [0, 1), ...).
        given = {k: getattr(self, k) for k in RECIPE_FIELDS if getattr(self, k) is not None}
        recipe = dataclasses.replace(self.task, **given)
        for name in RECIPE_FIELDS:
            setattr(self, name, getattr(recipe, name))
        if "warmup_epochs" not in given:
            self.warmup_epochs = min(self.task.warmup_epochs, self.epochs / 5)

    def rlrr_config(self) -> RLRRConfig | LoRAConfig | BitFitConfig | IA3Config | None:
        """The adapter configuration of this method, any method's (None for full fine-tuning)."""
        if self.method == "full":
            return None
        try:
            if self.method == "lora":
                return LoRAConfig(r=self.lora_rank or LORA_DEFAULTS["lora_rank"],
                                  lora_alpha=self.lora_alpha or LORA_DEFAULTS["lora_alpha"])
            if self.method in ("bitfit", "ia3"):
                return {"bitfit": BitFitConfig, "ia3": IA3Config}[self.method]()
            return RLRRConfig.preset(self.method, **self.rlrr_overrides)
        except ValueError as e:
            raise ConfigError(f"invalid adapter configuration: {e}") from None

    def recipe(self) -> dict[str, Any]:
        """What determines the trained weights: checked on --resume, stored in the adapter."""
        rc = self.rlrr_config()
        return {
            "task": self.task.name, "method": self.method, "rlrr_config": rc.to_dict() if rc else None,
            "backbone": self.backbone, "img_size": self.img_size, "holdout_val": self.holdout_val,
            "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
            "batch_size": self.batch_size, "warmup_epochs": self.warmup_epochs, "warmup_lr": WARMUP_LR,
            "min_lr": MIN_LR, "drop_path": self.drop_path, "hflip": self.task.hflip,
            "transform": self.task.transform, "seed": self.seed, "optimizer": "adamw(0.9, 0.999, 1e-8)",
            "schedule": "linear warmup + cosine, per iteration",
        }


def _value_type(annotation: Any) -> type:
    """`int | None` -> int."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if isinstance(annotation, types.UnionType) else annotation


def _field_help(f: dataclasses.Field) -> str | None:
    meta = f.metadata
    text = meta["help"] or next(t.metadata["help"] for t in fields(Task) if t.name == f.name)
    return f"{text} (env {meta['env']})" if meta["env"] else text


def _add_field(groups: dict[str, Any], f: dataclasses.Field, kind: type) -> None:
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if meta["env"]:
        default = os.environ.get(meta["env"]) or default  # empty (compose's unset `${X:-}`) = not set
    kw: dict[str, Any] = {"dest": f.name, "help": _field_help(f), **meta["argparse"]}
    if kind is bool:
        kw["action"] = "store_true"
    else:
        kw.update(type=kind, default=default)
    groups[meta["group"]].add_argument(flag, **kw)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add every training option (shared by `train` and `sweep`), generated from TrainConfig's fields.

    Args:
        p: The parser to extend.
    """
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for f in fields(TrainConfig):
        group = f.metadata.get("group")
        if group is None:
            continue
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        if f.name == "task":  # a name (and a task file) that get_task turns into the Task
            groups[group].add_argument("--task", required=True, help=f.metadata["help"])
            groups[group].add_argument("--tasks-file", help="TOML file of user tasks and overrides "
                                                            "(see trainer/tasks.py)")
        else:
            _add_field(groups, f, _value_type(hints[f.name]))
        if f.name == "method":
            _add_ablations(groups[group])


def _add_ablations(g: Any) -> None:
    rlrr = {f.name: f.metadata["help"] for f in fields(RLRRConfig)}
    for name in ABLATIONS:
        g.add_argument(f"--no-{name}", action="store_true", help=f"ablation, turns off: {rlrr[name]}")
    g.add_argument("--init", choices=INIT_POLICIES, help=f"adapter init policy: {rlrr['init']}")


def default_run_dir(task: str, method: str, seed: int) -> Path:
    """Where a run writes when --run-dir is not given."""
    return Path("runs") / f"{task}-{method}-s{seed}"


def typed_options(argv: list[str]) -> set[str]:
    """The training options typed on a command line (not defaults, not environment variables).

    Args:
        argv: The `train` arguments.
    """
    p = argparse.ArgumentParser(add_help=False)
    add_train_arguments(p)
    for action in p._actions:  # parse again with nothing filled in: what is left was typed
        action.default, action.required = argparse.SUPPRESS, False
    return set(vars(p.parse_known_args(argv)[0]))


def _setting_dests(args: argparse.Namespace) -> list[str]:
    train_fields = [f.name for f in fields(TrainConfig) if "group" in f.metadata and f.name not in RESUME_FREE]
    extra = ["tasks_file", "init", *(f"no_{name}" for name in ABLATIONS)]
    return [d for d in (*train_fields, *extra) if hasattr(args, d)]


def _with_recorded(args: argparse.Namespace, typed: set[str]) -> argparse.Namespace:
    """--resume: the run's recorded settings, refusing a typed option that differs (naming both values)."""
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.task, args.method, args.seed)
    path = run_dir / SETTINGS_NAME
    if not path.is_file():
        return args  # a run from before settings were recorded: the checkpoint's recipe check remains
    recorded = json.loads(path.read_text())
    merged = argparse.Namespace(**vars(args))
    for dest, value in recorded.items():
        if not hasattr(args, dest):
            continue
        if dest in typed and getattr(args, dest) != value:
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"--resume: {flag} {getattr(args, dest)} differs from the run's {value} "
                              f"({path}); leave it out to continue the run, or start a new one")
        setattr(merged, dest, value)
    return merged


def config_from_args(args: argparse.Namespace, typed: set[str] | None = None) -> TrainConfig:
    """The resolved run configuration: the task's recipe with the command line's overrides.

    With --resume, the settings recorded in the run dir replace what was not typed (`typed`).

    Args:
        args: Parsed `add_train_arguments` options.
        typed: The options typed on the command line (`typed_options`); None: all of them.
    """
    if getattr(args, "resume", False):
        args = _with_recorded(args, set(vars(args)) if typed is None else typed)
    overrides: dict[str, Any] = {name: False for name in ABLATIONS if getattr(args, f"no_{name}")}
    if args.init is not None:
        overrides["init"] = args.init
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if "group" in f.metadata}
    settings = {d: getattr(args, d) for d in _setting_dests(args)}
    return TrainConfig(**{**given, "task": get_task(args.task, args.tasks_file), "rlrr_overrides": overrides,
                          "settings": settings})
