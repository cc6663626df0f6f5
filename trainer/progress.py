"""Training progress: a tqdm bar on a terminal, plain lines everywhere else (CI, pipes, log files).

Both show the same figures: per step loss, accuracy, images/s, lr and the time left; per epoch the
log record (`epoch {...}`, the line log.jsonl gets). The bar writes the epoch records above itself.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["use_bar", "Progress", "fmt_eta"]


def use_bar(stream: TextIO | None = None) -> bool:
    """True when progress should be a bar: `stream` (default stderr, where tqdm draws) is a terminal.

    Args:
        stream: The stream the bar would be drawn on.
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def fmt_eta(seconds: float) -> str:
    """H:MM:SS of a non-negative duration."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _say(msg: str) -> None:
    print(msg, flush=True)


class Progress:
    """Progress of one run: `step` after every optimizer step, `epoch` after every epoch, then `close`.

    Args:
        epochs: Epochs of the whole run.
        iters_per_epoch: Optimizer steps per epoch.
        done_iters: Steps already done (a resumed run).
        bar: Draw a tqdm bar (default: `use_bar()`); else print a line every quarter epoch.
        stream: Where the bar is drawn (default stderr).
    """

    def __init__(self, epochs: int, iters_per_epoch: int, done_iters: int = 0, bar: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.epochs, self.iters_per_epoch = epochs, iters_per_epoch
        self.bar = None
        if use_bar(stream) if bar is None else bar:
            self.bar = tqdm(total=epochs * iters_per_epoch, initial=done_iters, file=stream, dynamic_ncols=True,
                            unit="it")

    def step(self, epoch: int, step: int, stats: dict[str, str], eta_s: float) -> None:
        """Report a finished step.

        Args:
            epoch: Epoch index, from 0.
            step: Step index within the epoch, from 0.
            stats: Running figures of the epoch, already formatted (loss, acc, img/s, lr).
            eta_s: Estimated seconds left in the run.
        """
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
            self.bar.set_postfix(stats, refresh=False)
            self.bar.update(1)  # tqdm shows its own elapsed<remaining
        elif (step + 1) % max(1, self.iters_per_epoch // 4) == 0 or step + 1 == self.iters_per_epoch:
            _say(f"epoch {epoch + 1}/{self.epochs} it {step + 1}/{self.iters_per_epoch} "
                 + " ".join(f"{k} {v}" for k, v in stats.items()) + f" eta {fmt_eta(eta_s)}")

    def epoch(self, record: dict[str, Any]) -> None:
        """Report a finished epoch's log record."""
        self.write("epoch " + json.dumps(record))

    def write(self, line: str) -> None:
        """Print a line (to stdout) without breaking the bar."""
        if self.bar is not None:
            self.bar.write(line)  # above the bar, which is redrawn below it
        else:
            _say(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
