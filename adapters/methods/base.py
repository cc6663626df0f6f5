"""The contract every adapter method meets, and the one form every method is served in.

A method is one small definition (a `Method` subclass in its own module of this package): its
config class, its tensors' shapes, its training wrappers, and its *forms*: what it does to each
frozen linear and norm, in one vocabulary the fold, the load-time bounds and the mixed-batch
engine all read:

    linear (or the patch-embedding conv, a linear over patches):
        W' = W ⊙ (a + l cᵀ) + k · B A,    b' = b + s
    norm (or the patch projection's output, for SSF):
        y · γ + β

So RLRR, SSF, LoRA, BitFit and IA³ share one fold (`adapters.merge`), one bound check and one
batch (`adapters.multitask`); the next method (VeRA, GLoRA, ...) adds a module here, not code in
the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import AdapterConfigError

__all__ = ["LinearForm", "NormForm", "Forms", "Method"]


def config_from_fields(cls: type, d: dict[str, Any]) -> Any:
    """A method config dataclass from its dict, naming any field it does not have.

    Args:
        cls: The config dataclass.
        d: Its `to_dict` form.
    """
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise AdapterConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**d)


@dataclass(frozen=True)
class LinearForm:
    """What one task does to one frozen linear: W' = W ⊙ (a + l cᵀ) + k · B A, b' = b + s.

    Attributes:
        rescale: Whether the l cᵀ term exists; without it a = 1 and l, c are unused.
        l: Tensor name of l (out,); None is ones.
        c: Tensor name of c (g, in) (g row groups, 3 for a split qkv) or (in,); None is ones.
        residual: a = 1; False gives W ⊙ (l cᵀ).
        s: Tensor name of the bias shift (out,); None is none.
        lora_a: Tensor name of A (r, in) (a conv's: (r, in·kh·kw)); None: no low-rank term.
        lora_b: Tensor name of B (out, r).
        lora_scale: k (α/r, or α/√r with rsLoRA).
    """

    rescale: bool = False
    l: str | None = None
    c: str | None = None
    residual: bool = True
    s: str | None = None
    lora_a: str | None = None
    lora_b: str | None = None
    lora_scale: float = 0.0

    @property
    def changes_weight(self) -> bool:
        return self.rescale or self.lora_a is not None


@dataclass(frozen=True)
class NormForm:
    """What one task does after a norm (or the patch projection): y · γ + β.

    Attributes:
        scale: Tensor name of γ (D,); None is ones.
        shift: Tensor name of β (D,); None is zeros.
    """

    scale: str | None = None
    shift: str | None = None


@dataclass
class Forms:
    """A task's forms: module path -> form; plus tensors the forms name that the adapter does not hold.

    Attributes:
        linears: Path of a block linear or the patch-embedding conv -> its form.
        norms: Path of a norm (or the patch projection, SSF's slot there) -> its form.
        derived: Tensors computed from the adapter's (IA³'s s − 1); CPU float32, never trained.
    """

    linears: dict[str, LinearForm] = field(default_factory=dict)
    norms: dict[str, NormForm] = field(default_factory=dict)
    derived: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """One adapter method. Subclasses set `name` and `config_class` and implement the three hooks.

    `config_class` is a frozen (hashable) dataclass with `to_dict` / `from_dict`; `name` is what
    adapter_config.json's `method` says.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]

    def shapes(self, model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every adapter tensor (the head excluded) for this backbone.

        Args:
            model: A timm ViT, plain or wrapped.
            config: The method's config.
        """
        raise NotImplementedError

    def wrap(self, model: nn.Module, config: Any) -> None:
        """Replace the modules the method adapts by training wrappers, in place (the model is frozen).

        Args:
            model: A plain timm ViT.
            config: The method's config.
        """
        raise NotImplementedError

    def forms(self, model: nn.Module, config: Any, tensors: Any) -> Forms:
        """The method's adapter in the shared forms.

        Args:
            model: The plain (or wrapped) backbone; its weights are read only for derived tensors.
            config: The method's config.
            tensors: The adapter's tensors (name -> tensor).
        """
        raise NotImplementedError
