"""Shared fixtures: tiny timm ViTs with random weights, never from a hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every test server measures its plan costs (as before the costs file): no state shared through ~/.cache.
# Tests of the file itself pass their own path.
os.environ.setdefault("RLRR_COSTS_FILE", "off")
