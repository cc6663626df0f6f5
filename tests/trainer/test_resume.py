"""Interrupt safety: 1 epoch + --resume + 1 epoch equals 2 straight epochs, bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer.loop
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
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr 0.5 differs from the run's 0.01" in err, err


def test_resume_reuses_the_recorded_settings(tiny_imagefolder: Path, vit_checkpoint: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the task and the run dir on resume: data root, backbone, checkpoint, size, epochs, lr,
    # store ... come from the run, none from the defaults or the environment.
    monkeypatch.setenv("RLRR_DATA", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("RLRR_BACKBONE", "vit_pico_patch4_32.cifar5")
    assert main([*_args(tiny_imagefolder, vit_checkpoint, tmp_path), "--stop-after", "1"]) == 0
    assert main(["--task", "tiny", "--run-dir", str(tmp_path / "run"), "--workers", "0", "--resume"]) == 0
    config = json.loads((tmp_path / "store/tiny/adapter_config.json").read_text())
    assert config["metadata"]["recipe"]["epochs"] == 3 and config["metadata"]["recipe"]["lr"] == 1e-2
    assert config["backbone_spec"]["name"] == "test_vit"
    assert config["backbone_spec"]["checkpoint"] == str(vit_checkpoint)
    assert len((tmp_path / "run/log.jsonl").read_text().splitlines()) == 3


def _interrupt_in_epoch(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    fit, calls = trainer.loop.fit, []

    def fit_then_ctrl_c(*args, **kwargs):  # noqa: ANN002, ANN003 - fit's own signature
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    monkeypatch.setattr(trainer.loop, "fit", fit_then_ctrl_c)


def test_ctrl_c_in_epoch_1_says_nothing_was_saved(tiny_imagefolder: Path, vit_checkpoint: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _interrupt_in_epoch(1, monkeypatch)
    assert main(_args(tiny_imagefolder, vit_checkpoint, tmp_path)) == 130
    err = capsys.readouterr().err
    assert err == ("interrupted in epoch 1 of 3: no epoch finished, nothing was saved (no adapter, no "
                   "checkpoint); run the same command again to start over\n")
    assert not (tmp_path / "run/ckpt.pt").exists()
    monkeypatch.undo()
    assert main(_args(tiny_imagefolder, vit_checkpoint, tmp_path)) == 0  # what it says works


def test_ctrl_c_later_names_the_saved_epoch(tiny_imagefolder: Path, vit_checkpoint: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _interrupt_in_epoch(2, monkeypatch)
    assert main(_args(tiny_imagefolder, vit_checkpoint, tmp_path)) == 130
    ckpt = tmp_path / "run" / "ckpt.pt"
    assert capsys.readouterr().err == (f"interrupted: {ckpt} holds epoch 1 of 3; run the same command with "
                                       "--resume to continue\n")
    monkeypatch.undo()
    assert main([*_args(tiny_imagefolder, vit_checkpoint, tmp_path), "--resume"]) == 0
