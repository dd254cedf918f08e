"""One interface over the inference backends: `session.run({input: array}) -> [outputs]`.

Backends (`--backend`):
    ort-cpu   ONNX Runtime, CPUExecutionProvider (the bundle's *.onnx files)
    ort-cuda  ONNX Runtime, CUDAExecutionProvider (onnxruntime-gpu, or JetPack's own ORT build)
    ort-trt   ONNX Runtime, TensorrtExecutionProvider (ORT builds and caches the engines itself)
    trt       TensorRT directly, with the engines `sglora-edge build-engines` wrote on this device
    auto      trt when engines for this GPU are in the bundle, else ort-cuda when ONNX Runtime has CUDA, else ort-cpu

A session is checked to run on the provider asked for: ONNX Runtime silently falls back to CPU when
the CUDA libraries fail to load, and a GPU user must hear about it rather than wait 50x longer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from .engine import require
from .errors import EngineUnavailable, InputError

Backend = Literal["auto", "ort-cpu", "ort-cuda", "ort-trt", "trt"]
BACKENDS = get_args(Backend)
ORT_PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-trt": "TensorrtExecutionProvider"}
Optimization = Literal["disable", "basic", "extended", "all"]
OPT_LEVELS = get_args(Optimization)
Precision = Literal["fp32", "fp16"]  # of the visual graphs: fp16 = the variants `export --fp16` writes
PRECISIONS = get_args(Precision)


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are made; recorded in every `run` result."""
    backend: Backend = "ort-cpu"
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = its default (one per physical core)
    optimization: Optimization = "all"  # ONNX Runtime graph optimisation level
    precision: Precision = "fp32"  # fp16: the bundle's fp16 graph variants where it has them (TensorRT: the engines')

    def describe(self) -> dict:
        return {"backend": self.backend, "threads": self.threads, "graph_optimization": self.optimization,
                "precision": self.precision}


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise InputError(f"--backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")


def resolve_backend(name: Backend, bundle) -> tuple[Backend, str]:
    """(backend, why) for a --backend value; `auto` picks the fastest one that can run here."""
    check_backend(name)
    if name != "auto":
        return name, "asked for"
    from . import tensorrt as trt_mod
    try:
        trt_mod.require_tensorrt()
        build = trt_mod.engines_for_this_device(bundle)
        return "trt", f"TensorRT {build['key']['tensorrt']} engines for {build['key']['gpu']} are in the bundle"
    except EngineUnavailable as e:
        trt_reason = str(e).split(";")[0]
    available = require("onnxruntime").get_available_providers()
    if "CUDAExecutionProvider" in available:
        return "ort-cuda", f"no usable TensorRT engines ({trt_reason}); ONNX Runtime has CUDA"
    return "ort-cpu", f"no usable TensorRT engines ({trt_reason}); ONNX Runtime has no CUDA provider here"


class OrtSession:
    """An ONNX Runtime session on exactly the provider asked for (CPU kept as the fallback for unsupported nodes
    only when the main provider did load). `initializers` override the graph's weights of those names."""

    def __init__(self, path: Path, config: SessionConfig, initializers: dict[str, np.ndarray] | None = None):
        ort = require("onnxruntime")
        provider = ORT_PROVIDERS[config.backend]
        available = ort.get_available_providers()
        if provider not in available:
            fix = "pip install 'sglora-edge[gpu]' (onnxruntime-gpu)" if config.backend != "ort-cpu" else \
                "reinstall onnxruntime"
            raise EngineUnavailable(f"--backend {config.backend}: this onnxruntime has no {provider} (it has "
                                    f"{', '.join(available)}); {fix}, or pass --backend ort-cpu")
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{config.optimization.upper()}"
                                                   if config.optimization != "disable" else "ORT_DISABLE_ALL")
        if config.threads:
            options.intra_op_num_threads = config.threads
        # add_initializer keeps a reference to the buffer, not a copy: hold the OrtValues for the session's life
        self._values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                        for name, a in (initializers or {}).items()}
        for name, value in self._values.items():
            options.add_initializer(name, value)
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        if config.backend == "ort-trt":
            providers.insert(1, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineUnavailable(f"{path}: ONNX Runtime could not load this graph ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}); re-export the bundle") from e
        got = self.session.get_providers()
        if got[0] != provider:
            raise EngineUnavailable(f"--backend {config.backend}: ONNX Runtime fell back to {got[0]} instead of "
                                    f"{provider} (its libraries failed to load; see the log above); fix the "
                                    f"CUDA/cuDNN install, or pass --backend ort-cpu to run on the CPU on purpose")
        self.providers = got
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


def open_session(bundle, graph: str, config: SessionConfig, initializers: dict[str, np.ndarray] | None = None):
    """The session for one of the bundle's graphs on the chosen backend."""
    check_backend(config.backend)
    if config.backend == "auto":
        raise ValueError("resolve --backend auto with resolve_backend() before opening sessions")
    if config.backend == "trt":
        from .tensorrt import TrtSession, engines_for_this_device
        build = engines_for_this_device(bundle)
        if graph not in build["engines"]:
            raise EngineUnavailable(f"{bundle.root}: the TensorRT build has no engine for {graph}; rebuild with "
                                    f"`sglora-edge build-engines --bundle {bundle.root}`")
        return TrtSession(bundle.path(build["engines"][graph]["file"]))
    return OrtSession(bundle.graph_file(graph, config.precision), config, initializers)


def max_batch(bundle, graph: str, config: SessionConfig, default: int) -> int:
    """The largest batch a backend accepts for a graph (TensorRT profiles are bounded; ONNX Runtime is not)."""
    if config.backend != "trt":
        return default
    from .tensorrt import engines_for_this_device
    return min(default, int(engines_for_this_device(bundle)["engines"][graph]["max_batch"]))
