from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn as nn


@pytest.fixture
def make_vit() -> Callable[..., nn.Module]:
    """Build a timm ViT with random (seeded) weights; never touches a hub."""

    def make(name: str = "test_vit", seed: int = 0, **kwargs) -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, **kwargs).eval()

    return make


@pytest.fixture
def perturb() -> Callable[..., nn.Module]:
    """Push every trainable tensor away from its init, so nothing passes by being the identity."""

    @torch.no_grad()
    def apply(model: nn.Module, scale: float = 0.2, seed: int = 1) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
        return model

    return apply
