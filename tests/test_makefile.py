"""`make serve` on a fresh checkout: a writable store seeded once from demo/store, the runtime
dependencies only. The Makefile runs in a scratch copy with a stand-in `.venv/bin/python`, so
nothing is installed and the checkout gets no `store/`."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_TASKS = sorted(p.name for p in (REPO / "demo" / "store").iterdir() if p.is_dir())


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copytree(REPO / "demo", tmp_path / "demo")
    (tmp_path / "pyproject.toml").write_text("")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"  # records what the server would be started with
    python.write_text('#!/bin/sh\necho "$@ RLRR_STORE=$RLRR_STORE" >> "$(dirname "$0")/calls"\n')
    python.chmod(0o755)
    os.utime(tmp_path / "pyproject.toml", (1, 1))  # older than the install marker: nothing to install
    (bin_dir / ".runtime").touch()
    return tmp_path


def _make(checkout: Path, *args: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RLRR_")} | env
    subprocess.run(["make", "-s", *args], cwd=checkout, env=environ, check=True, capture_output=True, timeout=60)
    return (checkout / ".venv" / "bin" / "calls").read_text().splitlines()


def test_serve_seeds_a_writable_store_once(checkout: Path) -> None:
    assert _make(checkout, "serve") == ["-m app RLRR_STORE=store"]
    assert sorted(p.name for p in (checkout / "store").iterdir()) == DEMO_TASKS
    shutil.rmtree(checkout / "store" / DEMO_TASKS[0])  # e.g. DELETE /tasks/NAME
    (checkout / "store" / "mine").mkdir()  # e.g. a trained task
    _make(checkout, "serve")
    assert sorted(p.name for p in (checkout / "store").iterdir()) == sorted([*DEMO_TASKS[1:], "mine"])
    assert sorted(p.name for p in (checkout / "demo" / "store").iterdir()) == DEMO_TASKS  # never written


def test_serve_seeds_another_store_and_installs_no_dev_extras(checkout: Path) -> None:
    assert _make(checkout, "serve", RLRR_STORE=str(checkout / "elsewhere"))[-1].endswith("RLRR_STORE=" +
                                                                                          str(checkout / "elsewhere"))
    assert sorted(p.name for p in (checkout / "elsewhere").iterdir()) == DEMO_TASKS
    dry = subprocess.run(["make", "-n", "-B", "runtime"], cwd=checkout, capture_output=True, text=True, check=True)
    assert "pip install -q -e .\n" in dry.stdout and "[dev]" not in dry.stdout
    dry = subprocess.run(["make", "-n", "-B", "venv"], cwd=checkout, capture_output=True, text=True, check=True)
    assert "-e '.[dev]'" in dry.stdout
