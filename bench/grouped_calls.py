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
With `--linears`, instead, one block's four linears alone: one GEMM over all B·N rows against the same
rows split into G segments with G weights, as a loop of `addmm` (what the segmented form runs) and as
one `torch._grouped_mm` call (torch's grouped GEMM; on CPU since torch 2.8): does a grouped GEMM
remove the split's cost here?
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
    p.add_argument("--linears", action="store_true", help="time one block's linears split G ways (see above)")
    args = p.parse_args()
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the server's engine thread does
    model = timm.create_model(args.backbone, pretrained=False).eval()
    if args.linears:
        return split_linears(model, args)
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


def split_linears(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Per linear of block 0: one GEMM over B·N rows vs G segments (an addmm loop, one grouped GEMM)."""
    b, g = args.batch, args.groups
    rows = b * (model.patch_embed.num_patches + model.num_prefix_tokens)  # B·N
    block = model.blocks[0]
    total: dict[str, float] = {}
    with torch.inference_mode():
        for name, lin in (("qkv", block.attn.qkv), ("proj", block.attn.proj), ("fc1", block.mlp.fc1),
                          ("fc2", block.mlp.fc2)):
            best = _time_split(lin, rows, g, max(args.repeats, 5))
            print(f"{name:5s} {tuple(lin.weight.shape)} " + "  ".join(
                f"{case} {1e3 * t:.2f} ms ({t / best['1 GEMM']:.3f})" for case, t in best.items()))
            for case, t in best.items():
                total[case] = total.get(case, 0.0) + t
    print(f"block 0, B·N = {rows}, G = {g}, {args.threads} thread(s): " + "  ".join(
        f"{case} {t / total['1 GEMM']:.3f}" for case, t in total.items()) + "  (time / 1 GEMM)")


def _time_split(lin: torch.nn.Linear, rows: int, g: int, repeats: int) -> dict[str, float]:
    w, bias = lin.weight, lin.bias
    cuts = [round(rows * (i + 1) / g) for i in range(g)]  # G near-equal segments (only their count matters)
    offs = torch.tensor(cuts, dtype=torch.int32)
    x, y = torch.randn(rows, w.shape[1]), torch.empty(rows, w.shape[0])
    stacked = torch.stack([w * (1 + 0.01 * i) for i in range(g)])  # (G, out, in): G distinct weights

    def loop() -> None:
        for i, (lo, hi) in enumerate(zip([0, *cuts[:-1]], cuts, strict=True)):
            torch.addmm(bias, x[lo:hi], stacked[i].t(), out=y[lo:hi])

    cases = {"1 GEMM": lambda: torch.addmm(bias, x, w.t(), out=y), f"{g} addmm": loop,
             "grouped_mm": lambda: torch._grouped_mm(x, stacked.transpose(1, 2), offs=offs).add_(bias)}
    best: dict[str, float] = {}
    for run in cases.values():
        run()  # warm-up
    for _ in range(repeats):  # interleaved, so drift on a busy machine hits every case alike
        for case, run in cases.items():
            start = time.perf_counter()
            run()
            best[case] = min(best.get(case, float("inf")), time.perf_counter() - start)
    return best

if __name__ == "__main__":
    main()
