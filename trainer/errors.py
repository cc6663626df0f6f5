"""Errors the CLI prints as one line (no traceback) and exits with code 2."""
from __future__ import annotations

__all__ = ["TrainerError", "ConfigError", "DataError", "BackboneError", "StoreError", "Interrupted"]


class TrainerError(Exception):
    """A problem the user can fix; the message says what and where."""


class ConfigError(TrainerError):
    """Inconsistent options, an unknown task, or a bad task file."""


class DataError(TrainerError):
    """Missing or malformed data; the message names the file (and line where there is one)."""


class BackboneError(TrainerError):
    """The backbone cannot be built or its weights cannot be loaded."""


class StoreError(TrainerError):
    """The store or the run directory refuses the write (e.g. it exists and --overwrite is off)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was saved and how to go on."""
