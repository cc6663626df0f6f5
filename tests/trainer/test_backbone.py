"""Backbone creation: local checkpoints (safetensors / .pth), offline errors, mismatches."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from trainer.backbone import create_backbone
from trainer.errors import BackboneError


def test_safetensors_and_pth_give_the_same_weights(vit_checkpoint: Path, tmp_path: Path) -> None:
    state = load_file(str(vit_checkpoint))
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": state}, pth)  # a wrapped torch checkpoint
    a = create_backbone("test_vit", vit_checkpoint)
    b = create_backbone("test_vit", pth)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, state[k]), k


def test_checkpoint_with_another_head_loads(vit_checkpoint: Path, tmp_path: Path) -> None:
    state = load_file(str(vit_checkpoint))
    state["head.weight"], state["head.bias"] = torch.zeros(5, 64), torch.zeros(5)
    path = tmp_path / "h.pth"
    torch.save(state, path)
    model = create_backbone("test_vit", path)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_offline_without_checkpoint_says_pass_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"offline .* pass --checkpoint FILE"):
        create_backbone("vit_tiny_patch16_224.augreg_in21k")


def test_wrong_checkpoint_and_names(vit_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("test_vit", tmp_path / "nope.safetensors")
    mismatch = r"does not fit this backbone: missing \['blocks\.6.*shape mismatch \['cls_token"
    with pytest.raises(BackboneError, match=mismatch):
        create_backbone("vit_tiny_patch16_224", vit_checkpoint)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BackboneError, match="cannot read checkpoint"):
        create_backbone("test_vit", tmp_path / "junk.pth")
    with pytest.raises(BackboneError, match="unknown timm model 'no_such_vit'"):
        create_backbone("no_such_vit")


def test_drop_path_rises_linearly(vit_checkpoint: Path) -> None:
    model = create_backbone("test_vit", vit_checkpoint, drop_path=0.5)
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)
    assert rates == sorted(rates)
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
