"""Served accuracy of a task on an ImageFolder split, through a real `python -m app` (the `make serve` defaults).

    python bench/served_accuracy.py --task ants-bees --folder .cache/data/hymenoptera/val
    python bench/served_accuracy.py --url http://localhost:8000 --task ants-bees --folder DIR   # a running server

Without --url it starts the server the way `make serve` does (package defaults, HF_HUB_OFFLINE=1)
on a copy of demo/store, reports how long it took to answer /readyz, then posts every image of
`--folder/<class>/*` as it is on disk (full-size photos: the server's preprocessing crops them) and
prints the served top-1 beside the task's recorded test accuracy. Not a timing benchmark: the ready
time is one measurement on whatever machine runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def start_server(port: int, store: Path) -> tuple[subprocess.Popen, float]:
    """`python -m app` on a copy of the demo store; returns the process and seconds until /readyz said 200."""
    env = {**os.environ, "RLRR_STORE": str(store), "RLRR_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    while time.perf_counter() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit("server not ready after 300 s")


def served_top1(url: str, task: str, folder: Path) -> tuple[float, int]:
    """(percent correct, images): every image posted once, its top-1 label compared with its folder."""
    files = sorted(p for p in folder.glob("*/*") if p.is_file())
    correct = 0
    with httpx.Client(timeout=60) as client:
        for p in files:
            r = client.post(f"{url}/classify?task={task}&top_k=1", content=p.read_bytes(),
                            headers={"content-type": "image/jpeg" if p.suffix.lower() in (".jpg", ".jpeg")
                                     else "image/png"})
            r.raise_for_status()
            correct += r.json()["results"][0]["predictions"][0]["label"] == p.parent.name
    return 100.0 * correct / len(files), len(files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="ants-bees")
    ap.add_argument("--folder", type=Path, default=REPO / ".cache" / "data" / "hymenoptera" / "val")
    ap.add_argument("--url", help="a running server (default: start one like `make serve`)")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args(argv)
    proc, ready_s = None, None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            store = shutil.copytree(REPO / "demo" / "store", Path(tmp) / "store")
            proc, ready_s = start_server(args.port, store)
            url = f"http://127.0.0.1:{args.port}"
        try:
            info = httpx.get(f"{url}/tasks/{args.task}", timeout=30).json()
            acc, n = served_top1(url, args.task, args.folder)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    out = {"task": args.task, "images": n, "served_top1": round(acc, 1),
           "recorded_test_top1": (info.get("metrics") or {}).get("test_top1"),
           "ready_s": None if ready_s is None else round(ready_s, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
