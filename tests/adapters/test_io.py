import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapters.io as adapter_io
from adapters import (
    AdapterError,
    RLRRConfig,
    add_rlrr,
    install_adapter,
    load_adapter,
    merge_rlrr,
    remove_adapter,
    remove_stale_uploads,
    save_adapter,
    stale_uploads,
)
from adapters.io import CONFIG_NAME, WEIGHTS_NAME, _sha256


@pytest.fixture
def trained(make_vit, perturb):
    base = make_vit()
    import copy
    model = perturb(add_rlrr(copy.deepcopy(base), RLRRConfig(), 4))
    return base, model


def save(model, path: Path, **kw) -> Path:
    return save_adapter(model, path, base_model="test_vit", labels=["ant", "bee", "cat", "dog"],
                        metadata={"epochs": 3, "metrics": {"test_top1": 0.5}}, **kw)


def edit_config(path: Path, **changes) -> None:
    doc = json.loads((path / CONFIG_NAME).read_text())
    doc.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(doc))


@torch.no_grad()
def test_round_trip_gives_identical_logits(trained, tmp_path: Path) -> None:
    base, model = trained
    out = save(model, tmp_path / "pets")
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    doc = json.loads((out / CONFIG_NAME).read_text())
    assert doc["format_version"] == 1 and doc["base_model"] == "test_vit" and doc["num_classes"] == 4
    assert doc["data_config"]["input_size"] == [3, 160, 160]
    adapter = load_adapter(out, backbone=base)
    assert adapter.labels == ["ant", "bee", "cat", "dog"] and adapter.metadata["epochs"] == 3
    reloaded = add_rlrr(make_copy(base), adapter.config, adapter.num_classes)
    reloaded.load_state_dict(adapter.tensors, strict=False)
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(reloaded.eval()(x), model.eval()(x))
    # The file holds adapter tensors only: no backbone weight travels with it.
    assert not any("base_layer" in k or k.startswith("blocks.0.attn.qkv.weight") for k in adapter.tensors)
    assert adapter.nbytes < sum(p.numel() * 4 for p in base.parameters()) / 5


def make_copy(m):
    import copy
    return copy.deepcopy(m)


def test_raw_tensors_need_their_metadata(trained, tmp_path: Path) -> None:
    _, model = trained
    from adapters import adapter_state_dict
    with pytest.raises(ValueError, match="needs config, fingerprint"):
        save_adapter(adapter_state_dict(model), tmp_path / "x", base_model="test_vit")


def test_refuses_another_backbone(trained, make_vit, tmp_path: Path) -> None:
    _, model = trained
    out = save(model, tmp_path / "pets")
    with pytest.raises(AdapterError, match="trained on backbone 'test_vit' with fingerprint"):
        load_adapter(out, backbone=make_vit(seed=123))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / CONFIG_NAME).unlink(), "adapter_config.json is missing"),
        (lambda p: (p / WEIGHTS_NAME).unlink(), "adapter_model.safetensors is missing"),
        (lambda p: (p / CONFIG_NAME).write_text("{not json"), "is not valid JSON"),
        (lambda p: edit_config(p, format_version=99), "unknown format_version 99"),
        (lambda p: edit_config(p, rlrr_config={"left": "maybe", "right": False}), "invalid rlrr_config"),
        (lambda p: edit_config(p, labels=["a"]), "1 labels for 4 classes"),
        (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:100]), "corrupt or truncated"),
    ],
)
def test_refusals_name_the_problem(trained, tmp_path: Path, damage, message: str) -> None:
    base, model = trained
    out = save(model, tmp_path / "pets")
    damage(out)
    with pytest.raises(AdapterError, match=message):
        load_adapter(out, backbone=base)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not a directory"):
        load_adapter(tmp_path / "nope")


def _rewrite_weights(path: Path, tensors: dict) -> None:
    """Replace the weights file and fix its checksum, as a buggy or hostile writer could."""
    save_file(tensors, str(path / WEIGHTS_NAME))
    edit_config(path, weights_sha256=_sha256(path / WEIGHTS_NAME))


def test_refuses_wrong_shapes_and_non_finite_values(trained, tmp_path: Path) -> None:
    base, model = trained
    out = save(model, tmp_path / "pets")
    tensors = dict(load_adapter(out).tensors)
    tensors["blocks.0.attn.qkv.rlrr_c"] = torch.zeros(1, 64)
    _rewrite_weights(out, tensors)
    with pytest.raises(AdapterError, match=r"wrong shapes \['blocks.0.attn.qkv.rlrr_c: \(1, 64\) != \(3, 64\)'"):
        load_adapter(out, backbone=base)
    del tensors["blocks.0.attn.qkv.rlrr_c"]
    _rewrite_weights(out, tensors)
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(out, backbone=base)
    tensors = dict(load_adapter(save(model, tmp_path / "pets")).tensors)
    tensors["blocks.1.norm2.ssf_shift"][3] = float("nan")
    _rewrite_weights(out, tensors)
    with pytest.raises(AdapterError, match="'blocks.1.norm2.ssf_shift' holds non-finite"):
        load_adapter(out, backbone=base)
    # An integer tensor is refused by name, not silently converted while being packed.
    tensors = dict(load_adapter(save(model, tmp_path / "pets")).tensors)
    tensors["blocks.0.norm1.ssf_scale"] = torch.ones(64, dtype=torch.int64)
    _rewrite_weights(out, tensors)
    with pytest.raises(AdapterError, match="'blocks.0.norm1.ssf_scale' has dtype torch.int64"):
        load_adapter(out, backbone=base)


def test_save_refuses_non_finite(trained, tmp_path: Path) -> None:
    _, model = trained
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    with pytest.raises(AdapterError, match="'head.bias' holds non-finite"):
        save(model, tmp_path / "pets")
    assert not (tmp_path / "pets").exists()


def test_write_is_atomic_when_it_crashes(trained, tmp_path: Path, monkeypatch) -> None:
    base, model = trained
    out = save(model, tmp_path / "pets")
    original = (out / WEIGHTS_NAME).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(adapter_io, "save_file", crash)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save(model, out)
    assert (out / WEIGHTS_NAME).read_bytes() == original  # the old adapter is intact
    assert sorted(os.listdir(tmp_path)) == ["pets"]  # and no temporary folder is left behind
    load_adapter(out, backbone=base)


def test_overwrite_replaces_whole_adapter(trained, tmp_path: Path) -> None:
    base, model = trained
    out = save(model, tmp_path / "pets")
    with torch.no_grad():
        model.head.bias.add_(1.0)
    save(model, out)
    assert torch.equal(load_adapter(out, backbone=base).tensors["head.bias"], model.head.bias.detach())
    assert sorted(os.listdir(tmp_path)) == ["pets"]


def test_merge_of_reloaded_adapter_matches(trained, tmp_path: Path) -> None:
    base, model = trained
    adapter = load_adapter(save(model, tmp_path / "pets"), backbone=base)
    from adapters import fold_adapter
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        out = torch.func.functional_call(base, fold_adapter(base, adapter.tensors, adapter.config), (x,))
        ref = merge_rlrr(model).eval()(x)
    assert (out - ref).abs().max() < 1e-5  # same fold, same inputs: only summation order differs


def test_loaded_tensors_are_packed_views_that_round_trip(trained, tmp_path: Path) -> None:
    from adapters import adapter_state_dict
    from adapters.packed import PackedTensors

    base, model = trained
    adapter = load_adapter(save(model, tmp_path / "a"), backbone=base)
    tensors = adapter.tensors
    assert isinstance(tensors, PackedTensors)
    expected = adapter_state_dict(model)
    assert sorted(tensors) == sorted(expected) and len(tensors) == len(expected)
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())
    body = [k for k in tensors if not k.startswith("head.")]
    assert all(tensors[k].untyped_storage().data_ptr() == tensors.flat.untyped_storage().data_ptr() for k in body)
    assert tensors.to("cpu", torch.float32) is tensors  # nothing to move: no copy
    half = tensors.to("cpu", torch.float16)
    assert half.layout is tensors.layout and half["head.weight"].dtype == torch.float16
    with pytest.raises(KeyError):
        tensors["blocks.0.nope"]
    # Re-saving loaded (packed, memory-sharing) tensors works and gives the same adapter back.
    again = save_adapter(tensors, tmp_path / "b", base_model="test_vit", config=adapter.config,
                         fingerprint=adapter.fingerprint, num_classes=adapter.num_classes, labels=adapter.labels)
    reloaded = load_adapter(again, backbone=base)
    assert reloaded.weights_sha256 == adapter.weights_sha256
    assert reloaded.tensors.layout is tensors.layout  # one layout object per (names, shapes)


def adapter_bytes(model, tmp_path: Path, name: str = "src") -> tuple[bytes, bytes]:
    out = save(model, tmp_path / "elsewhere" / name)
    return (out / CONFIG_NAME).read_bytes(), (out / WEIGHTS_NAME).read_bytes()


def test_install_validates_the_upload_before_it_replaces_the_task(trained, tmp_path: Path) -> None:
    base, model = trained
    store = tmp_path / "store"
    old = save(model, store / "pets")
    with torch.no_grad():
        model.head.bias.add_(1.0)
    config, weights = adapter_bytes(model, tmp_path)
    seen = []

    def validate(folder: Path) -> None:
        assert folder.parent == store and folder.name.startswith(".upload-pets-")
        assert (old / WEIGHTS_NAME).read_bytes() != weights  # the served task is untouched meanwhile
        seen.append(load_adapter(folder, backbone=base))

    assert install_adapter(store, "pets", config, weights, validate=validate) == store / "pets"
    assert len(seen) == 1 and sorted(os.listdir(store)) == ["pets"]
    assert (store / "pets" / WEIGHTS_NAME).read_bytes() == weights
    assert torch.equal(load_adapter(store / "pets", backbone=base).tensors["head.bias"], model.head.bias.detach())


def test_install_that_fails_validation_leaves_nothing_behind(trained, tmp_path: Path) -> None:
    base, model = trained
    store = tmp_path / "store"
    original = (save(model, store / "pets") / WEIGHTS_NAME).read_bytes()
    config, weights = adapter_bytes(model, tmp_path)

    def refuse(folder: Path) -> None:
        raise AdapterError("not for this backbone")

    with pytest.raises(AdapterError, match="not for this backbone"):
        install_adapter(store, "pets", config, weights, validate=refuse)
    with pytest.raises(AdapterError, match="not valid JSON"):  # a real check: the upload is garbage
        install_adapter(store, "ants", b"{", weights, validate=load_adapter)
    assert sorted(os.listdir(store)) == ["pets"] and stale_uploads(store) == []
    assert (store / "pets" / WEIGHTS_NAME).read_bytes() == original


def test_crash_mid_install_keeps_the_old_adapter_and_leaves_a_stale_upload(trained, tmp_path: Path) -> None:
    base, model = trained
    store = tmp_path / "store"
    original = (save(model, store / "pets") / WEIGHTS_NAME).read_bytes()
    config, weights = adapter_bytes(model, tmp_path)
    pid = os.fork()
    if pid == 0:  # the child dies after the upload is written, before the rename: no cleanup runs
        install_adapter(store, "pets", config, b"new " + weights, validate=lambda folder: os._exit(0))
        os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    assert (store / "pets" / WEIGHTS_NAME).read_bytes() == original
    stale = stale_uploads(store)
    assert [p.name.startswith(".upload-pets-") for p in stale] == [True]
    assert (stale[0] / WEIGHTS_NAME).read_bytes() == b"new " + weights
    assert remove_stale_uploads(store) == stale and sorted(os.listdir(store)) == ["pets"]
    load_adapter(store / "pets", backbone=base)


def test_stale_uploads_lists_only_what_interrupted_writes_leave(tmp_path: Path) -> None:
    stale = [".upload-pets-x1", ".pets.tmp-x2", ".pets.old-12-ab", ".pets.deleted-12-cd"]
    kept = ["pets", "ants.old-1", ".hidden", ".pets.older", "upload-x"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
    (tmp_path / ".dtd.deleted-3-ef").symlink_to(tmp_path / "pets")  # left by a removal that crashed
    assert stale_uploads(tmp_path) == sorted(tmp_path / n for n in [*stale, ".dtd.deleted-3-ef"])
    remove_stale_uploads(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert stale_uploads(tmp_path / "no-store") == []


def test_remove_adapter_is_one_rename_then_a_delete(trained, tmp_path: Path) -> None:
    _, model = trained
    store = tmp_path / "store"
    save(model, store / "pets")
    assert remove_adapter(store, "pets") is True
    assert os.listdir(store) == []
    assert remove_adapter(store, "pets") is False


def test_symlinked_task_removal_removes_the_link_only(trained, tmp_path: Path) -> None:
    base, model = trained
    store = tmp_path / "store"
    target = save(model, tmp_path / "shared" / "pets")
    store.mkdir()
    (store / "pets").symlink_to(target, target_is_directory=True)
    assert remove_adapter(store, "pets") is True
    assert os.listdir(store) == []  # no '.pets.deleted-*' link left behind
    load_adapter(target, backbone=base)  # what the link pointed to is kept


def test_install_over_a_symlinked_task_replaces_the_link_only(trained, tmp_path: Path) -> None:
    _, model = trained
    store = tmp_path / "store"
    target = save(model, tmp_path / "shared" / "pets")
    before = (target / WEIGHTS_NAME).read_bytes()
    store.mkdir()
    (store / "pets").symlink_to(target, target_is_directory=True)
    config, weights = adapter_bytes(model, tmp_path)
    install_adapter(store, "pets", config, b"x" + weights)
    assert not (store / "pets").is_symlink() and os.listdir(store) == ["pets"]
    assert (target / WEIGHTS_NAME).read_bytes() == before


@pytest.mark.parametrize("name", ["", ".pets", "a/b", "..", " pets"])
def test_install_and_remove_refuse_names_that_are_not_one_visible_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="one plain, visible folder name"):
        install_adapter(tmp_path, name, b"{}", b"")
    with pytest.raises(ValueError, match="one plain, visible folder name"):
        remove_adapter(tmp_path, name)
    assert os.listdir(tmp_path) == []


def test_label_fast_path_agrees_with_the_full_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # check_labels' one-pass ASCII shortcut must accept exactly what the per-label loop accepts.
    import random

    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\x7f", "\x1f", "é", "\u200b", "\ud800", "e\u0301", "A"]

    def outcome(labels: list[str]) -> bool:
        try:
            adapter_io.check_labels(labels)
        except ValueError:
            return False
        return True

    lists = [["".join(rng.choices(alphabet, k=rng.randint(0, 3))) for _ in range(rng.randint(1, 4))]
             for _ in range(3000)]
    fast = [outcome(labels) for labels in lists]
    monkeypatch.setattr(adapter_io, "_plain_ascii", lambda labels: False)
    assert fast == [outcome(labels) for labels in lists]
    assert any(fast) and not all(fast)  # both outcomes exercised


def test_packed_load_reads_the_body_in_runs_like_the_per_tensor_path(tmp_path) -> None:
    # save_file writes one dtype's tensors in name order, the head in the middle: the buffer is read in
    # two runs. The result must equal reading tensor by tensor; mixed dtypes take the per-tensor path.
    from adapters.packed import PackedTensors, _contiguous_body, shape_of

    gen = torch.Generator().manual_seed(0)
    tensors = {"blocks.0.x": torch.randn(7, generator=gen), "blocks.1.y": torch.randn(3, 4, generator=gen),
               "head.weight": torch.randn(2, 4, generator=gen), "head.bias": torch.randn(2, generator=gen),
               "norm.z": torch.randn(5, generator=gen), "patch_embed.w": torch.randn(1, 2, generator=gen)}
    save_file(tensors, tmp_path / "a.safetensors")
    assert _contiguous_body(tmp_path / "a.safetensors") is not None
    mixed = {**tensors, "norm.z": tensors["norm.z"].half()}
    save_file(mixed, tmp_path / "b.safetensors")
    assert _contiguous_body(tmp_path / "b.safetensors") is None
    for path, source in (("a.safetensors", tensors), ("b.safetensors", mixed)):
        loaded = PackedTensors.load_file(tmp_path / path)
        assert set(loaded) == set(source)
        for name, value in source.items():
            assert torch.equal(loaded[name], value.float()) and shape_of(loaded, name) == tuple(value.shape)
    assert shape_of(loaded, "missing") is None
