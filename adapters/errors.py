"""The errors `adapters` raises about an adapter, its model or its tasks.

Each is a subclass of the builtin it replaces, so a caller that catches ValueError (or KeyError
for an unknown task) keeps working, and one that catches `AdapterError` gets them all. A bad
argument of a call (a mode name, a class count below one) stays a plain ValueError.
"""
from __future__ import annotations

__all__ = ["AdapterError", "AdapterConfigError", "AdapterModelError", "AdapterShapeError", "AdapterValueError",
           "UnknownTaskError"]


class AdapterError(ValueError):
    """An adapter that cannot be used; the message says exactly why."""


class AdapterConfigError(AdapterError):
    """An invalid `RLRRConfig`: unknown fields or presets, or switches that do not go together."""


class AdapterModelError(AdapterError):
    """The model cannot take this adapter: not a supported timm ViT, a target missing, wrapped twice or not at all."""


class AdapterShapeError(AdapterError):
    """An adapter tensor is missing, unexpected, or of the wrong shape or dtype for its model and config."""


class AdapterValueError(AdapterError):
    """An adapter holds, or folds to, values that are not finite or too large to serve."""


class UnknownTaskError(KeyError, AdapterError):
    """A task name or index that is not loaded."""
