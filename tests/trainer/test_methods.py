"""--method lora / bitfit / ia3: train through the same loop, resume bit for bit, export merged == unmerged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from adapters import LoRAConfig, add_adapter, load_adapter
from trainer.backbone import backbone_spec, create_backbone
from trainer.cli import main

# The merged export and the unmerged (wrapped) model differ by fold rounding only (~1e-7 in fp32).
EXPORT_ATOL = 1e-5
METHODS = {"lora": ["--lora-rank", "4", "--lora-alpha", "8"], "bitfit": [], "ia3": []}


def _args(tiny: Path, ckpt: Path, out: Path, method: str) -> list[str]:
    return [str(a) for a in ("--task", "tiny", "--data-root", tiny, "--backbone", "test_vit", "--checkpoint", ckpt,
                             "--img-size", 32, "--epochs", 2, "--batch-size", 8, "--lr", 3e-2, "--workers", 0,
                             "--method", method, *METHODS[method], "--store", out / "store", "--run-dir", out / "run")]


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_resumes_and_exports_exactly(tiny_imagefolder: Path, vit_checkpoint: Path, tmp_path: Path,
                                                   method: str) -> None:
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert main(_args(tiny_imagefolder, vit_checkpoint, straight, method)) == 0
    assert main([*_args(tiny_imagefolder, vit_checkpoint, pieces, method), "--stop-after", "1"]) == 0
    assert main([*_args(tiny_imagefolder, vit_checkpoint, pieces, method), "--resume"]) == 0
    a = load_file(str(straight / "store/tiny/adapter_model.safetensors"))
    b = load_file(str(pieces / "store/tiny/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    doc = json.loads((straight / "store/tiny/adapter_config.json").read_text())
    assert doc["method"] == method and doc["metadata"]["recipe"]["method"] == method
    if method == "lora":
        assert doc["method_config"]["r"] == 4 and doc["method_config"]["lora_alpha"] == 8.0
    # trained: the adapter moved away from its init (B = 0, IA³ = 1, BitFit = 0)
    body = {k: v for k, v in a.items() if not k.startswith("head.")}
    init = {"lora_B": 0.0, "ia3_l": 1.0, "bitfit_b": 0.0}
    moved = [k for k, v in body.items() if k.rsplit(".", 1)[-1] in init and
             (v - init[k.rsplit(".", 1)[-1]]).abs().max() > 0]
    assert moved

    out = tmp_path / "merged.safetensors"
    assert main(["export", "--task", "tiny", "--store", str(straight / "store"), "--out", str(out),
                 "--checkpoint", str(vit_checkpoint)]) == 0
    merged = timm.create_model("test_vit", pretrained=False, num_classes=2, img_size=32,
                               checkpoint_path=str(out)).eval()
    backbone = create_backbone(backbone_spec("test_vit", vit_checkpoint, 32))  # as the trainer built it
    adapter = load_adapter(straight / "store/tiny")
    wrapped = add_adapter(backbone, adapter.config, 2)
    wrapped.load_state_dict(dict(adapter.tensors), strict=False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(x) - wrapped.eval()(x)).abs().max() < EXPORT_ATOL


def test_lora_flags_belong_to_lora(tiny_imagefolder: Path, vit_checkpoint: Path, tmp_path: Path, capsys) -> None:
    args = [a for a in _args(tiny_imagefolder, vit_checkpoint, tmp_path, "bitfit")]
    assert main([*args, "--lora-rank", "4"]) == 2
    assert "--lora-rank apply to --method lora only" in capsys.readouterr().err
    assert LoRAConfig().r == 8  # the default the trainer uses without --lora-rank
