"""RLRRConfig: which modules an adapter touches and how it starts.

The paper's Table 6 ablations are switches here, so SSF-like and one-sided variants are
configurations of one code path, not new code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import AdapterConfigError

__all__ = ["RLRRConfig", "INIT_POLICIES", "MODEL_LEVEL_SSF"]

INIT_POLICIES = ("reference", "identity")
# SSF target names that live on the model itself; every other name is looked up in each block.
MODEL_LEVEL_SSF = ("patch_embed", "norm")


@dataclass(frozen=True)
class RLRRConfig:
    """What an RLRR adapter rescales, and how it is initialised.

    W' = W ⊙ (1 + l cᵀ) with `residual`, W ⊙ (l cᵀ) without; b' = b + s. A disabled side
    (`left=False` or `right=False`) is a fixed vector of ones.
    """

    rescale_targets: tuple[str, ...] = field(
        default=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        metadata={"help": "Linear layers, by path inside each block, that get l, c and s."},
    )
    ssf_targets: tuple[str, ...] = field(
        default=("patch_embed", "norm1", "norm2", "norm"),
        metadata={"help": "Modules followed by SSF x·γ + β: 'patch_embed' and 'norm' (final) on the "
                          "model, any other name inside each block."},
    )
    left: bool = field(default=True, metadata={"help": "Learn the row vector l (else fixed ones)."})
    right: bool = field(default=True, metadata={"help": "Learn the column vector c (else fixed ones)."})
    residual: bool = field(default=True, metadata={"help": "W ⊙ (1 + l cᵀ); False gives W ⊙ (l cᵀ)."})
    bias_shift: bool = field(default=True, metadata={"help": "Learn a bias shift s on rescaled linears."})
    split_qkv: bool = field(
        default=True, metadata={"help": "Give the fused qkv one column vector per q/k/v slice."}
    )
    init: str = field(
        default="reference",
        metadata={"help": "'reference' (the paper's code: not the identity) or 'identity' "
                          "(starts exactly at the pretrained model)."},
    )

    def __post_init__(self) -> None:
        # Accept lists (from JSON) but store tuples so the config stays hashable.
        object.__setattr__(self, "rescale_targets", tuple(self.rescale_targets))
        object.__setattr__(self, "ssf_targets", tuple(self.ssf_targets))
        for name in ("left", "right", "residual", "bias_shift", "split_qkv"):
            if not isinstance(getattr(self, name), bool):
                raise AdapterConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not all(isinstance(n, str) for n in self.rescale_targets + self.ssf_targets):
            raise AdapterConfigError("targets must be module paths (strings)")
        if self.init not in INIT_POLICIES:
            raise AdapterConfigError(f"init must be one of {INIT_POLICIES}, got {self.init!r}")
        if self.rescale_targets and not (self.left or self.right):
            raise AdapterConfigError(
                "left=False and right=False leave nothing to learn on the rescaled linears; "
                "set rescale_targets=() for a bias/SSF-only adapter"
            )
        for names, what in ((self.rescale_targets, "rescale_targets"), (self.ssf_targets, "ssf_targets")):
            if len(set(names)) != len(names):
                raise AdapterConfigError(f"{what} lists a module twice: {names}")
            if any(not n or n.startswith(".") or n.endswith(".") for n in names):
                raise AdapterConfigError(f"{what} holds an empty or malformed module path: {names}")
        overlap = set(self.rescale_targets) & set(self.ssf_targets)
        if overlap:
            raise AdapterConfigError(f"modules {sorted(overlap)} are both rescaled and SSF targets; pick one")

    @classmethod
    def preset(cls, method: str, **overrides: Any) -> RLRRConfig:
        """A named configuration.

        Args:
            method: 'rlrr' (the paper), 'ssf' (left scaling, no residual: SSF after every linear
                and norm), or 'linear' (head only).
            overrides: Fields to change on top of the preset.
        """
        presets = {
            "rlrr": {},
            "ssf": {"right": False, "residual": False},
            "linear": {"rescale_targets": (), "ssf_targets": ()},
        }
        if method not in presets:
            raise AdapterConfigError(f"unknown method {method!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[method], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rescale_targets"] = list(self.rescale_targets)
        d["ssf_targets"] = list(self.ssf_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RLRRConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise AdapterConfigError(f"unknown RLRRConfig fields {sorted(unknown)}")
        return cls(**d)
