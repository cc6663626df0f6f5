"""`python -m trainer sweep`: a 2x2 lr x weight-decay grid of test_vit trials on Ray Tune (CPU)."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters import load_adapter
from trainer.cli import main
from trainer.errors import ConfigError
from trainer.sweep import format_table, parse_grid

GRID = ["lr=3e-3,1e-1", "wd=0,1e-2"]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): sweep tests skipped")
    pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _args(data: Path, tmp_path: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["sweep", "--task", "colors", "--data-root", str(data), "--backbone", "test_vit",
            "--checkpoint", str(checkpoint), "--img-size", "32", "--epochs", "2", "--batch-size", "8",
            "--workers", "0", "--store", str(tmp_path / "store"), "--run-dir", str(tmp_path / "sweep"), *extra]


def test_parse_grid() -> None:
    both = {"lr": [1e-3, 3e-3], "weight_decay": [0.0, 1e-4]}
    assert parse_grid(["lr=1e-3,3e-3,wd=0,1e-4"]) == both
    assert parse_grid(["lr=1e-3,3e-3", "wd=0,1e-4"]) == both
    for bad in (["lr="], ["momentum=0.9"], ["1e-3"], ["lr=fast"], ["lr=1", "lr=2"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_2x2_selects_on_val_and_publishes_the_best(ray_local: None, tiny_imagefolder: Path, tmp_path: Path,
                                                         vit_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_args(tiny_imagefolder, tmp_path, vit_checkpoint, "--grid", *GRID)) == 0
    out = capsys.readouterr().out
    print(out[out.index("sweep of colors"):])  # the grid table, for -s runs

    adapter = load_adapter(tmp_path / "store" / "colors")
    sweep = adapter.metadata["sweep"]
    assert sweep["selected_on"] == "val_top1" and sweep["keys"] == ["lr", "weight_decay"]
    grid = sweep["grid"]
    assert [(r["lr"], r["weight_decay"]) for r in grid] == [(3e-3, 0.0), (3e-3, 1e-2), (1e-1, 0.0), (1e-1, 1e-2)]
    assert all(r["status"] == "ok" for r in grid)
    assert not any("test" in key for r in grid for key in r)  # test accuracy never enters selection
    best = max(grid, key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert sweep["best"] == {"lr": best["lr"], "weight_decay": best["weight_decay"]}
    # The published adapter is the winning trial's: same recipe, same tensors.
    assert (adapter.metadata["recipe"]["lr"], adapter.metadata["recipe"]["weight_decay"]) == (best["lr"],
                                                                                               best["weight_decay"])
    assert adapter.metadata["metrics"]["val_top1"] == best["val_top1"]
    trial = next((tmp_path / "sweep").glob(f"trial-lr{best['lr']:g}-weight_decay{best['weight_decay']:g}"))
    trial_adapter = load_adapter(trial / "store" / "colors")
    assert all(torch.equal(adapter.tensors[k], trial_adapter.tensors[k]) for k in trial_adapter.tensors)
    assert (tmp_path / "sweep" / "sweep.json").is_file()
    assert "*" in format_table(grid, ["lr", "weight_decay"], grid[grid.index(best)])


@pytest.mark.ray
def test_sweep_refuses_a_task_without_validation_split(ray_local: None, tiny_imagefolder: Path, tmp_path: Path,
                                                       vit_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    data = Path(shutil.copytree(tiny_imagefolder, tmp_path / "noval"))
    shutil.rmtree(data / "val")
    assert main(_args(data, tmp_path, vit_checkpoint, "--grid", *GRID)) == 2
    err = capsys.readouterr().err
    assert "no validation split" in err and "never on test" in err
    assert not (tmp_path / "store").exists()
