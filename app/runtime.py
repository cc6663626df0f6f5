"""The process around the model: device and dtype, the backbone's weights, and the C heap."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

import torch
from torch import nn

from adapters import build_backbone
from app.settings import Settings

log = logging.getLogger("app")


def resolve_device(setting: str) -> torch.device:
    """The device for `auto|cuda|cpu`; asking for CUDA where there is none is an error.

    Args:
        setting: `Settings.device`.
    """
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RLRR_DEVICE=cuda but CUDA is not available")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """Half precision on CUDA, float32 on CPU (CPU half matmuls are slow and less accurate).

    Args:
        setting: `Settings.dtype`.
        device: The resolved device.
    """
    if device.type != "cuda":
        if setting not in ("auto", "float32"):
            log.warning("dtype %s ignored on %s: using float32", setting, device)
        return torch.float32
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, setting)


def load_backbone(settings: Settings) -> tuple[nn.Module, bool]:
    """Build the frozen backbone on CPU in float32; returns it and whether its weights are random.

    The trainer's loader too (`adapters.build_backbone`), so the fingerprints agree; the model
    carries its spec, against which every adapter's recorded spec is checked at load.

    Args:
        settings: Backbone name, optional checkpoint, model kwargs, pretrained flag and seed.

    Raises:
        BackboneError: The backbone cannot be built or its weights loaded (the message says why).
    """
    model, random_weights = build_backbone(settings.backbone_spec())
    return model.eval().requires_grad_(False), random_weights


def trim_heap() -> None:
    """Hand freed C heap pages back to the OS (glibc only; a no-op elsewhere).

    Loading a task allocates and frees temporaries (file reads, a fold); glibc keeps such freed
    pages resident. Handing them back after each (rare) load/delete keeps resident memory at what
    the tasks really hold.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def flush_denormals() -> None:
    """Flush denormals to zero on this thread (the engine thread's initializer).

    Tiny attention probabilities underflow to denormals, which run 10-100x slower on x86 CPUs;
    flushing them to zero changes results by < 1e-37.
    """
    torch.set_flush_denormal(True)
