"""Interrupt safety: 1 epoch + --resume + 1 epoch equals 2 straight epochs, bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.cli import main


def _args(tiny: Path, ckpt: Path, out: Path) -> list[str]:
    # Flip augmentation and drop path are on, so an RNG state not restored would show.
    return [str(a) for a in ("--task", "tiny", "--data-root", tiny, "--backbone", "test_vit", "--checkpoint",
                             ckpt, "--img-size", 32, "--epochs", 3, "--batch-size", 4, "--lr", 1e-2,
                             "--drop-path", 0.2, "--workers", 0, "--store", out / "store", "--run-dir", out / "run")]


def test_resume_is_bit_for_bit(tiny_imagefolder: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert main(_args(tiny_imagefolder, vit_checkpoint, straight)) == 0
    assert main([*_args(tiny_imagefolder, vit_checkpoint, pieces), "--stop-after", "1"]) == 0
    assert not (pieces / "store" / "tiny").exists()  # nothing stored until the run is complete
    assert main([*_args(tiny_imagefolder, vit_checkpoint, pieces), "--resume", "--stop-after", "2"]) == 0
    assert main([*_args(tiny_imagefolder, vit_checkpoint, pieces), "--resume"]) == 0

    a = load_file(str(straight / "store/tiny/adapter_model.safetensors"))
    b = load_file(str(pieces / "store/tiny/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = torch.load(straight / "run/ckpt.pt", weights_only=True)
    cb = torch.load(pieces / "run/ckpt.pt", weights_only=True)
    for i, state in ca["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], cb["optimizer"]["state"][i]["exp_avg_sq"])
    assert ca["iter"] == cb["iter"] == 3 * 4
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    log = lambda d: [{k: v for k, v in json.loads(x).items() if k not in ("img_per_s", "seconds")}
                     for x in (d / "run/log.jsonl").read_text().splitlines()]
    assert log(straight) == log(pieces) and len(log(straight)) == 3
    # The val-selected result survives the interruption too.
    ma = json.loads((straight / "store/tiny/adapter_config.json").read_text())["metadata"]["metrics"]
    mb = json.loads((pieces / "store/tiny/adapter_config.json").read_text())["metadata"]["metrics"]
    assert ma == mb and "test_top1_at_best_val" in ma


def test_resume_refuses_changed_settings(tiny_imagefolder: Path, vit_checkpoint: Path, tmp_path: Path,
                                         capsys) -> None:
    assert main([*_args(tiny_imagefolder, vit_checkpoint, tmp_path), "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert main([*_args(tiny_imagefolder, vit_checkpoint, tmp_path), "--resume", "--lr", "0.5"]) == 2
    assert "made with different settings (['lr'])" in capsys.readouterr().err
