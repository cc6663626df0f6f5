"""Segmented rescaled linear: the Triton kernel (CPU interpreter) against the torch oracle.

TRITON_INTERPRET=1 only takes effect if set before triton decorates the kernel, and other tests
import torch (and maybe triton) earlier in the same process, so the kernel runs in ONE subprocess
for all cases: inputs go in and outputs come back through torch.save files; comparisons, the tile
table and the shape errors are checked here.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adapters.triton_segmented as ts
from adapters.triton_segmented import segmented_rescaled_linear, segmented_rescaled_linear_reference

ROOT = Path(__file__).resolve().parents[2]

# Tolerances, as a fraction of max |reference| (outputs are O(1..10)):
# fp32: the interpreter's dot is an IEEE fp32 matmul; only the summation order and the order of the
#   rescale's products differ from the oracle (observed ~4e-7). 1e-4 still catches any real error:
#   a wrong c group, a dropped l, a or s moves outputs by O(1).
# fp16: the kernel rounds W' to fp16 for the dot (2^-11 relative per element) and the output to fp16;
#   the oracle keeps W' in fp32 (observed ~4e-4). 4e-3 is ~8 fp16 ulps at the max.
# bf16: same roundings with 8 mantissa bits, 2^-8 each (observed ~8e-3).
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def offsets_of(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


def make_case(
        lengths: list[int],
        groups: int,
        dtype: torch.dtype,
        bias: bool = True,
        shift: bool = True,
        out_f: int = 48,
        in_f: int = 40,
        seed: int = 0,
        strided_weight: bool = False,
) -> dict:
    """Kernel arguments with l, c, s far from the identity and a alternating 1, 0, 1, ..."""
    g = torch.Generator().manual_seed(seed)
    u = len(lengths)
    offsets = offsets_of(lengths)
    weight = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5  # (out, in)
    if strided_weight:
        weight = weight.t().contiguous().t()  # same values, stride (1, out): the host must copy
    return dict(
        x=torch.randn(offsets[-1], in_f, generator=g).to(dtype),  # (M, in)
        weight=weight.to(dtype),
        bias=torch.randn(out_f, generator=g).to(dtype) if bias else None,  # (out,)
        l=torch.randn(u, out_f, generator=g).to(dtype),  # (U, out)
        c=(1 + 0.5 * torch.randn(u, groups, in_f, generator=g)).to(dtype),  # (U, g, in)
        s=torch.randn(u, out_f, generator=g).to(dtype) if shift else None,  # (U, out)
        a=torch.tensor([float(i % 2 == 0) for i in range(u)]),  # (U,)
        offsets=offsets,
    )


UNEVEN = [1, 5, 0, 17, 2]  # 1-row and empty segments; 17 rows span two BLOCK_M=16 tiles
CASES = {
    "fp32_g3": make_case(UNEVEN, 3, torch.float32),
    "fp32_g1_no_bias_no_s": make_case(UNEVEN, 1, torch.float32, bias=False, shift=False, seed=1),
    "fp32_g3_strided_weight_no_s": make_case(UNEVEN, 3, torch.float32, shift=False, seed=2, strided_weight=True),
    "fp32_block_m32": make_case([64, 64, 1], 3, torch.float32, seed=3),
    "fp16_g3": make_case(UNEVEN, 3, torch.float16, seed=4),
    "fp16_g1_no_bias": make_case(UNEVEN, 1, torch.float16, bias=False, seed=5),
    "bf16_g3": make_case(UNEVEN, 3, torch.bfloat16, seed=6),
}

_RUNNER = """
import sys, torch
from adapters.triton_segmented import segmented_rescaled_linear
cases = torch.load(sys.argv[1])
torch.save({k: segmented_rescaled_linear(**v) for k, v in cases.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Kernel outputs for every case in CASES, from one TRITON_INTERPRET=1 subprocess."""
    if not ts.AVAILABLE:
        pytest.skip("triton is not installed")
    tmp = tmp_path_factory.mktemp("triton_segmented")
    torch.save(CASES, tmp / "cases.pt")
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(tmp / "cases.pt"), str(tmp / "out.pt")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str, interpreted: dict[str, torch.Tensor]) -> None:
    case = CASES[name]
    y = interpreted[name]
    ref = segmented_rescaled_linear_reference(**case)
    assert y.dtype == case["x"].dtype and y.shape == ref.shape == (case["offsets"][-1], case["weight"].shape[0])
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=TOL[y.dtype] * scale)


def test_adapters_are_not_the_identity() -> None:
    """Each segment's output moves far from the plain layer, and a = 0 differs from a = 1.

    Otherwise a kernel that ignored l, c, s or a could pass the comparisons above.
    """
    case = CASES["fp32_g3"]
    ref = segmented_rescaled_linear_reference(**case)
    plain = F.linear(case["x"], case["weight"], case["bias"])
    flipped = segmented_rescaled_linear_reference(**{**case, "a": 1 - case["a"]})
    offsets = case["offsets"]
    for lo, hi in itertools.pairwise(offsets):
        if lo < hi:
            assert (ref[lo:hi] - plain[lo:hi]).abs().max() > 0.1
            assert (ref[lo:hi] - flipped[lo:hi]).abs().max() > 0.1


@pytest.mark.parametrize(
    ("lengths", "block_m"),
    [([1, 5, 0, 17, 2], 16), ([64, 64, 1], 32), ([128, 64], 64), ([0, 3], 16)],
)
def test_tile_table_never_crosses_a_segment(lengths: list[int], block_m: int) -> None:
    offsets = tuple(offsets_of(lengths))
    assert ts._pick_block_m(offsets) == block_m
    tiles = ts._tile_table(offsets, block_m, torch.device("cpu")).tolist()
    assert tiles == sorted(tiles)
    covered = []
    for start, end, seg in tiles:
        assert offsets[seg] <= start < end <= offsets[seg + 1]
        assert end - start <= block_m
        covered.extend(range(start, end))
    assert covered == list(range(offsets[-1]))  # every row exactly once
    assert {seg for *_, seg in tiles} == {u for u, n in enumerate(lengths) if n}  # empty segments: no tile


def _broken(case: dict, **changes) -> dict:
    return {**case, **changes}


_C = CASES["fp32_g3"]
BAD = {
    "x_1d": (_broken(_C, x=_C["x"][0]), "2-D"),
    "in_mismatch": (_broken(_C, weight=_C["weight"][:, :39]), "features"),
    "bias_shape": (_broken(_C, bias=_C["bias"][:47]), "bias"),
    "l_shape": (_broken(_C, l=_C["l"][:, :47]), "l must be"),
    "c_in": (_broken(_C, c=_C["c"][:, :, :39]), "c must be"),
    "c_groups_do_not_split_out": (_broken(_C, c=_C["c"][:, :1].expand(-1, 5, -1)), "groups"),
    "s_shape": (_broken(_C, s=_C["s"][:4]), "s must be"),
    "a_shape": (_broken(_C, a=_C["a"][:4]), "a must be"),
    "offsets_length": (_broken(_C, offsets=_C["offsets"][:-1]), "U \\+ 1"),
    "offsets_end": (_broken(_C, offsets=[*_C["offsets"][:-1], 24]), "from 0 to M"),
    "offsets_decreasing": (_broken(_C, offsets=[0, 6, 1, 23, 23, 25]), "non-decreasing"),
    "int_x": (_broken(_C, x=_C["x"].long()), "dtype"),
}


@pytest.mark.parametrize("fn", [segmented_rescaled_linear, segmented_rescaled_linear_reference])
@pytest.mark.parametrize("name", list(BAD))
def test_shape_errors(name: str, fn) -> None:
    case, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        fn(**case)


def test_cpu_tensors_without_interpreter_are_refused() -> None:
    if ts._INTERPRET or not ts.AVAILABLE:
        pytest.skip("needs triton, compiled (not interpreted) mode")
    with pytest.raises(ValueError, match="CUDA"):
        segmented_rescaled_linear(**_C)


def test_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(ts.AVAILABLE, bool)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("adapters._triton_segmented_no_triton", ts.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.AVAILABLE is False
    torch.testing.assert_close(mod.segmented_rescaled_linear_reference(**_C), segmented_rescaled_linear_reference(**_C))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        mod.segmented_rescaled_linear(**_C)
