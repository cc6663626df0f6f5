"""The one backbone contract: BackboneSpec, build_backbone, and the spec recorded in adapter_config.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config

from adapters import (
    AdapterError,
    BackboneError,
    BackboneSpec,
    RLRRConfig,
    add_rlrr,
    backbone_fingerprint,
    backbones,
    build_backbone,
    load_adapter,
    save_adapter,
)
from adapters.backbones import PICO_NAME

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_vit weights with their 1000-class head, as a training run's --checkpoint would be."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("ckpt") / "test_vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    return path


def _save(spec: BackboneSpec, directory: Path) -> Path:
    model, _ = build_backbone(spec)
    add_rlrr(model, RLRRConfig(), num_classes=2)
    return save_adapter(model, directory, base_model=spec.name)  # the spec comes from the model


def test_spec_normalises_so_equal_backbones_compare_equal() -> None:
    assert BackboneSpec("test_vit", model_kwargs={"img_size": (32, 32)}).model_kwargs == {"img_size": [32, 32]}
    # test_vit's default resolution is 160: saying so is the same backbone as saying nothing
    assert BackboneSpec("test_vit", model_kwargs={"img_size": 160}) == BackboneSpec("test_vit")
    assert BackboneSpec(PICO_NAME, model_kwargs={"img_size": [32, 32]}).model_kwargs == {}
    assert BackboneSpec("test_vit", model_kwargs={"img_size": 32}) != BackboneSpec("test_vit")
    with pytest.raises(ValueError, match="JSON"):
        BackboneSpec("test_vit", model_kwargs={"act_layer": object()})
    spec = BackboneSpec("test_vit", checkpoint=Path("w.safetensors"), model_kwargs={"img_size": 32}, seed=3,
                        pretrained=False)
    assert spec.checkpoint == "w.safetensors"
    assert BackboneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match=r"unknown backbone_spec fields \['future'\]"):
        BackboneSpec.from_dict({**spec.to_dict(), "future": 1})


def test_spec_round_trips_through_the_adapter_file(checkpoint: Path, tmp_path: Path) -> None:
    spec = BackboneSpec("test_vit", checkpoint=str(checkpoint), model_kwargs={"img_size": 32})
    directory = _save(spec, tmp_path / "task")
    doc = json.loads((directory / "adapter_config.json").read_text())
    assert doc["backbone_spec"] == {"name": "test_vit", "checkpoint": str(checkpoint),
                                    "model_kwargs": {"img_size": 32}, "seed": 0, "pretrained": True}
    backbone, random_weights = build_backbone(BackboneSpec.from_dict(doc["backbone_spec"]))
    assert not random_weights
    adapter = load_adapter(directory, backbone=backbone)  # same kwargs, same fingerprint, same shapes
    assert adapter.backbone_spec == spec
    assert adapter.fingerprint == backbone_fingerprint(backbone)


def test_other_model_kwargs_are_refused_naming_both(checkpoint: Path, tmp_path: Path) -> None:
    directory = _save(BackboneSpec("test_vit", checkpoint=str(checkpoint), model_kwargs={"img_size": 32}),
                      tmp_path / "small")
    default, _ = build_backbone(BackboneSpec("test_vit", checkpoint=str(checkpoint)))
    # Checked before the fingerprint (which differs too: the position grid was resampled), so the
    # reason is the cause, with both sides spelled as the JSON RLRR_BACKBONE_KWARGS takes.
    both = (r"adapter small was trained on backbone 'test_vit' with model_kwargs \{\"img_size\": 32\}, "
            r"but this backbone 'test_vit' has model_kwargs \{\}")
    with pytest.raises(AdapterError, match=both):
        load_adapter(directory, backbone=default)
    with pytest.raises(AdapterError, match=r"\{\"img_size\": 48\}"):
        load_adapter(directory, fingerprint="0" * 64,
                     backbone_spec=BackboneSpec("test_vit", model_kwargs={"img_size": 48}))


def test_older_adapter_files_derive_their_spec(checkpoint: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Embedded weights: no hub probe (an offline `make serve` must not wait on the network).
    monkeypatch.setattr(backbones, "hub_offline", lambda *a, **k: pytest.fail("probed the hub"))
    # The pico demo store predated backbone_spec: such a file's spec comes from metadata.backbone (as
    # that store recorded it), and it still loads.
    pico, random_weights = build_backbone(BackboneSpec(PICO_NAME))
    assert not random_weights
    older = _save(BackboneSpec(PICO_NAME), tmp_path / "pico-older")
    doc = json.loads((older / "adapter_config.json").read_text())
    del doc["backbone_spec"]
    doc["metadata"] = {"backbone": {"checkpoint": None, "model_kwargs": {}, "name": PICO_NAME}}
    (older / "adapter_config.json").write_text(json.dumps(doc))
    demo = load_adapter(older, backbone=pico)
    assert demo.backbone_spec == BackboneSpec(PICO_NAME)
    # A file without backbone_spec whose metadata recorded kwargs keeps them, and is checked on them.
    directory = _save(BackboneSpec("test_vit", checkpoint=str(checkpoint), model_kwargs={"img_size": 32}),
                      tmp_path / "old")
    path = directory / "adapter_config.json"
    doc = json.loads(path.read_text())
    del doc["backbone_spec"]
    doc["metadata"] = {"backbone": {"name": "test_vit", "checkpoint": None, "model_kwargs": {"img_size": 32}}}
    path.write_text(json.dumps(doc))
    assert load_adapter(directory).backbone_spec.model_kwargs == {"img_size": 32}
    with pytest.raises(AdapterError, match="model_kwargs"):
        load_adapter(directory, backbone=build_backbone(BackboneSpec("test_vit", checkpoint=str(checkpoint)))[0])


def test_random_backbone_is_seeded_and_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, random_a = build_backbone(BackboneSpec("test_vit", pretrained=False))
    assert torch.equal(torch.random.get_rng_state(), before)  # the trainer's adapter init is unaffected
    b, _ = build_backbone(BackboneSpec("test_vit", pretrained=False))
    c, _ = build_backbone(BackboneSpec("test_vit", pretrained=False, seed=1))
    assert random_a
    assert backbone_fingerprint(a) == backbone_fingerprint(b) != backbone_fingerprint(c)


def test_img_size_sets_the_geometry_every_data_config_reads(checkpoint: Path) -> None:
    model, _ = build_backbone(BackboneSpec("test_vit", checkpoint=str(checkpoint), model_kwargs={"img_size": 32}))
    assert resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)  # timm alone says 160
    assert model.pos_embed.shape == (1, 1 + 2 * 2, 64)  # resampled from the checkpoint's 10x10 grid
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


def test_checkpoint_without_head_loads_and_a_misfit_is_precise(checkpoint: Path, tmp_path: Path) -> None:
    state = {k: v for k, v in timm.create_model("test_vit").state_dict().items() if not k.startswith("head.")}
    headless = tmp_path / "headless.safetensors"
    save_file(state, str(headless))
    model, _ = build_backbone(BackboneSpec("test_vit", checkpoint=str(headless)))
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    with pytest.raises(BackboneError, match=r"does not fit this backbone: missing \['blocks\.6.*shape mismatch"):
        build_backbone(BackboneSpec("vit_tiny_patch16_224", checkpoint=str(checkpoint)))
    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone(BackboneSpec("test_vit", checkpoint=str(tmp_path / "nope.safetensors")))
    with pytest.raises(BackboneError, match="unknown timm model 'no_such_vit'"):
        build_backbone(BackboneSpec("no_such_vit"))
    with pytest.raises(BackboneError, match=r"cannot build 'test_vit' with model_kwargs \{\"no_such_kwarg\": 1\}"):
        build_backbone(BackboneSpec("test_vit", pretrained=False, model_kwargs={"no_such_kwarg": 1}))
