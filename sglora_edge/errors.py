"""Every error the server raises on purpose is an `SGLoRAError` (a ValueError).

The root is defined in the torch-free runtime (`runtime/errors.py`), because the server may
import the runtime but never the reverse: one class covers both halves, and the CLI catches
it once (`cli.Commands.invoke`). Error classes that belong to one module (ArtifactError,
BackboneError, DatasetError, ...) stay there and subclass the root.
"""

from __future__ import annotations

from runtime.errors import EngineError, MissingExtra, PathNotFound, SGLoRAError


class OutputExists(SGLoRAError, FileExistsError):
    """An output folder exists and may not be replaced (not asked to, or not ours to replace)."""


class TrainingDiverged(SGLoRAError):
    """A training loss became NaN or inf; the message names the setting to lower."""


__all__ = ["EngineError", "MissingExtra", "OutputExists", "PathNotFound", "SGLoRAError", "TrainingDiverged"]
