"""Pictures of training: the per-layer shift numbers, and the PNGs a run and `report` write."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from adapters import RLRRConfig, adapter_state_dict, add_rlrr, load_adapter
from trainer import plots
from trainer.cli import main
from trainer.loop import TrainConfig, train
from trainer.tasks import Task

LAYERS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def assert_png(path: Path, min_w: int = 400, min_h: int = 250) -> None:
    """A readable PNG of non-trivial size that is not one flat colour."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w and im.height >= min_h, im.size
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # axes, text and colours on a white background


def _adapted(config: RLRRConfig | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return add_rlrr(timm.create_model("test_vit", pretrained=False), config or RLRRConfig(), num_classes=2)


def _set(model: torch.nn.Module, l: float | None, c: float | None) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("rlrr_l") and l is not None:
                p.fill_(l)
            elif name.endswith("rlrr_c") and c is not None:
                p.fill_(c)


def test_zero_adapter_moves_nothing_and_the_backbone_is_only_read() -> None:
    model = _adapted()
    _set(model, 0.0, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shifts = plots.weight_shift(model, adapter_state_dict(model), model.rlrr_config)
    assert [(s.block, s.layer) for s in shifts] == [(b, n) for b in range(len(model.blocks)) for n in LAYERS]
    for s in shifts:
        assert s.rel_frobenius == 0.0 and s.sv_change == 0.0, s.path
        assert s.sv_before == s.sv_after and len(s.sv_before) == plots.TOP_K
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_uniform_rescaling_changes_norm_and_singular_values_by_l_times_c() -> None:
    # l = 0.5, c = 0.4: W' = (1 + 0.2) W, so ‖W' − W‖/‖W‖ = 0.2 and every σ grows by 20%.
    model = _adapted()
    _set(model, 0.5, 0.4)
    for s in plots.weight_shift(model, adapter_state_dict(model), model.rlrr_config):
        assert s.rel_frobenius == pytest.approx(0.2, rel=1e-5), s.path
        assert s.sv_change == pytest.approx(0.2, rel=1e-4), s.path


def test_known_l_c_match_the_hand_computation_on_a_plain_backbone() -> None:
    # W' − W = diag(l) W diag(c_g) on each q/k/v row group g: computed here by matrix products.
    model = _adapted()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("rlrr_l", "rlrr_c")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    tensors, config = adapter_state_dict(model), model.rlrr_config
    torch.manual_seed(0)
    plain = timm.create_model("test_vit", pretrained=False)  # the same weights _adapted() wrapped
    assert torch.equal(plain.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.base_layer.weight)
    shifts = {s.path: s for s in plots.weight_shift(plain, tensors, config)}
    assert len(shifts) == 4 * len(plain.blocks)
    for path, s in shifts.items():
        w = plain.get_submodule(path).weight.detach().double()
        l, c = tensors[f"{path}.rlrr_l"].double(), tensors[f"{path}.rlrr_c"].double()
        rows = w.shape[0] // c.shape[0]
        delta = torch.cat([torch.diag(l[g * rows:(g + 1) * rows]) @ w[g * rows:(g + 1) * rows] @ torch.diag(c[g])
                           for g in range(c.shape[0])])
        assert s.rel_frobenius == pytest.approx((delta.norm() / w.norm()).item(), rel=1e-5), path
        sv = torch.linalg.svdvals(w)[:plots.TOP_K]
        sv_new = torch.linalg.svdvals(w + delta)[:plots.TOP_K]
        assert s.sv_change == pytest.approx(((sv_new - sv) / sv).mean().item(), rel=1e-3, abs=1e-6), path


def test_no_residual_identity_adapter_moves_nothing() -> None:
    model = _adapted(RLRRConfig(residual=False))
    _set(model, 1.0, 1.0)  # W ⊙ (l cᵀ) with l = c = 1 is W
    for s in plots.weight_shift(model, adapter_state_dict(model), model.rlrr_config):
        assert s.rel_frobenius == pytest.approx(0.0, abs=1e-7)


def test_shift_from_the_adapters_own_start(tmp_path: Path) -> None:
    # Reference init (not the identity): at step 0 the whole shift from W is "from init", none learned.
    model = _adapted()
    init = adapter_state_dict(model)
    plots.save_init(tmp_path, init)
    kept = plots.read_init(tmp_path)
    assert set(kept) == {k for k in init if k.endswith(("rlrr_l", "rlrr_c"))}
    at_start = plots.weight_shift(model, init, model.rlrr_config, init=kept)
    assert all(s.rel_frobenius > 0 for s in at_start)  # the reference init already moves W
    for s in at_start:
        assert s.rel_from_init == 0.0 and s.rel_init == pytest.approx(s.rel_frobenius, rel=1e-6), s.path
    # "Training" adds 0.1 to every l: the change from the start is that step alone, not the init's share.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("rlrr_l"):
                p.add_(0.1)
    later = plots.weight_shift(model, adapter_state_dict(model), model.rlrr_config, init=kept)
    for a, b in zip(at_start, later, strict=True):
        assert b.rel_from_init > 0 and b.rel_init == pytest.approx(a.rel_init)
        assert b.rel_from_init != pytest.approx(b.rel_frobenius)
    assert plots.read_init(tmp_path / "elsewhere") is None
    assert_png(plots.plot_shift(later, tmp_path / "s.png", "t"), min_h=400)  # three panels


def test_plots_are_readable_pngs(tmp_path: Path) -> None:
    records = [{"epoch": e, "lr": 1e-3 / e, "train_loss": 1 / e, "train_top1": 50 + 5 * e,
                "val_top1": 45 + 4 * e, "val_loss": 1.2 / e} for e in range(1, 6)]
    metrics = {"test_top1": 61.0, "epochs": 5, "best_val_epoch": 4, "test_top1_at_best_val": 60.0}
    assert_png(plots.plot_curves(records, tmp_path / "c.png", "t", metrics), 1000, 300)
    assert_png(plots.plot_curves(records[:1], tmp_path / "one.png"), 1000, 300)  # a single epoch draws too
    model = _adapted()
    shifts = plots.weight_shift(model, adapter_state_dict(model), model.rlrr_config)
    assert_png(plots.plot_shift(shifts, tmp_path / "s.png", "t"))
    with pytest.raises(ValueError, match="no epochs"):
        plots.plot_curves([], tmp_path / "none.png")


def test_curves_of_a_running_training_are_redrawn_at_most_every_interval(tmp_path: Path) -> None:
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 1, "lr": 1e-3, "train_loss": 1.0, "train_top1": 50.0})
                                        + "\n")
    writer = plots.CurveWriter(tmp_path, "t", say=pytest.fail, min_interval_s=3600)
    assert writer.update() == tmp_path / plots.CURVES_NAME  # the first call draws
    (tmp_path / plots.CURVES_NAME).unlink()
    assert writer.update() is None and not (tmp_path / plots.CURVES_NAME).exists()  # not due yet
    assert writer.update(force=True) == tmp_path / plots.CURVES_NAME  # e.g. the run's last epoch


def test_training_run_draws_both_and_report_redraws_them(tiny_imagefolder: Path, vit_checkpoint: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, run_dir = tmp_path / "store", tmp_path / "run"
    cfg = TrainConfig(task=Task("tiny"), data_root=str(tiny_imagefolder), backbone="test_vit",
                      checkpoint=str(vit_checkpoint), img_size=32, epochs=2, warmup_epochs=0, workers=0,
                      batch_size=8, store=str(store), run_dir=str(run_dir))
    train(cfg)
    out = capsys.readouterr().out
    assert "epoch 1/2 it 2/2 loss" in out and "eta" in out  # not a terminal: plain progress lines
    assert "warning" not in out
    assert_png(run_dir / plots.CURVES_NAME, 1000, 300)
    assert_png(run_dir / plots.SHIFT_NAME)
    n_blocks = len(timm.create_model("test_vit").blocks)
    numbers = json.loads((run_dir / plots.SHIFT_JSON).read_text())
    assert len(numbers) == 4 * n_blocks
    assert (run_dir / plots.INIT_NAME).is_file()  # step 0 kept: the picture shows what training moved
    assert all(s["rel_from_init"] > 0 and s["rel_init"] > 0 for s in numbers)
    training = load_adapter(store / "tiny").metadata["training"]
    assert training == {"run_dir": str(run_dir.resolve()), "log": str((run_dir / "log.jsonl").resolve()),
                        "curves": str((run_dir / plots.CURVES_NAME).resolve()),
                        "shift": str((run_dir / plots.SHIFT_NAME).resolve())}

    rep = tmp_path / "report"
    assert main(["report", "--task", "tiny", "--store", str(store), "--checkpoint", str(vit_checkpoint),
                 "--out", str(rep)]) == 0  # the run dir comes from the adapter's metadata
    assert capsys.readouterr().out.split() == ["wrote", str(rep / plots.CURVES_NAME),
                                               "wrote", str(rep / plots.SHIFT_NAME)]
    assert_png(rep / plots.CURVES_NAME, 1000, 300)
    assert_png(rep / plots.SHIFT_NAME)
    assert (rep / plots.SHIFT_JSON).read_text() == (run_dir / plots.SHIFT_JSON).read_text()


def test_report_without_a_run_dir_draws_the_shift_and_says_why_no_curves(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    demo = Path(__file__).resolve().parents[2] / "demo" / "store"
    assert main(["report", "--task", "digits", "--store", str(demo), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no training curves for 'digits': the adapter records no run directory" in out
    assert_png(tmp_path / plots.SHIFT_NAME)
    assert not (tmp_path / plots.CURVES_NAME).exists()


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--task", "nope", "--store", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no adapter for task 'nope'")
    demo = Path(__file__).resolve().parents[2] / "demo" / "store"
    assert main(["report", "--task", "digits", "--store", str(demo), "--run-dir", str(tmp_path)]) == 2
    assert "holds no log.jsonl" in capsys.readouterr().err
