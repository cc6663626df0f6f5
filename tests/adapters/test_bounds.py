"""Load-time refusal of adapters that cannot produce finite outputs, without folding anything."""

from __future__ import annotations

import math

import pytest
import torch

from adapters import VALUE_LIMIT, RLRRConfig, adapter_state_dict, add_rlrr, check_bounds, weight_bounds
from adapters.errors import AdapterValueError


@pytest.fixture
def adapter(make_vit, perturb) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    base = make_vit()
    bounds = weight_bounds(base)
    model = perturb(add_rlrr(base, RLRRConfig(), 4))
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}, bounds


def test_a_trained_adapter_passes(adapter) -> None:
    tensors, bounds = adapter
    check_bounds(tensors, RLRRConfig(), bounds, torch.float32)
    check_bounds(tensors, RLRRConfig(), bounds, torch.float16)
    # test_vit: 6 blocks x 4 linears, and the patch conv (LoRA and IA³ may change it)
    assert all(b > 0 for b in bounds.values()) and len(bounds) == 4 * 6 + 1


@pytest.mark.parametrize("value, message", [(1e30, "1e\\+30"), (math.inf, "non-finite"), (math.nan, "non-finite"),
                                            (-2 * VALUE_LIMIT, "2e\\+04")])
@pytest.mark.parametrize("name", ["blocks.1.mlp.fc1.rlrr_l", "norm.ssf_scale", "head.weight"])
def test_huge_or_non_finite_values_are_refused_by_name(adapter, name, value, message) -> None:
    tensors, bounds = adapter
    tensors[name][0] = value
    with pytest.raises(ValueError, match=f"'{name}' has .*{message}"):
        check_bounds(tensors, RLRRConfig(), bounds, torch.float32)


def test_the_serving_dtype_decides(adapter) -> None:
    # l and c each within the value limit, but their product rescales W by ~2.5e7: finite in float32
    # weights, beyond what float16 holds (max 65504) with room for a dot product.
    tensors, bounds = adapter
    tensors["blocks.0.attn.qkv.rlrr_l"][:] = 5e3
    tensors["blocks.0.attn.qkv.rlrr_c"][:] = 5e3
    check_bounds(tensors, RLRRConfig(), bounds, torch.float32)
    with pytest.raises(ValueError, match="folded weights of 'blocks.0.attn.qkv' could reach .* torch.float16"):
        check_bounds(tensors, RLRRConfig(), bounds, torch.float16)


def test_packed_peaks_equal_the_per_tensor_walk() -> None:
    # The one-pass path over a PackedTensors' buffer must give every tensor's own max|value| (an empty
    # tensor: 0), exactly as the per-tensor walk does; out of bounds it defers to the walk, which names it.
    from adapters.merge import _packed_peaks, _peaks
    from adapters.packed import PackedTensors

    gen = torch.Generator().manual_seed(0)
    tensors = {"a.x": torch.randn(7, generator=gen), "b.empty": torch.zeros(0), "c.y": torch.randn(3, 4, generator=gen),
               "d.z": -5 * torch.rand(5, generator=gen), "head.weight": torch.randn(2, 4, generator=gen)}
    packed = PackedTensors.pack(tensors)
    fast = _packed_peaks(packed, 1e4)
    slow = _peaks(dict(tensors), 1e4)
    assert fast is not None and fast.keys() == slow.keys()
    assert all(fast[k] == pytest.approx(slow[k], rel=0, abs=0) for k in slow)  # same float32 values, no rounding
    bad = PackedTensors.pack({**tensors, "c.y": torch.full((3, 4), 2e4)})
    assert _packed_peaks(bad, 1e4) is None
    with pytest.raises(AdapterValueError, match="c.y"):
        _peaks(bad, 1e4)
