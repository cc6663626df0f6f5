"""RLRR adapters for timm Vision Transformers: the contract shared by `trainer` and `app`.

    from adapters import RLRRConfig, add_rlrr, merge_rlrr, MultiTaskViT, save_adapter, load_adapter
"""
from . import backbones  # noqa: F401 - registers the in-house timm backbone
from .backbones import BackboneError, BackboneSpec, build_backbone
from .config import RLRRConfig
from .inject import adapter_shapes, adapter_state_dict, add_rlrr, backbone_fingerprint, plan_targets
from .io import Adapter, AdapterError, load_adapter, save_adapter
from .merge import VALUE_LIMIT, check_bounds, check_fold, fold_adapter, merge_rlrr, weight_bounds
from .multitask import MultiTaskViT
from .packed import PackedTensors

__all__ = [
    "RLRRConfig", "add_rlrr", "merge_rlrr", "MultiTaskViT", "save_adapter", "load_adapter",
    "Adapter", "AdapterError", "adapter_state_dict", "adapter_shapes", "backbone_fingerprint",
    "fold_adapter", "check_fold", "check_bounds", "weight_bounds", "VALUE_LIMIT", "plan_targets", "PackedTensors",
    "BackboneSpec", "BackboneError", "build_backbone",
]
