"""One interface over the inference engines: `session.run({input: array}) -> [outputs]`.

ONNX Runtime runs the bundle's *.onnx files; TensorRT runs the *.plan engines that
`export.tensorrt.build_engines` wrote on the device (device-specific, fp16 by default).
Both engines are imported lazily; a missing one raises EngineUnavailable with the install line.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np

from .engine import Engine, EngineUnavailable, onnx_session, require
from .errors import EngineError, SGLoRAError

ENGINES = get_args(Engine)


class OrtSession:
    def __init__(self, path: Path):
        self.session = onnx_session(str(path))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


def _cudart():
    """cuda-python's runtime API (new `cuda.bindings` layout first, then the older `cuda.cudart`)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        try:
            from cuda import cudart
            return cudart
        except ImportError as e:
            raise EngineUnavailable(f"the TensorRT engine needs cuda-python ({e}); install it with: "
                                    f"pip install 'sglora-edge[trt]' cuda-python") from e


def _check(result):
    """cuda-python returns (error, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else values


def cuda_device_count() -> int:
    cudart = _cudart()
    err, count = cudart.cudaGetDeviceCount()
    return count if int(err) == 0 else 0


def require_tensorrt():
    """tensorrt, or EngineUnavailable naming the [trt] extra / saying no CUDA GPU is visible."""
    trt = require("tensorrt")
    if cuda_device_count() < 1:
        raise EngineUnavailable("TensorRT needs a CUDA GPU and none is visible here; use --engine onnxruntime "
                                "(the bundle's ONNX files), or build and run the engines on the device")
    return trt


class TrtSession:
    """A deserialized TensorRT engine; buffers are allocated per call (shapes vary with the batch)."""

    def __init__(self, path: Path):
        trt = require_tensorrt()
        self.trt, self.cudart = trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT could not load this engine (built for another GPU or TensorRT "
                              f"version?); rebuild it on this device with `sglora-edge export --tensorrt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = _check(self.cudart.cudaStreamCreate())

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        trt, cudart = self.trt, self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        allocated, outputs = [], []
        try:
            for name in self.input_names:
                host = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_input_shape(name, host.shape)
                ptr = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                allocated.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self.stream))
                self.context.set_tensor_address(name, int(ptr))
            for name in self.output_names:
                host = np.empty(tuple(self.context.get_tensor_shape(name)),
                                dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                allocated.append(ptr)
                self.context.set_tensor_address(name, int(ptr))
                outputs.append((host, ptr))
            if not self.context.execute_async_v3(int(self.stream)):
                raise EngineError("TensorRT execution failed")
            for host, ptr in outputs:
                _check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
        finally:
            for ptr in allocated:
                cudart.cudaFree(ptr)
        return [host.astype(np.float32, copy=False) for host, _ in outputs]


def open_session(bundle, graph: str, engine: Engine = "onnxruntime"):
    """The session for one of the bundle's graphs on the chosen engine."""
    if engine == "onnxruntime":
        return OrtSession(bundle.graph_file(graph))
    if engine == "tensorrt":
        require_tensorrt()
        plans = bundle.manifest.get("tensorrt", {}).get("engines", {})
        if graph not in plans:
            raise EngineUnavailable(f"{bundle.root} has no TensorRT engine for {graph}; build them on this device "
                                    f"with `sglora-edge export ... --tensorrt` (or export.tensorrt.build_engines)")
        return TrtSession(bundle.path(plans[graph]["file"]))
    raise SGLoRAError(f"engine {engine!r} is unknown; choose one of {', '.join(ENGINES)}")


def max_batch(bundle, graph: str, engine: str, default: int) -> int:
    """The largest batch an engine accepts for a graph (TensorRT profiles are bounded; ONNX Runtime is not)."""
    if engine != "tensorrt":
        return default
    return min(default, int(bundle.manifest["tensorrt"]["engines"][graph]["max_batch"]))
