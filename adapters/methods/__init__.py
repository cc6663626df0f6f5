"""Adapter methods: one module each, all registered here by the name adapter_config.json uses.

    rlrr (with its ablations: ssf, linear)   adapters/methods/rlrr.py
    lora                                     adapters/methods/lora.py
    bitfit                                   adapters/methods/bitfit.py
    ia3                                      adapters/methods/ia3.py

Adding a method: a `Method` subclass in a new module, imported and listed in `METHODS` below.
"""
from __future__ import annotations

from typing import Any

from ..errors import AdapterConfigError
from .base import Forms, LinearForm, Method, NormForm
from .bitfit import BitFit, BitFitConfig
from .ia3 import IA3, IA3Config
from .lora import LoRA, LoRAConfig
from .rlrr import RLRR

__all__ = ["METHODS", "Method", "Forms", "LinearForm", "NormForm", "method_of", "config_from_dict",
           "LoRAConfig", "BitFitConfig", "IA3Config", "AdapterConfig"]

METHODS: dict[str, Method] = {m.name: m for m in (RLRR(), LoRA(), BitFit(), IA3())}
_BY_CONFIG = {type(m).config_class: m for m in METHODS.values()}
AdapterConfig = Any  # any registered method's config (RLRRConfig, LoRAConfig, ...)


def method_of(config: Any) -> Method:
    """The method a config belongs to.

    Raises:
        AdapterConfigError: Not a registered method's config.
    """
    method = _BY_CONFIG.get(type(config))
    if method is None:
        raise AdapterConfigError(f"{type(config).__name__} is no adapter method's config; "
                                 f"methods: {sorted(METHODS)}")
    return method


def config_from_dict(method: str, d: dict[str, Any]) -> Any:
    """A method's config from its JSON object.

    Args:
        method: The method's name.
        d: Its config fields.

    Raises:
        AdapterConfigError: Unknown method or invalid fields (the message names them).
    """
    if method not in METHODS:
        raise AdapterConfigError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    if not isinstance(d, dict):
        raise AdapterConfigError(f"the {method} config must be a JSON object")
    return type(METHODS[method]).config_class.from_dict(d)
