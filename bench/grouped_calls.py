"""Does running a mixed batch as one merged call per task cost more compute than one call?

    python bench/grouped_calls.py                       # vit_small_patch16_224, 16 images, 1 thread
    python bench/grouped_calls.py --groups 9 --threads 2

In one process, with random backbone weights: the time of ONE `functional_call` on a batch of B
images (the `single` scenario of bench/serve.py) against B calls of one image each, and against G
calls of B/G images, every call with its own folded weight set (distinct tensors, as in the
merged cache). Prints the fastest of `--repeats` runs of each and its ratio to the single call,
so what the engine pays per task group is separated from the HTTP server around it.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from torch.func import functional_call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--groups", type=int, default=9, help="task groups of the middle case (Zipf-50 gives ~9 of 16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the server's engine thread does
    model = timm.create_model(args.backbone, pretrained=False).eval()
    base = dict(model.named_parameters())
    weights = [{k: v + 0.0 for k, v in base.items()} for _ in range(args.batch)]  # distinct tensors per "task"
    x = torch.randn(args.batch, 3, *model.patch_embed.img_size)
    b, g = args.batch, args.groups
    cases = {
        "1 call of B": lambda: functional_call(model, weights[0], (x,)),
        f"{g} calls of ~B/{g}": lambda: [functional_call(model, weights[i], (x[i * b // g:(i + 1) * b // g],))
                                         for i in range(g)],
        "B calls of 1": lambda: [functional_call(model, weights[i], (x[i:i + 1],)) for i in range(b)],
    }
    best: dict[str, float] = {}
    with torch.inference_mode():
        for run in cases.values():
            run()  # warm-up
        for _ in range(args.repeats):  # interleaved, so drift on a busy machine hits every case alike
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    print(f"{args.backbone}, B={b}, {args.threads} thread(s), fastest of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:18s} {seconds:7.3f} s   time / (1 call of B) = {seconds / best['1 call of B']:.3f}")


if __name__ == "__main__":
    main()
