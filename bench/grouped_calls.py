"""What does a mixed batch cost in compute, form by form, against one plain call?

    python bench/grouped_calls.py                       # vit_small_patch16_224, 16 images, 1 thread
    python bench/grouped_calls.py --groups 9 --threads 2
    python bench/grouped_calls.py --methods rlrr,lora,ia3    # task i of methods[i % 3]: mixed-method passes

In one process, with random backbone weights: the time of ONE `functional_call` on a batch of B
images (the `single` scenario of bench/serve.py: one cached fold) against
- G / B calls of B/G / 1 images, each with its own folded weight set (a backbone copy per task),
- one `MultiTaskViT` pass in `segmented` mode with 1, G and B task segments, every layer folded
  just in time into a reused buffer (no copy of the backbone per task),
- one pass in `unmerged` mode (the two-matmul form) with B tasks.
Cases run interleaved (drift on a busy machine hits every case alike); prints the fastest of
`--repeats` runs of each and its ratio to the single call, so what the engine pays per task group
is separated from the HTTP server around it.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from torch.func import functional_call

from adapters import BitFitConfig, IA3Config, LoRAConfig, MultiTaskViT, RLRRConfig, adapter_state_dict, add_rlrr

CONFIGS = {"rlrr": RLRRConfig(), "ssf": RLRRConfig.preset("ssf"), "lora": LoRAConfig(r=8, lora_alpha=16),
           "bitfit": BitFitConfig(), "ia3": IA3Config()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--groups", type=int, default=9, help="task groups of the middle case (Zipf-50 gives ~9 of 16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="rlrr", help=f"methods of the tasks, in turn (of {', '.join(CONFIGS)})")
    args = p.parse_args()
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the server's engine thread does
    model = timm.create_model(args.backbone, pretrained=False).eval()
    base = dict(model.named_parameters())
    weights = [{k: v + 0.0 for k, v in base.items()} for _ in range(args.batch)]  # distinct tensors per "task"
    x = torch.randn(args.batch, 3, *model.patch_embed.img_size)
    b, g = args.batch, args.groups
    multi = MultiTaskViT(model)
    adapters = {m: adapter_state_dict(add_rlrr(timm.create_model(args.backbone, pretrained=False), CONFIGS[m], 10))
                for m in methods}  # RLRR's reference init is not the identity; the others move by 0.01·i below
    for i in range(b):
        m = methods[i % len(methods)]
        multi.add_task(f"t{i}", {k: v + 0.01 * (i + 1) for k, v in adapters[m].items()}, CONFIGS[m], 10)
    segments = lambda n: [f"t{i * n // b}" for i in range(b)]  # noqa: E731 - rows sorted, n segments
    cases = {
        "1 call of B": lambda: functional_call(model, weights[0], (x,)),
        f"{g} calls of ~B/{g}": lambda: [functional_call(model, weights[i], (x[i * b // g:(i + 1) * b // g],))
                                         for i in range(g)],
        "B calls of 1": lambda: [functional_call(model, weights[i], (x[i:i + 1],)) for i in range(b)],
        "segmented, 1 task": lambda: multi(x, segments(1), mode="segmented"),
        f"segmented, {g} tasks": lambda: multi(x, segments(g), mode="segmented"),
        "segmented, B tasks": lambda: multi(x, segments(b), mode="segmented"),
        "unmerged, B tasks": lambda: multi(x, segments(b), mode="unmerged"),
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
    print(f"{args.backbone}, B={b}, {args.threads} thread(s), fastest of {args.repeats}, methods {methods}")
    for name, seconds in best.items():
        print(f"{name:20s} {seconds:7.3f} s   time / (1 call of B) = {seconds / best['1 call of B']:.3f}")


if __name__ == "__main__":
    main()
