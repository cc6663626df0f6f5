"""RLRRLinear's init on ViT-B/16-sized layers: the reference code's kaiming-uniform with a = 0."""
import math

import pytest
import torch
import torch.nn as nn

from adapters import RLRRConfig
from adapters.layers import RLRRLinear

D, HID = 768, 3072  # ViT-B/16: qkv is 768 -> 2304 (3 slices), fc1 768 -> 3072, fc2 3072 -> 768

# The max of n draws of U(-b, b) is below 0.9 b with probability 0.9^n: < 1e-35 for the 768 draws of
# one c slice, so 0.9 b cannot fail by chance, while the old a = √5 init (bound 1/√fan_in, i.e.
# b / √6 = 0.41 b) stays far under it on both vectors.
MAX_FRACTION = 0.9
# mean |U(-b, b)| = b / 2 with a standard error of b / √(12 n) ≤ 0.011 b for n ≥ 768: 0.05 b is > 4 SE.
# Tells a uniform draw from, e.g., a normal one of the same bound.
MEAN_ABS_TOL = 0.05


@pytest.mark.parametrize(("in_f", "out_f", "groups"), [(D, 3 * D, 3), (D, HID, 1), (HID, D, 1)],
                         ids=["qkv", "fc1", "fc2"])
def test_reference_init_bounds_are_kaiming_uniform_with_a_zero(in_f: int, out_f: int, groups: int) -> None:
    torch.manual_seed(0)
    layer = RLRRLinear(nn.Linear(in_f, out_f), RLRRConfig(init="reference"), groups=groups)
    c, l = layer.rlrr_c.detach(), layer.rlrr_l.detach()
    assert c.shape == (groups, in_f) and l.shape == (out_f,)
    bound_c = math.sqrt(6 / in_f)  # c: (1 x in) per slice, fan_in = in -> 0.088 for in = 768
    bound_l = math.sqrt(6)  # l: (out x 1), fan_in = 1 -> 2.449
    for row in c:  # each q/k/v slice is its own kaiming draw over `in`, not one over 3·in
        assert MAX_FRACTION * bound_c < row.abs().max() <= bound_c
        assert abs(row.abs().mean() - bound_c / 2) < MEAN_ABS_TOL * bound_c
    assert MAX_FRACTION * bound_l < l.abs().max() <= bound_l
    assert abs(l.abs().mean() - bound_l / 2) < MEAN_ABS_TOL * bound_l
    assert torch.count_nonzero(layer.rlrr_s) == 0


def test_identity_init_zeros_l_and_keeps_c_at_the_reference_bound() -> None:
    torch.manual_seed(0)
    layer = RLRRLinear(nn.Linear(D, 3 * D), RLRRConfig(init="identity"), groups=3)
    assert torch.count_nonzero(layer.rlrr_l) == 0  # l cᵀ = 0: starts exactly at W
    bound_c = math.sqrt(6 / D)  # c stays random so that l gets gradients from the first step
    assert MAX_FRACTION * bound_c < layer.rlrr_c.abs().max() <= bound_c
    x = torch.randn(4, D)
    assert torch.equal(layer(x), layer.base_layer(x))
