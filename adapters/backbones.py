"""The in-house backbone, registered with timm so every part of the project builds it by name.

`vit_pico_patch4_32.cifar5` is a small ViT pretrained in-house on 5 CIFAR-10 classes at 32×32
px (see `adapters/weights/README.md`): NOT an ImageNet model. Its weights ship inside the package,
so `timm.create_model("vit_pico_patch4_32.cifar5", pretrained=True)` works offline once
`adapters` is imported.
"""
from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["PICO_NAME", "PICO_WEIGHTS", "PICO_KWARGS"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
PICO_NAME = "vit_pico_patch4_32.cifar5"
PICO_WEIGHTS = WEIGHTS_DIR / "vit_pico_patch4_32.cifar5.safetensors"
PICO_KWARGS = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0)

# CIFAR-10 channel statistics: the backbone was pretrained with them.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)

default_cfgs = generate_default_cfgs({
    "vit_pico_patch4_32.cifar5": {
        "file": str(PICO_WEIGHTS),
        "num_classes": 5,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": _CIFAR_MEAN,
        "std": _CIFAR_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "same as the project",
    },
})


@register_model
def vit_pico_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/4 at 32×32: 96 dims, 6 blocks, 3 heads (0.68M parameters)."""
    return build_model_with_cfg(
        VisionTransformer, "vit_pico_patch4_32", pretrained,
        pretrained_filter_fn=checkpoint_filter_fn, **{**PICO_KWARGS, **kwargs},
    )
