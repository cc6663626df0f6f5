"""Adapter tensor names: the one rule `{module path}.{tag}`, and the head beside them.

A wrapper (`RLRRLinear`, `SSFLayer`) replaces the module at `path` and holds its vectors as the
attributes named by the tags, so the wrapped model's state dict, the safetensors file, the fold and
`MultiTaskViT` all name a tensor as `tensor_name` does.
"""
from __future__ import annotations

__all__ = ["RLRR_L", "RLRR_C", "RLRR_S", "SSF_SCALE", "SSF_SHIFT", "LORA_A", "LORA_B", "IA3_L", "BITFIT_B",
           "ADAPTER_PARAM_TAGS", "HEAD_NAMES", "tensor_name", "is_adapter_key"]

RLRR_L, RLRR_C, RLRR_S = "rlrr_l", "rlrr_c", "rlrr_s"  # row vector, column vectors, bias shift
SSF_SCALE, SSF_SHIFT = "ssf_scale", "ssf_shift"
LORA_A, LORA_B = "lora_A", "lora_B"  # (r, in) and (out, r), as PEFT names them; a conv's A is (r, in·kh·kw)
IA3_L = "ia3_l"  # IA³ scaling: (out,), or (in,) on a feed-forward module
BITFIT_B = "bitfit_b"  # BitFit: the learned shift of a bias (out,)
# Every adapter tensor's name ends with one of these, so it can be told from backbone weights.
ADAPTER_PARAM_TAGS = (RLRR_L, RLRR_C, RLRR_S, SSF_SCALE, SSF_SHIFT, LORA_A, LORA_B, IA3_L, BITFIT_B)
HEAD_NAMES = ("head.weight", "head.bias")  # the task head travels with the adapter


def tensor_name(path: str, tag: str) -> str:
    """The name of one adapter tensor.

    Args:
        path: Module path in the plain backbone, e.g. 'blocks.3.attn.qkv'.
        tag: One of `ADAPTER_PARAM_TAGS`.
    """
    return f"{path}.{tag}"


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict name is an adapter tensor (not a backbone weight, not the head)."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAM_TAGS
