"""TrainConfig and the training command line: each option defined once, as a field."""
from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from trainer.cli import build_parser
from trainer.config import TrainConfig, add_train_arguments, config_from_args
from trainer.errors import ConfigError
from trainer.tasks import BUILTIN_TASKS, Task


def _actions() -> dict[str, argparse.Action]:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return {a.dest: a for a in p._actions}


def test_options_are_generated_from_the_fields() -> None:
    actions = _actions()
    options = {f.name for f in fields(TrainConfig) if "group" in f.metadata}
    # Besides the fields: the task file, and RLRRConfig's switches (into rlrr_overrides).
    assert set(actions) - options == {"help", "tasks_file", "no_left", "no_right", "no_residual", "init"}
    task_help = {f.name: f.metadata["help"] for f in fields(Task)}
    assert actions["lr"].help == task_help["lr"] and actions["lr"].type is float and actions["lr"].default is None
    assert actions["epochs"].type is int and actions["img_size"].type is int
    assert actions["holdout_val"].option_strings == ["--val"] and actions["holdout_val"].default is False
    assert actions["method"].choices == ("rlrr", "ssf", "linear", "lora", "bitfit", "ia3", "full")


def test_recipe_fields_default_to_the_tasks() -> None:
    dtd = BUILTIN_TASKS["dtd"]
    cfg = TrainConfig(task=dtd)
    assert (cfg.lr, cfg.epochs, cfg.weight_decay, cfg.drop_path, cfg.warmup_epochs) == (2e-3, 100, 5e-5, 0.1, 10.0)
    cfg = TrainConfig(task=dtd, epochs=20, lr=1e-2)
    assert (cfg.lr, cfg.epochs, cfg.warmup_epochs) == (1e-2, 20, 4.0)  # warmup: at most a fifth of the epochs
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainConfig(task=Task("x"), lr=0.0)


def test_command_line_and_config_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLRR_DATA", raising=False)
    monkeypatch.setenv("RLRR_STORE", "/tmp/somewhere")
    args = build_parser().parse_args(["train", "--task", "dtd", "--no-left", "--init", "identity", "--epochs", "20",
                                      "--val"])
    expected = TrainConfig(task=BUILTIN_TASKS["dtd"], epochs=20, holdout_val=True, store="/tmp/somewhere",
                           rlrr_overrides={"left": False, "init": "identity"})
    assert config_from_args(args) == expected
