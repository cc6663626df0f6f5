"""PEFT folders in: the served scores equal peft.PeftModel's, through PUT and through import-peft; refusals."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config

from adapters import BitFitConfig, RLRRConfig, add_adapter, merge_adapter, save_adapter
from app.main import create_app
from app.settings import Settings
from app.tasks import BatchItem
from trainer.cli import main as trainer_main

peft = pytest.importorskip("peft")  # the dev extra; the oracle only

AUTH = {"authorization": "Bearer s3cret"}
PNG = {"content-type": "image/png"}
BACKBONE = "vit_tiny_patch16_224"
CLASSES = 5
LABELS = [f"c{i}" for i in range(CLASSES)]
# fp32 throughout: served scores and PeftModel's softmax differ by summation order and fold rounding only.
PEFT_ATOL = 1e-5


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path]:
    torch.manual_seed(2024)
    state = timm.create_model(BACKBONE, pretrained=False).state_dict()
    path = tmp_path_factory.mktemp("peft") / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state, path


def _peft_model(state: dict[str, torch.Tensor], config: object, seed: int) -> torch.nn.Module:
    """A PeftModel over the seeded backbone, its adapter pushed away from init (B ≠ 0, IA³ ≠ 1), head random."""
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=CLASSES)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.5)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "head" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.eval()


@pytest.fixture(scope="module")
def folders(backbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    state, _ = backbone
    root = tmp_path_factory.mktemp("peft_folders")
    configs = {
        "lora": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "proj", "fc1", "fc2"],
                                modules_to_save=["head"]),
        "ia3": peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"], modules_to_save=["head"]),
    }
    out = {}
    for seed, (name, config) in enumerate(configs.items()):
        pm = _peft_model(state, config, seed + 1)
        pm.save_pretrained(root / name)
        out[name] = (root / name, pm)
    return out


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(180, 200, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _peft_probs(pm: torch.nn.Module, image: bytes) -> torch.Tensor:
    base = timm.create_model(BACKBONE, pretrained=False)
    transform = create_transform(**resolve_data_config({}, model=base), is_training=False)
    x = transform(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    with torch.no_grad():
        return pm(x).softmax(-1)[0]


OURS = {"rlrr": RLRRConfig(), "bitfit": BitFitConfig(), "ssf": RLRRConfig.preset("ssf")}


@pytest.fixture(scope="module")
def ours(backbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, object]]:
    """This library's RLRR, BitFit and SSF adapters on the same backbone: (merged reference, config)."""
    state, _ = backbone
    out = {}
    for seed, (name, config) in enumerate(OURS.items()):
        model = timm.create_model(BACKBONE, pretrained=False)
        model.load_state_dict(state)
        add_adapter(model, config, CLASSES)
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        out[name] = model.eval()
    return out


@pytest.fixture(scope="module")
def client(backbone, folders, ours, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    _, checkpoint = backbone
    store = tmp_path_factory.mktemp("peft_store")
    for name, model in ours.items():
        save_adapter(model, store / name, base_model=BACKBONE, labels=LABELS)
    # import-peft writes one task before the server starts; PUT adds the others while it runs
    for name in folders:
        assert trainer_main(["import-peft", str(folders[name][0]), "--task", f"imported-{name}", "--labels",
                             json.dumps(LABELS), "--store", str(store), "--backbone", BACKBONE,
                             "--checkpoint", str(checkpoint)]) == 0
    settings = Settings(backbone=BACKBONE, checkpoint=checkpoint, store=store, device="cpu", max_wait_ms=2.0,
                        admin_token="s3cret", preprocess_workers=1)
    with TestClient(create_app(settings)) as c:
        yield c


def _files(directory: Path, config: dict | None = None, weights: bytes | None = None,
           labels: list[str] | None = LABELS) -> dict:
    files = {"config": ("adapter_config.json", json.dumps(config).encode() if config is not None
                        else (directory / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", weights if weights is not None
                         else (directory / "adapter_model.safetensors").read_bytes())}
    return files if labels is None else {**files, "labels": (None, json.dumps(labels).encode())}


def _served(client: TestClient, task: str, image: bytes) -> torch.Tensor:
    answer = client.post(f"/classify?task={task}&top_k={CLASSES}", content=image, headers=PNG)
    assert answer.status_code == 200, answer.text
    scores = {p["label"]: p["score"] for p in answer.json()["results"][0]["predictions"]}
    return torch.tensor([scores[label] for label in LABELS])


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_served_scores_equal_the_peft_model(client, folders, name) -> None:
    directory, pm = folders[name]
    response = client.put(f"/tasks/put-{name}", files=_files(directory), headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["method"] == name and response.json()["labels"] == LABELS
    for seed in (1, 2):
        image = _png(seed)
        expected = _peft_probs(pm, image)
        assert (_served(client, f"put-{name}", image) - expected).abs().max() <= PEFT_ATOL
        assert (_served(client, f"imported-{name}", image) - expected).abs().max() <= PEFT_ATOL
    assert expected.max() - expected.min() > 1e-3  # not a flat head: the comparison means something


@pytest.mark.parametrize("form", [None, "merged", "segmented", "unmerged"])
def test_mixed_method_batch_through_the_engine_equals_each_task_alone(client, folders, ours, form) -> None:
    # Rows cycle RLRR, PEFT LoRA, PEFT IA³, BitFit and SSF tasks in one batch, in every form the
    # planner can choose (None: auto); each row must be its own task's model.
    import asyncio

    service = client.app.state.service
    names = ["rlrr", "imported-lora", "imported-ia3", "bitfit", "ssf"]
    images = [_png(10 + i) for i in range(2 * len(names))]
    items = []
    for i, image in enumerate(images):
        task = client.portal.call(service.load_task, names[i % len(names)])  # resident (loaded if only stored)
        items.append(BatchItem(task, task.transform(Image.open(io.BytesIO(image)).convert("RGB")), CLASSES))
    engine = service.engine
    got = asyncio.run(engine._call(engine._run_batch, items, form, False))
    for i, image in enumerate(images):
        name = names[i % len(names)]
        if name.startswith("imported-"):
            expected = _peft_probs(folders[name.removeprefix("imported-")][1], image)
        else:
            expected = _peft_probs(merge_adapter(ours[name]).eval(), image)
        served = torch.zeros(CLASSES)
        for index, score in got[i]:
            served[index] = score
        assert (served - expected).abs().max() <= PEFT_ATOL, (name, form)


def _lora_doc(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


REFUSALS = {  # what is changed -> the field the reason must name
    "use_dora": (lambda d: {**d, "use_dora": True}, None, "use_dora"),
    "pissa": (lambda d: {**d, "init_lora_weights": "pissa_niter_4"}, None, "init_lora_weights"),
    "olora": (lambda d: {**d, "init_lora_weights": "olora"}, None, "init_lora_weights"),
    "corda": (lambda d: {**d, "init_lora_weights": "corda"}, None, "init_lora_weights"),
    "peft_type": (lambda d: {**d, "peft_type": "LOHA"}, None, "peft_type"),
    "targets": (lambda d: {**d, "target_modules": ["query", "value"]}, None, "target_modules"),
    "labels": (lambda d: d, None, "labels"),
    "no_head": (lambda d: {**d, "modules_to_save": None}, None, "modules_to_save"),
    "bias": (lambda d: {**d, "bias": "all"}, None, "bias"),
    "rank_pattern": (lambda d: {**d, "rank_pattern": {"qkv": 4}}, None, "rank_pattern"),
    "regex": (lambda d: {**d, "target_modules": r"blocks\.\d+\.nothing"}, None, "target_modules"),
    "missing": (lambda d: d, "drop", "missing"),
    "shape": (lambda d: {**d, "r": 4}, None, "shape"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_field_and_store_nothing(client, folders, case) -> None:
    directory, _ = folders["lora"]
    change, weights_change, field = REFUSALS[case]
    weights = None
    if weights_change == "drop":
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        del tensors[next(k for k in tensors if "blocks.3.mlp.fc1.lora_B" in k)]
        buf = io.BytesIO()
        from safetensors.torch import save

        buf.write(save(tensors))
        weights = buf.getvalue()
    labels = LABELS[:3] if case == "labels" else LABELS
    store = Path(client.app.state.service.registry.store)
    before = sorted(p.name for p in store.iterdir())
    response = client.put(f"/tasks/bad-{case}", files=_files(directory, change(copy.deepcopy(_lora_doc(directory))),
                                                          weights, labels), headers=AUTH)
    assert response.status_code == 422, response.text
    assert field in response.text, response.text
    assert sorted(p.name for p in store.iterdir()) == before
    assert client.get(f"/tasks/bad-{case}").status_code == 404


def test_labels_must_be_a_json_array(client, folders) -> None:
    directory, _ = folders["lora"]
    files = {**_files(directory, labels=None), "labels": (None, b"ant,bee")}
    response = client.put("/tasks/bad-labels-field", files=files, headers=AUTH)
    assert response.status_code == 422 and "labels" in response.text


def test_import_peft_refuses_with_the_reason(backbone, folders, tmp_path, capsys) -> None:
    _, checkpoint = backbone
    directory, _ = folders["ia3"]
    bad = tmp_path / "bad"
    bad.mkdir()
    doc = json.loads((directory / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**doc, "target_modules": ["nothing_here"]}))
    (bad / "adapter_model.safetensors").write_bytes((directory / "adapter_model.safetensors").read_bytes())
    code = trainer_main(["import-peft", str(bad), "--task", "x", "--store", str(tmp_path / "store"),
                         "--backbone", BACKBONE, "--checkpoint", str(checkpoint)])
    assert code == 2 and "target_modules" in capsys.readouterr().err
    assert not (tmp_path / "store" / "x").exists()




@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_export_peft_loads_in_peft_with_the_served_scores(client, backbone, name, tmp_path) -> None:
    state, checkpoint = backbone
    store = Path(client.app.state.service.registry.store)
    out = tmp_path / f"exported-{name}"
    assert trainer_main(["export", "--task", f"imported-{name}", "--format", "peft", "--out", str(out),
                         "--store", str(store), "--checkpoint", str(checkpoint)]) == 0
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=CLASSES)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
    pm = peft.PeftModel.from_pretrained(model, str(out)).eval()
    image = _png(3)
    assert (_served(client, f"imported-{name}", image) - _peft_probs(pm, image)).abs().max() <= PEFT_ATOL


def test_export_peft_refuses_a_method_peft_lacks(client, tmp_path, capsys) -> None:
    # RLRR has no PEFT type: a clear error, not a folder PEFT would misread
    from adapters import RLRRConfig, add_adapter, save_adapter

    model = add_adapter(timm.create_model("test_vit", pretrained=False), RLRRConfig(), 2)
    save_adapter(model, tmp_path / "store" / "r", base_model="test_vit")
    code = trainer_main(["export", "--task", "r", "--format", "peft", "--out", str(tmp_path / "o"),
                         "--store", str(tmp_path / "store")])
    assert code == 2 and "PEFT has no format" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_task_list_names_each_method_before_a_task_is_loaded(backbone, folders, ours, tmp_path) -> None:
    # Start-up reads configs only (stored tier): the list must still say which method each task is.
    _, checkpoint = backbone
    for name, model in ours.items():
        save_adapter(model, tmp_path / name, base_model=BACKBONE, labels=LABELS)
    assert trainer_main(["import-peft", str(folders["lora"][0]), "--task", "imported-lora", "--labels",
                         json.dumps(LABELS), "--store", str(tmp_path), "--backbone", BACKBONE,
                         "--checkpoint", str(checkpoint)]) == 0
    settings = Settings(backbone=BACKBONE, checkpoint=checkpoint, store=tmp_path, device="cpu", warmup=False)
    with TestClient(create_app(settings)) as c:
        tasks = {t["name"]: t for t in c.get("/tasks").json()["tasks"]}
    assert {n: t["tier"] for n, t in tasks.items()} == dict.fromkeys(tasks, "stored")
    assert tasks["imported-lora"]["method"] == "lora"
    # SSF is an RLRR preset (its folders say method "rlrr")
    assert {n: tasks[n]["method"] for n in ours} == {"rlrr": "rlrr", "bitfit": "bitfit", "ssf": "rlrr"}
