"""Inference engines, imported lazily so a missing one fails with the install line that fixes it."""

from __future__ import annotations

import importlib

from .errors import EngineUnavailable  # noqa: F401 - re-exported: callers catch it from here

INSTALL_HINT = {
    "onnxruntime": "pip install 'sglora-edge[cpu]' (CPU) or 'sglora-edge[gpu]' (CUDA; never both: "
                   "onnxruntime and onnxruntime-gpu shadow each other)",
    "tensorrt": "pip install 'sglora-edge[trt]' (TensorRT 10 with cuda-python; on a Jetson use JetPack 6.1+'s "
                "python3-libnvinfer), or use --backend ort-cpu",
    "openvino": "pip install 'sglora-edge[openvino]' (x86 CPUs), or use --backend ort-cpu",
}


def require(module: str):
    """Import an engine module or raise EngineUnavailable naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailable(f"{module} is not installed ({e}); install it with: {INSTALL_HINT.get(module, 'pip install ' + module)}") from e
