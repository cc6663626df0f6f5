"""The built-in task table (recipe.md) and TOML task files."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.errors import ConfigError
from trainer.tasks import BUILTIN_TASKS, get_task, load_task_file


def test_builtin_table_matches_recipe() -> None:
    vtab = [t for t in BUILTIN_TASKS.values() if t.suite == "vtab-1k"]
    fgvc = [t for t in BUILTIN_TASKS.values() if t.suite == "fgvc"]
    assert len(vtab) == 19 and len(fgvc) == 5
    dtd = BUILTIN_TASKS["dtd"]
    assert (dtd.num_classes, dtd.lr, dtd.weight_decay, dtd.drop_path, dtd.hflip, dtd.epochs) == \
        (47, 2e-3, 5e-5, 0.1, True, 100)
    assert dtd.transform == "vtab" and dtd.warmup_epochs == 10 and dtd.batch_size == 32
    cub = BUILTIN_TASKS["cub"]
    assert (cub.num_classes, cub.lr, cub.weight_decay, cub.drop_path, cub.epochs, cub.transform) == \
        (200, 3e-3, 5e-2, 0.1, 50, "fgvc")
    assert BUILTIN_TASKS["clevr_count"].drop_path == 0.5 and not BUILTIN_TASKS["cifar"].hflip
    assert sum(t.num_classes for t in vtab) == 940  # the 19 class counts of the recipe table
    assert sum(t.num_classes for t in fgvc) == 200 + 555 + 102 + 196 + 120


def test_task_file_defines_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "tasks.toml"
    f.write_text('[defaults]\nepochs = 7\n\n[tasks.ants]\ndata_root = "data/ants"\nlr = 0.01\nhflip = false\n'
                 'data_dirs = ["ants", "Ants"]\n\n[tasks.dtd]\nepochs = 3\nweight_decay = 0.1\n')
    tasks = load_task_file(f)
    assert tasks["ants"].epochs == 7 and tasks["ants"].lr == 0.01 and not tasks["ants"].hflip
    assert tasks["ants"].data_dirs == ("ants", "Ants")
    assert Path(tasks["ants"].data_root) == (tmp_path / "data/ants").resolve()  # relative to the file
    assert tasks["dtd"].epochs == 3 and tasks["dtd"].weight_decay == 0.1
    assert tasks["dtd"].num_classes == 47 and tasks["dtd"].transform == "vtab"  # rest of the recipe kept
    assert get_task("dtd", f).epochs == 3 and get_task("dtd").epochs == 100
    assert get_task("brand_new").transform == "timm"


@pytest.mark.parametrize("text, message", [
    ("[tasks.a]\nlearning_rate = 1\n", r"\[tasks.a\]: unknown key 'learning_rate'"),
    ("[tasks.a]\nepochs = 'ten'\n", r"'epochs' must be int"),
    ("[tasks.a]\nepochs = true\n", r"'epochs' must be int"),
    ("[tasks.a]\nlr = '1e-3'\n", r"'lr' must be int or float"),
    ("[tasks.a]\ndata_dirs = 'a'\n", r"'data_dirs' must be list"),
    ("[tasks.a]\nformat = 3\n", r"'format' must be str"),
    ("[tasks.a]\ntransform = 'fancy'\n", r"transform must be one of"),
    ("[tasks.a\n", r"invalid TOML"),
    ("[task.a]\n", r"unknown top-level tables \['task'\]"),
])
def test_task_file_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "t.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_task_file(f)
