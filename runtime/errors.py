"""The one root of every error sglora-edge raises on purpose, server and device alike.

It lives here, in the torch-free runtime, because the server may import the runtime but
never the reverse; `sglora_edge.errors` re-exports it. The CLI catches `SGLoRAError` once
and prints its message, which names the bad input and the fix, on one line. Anything else
that escapes is a bug and keeps its traceback (the device commands report it as one).
"""

from __future__ import annotations


class SGLoRAError(ValueError):
    """A bad input, file, setting or install; the message says what is wrong and how to fix it."""


class MissingExtra(SGLoRAError):
    """An optional dependency is not installed; the message names the pip line that installs it."""


class InputError(SGLoRAError):
    """A bad argument or input file (description, gallery, query, option)."""


class EngineError(SGLoRAError, RuntimeError):
    """An inference engine failed (TensorRT, CUDA, ONNX Runtime providers)."""


class EngineUnavailable(EngineError):
    """The inference backend asked for cannot run here (not installed, no GPU, wrong engines)."""


def install_line(extra: str) -> str:
    return f"pip install 'sglora-edge[{extra}]'"
