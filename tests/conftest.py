"""Shared fixtures: tiny timm ViTs with random weights, never from a hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
