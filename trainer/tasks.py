"""Task table: the recipe's 19 VTAB-1k and 5 FGVC tasks, plus user tasks from a TOML file.

A task is a recipe (lr, weight decay, drop path, flip, epochs, preprocessing) and where its data
lives. Command-line flags override a task's fields afterwards (see `trainer/config.py`).

A task file defines user tasks and overrides built-in ones (paths relative to the file):

    [defaults]            # applied to every task defined in this file
    epochs = 30

    [tasks.ants_bees]     # a new task: ImageFolder under data_root
    data_root = "data/hymenoptera"
    lr = 1e-3

    [tasks.dtd]           # a built-in task with overrides
    epochs = 50
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has the same parser as the `tomli` package
    import tomli as tomllib

__all__ = ["Task", "BUILTIN_TASKS", "TRANSFORMS", "FORMATS", "get_task", "load_task_file"]

TRANSFORMS = ("vtab", "fgvc", "timm")
FORMATS = ("vtab", "fgvc", "imagefolder")


@dataclass(frozen=True)
class Task:
    """One training task: its recipe and where its data lives."""

    name: str = field(metadata={"help": "Task name; also the adapter's folder in the store."})
    num_classes: int | None = field(default=None, metadata={"help": "Classes; None = from the data."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (after warmup)."})
    weight_decay: float = field(default=5e-5, metadata={"help": "AdamW decay on l, c and head weight."})
    drop_path: float = field(default=0.1, metadata={"help": "Stochastic depth at the last block."})
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flip while training."})
    epochs: int = field(default=100, metadata={"help": "Training epochs."})
    warmup_epochs: float = field(default=10.0, metadata={"help": "Linear warmup length in epochs."})
    batch_size: int = field(default=32, metadata={"help": "Images per optimizer step."})
    transform: str = field(
        default="timm",
        metadata={"help": "'vtab' (squash to 224, mean/std .5), 'fgvc' (256 → crop 224, mean/std .5) "
                          "or 'timm' (the backbone's data config)."},
    )
    format: str | None = field(
        default=None, metadata={"help": "'vtab', 'fgvc' or 'imagefolder'; None = detect from the files."}
    )
    data_dirs: tuple[str, ...] = field(
        default=(), metadata={"help": "Folder names to look for under the data root (first that exists)."}
    )
    data_root: str | None = field(default=None, metadata={"help": "Data root from a task file."})
    suite: str = field(default="user", metadata={"help": "'vtab-1k', 'fgvc' or 'user'."})

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"task {self.name}: transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"task {self.name}: format must be one of {FORMATS}, got {self.format!r}")
        for name in ("lr", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"task {self.name}: {name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"task {self.name}: drop_path must be in [0, 1), got {self.drop_path}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"task {self.name}: num_classes must be >= 1, got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "data_dirs": list(self.data_dirs)}


def _vtab(name: str, classes: int, lr: float, wd: float, dp: float, hflip: bool) -> Task:
    return Task(name, classes, lr, wd, dp, hflip, epochs=100, transform="vtab", format="vtab",
                data_dirs=(name,), suite="vtab-1k")


def _fgvc(name: str, classes: int, lr: float, wd: float, dp: float, dirs: tuple[str, ...]) -> Task:
    # FGVC always flips (recipe: random crop + flip); 50 epochs in the plain cross-entropy variant.
    return Task(name, classes, lr, wd, dp, True, epochs=50, transform="fgvc", format="fgvc",
                data_dirs=(*dirs, name), suite="fgvc")


# recipe.md, verbatim: name, classes, lr, weight decay, drop path, hflip.
BUILTIN_TASKS: dict[str, Task] = {t.name: t for t in (
    _vtab("cifar", 100, 3e-3, 5e-5, 0.1, False),
    _vtab("caltech101", 102, 1e-3, 5e-5, 0.1, False),
    _vtab("dtd", 47, 2e-3, 5e-5, 0.1, True),
    _vtab("oxford_flowers102", 102, 3e-3, 5e-2, 0.3, False),
    _vtab("oxford_iiit_pet", 37, 1e-3, 5e-5, 0.1, True),
    _vtab("svhn", 10, 5e-3, 5e-5, 0.3, False),
    _vtab("sun397", 397, 1e-3, 5e-5, 0.1, False),
    _vtab("patch_camelyon", 2, 3e-3, 5e-2, 0.3, True),
    _vtab("eurosat", 10, 1e-3, 5e-5, 0.1, True),
    _vtab("resisc45", 45, 3e-3, 5e-5, 0.0, False),
    _vtab("diabetic_retinopathy", 5, 5e-3, 5e-5, 0.1, True),
    _vtab("clevr_count", 8, 5e-3, 5e-5, 0.5, True),
    _vtab("clevr_dist", 6, 1e-2, 5e-5, 0.2, True),
    _vtab("dmlab", 6, 5e-3, 5e-5, 0.3, True),
    _vtab("kitti", 4, 3e-3, 5e-2, 0.3, True),
    _vtab("dsprites_loc", 16, 1e-2, 5e-5, 0.1, False),
    _vtab("dsprites_ori", 16, 5e-3, 5e-5, 0.1, False),
    _vtab("smallnorb_azi", 18, 5e-3, 5e-2, 0.3, False),
    _vtab("smallnorb_ele", 9, 1e-3, 5e-5, 0.3, True),
    # Folder names of the VPT release first, then the task name.
    _fgvc("cub", 200, 3e-3, 5e-2, 0.1, ("CUB_200_2011", "CUB")),
    _fgvc("nabirds", 555, 5e-4, 5e-2, 0.3, ("nabirds", "NABirds")),
    _fgvc("oxford_flowers", 102, 3e-3, 5e-2, 0.2, ("OxfordFlower", "OxfordFlowers")),
    _fgvc("stanford_cars", 196, 3e-3, 5e-2, 0.2, ("Stanford-cars", "StanfordCars", "stanford_cars")),
    _fgvc("stanford_dogs", 120, 1e-4, 5e-2, 0.0, ("Stanford-dogs", "StanfordDogs", "stanford_dogs")),
)}

def _toml_types(annotation: Any) -> tuple[type, ...]:
    """The TOML values a Task field accepts, from its annotation: `float` takes 1 too, a tuple a list."""
    if typing.get_origin(annotation) is tuple:
        return (list,)
    kind = next(a for a in typing.get_args(annotation) or (annotation,) if a is not type(None))  # X | None -> X
    return (int, float) if kind is float else (kind,)


def _check_fields(table: dict[str, Any], where: str) -> dict[str, Any]:
    """Type-check one TOML table against Task's fields; returns it ready for dataclasses.replace."""
    known = {f.name for f in fields(Task)} - {"name", "suite"}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        types = _toml_types(typing.get_type_hints(Task)[key])
        # bool is an int in Python; refuse `epochs = true` all the same.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{where}: '{key}' must be {' or '.join(t.__name__ for t in types)}, "
                              f"got {value!r}")
        out[key] = tuple(value) if key == "data_dirs" else value
    return out


def load_task_file(path: str | Path) -> dict[str, Task]:
    """Read user tasks (and overrides of built-in tasks) from a TOML file.

    Args:
        path: The task file; a relative `data_root` inside it is relative to the file's folder.

    Raises:
        ConfigError: Unreadable TOML, unknown keys or wrong value types; names the file and place.
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"task file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    unknown = set(doc) - {"defaults", "tasks"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level tables {sorted(unknown)}; use [defaults] and [tasks.NAME]")
    defaults = _check_fields(doc.get("defaults", {}), f"{path} [defaults]")
    tasks: dict[str, Task] = {}
    for name, table in doc.get("tasks", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: 'tasks.{name}' must be a table ([tasks.{name}])")
        overrides = {**defaults, **_check_fields(table, f"{path} [tasks.{name}]")}
        if "data_root" in overrides:
            overrides["data_root"] = str((path.parent / overrides["data_root"]).resolve())
        base = BUILTIN_TASKS.get(name, Task(name))
        tasks[name] = dataclasses.replace(base, **overrides)
    return tasks


def get_task(name: str, task_file: str | Path | None = None, user_ok: bool = True) -> Task:
    """The task called `name`: from the task file if it defines it, else built in, else a user task.

    Args:
        name: Task name.
        task_file: Optional TOML task file.
        user_ok: Allow an unknown name to become a user task with default recipe (it then needs
            --data-root); when False an unknown name is an error.
    """
    if task_file is not None:
        tasks = load_task_file(task_file)
        if name in tasks:
            return tasks[name]
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]
    if not user_ok:
        raise ConfigError(f"unknown task '{name}'; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"task name {name!r} is not a valid folder name")
    return Task(name)
