"""Train RLRR adapters (and baselines) on a frozen timm ViT: `python -m trainer --task dtd`.

Depends on `adapters` only. The training loop and recipe: `trainer/loop.py`; the command line:
`trainer/cli.py` (no library module imports it).

    config.py      TrainConfig and the training options generated from its fields
    run.py         setup: paths, seed, data, backbone + adapter, loaders, optimizer
    loop.py        train(): fit (train one epoch + validate) every epoch, checkpoint, final test
    optim.py       AdamW decay groups and the lr schedule (also used by pretrain.py)
    checkpoint.py  checkpoint / resume, bit for bit
    publish.py     metadata, pictures, the adapter into the store
    cli.py         python -m trainer; sweep.py, pretrain.py, mini_vtab.py: its other commands
"""
from .errors import BackboneError, ConfigError, DataError, StoreError, TrainerError

__all__ = ["TrainerError", "ConfigError", "DataError", "BackboneError", "StoreError"]
