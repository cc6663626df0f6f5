import random
from pathlib import Path

import numpy as np
import pytest

from trainer import mini_vtab


@pytest.mark.parametrize(("fn", "classes"), [
    (mini_vtab.shapes_count, {str(k) for k in range(1, 7)}),
    (mini_vtab.shapes_loc, {f"{c:02d}" for c in range(16)}),
    (mini_vtab.shapes_ori, {f"{b * 45 // 2:03d}deg" for b in range(8)}),
])
def test_generated_tasks_are_seeded_and_cover_their_classes(fn, classes: set[str]) -> None:
    a = fn(random.Random(0), 400)
    b = fn(random.Random(0), 400)
    assert [lab for _, lab in a] == [lab for _, lab in b]
    assert np.array_equal(np.asarray(a[5][0]), np.asarray(b[5][0]))
    assert {lab for _, lab in a} == classes
    assert a[0][0].size == (32, 32)


def test_shapes_count_draws_that_many_objects() -> None:
    # Objects sit on distinct lattice cells, so the count of bright connected blobs is the label.
    from scipy import ndimage

    for img, label in mini_vtab.shapes_count(random.Random(1), 30):
        bright = np.asarray(img).max(axis=2) >= 120
        assert ndimage.label(bright)[1] == int(label)


def test_prepare_digits_builds_disjoint_imagefolder(tmp_path: Path) -> None:
    sizes = mini_vtab.prepare_task("digits", tmp_path)
    assert sizes == {"train": 1000, "test": 797}
    train = sorted(p.parent.name for p in (tmp_path / "digits" / "train").rglob("*.png"))
    assert set(train) == {str(d) for d in range(10)} and len(train) == 1000
    # Train and test images are disjoint (digits has no exact duplicates across its 1,797 images).
    tr = {p.read_bytes() for p in (tmp_path / "digits" / "train").rglob("*.png")}
    te = {p.read_bytes() for p in (tmp_path / "digits" / "test").rglob("*.png")}
    assert not tr & te
    assert mini_vtab.prepare_task("digits", tmp_path) == sizes  # second call reuses the cache


def test_caches_go_where_they_can_be_written(monkeypatch, tmp_path) -> None:
    # An installed package (site-packages, read-only in the image) has no pyproject beside it:
    # its caches go to RLRR_CACHE_DIR, else the user's cache folder, never into the package.
    from trainer import mini_vtab

    monkeypatch.delenv("RLRR_CACHE_DIR", raising=False)
    assert mini_vtab._cache_root() == mini_vtab.REPO / ".cache"  # this checkout
    monkeypatch.setattr(mini_vtab, "REPO", tmp_path / "site-packages")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mini_vtab._cache_root() == tmp_path / "xdg" / "rlrr-serve"
    monkeypatch.setenv("RLRR_CACHE_DIR", str(tmp_path / "mine"))
    assert mini_vtab._cache_root() == tmp_path / "mine"
