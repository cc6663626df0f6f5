"""rlrr-serve: one frozen timm ViT on the device, every task's RLRR adapter, `POST /classify?task=NAME`.

    from app.main import create_app
    from app.settings import Settings
"""
