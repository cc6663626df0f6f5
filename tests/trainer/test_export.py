"""`trainer export` writes a file plain timm loads: a fresh Python that never imports this project
builds the model from the file's metadata and gives the adapter's logits."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from adapters import RLRRConfig, add_rlrr, save_adapter
from adapters.backbones import PICO_NAME
from trainer.backbone import create_backbone
from trainer.cli import main

# What a user types, nothing more: timm, safetensors, the file. Run with -I (no PYTHONPATH, no cwd
# on sys.path), and checked: no module of the project was imported.
LOADER = """
import json, sys
import timm, torch
from safetensors import safe_open
path, x_path, out_path = sys.argv[1:]
meta = safe_open(path, "pt").metadata()
model = timm.create_model(meta["timm_model"], checkpoint_path=path, **json.loads(meta["timm_kwargs"])).eval()
with torch.no_grad():
    logits = model(torch.load(x_path))
project = sorted(m for m in sys.modules if m.split(".")[0] in ("adapters", "trainer", "app"))
assert not project, project
config = timm.data.resolve_data_config(model=model)
torch.save({"logits": logits, "mean": list(config["mean"]), "input_size": list(config["input_size"])}, out_path)
"""


def _adapter(backbone: nn.Module, store: Path, task: str) -> nn.Module:
    torch.manual_seed(3)
    model = add_rlrr(backbone, RLRRConfig(), num_classes=3)  # reference init: not the identity
    with torch.no_grad():
        nn.init.normal_(model.head.weight, std=0.5)  # a head that is not the zero init
    save_adapter(model, store / task, labels=["a", "b", "c"])
    return model.eval()


def _load_plainly(out: Path, x: torch.Tensor, tmp_path: Path) -> dict:
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, str(out), str(tmp_path / "x.pt"),
                           str(tmp_path / "got.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(tmp_path / "got.pt")


@pytest.mark.parametrize("backbone", ["in-house", "timm"])
def test_export_loads_with_plain_timm(backbone: str, vit_checkpoint: Path, tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "task.safetensors"
    if backbone == "in-house":  # not registered in stock timm: the architecture travels in the file
        model, extra = _adapter(create_backbone(PICO_NAME), store, "task"), []
    else:  # a timm model at a non-default size (the geometry travels too)
        model = _adapter(create_backbone("test_vit", vit_checkpoint, img_size=32), store, "task")
        extra = ["--checkpoint", str(vit_checkpoint)]
    assert main(["export", "--task", "task", "--store", str(store), "--out", str(out), *extra]) == 0
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)  # the adapter's unmerged form, in this process
    got = _load_plainly(out, x, tmp_path)
    assert expected.abs().max() > 0.1
    # fp32: the fold reorders a few products; observed max difference ~1e-6 on logits of magnitude ~1
    torch.testing.assert_close(got["logits"], expected, atol=1e-4, rtol=1e-4)
    assert got["input_size"] == [3, 32, 32]
    data_cfg = model.pretrained_cfg
    assert got["mean"] == pytest.approx(list(data_cfg["mean"]))  # preprocessing as trained (CIFAR stats for pico)


def test_export_metadata_names_a_stock_model(vit_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    _adapter(create_backbone(PICO_NAME), tmp_path / "store", "pico")
    out = tmp_path / "pico.safetensors"
    assert main(["export", "--task", "pico", "--store", str(tmp_path / "store"), "--out", str(out)]) == 0
    meta = safe_open(str(out), "pt").metadata()
    assert meta["base_model"] == PICO_NAME and meta["timm_model"] == "vit_tiny_patch16_224"
    assert json.loads(meta["timm_kwargs"])["num_classes"] == 3 and json.loads(meta["labels"]) == ["a", "b", "c"]
