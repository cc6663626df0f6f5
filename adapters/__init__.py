"""RLRR adapters for timm Vision Transformers: the contract shared by `trainer` and `app`.

    from adapters import RLRRConfig, add_rlrr, merge_rlrr, MultiTaskViT, save_adapter, load_adapter
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
from .inject import adapter_shapes, adapter_state_dict, add_rlrr, backbone_fingerprint, plan_targets
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
from .merge import VALUE_LIMIT, check_bounds, fold_adapter, merge_rlrr, weight_bounds
from .multitask import MultiTaskViT
from .names import tensor_name
from .packed import PackedTensors

__all__ = [
    "RLRRConfig", "add_rlrr", "merge_rlrr", "MultiTaskViT", "save_adapter", "load_adapter",
    "Adapter", "adapter_state_dict", "adapter_shapes", "backbone_fingerprint",
    "fold_adapter", "check_bounds", "weight_bounds", "VALUE_LIMIT", "plan_targets", "PackedTensors",
    "BackboneSpec", "BackboneError", "build_backbone", "tensor_name",
    "install_adapter", "remove_adapter", "stale_uploads", "remove_stale_uploads", "CONFIG_NAME", "WEIGHTS_NAME",
    "read_adapter_config",
    "AdapterError", "AdapterConfigError", "AdapterModelError", "AdapterShapeError", "AdapterValueError",
    "UnknownTaskError",
]
