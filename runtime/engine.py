"""Inference engines, imported lazily so a missing one fails with the install line that fixes it."""

from __future__ import annotations

import importlib
from typing import Literal

from .errors import EngineError

Engine = Literal["onnxruntime", "tensorrt"]
INSTALL_HINT = {
    "onnxruntime": "pip install 'sglora-edge[cpu]' (CPU) or 'sglora-edge[gpu]' (CUDA; never both: "
                   "onnxruntime and onnxruntime-gpu shadow each other)",
    "tensorrt": "pip install 'sglora-edge[trt]' (needs an NVIDIA GPU with CUDA), or use --engine onnxruntime",
}


class EngineUnavailable(EngineError):
    """An engine is not installed or cannot run here; the message names the install line or the alternative."""


def require(module: str):
    """Import an engine module or raise EngineUnavailable naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailable(f"{module} is not installed ({e}); install it with: {INSTALL_HINT.get(module, 'pip install ' + module)}") from e


def onnx_session(path: str, providers: list[str] | None = None):
    """An ONNX Runtime session on the best available provider (CUDA when onnxruntime-gpu sees a GPU)."""
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise EngineUnavailable(f"ONNX Runtime providers {missing} are not available here (available: {available})")
    return ort.InferenceSession(str(path), providers=wanted)
