import pytest
import torch
import torch.nn as nn

from adapters import (
    AdapterConfigError,
    AdapterError,
    AdapterModelError,
    AdapterShapeError,
    AdapterValueError,
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    MultiTaskViT,
    RLRRConfig,
    UnknownTaskError,
    adapter_state_dict,
    add_rlrr,
    check_bounds,
    fold_adapter,
    merge_rlrr,
    tensor_name,
    weight_bounds,
)
from adapters.layers import ADAPTER_PARAM_TAGS, AdapterWrapper


@pytest.mark.parametrize(
    ("error", "builtin"),
    [(AdapterError, ValueError), (AdapterConfigError, ValueError), (AdapterModelError, ValueError),
     (AdapterShapeError, ValueError), (AdapterValueError, ValueError), (UnknownTaskError, KeyError)],
)
def test_every_error_is_an_adapter_error_and_the_builtin_it_replaces(error, builtin) -> None:
    assert issubclass(error, AdapterError) and issubclass(error, builtin)


def test_each_problem_raises_its_own_error(make_vit, perturb) -> None:
    with pytest.raises(AdapterConfigError, match="unknown method"):
        RLRRConfig.preset("lora")
    with pytest.raises(AdapterModelError, match="supports timm VisionTransformer"):
        add_rlrr(nn.Linear(2, 2))
    with pytest.raises(AdapterModelError, match="add_rlrr was not called"):
        merge_rlrr(make_vit())
    model = perturb(add_rlrr(make_vit(), RLRRConfig(), 3))
    tensors = adapter_state_dict(model)
    name = tensor_name("blocks.0.mlp.fc1", "rlrr_l")
    with pytest.raises(AdapterShapeError, match=f"'{name}' is missing"):
        fold_adapter(model, {k: v for k, v in tensors.items() if k != name}, model.rlrr_config)
    tensors[name][0] = 1e6
    with pytest.raises(AdapterValueError, match=f"'{name}' has \\|value\\| up to 1e\\+06"):
        check_bounds(tensors, model.rlrr_config, weight_bounds(model))
    multi = MultiTaskViT(make_vit())
    with pytest.raises(UnknownTaskError, match="unknown task 'pets'"):
        multi.task_index("pets")


def test_wrapper_attributes_are_the_tensor_name_tags(make_vit) -> None:
    # Every method's wrappers together hold exactly the registered tags (no tensor escapes is_adapter_key).
    own = set()
    for config in (RLRRConfig(), LoRAConfig(), BitFitConfig(), IA3Config()):
        wrapped = add_rlrr(make_vit(), config, 3)
        own |= {name for m in wrapped.modules() if isinstance(m, AdapterWrapper)
                for name, _ in m.named_parameters(recurse=False)}
    assert own == set(ADAPTER_PARAM_TAGS)
    model = add_rlrr(make_vit(), RLRRConfig(), 3)
    qkv = model.blocks[0].attn.qkv
    assert torch.equal(model.state_dict()[tensor_name("blocks.0.attn.qkv", "rlrr_c")], qkv.rlrr_c)
