"""Every user-fixable error: exit status 2, one line on stderr naming the problem, no traceback."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def base(vit_checkpoint: Path, tmp_path: Path) -> list[str]:
    """Flags of a small offline run writing into tmp_path."""
    return ["--backbone", "test_vit", "--checkpoint", vit_checkpoint, "--img-size", 32, "--workers", 0,
            "--store", tmp_path / "store", "--run-dir", tmp_path / "run"]


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_missing_data_root(base: list[str], capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLRR_DATA", raising=False)
    code, _, err = run_cli(["--task", "mine", *base], capsys)
    assert_one_line_error(code, err, "no data for task 'mine'", "--data-root")


def test_malformed_line_is_reported_before_training(base: list[str], tmp_path: Path, layouts: SimpleNamespace,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    d = layouts.vtab(tmp_path / "vtab")
    (d / "test.txt").write_text("images/009.jpg 0\nimages/010.jpg\n")
    code, out, err = run_cli(["--task", "dtd_mini", "--data-root", tmp_path / "vtab", *base], capsys)
    assert_one_line_error(code, err, f"{d / 'test.txt'}:2: expected '<relative/path> <int label>'")
    assert "params:" not in out and not (tmp_path / "run").exists()  # nothing was built or trained


def test_offline_without_checkpoint(tiny_imagefolder: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["--task", "tiny", "--data-root", tiny_imagefolder, "--backbone",
                            "vit_tiny_patch16_224.augreg_in21k", "--store", tmp_path / "s"], capsys)
    assert_one_line_error(code, err, "offline", "pass --checkpoint FILE")


@pytest.mark.parametrize(("name", "expected"), [
    ("vit_pico_patch4_32.cifar6", "unknown pretrained tag 'cifar6' for 'vit_pico_patch4_32'; timm has: cifar5"),
    ("vit_base_patch16_224.augreg_in21", "unknown pretrained tag 'augreg_in21' for 'vit_base_patch16_224'"),
])
def test_bad_pretrained_tag(name: str, expected: str, tiny_imagefolder: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["--task", "tiny", "--data-root", tiny_imagefolder, "--backbone", name, "--workers", 0,
                            "--store", tmp_path / "s", "--run-dir", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, expected)


def test_backbone_defaults_to_the_served_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings
    from trainer.cli import build_parser

    for env in ({}, {"RLRR_BACKBONE": ""}, {"RLRR_BACKBONE": "test_vit", "RLRR_CHECKPOINT": "w.safetensors"}):
        for name in ("RLRR_BACKBONE", "RLRR_CHECKPOINT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        args = build_parser().parse_args(["train", "--task", "x"])
        served = Settings()
        assert args.backbone == served.backbone
        assert args.checkpoint == (None if served.checkpoint is None else str(served.checkpoint))


def test_store_refuses_to_overwrite(base: list[str], tiny_imagefolder: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "store" / "tiny"
    existing.mkdir(parents=True)
    (existing / "adapter_config.json").write_text("{}")
    code, _, err = run_cli(["--task", "tiny", "--data-root", tiny_imagefolder, *base], capsys)
    assert_one_line_error(code, err, f"{existing} already exists; pass --overwrite")
    assert (existing / "adapter_config.json").read_text() == "{}"


def test_run_dir_and_option_errors(base: list[str], tiny_imagefolder: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--task", "tiny", "--data-root", tiny_imagefolder, *base]
    code, _, err = run_cli([*args, "--resume"], capsys)
    assert_one_line_error(code, err, "--resume: no checkpoint at")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "holds an earlier run: pass --resume")
    code, _, err = run_cli([*args, "--method", "ssf", "--no-left"], capsys)
    assert_one_line_error(code, err, "ablation switches ['left'] apply to --method rlrr only")
    code, _, err = run_cli([*args, "--no-left", "--no-right"], capsys)
    assert_one_line_error(code, err, "invalid adapter configuration")
    code, _, err = run_cli([*args, "--epochs", 2, "--warmup-epochs", 2], capsys)
    assert_one_line_error(code, err, "--warmup-epochs (2.0) must be in [0, --epochs=2)")


def test_export_of_unknown_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["export", "--task", "nope", "--out", tmp_path / "x.safetensors",
                            "--store", tmp_path], capsys)
    assert_one_line_error(code, err, "no adapter for task 'nope'")


def test_tasks_lists_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["tasks"], capsys)
    assert code == 0 and len(out.splitlines()) == 1 + 24 and "smallnorb_ele" in out
