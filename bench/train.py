"""Training cost of RLRR vs full fine-tuning vs linear probing: step time, peak memory, trainable params.

    python bench/train.py                                        # CPU default: vit_tiny, batch 8
    python bench/train.py --backbone vit_base_patch16_224 --batch-size 32 --steps 20   # on a GPU
    python bench/train.py --json                                 # one JSON line per method

One invocation measures every method with the same backbone, batch and input, and the optimizer
and step of `python -m trainer` (`trainer.optim.adamw` with the trainer's decay groups;
`trainer.loop.train_step`: autocast on CUDA, fp32 cross-entropy, GradScaler for fp16). Each method
runs in its own fresh process, so peak memory is not polluted by the previous one: on CUDA it is
`max_memory_allocated` during the timed steps; on CPU the growth of peak RSS over the process's
size before the first step (activations, gradients and optimizer state). Weights are random
(pretrained=False): cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = ("full", "rlrr", "linear")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(method: str, backbone: str, batch_size: int, steps: int, warmup: int, device: str,
            num_classes: int, threads: int | None = None) -> dict[str, Any]:
    """Time `steps` optimizer steps of one method after `warmup` untimed ones.

    Args:
        method: 'full', 'rlrr' or 'linear'.
        backbone: timm model name.
        batch_size: Images per step.
        steps: Timed steps (the median is reported).
        warmup: Untimed steps first (allocator, autotuning, lazy init).
        device: 'cpu' or 'cuda'.
        num_classes: Classes of the head.
        threads: torch intra-op threads (None: torch's default).
    """
    import timm
    import torch

    from adapters import RLRRConfig, add_rlrr
    from trainer.loop import train_step
    from trainer.optim import adamw
    from trainer.run import grad_scaler, resolve_device

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev, amp_dtype = resolve_device(device)
    model = timm.create_model(backbone, pretrained=False, drop_path_rate=0.1)
    if method == "full":
        model.reset_classifier(num_classes)
    else:
        add_rlrr(model, RLRRConfig.preset(method), num_classes)
    model.to(dev).train()
    optimizer = adamw(model, lr=1e-3, weight_decay=0.05)
    scaler = grad_scaler(dev, amp_dtype)
    size = model.pretrained_cfg["input_size"][-1]
    images = torch.randn(batch_size, 3, size, size, device=dev)
    labels = torch.randint(0, num_classes, (batch_size,), device=dev)

    def step() -> None:
        train_step(model, optimizer, scaler, images, labels, amp_dtype)  # the trainer's step, GradScaler included

    times, memory = _timed(step, dev, warmup, steps)
    return {
        "method": method, "backbone": backbone, "batch_size": batch_size, "img_size": size,
        "device": str(dev), "precision": str(amp_dtype or "fp32"), "threads": torch.get_num_threads(),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "step_ms": 1000 * statistics.median(times), "step_ms_min": 1000 * min(times),
        **memory,
    }


def _timed(step: Callable[[], None], dev: Any, warmup: int, steps: int) -> tuple[list[float], dict[str, Any]]:
    """Seconds of each timed step, and the peak memory of all of them (see the module docstring)."""
    import torch

    rss_before = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # sync point: kernels are async, time the whole step
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        return times, {"peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20,
                       "peak_kind": "cuda max_memory_allocated (MiB)", "model_mib": base / 2**20}
    return times, {"peak_mib": _peak_rss_mib() - rss_before, "peak_kind": "peak RSS growth during training (MiB)",
                   "rss_before_mib": rss_before}


def _table(rows: list[dict[str, Any]]) -> str:
    full = next(r for r in rows if r["method"] == "full")
    r0 = rows[0]
    lines = [f"backbone {r0['backbone']}, batch {r0['batch_size']}, {r0['img_size']} px, {r0['device']} "
             f"({r0['precision']}, {r0['threads']} threads); memory = {r0['peak_kind']}",
             f"{'method':8} {'trainable':>12} {'step ms':>9} {'memory MiB':>11} | "
             f"{'trainable/full':>14} {'step/full':>9} {'memory/full':>11}"]
    for r in rows:
        lines.append(f"{r['method']:8} {r['trainable']:>12,} {r['step_ms']:>9.1f} {r['peak_mib']:>11.1f} | "
                     f"{r['trainable'] / full['trainable']:>14.5f} {r['step_ms'] / full['step_ms']:>9.3f} "
                     f"{r['peak_mib'] / full['peak_mib']:>11.3f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; must include full")
    p.add_argument("--json", action="store_true", help="print one JSON line per method instead of a table")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = p.parse_args()
    if args.worker:
        row = measure(args.worker, args.backbone, args.batch_size, args.steps, args.warmup, args.device,
                      args.num_classes, args.threads)
        print(json.dumps(row))
        return
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = args.methods.split(",")
    if "full" not in methods:
        p.error("--methods must include full (the ratios are against it)")
    rows = []
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    for method in methods:
        cmd = [sys.executable, __file__, "--worker", method, "--backbone", args.backbone, "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device",
               args.device, "--num-classes", str(args.num_classes)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        if args.json:
            print(out.strip().splitlines()[-1], flush=True)
    if not args.json:
        print(_table(rows))


if __name__ == "__main__":
    main()
