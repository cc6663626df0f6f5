"""Train RLRR adapters (and baselines) on a frozen timm ViT: `python -m trainer --task dtd`.

Depends on `adapters` only; see `trainer/loop.py` for the training recipe.
"""
from .errors import BackboneError, ConfigError, DataError, StoreError, TrainerError

__all__ = ["TrainerError", "ConfigError", "DataError", "BackboneError", "StoreError"]
