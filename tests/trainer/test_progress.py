"""Training progress: a tqdm bar on a terminal, the same figures as plain lines elsewhere."""
from __future__ import annotations

import io

import pytest

from trainer.progress import Progress, use_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    assert use_bar(_Terminal()) and not use_bar(io.StringIO())
    monkeypatch.setenv("TERM", "dumb")
    assert not use_bar(_Terminal())


def test_terminal_gets_a_tqdm_bar_with_the_same_figures(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TERM", "xterm")
    term = _Terminal()
    progress = Progress(epochs=2, iters_per_epoch=4, stream=term)
    assert progress.bar is not None
    stats = {"loss": "0.5000", "acc": "75.0%", "img/s": "10.0", "lr": "1.00e-03"}
    for step in range(4):
        progress.step(0, step, stats, eta_s=5.0)
    progress.epoch({"epoch": 1, "train_loss": 0.5})
    progress.close()
    drawn = term.getvalue()
    assert "epoch 1/2" in drawn and "loss=0.5000" in drawn and "4/8" in drawn
    assert capsys.readouterr().out == 'epoch {"epoch": 1, "train_loss": 0.5}\n'  # records above the bar


def test_pipe_gets_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(epochs=1, iters_per_epoch=8, stream=io.StringIO())
    assert progress.bar is None
    for step in range(8):
        progress.step(0, step, {"loss": "0.5000"}, eta_s=3725.0)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"epoch 1/1 it {i}/8 loss 0.5000 eta 1:02:05" for i in (2, 4, 6, 8)]
