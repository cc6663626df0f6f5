"""Mergeable adapters (RLRR, SSF, LoRA, BitFit, IA³) for timm Vision Transformers: the contract
shared by `trainer` and `app`.

    from adapters import RLRRConfig, LoRAConfig, add_adapter, merge_adapter, MultiTaskViT, save_adapter
"""
from . import backbones  # noqa: F401 - registers the in-house timm backbone
from .backbones import BackboneError, BackboneSpec, build_backbone
from .config import RLRRConfig
from .errors import (
    AdapterConfigError,
    AdapterError,
    AdapterModelError,
    AdapterShapeError,
    AdapterValueError,
    UnknownTaskError,
)
from .inject import adapter_state_dict, backbone_fingerprint, plan_targets
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    install_adapter,
    load_adapter,
    read_adapter_config,
    remove_adapter,
    remove_stale_uploads,
    save_adapter,
    stale_uploads,
)
from .merge import VALUE_LIMIT, adapter_forms, check_bounds, fold_adapter, merge_adapter, merge_rlrr, weight_bounds
from .methods import METHODS, BitFitConfig, IA3Config, LoRAConfig, method_of
from .multitask import MultiTaskViT, TaskHandle
from .names import tensor_name
from .packed import PackedTensors
from .wrap import adapter_shapes, add_adapter, add_rlrr

__all__ = [
    "RLRRConfig", "LoRAConfig", "BitFitConfig", "IA3Config", "METHODS", "method_of", "add_adapter",
    "merge_adapter", "adapter_forms", "TaskHandle",
    "add_rlrr", "merge_rlrr", "MultiTaskViT", "save_adapter", "load_adapter",
    "Adapter", "adapter_state_dict", "adapter_shapes", "backbone_fingerprint",
    "fold_adapter", "check_bounds", "weight_bounds", "VALUE_LIMIT", "plan_targets", "PackedTensors",
    "BackboneSpec", "BackboneError", "build_backbone", "tensor_name",
    "install_adapter", "remove_adapter", "stale_uploads", "remove_stale_uploads", "CONFIG_NAME", "WEIGHTS_NAME",
    "read_adapter_config",
    "AdapterError", "AdapterConfigError", "AdapterModelError", "AdapterShapeError", "AdapterValueError",
    "UnknownTaskError",
]
