import pytest

from adapters import RLRRConfig


def test_default_is_the_paper() -> None:
    cfg = RLRRConfig()
    assert cfg.rescale_targets == ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert cfg.ssf_targets == ("patch_embed", "norm1", "norm2", "norm")
    assert (cfg.left, cfg.right, cfg.residual, cfg.split_qkv, cfg.init) == (True, True, True, True, "reference")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"left": False, "right": False}, "nothing to learn"),
        ({"init": "zeros"}, "init must be one of"),
        ({"rescale_targets": ("attn.qkv", "attn.qkv")}, "lists a module twice"),
        ({"ssf_targets": ("norm1", "")}, "malformed"),
        ({"rescale_targets": ("mlp.fc1",), "ssf_targets": ("mlp.fc1",)}, "both rescaled and SSF"),
    ],
)
def test_invalid_combinations_say_why(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RLRRConfig(**kwargs)


def test_bias_only_adapter_is_allowed_without_rescale_targets() -> None:
    cfg = RLRRConfig(rescale_targets=(), left=False, right=False)
    assert cfg.rescale_targets == ()


def test_dict_round_trip_and_unknown_fields() -> None:
    cfg = RLRRConfig.preset("ssf", init="identity")
    assert RLRRConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown RLRRConfig fields"):
        RLRRConfig.from_dict({**cfg.to_dict(), "rank": 4})


def test_presets() -> None:
    assert RLRRConfig.preset("ssf").right is False and RLRRConfig.preset("ssf").residual is False
    assert RLRRConfig.preset("linear").rescale_targets == ()
    with pytest.raises(ValueError, match="unknown method"):
        RLRRConfig.preset("lora")
