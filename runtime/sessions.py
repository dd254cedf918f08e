"""One interface over the inference backends: `session.run({input: array}) -> [outputs]`.

Backends (`--backend`):
    ort-cpu   ONNX Runtime, CPUExecutionProvider (the bundle's *.onnx files)
    ort-cuda  ONNX Runtime, CUDAExecutionProvider (onnxruntime-gpu, or JetPack's own ORT build)
    ort-trt   ONNX Runtime, TensorrtExecutionProvider (ORT builds and caches the engines itself)
    trt       TensorRT directly, with the engines `sglora-edge build-engines` wrote on this device
    openvino  OpenVINO's own runtime on the CPU (the bundle's *.onnx files, read and compiled by OpenVINO)
    auto      trt when engines for this GPU are in the bundle, else ort-cuda when ONNX Runtime has CUDA, else
              openvino on an x86 CPU where it is installed (input mode, not fp16), else ort-cpu

A session is checked to run on the provider asked for: ONNX Runtime silently falls back to CPU when
the CUDA libraries fail to load, and a GPU user must hear about it rather than wait 50x longer.

OpenVINO is called directly rather than through ONNX Runtime's OpenVINO provider: measured on the same ViT-B/16
graphs (benchmarks/results/xeon-2vcpu/README.md) the provider ran at the same speed (within 4 %, fp32 and bf16),
took ~0.7 s longer to load, and is a separate ONNX Runtime wheel (onnxruntime-openvino) that shadows the
`onnxruntime` the other backends use, so a device could not have both.

Precision (`--precision`) is what the visual graphs compute in:
    fp32  the fp32 graphs (OpenVINO: inference precision hint f32, so it matches ONNX Runtime)
    fp16  the bundle's fp16 graph variants (`export --fp16`) on ONNX Runtime, the engines' on TensorRT,
          OpenVINO's f16 hint where the CPU reports FP16
    bf16  OpenVINO's bf16 inference precision hint (CPUs with AVX512-BF16 or AMX); ONNX Runtime has no x86 bf16
    int8  the bundle's INT8 graph variants (`sglora-edge quantize`: NNCF post-training quantisation, QDQ ONNX),
          run by ONNX Runtime or OpenVINO
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

import numpy as np


def package_version(module: str) -> str | None:
    """The installed version of a backend's package (onnxruntime or its -gpu build, tensorrt or its CUDA wheel)."""
    for dist in {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "tensorrt": ("tensorrt", "tensorrt-cu12")}.get(
            module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None

from .engine import require
from .errors import EngineUnavailable, InputError

Backend = Literal["auto", "ort-cpu", "ort-cuda", "ort-trt", "trt", "openvino"]
BACKENDS = get_args(Backend)
ORT_PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-trt": "TensorrtExecutionProvider"}
Optimization = Literal["disable", "basic", "extended", "all"]
OPT_LEVELS = get_args(Optimization)
Precision = Literal["fp32", "fp16", "bf16", "int8"]  # of the visual graphs (see above)
PRECISIONS = get_args(Precision)
VARIANT_PRECISIONS = ("fp16", "int8")  # precisions that are graph files of their own (manifest `<p>_graphs`)
OV_HINT = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}  # int8: what is not quantized runs f32
OV_CAPABILITY = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "int8": "INT8"}  # CPU OPTIMIZATION_CAPABILITIES
QUANTIZE_HINT = "add them with `sglora-edge quantize --bundle {root} --images DIR` (or --world DIR: its train images)"


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


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@lru_cache(maxsize=1)
def openvino_core():
    """One OpenVINO Core per process (it holds the plugins; creating one per graph reloads them)."""
    return require("openvino").Core()


def openvino_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin says this CPU computes natively: FP32, BF16, FP16, INT8, ..."""
    return list(openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def resolve_backend(name: Backend, bundle, lora_mode: str = "input", precision: str | None = None
                    ) -> tuple[Backend, str]:
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
    why = f"no usable TensorRT engines ({trt_reason}); ONNX Runtime has no CUDA provider here"
    if not x86():
        return "ort-cpu", f"{why}; OpenVINO is for x86 CPUs, this is {platform.machine()}"
    if not openvino_installed():
        return "ort-cpu", f"{why}; OpenVINO is not installed (pip install 'sglora-edge[openvino]' to use it)"
    if lora_mode == "merged":
        return "ort-cpu", f"{why}; --lora-mode merged runs on ONNX Runtime (OpenVINO would recompile per LoRA)"
    if precision == "fp16":
        return "ort-cpu", f"{why}; --precision fp16 runs the bundle's fp16 graphs on ONNX Runtime"
    return "openvino", f"{why}; x86 CPU with OpenVINO installed: OpenVINO compiles the graphs for this CPU"


def check_precision(backend: str, precision: str, bundle) -> None:
    """Refuse, in one line, a precision this backend, bundle or CPU cannot run (TensorRT is checked by the caller:
    its precision is the engines')."""
    root = bundle.root
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if backend.startswith("ort-") and precision == "bf16":
        raise InputError("--precision bf16: ONNX Runtime has no bf16 kernels for the CPU on x86 (its fast-math "
                         "bf16 is ARM-only); use --backend openvino on a CPU with AVX512-BF16 or AMX")
    if backend in ("ort-cuda", "ort-trt") and precision == "int8":
        raise InputError("--precision int8: the INT8 graphs are for CPUs (ONNX Runtime CPU or OpenVINO); use "
                         "--backend ort-cpu or openvino, or --precision fp16 on the GPU")
    if precision in VARIANT_PRECISIONS and not (backend == "openvino" and precision == "fp16") \
            and not bundle.manifest.variant(precision):
        fix = "re-export it with `sglora-edge export --fp16 ...`" if precision == "fp16" else \
            QUANTIZE_HINT.format(root=root)
        raise InputError(f"--precision {precision}: {root} has no {precision} graphs; {fix}, or leave --precision out")
    if backend == "openvino":
        have = openvino_capabilities()
        if OV_CAPABILITY[precision] not in have:
            raise InputError(f"--precision {precision}: OpenVINO says this CPU has no native "
                             f"{OV_CAPABILITY[precision]} (it has {', '.join(have)}); choose a precision it has, "
                             f"or leave --precision out")


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


class OvSession:
    """A graph compiled by OpenVINO for the CPU, computing in the precision asked for (OpenVINO's default on a
    bf16-capable CPU is bf16: fp32 is set explicitly). One infer request, reused; outputs are copied out."""

    def __init__(self, path: Path, config: SessionConfig):
        core = openvino_core()
        props = {"INFERENCE_PRECISION_HINT": OV_HINT[config.precision], "PERFORMANCE_HINT": "LATENCY"}
        if config.threads:
            props["INFERENCE_NUM_THREADS"] = config.threads
        try:
            self.compiled = core.compile_model(str(path), "CPU", props)
        except RuntimeError as e:  # OpenVINO raises RuntimeError (its Exception) for unreadable or unsupported graphs
            raise EngineUnavailable(f"{path}: OpenVINO could not compile this graph "
                                    f"({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}); "
                                    f"re-export the bundle, or use --backend ort-cpu") from e
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)
        self.input_names = [i.any_name for i in self.compiled.inputs]
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # f32, bf16, ...
        self.providers = [f"OpenVINO CPU ({self.precision})"]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)  # share_outputs=False: copies, the request's buffers are reused
        return [result[o] for o in self.outputs]


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
    if config.backend == "openvino":
        if initializers:
            raise InputError("--lora-mode merged runs on ONNX Runtime backends (OpenVINO would recompile the graph "
                             "for every LoRA); use --lora-mode input with --backend openvino")
        if not graph.startswith("visual_"):  # precision is the visual graphs'; text and generator stay fp32
            config = SessionConfig(config.backend, config.threads, config.optimization, "fp32")
        return OvSession(bundle.graph_file(graph, config.precision), config)
    return OrtSession(bundle.graph_file(graph, config.precision), config, initializers)


def max_batch(bundle, graph: str, config: SessionConfig, default: int) -> int:
    """The largest batch a backend accepts for a graph (TensorRT profiles are bounded; ONNX Runtime is not)."""
    if config.backend != "trt":
        return default
    from .tensorrt import engines_for_this_device
    return min(default, int(engines_for_this_device(bundle)["engines"][graph]["max_batch"]))
