"""TensorRT on the device, torch-free: engines built from the bundle's ONNX files, keyed to the GPU and version.

Engines are specific to the GPU model and the TensorRT version, so `build_engines` runs on the device
that will use them. It verifies the bundle first (a tampered file is refused, never re-blessed), builds
each graph with a timing cache, and writes the plans under `tensorrt/<key>/` with a record in
manifest.json (`tensorrt.builds[<key>]`: GPU name, compute capability, TensorRT version, the precision
actually built, the profiles). Loading picks the build whose key matches this device and refuses otherwise.

Written against the TensorRT 10 Python API (explicit batch, named I/O tensors, execute_async_v3) and
TensorRT 11 (no BuilderFlag.FP16: precision comes from the ONNX types). Not run on a GPU by us.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np

from .artifacts import write_bytes
from .bundle import Bundle, file_table, write_manifest
from .engine import require
from .errors import EngineError, EngineUnavailable

MIN_VERSION, MAX_VERSION = 10, 11  # majors this code is written against ([trt] pins tensorrt>=10,<12)
TIMING_CACHE = "timing.cache"


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
            raise EngineUnavailable(f"TensorRT needs cuda-python ({e}); install it with: pip install "
                                    f"'sglora-edge[trt]'") from e


def _check(result):
    """cuda-python returns (error, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else values


def require_tensorrt():
    """tensorrt (major 10 or 11) with a visible CUDA GPU, or EngineUnavailable saying what to install."""
    trt = require("tensorrt")
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_VERSION:
        raise EngineUnavailable(f"TensorRT {trt.__version__} is too old (8.x is what JetPack 5 and 6.0 ship: implicit "
                                f"batch, no INT64 ArgMax); install TensorRT 10 (JetPack 6.1+, or pip install "
                                f"'sglora-edge[trt]'), or use --backend ort-cuda / ort-cpu")
    if major > MAX_VERSION:
        raise EngineUnavailable(f"TensorRT {trt.__version__} is newer than this runtime knows (10-11); install "
                                f"'tensorrt>=10,<12' or upgrade sglora-edge")
    cudart = _cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise EngineUnavailable("TensorRT needs a CUDA GPU and none is visible here; use --backend ort-cpu")
    return trt


def device_key() -> dict:
    """What an engine is tied to: GPU name, compute capability, TensorRT version."""
    trt = require_tensorrt()
    props = _check(_cudart().cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}",
            "tensorrt": str(trt.__version__)}


def key_slug(key: dict) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", f"{key['gpu']}-sm{key['compute_capability']}-trt{key['tensorrt']}")


def engines_for_this_device(bundle) -> dict:
    """The bundle's TensorRT build for this GPU + TensorRT version, or EngineUnavailable naming the fix."""
    builds = (bundle.manifest.tensorrt or {}).get("builds", {})
    fix = f"build them here with `sglora-edge build-engines --bundle {bundle.root}`"
    if not builds:
        raise EngineUnavailable(f"{bundle.root} has no TensorRT engines; {fix}")
    key = device_key()
    build = builds.get(key_slug(key))
    if build is None:
        have = "; ".join(f"{b['key']['gpu']} sm{b['key']['compute_capability']} TensorRT {b['key']['tensorrt']}"
                         for b in builds.values())
        raise EngineUnavailable(f"{bundle.root}: its TensorRT engines were built for {have}, this is {key['gpu']} "
                                f"sm{key['compute_capability']} TensorRT {key['tensorrt']} (engines do not move "
                                f"between GPUs or versions); {fix}")
    return build


class TrtSession:
    """A deserialized TensorRT engine; buffers are allocated per call (shapes vary with the batch)."""

    def __init__(self, path: Path):
        trt = require_tensorrt()
        self.trt, self.cudart = trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise EngineUnavailable(f"{path}: TensorRT could not load this engine; rebuild it on this device with "
                                    f"`sglora-edge build-engines --bundle <bundle>`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.providers = ["TensorRT"]

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


def _profile_shapes(dims: list, opt_batch: int, max_batch: int, max_samples: int, max_sequence: int
                    ) -> tuple[list, list, list]:
    """(min, opt, max) for one input from its manifest dims (ints are fixed, names are dynamic axes)."""
    ranges = {"batch": (1, min(opt_batch, max_batch), max_batch), "samples": (1, min(5, max_samples), max_samples),
              "sequence": (1, min(16, max_sequence), max_sequence)}
    lo, opt, hi = [], [], []
    for d in dims:
        a, b, c = (d, d, d) if isinstance(d, int) else ranges[d]
        lo.append(a)
        opt.append(b)
        hi.append(c)
    return lo, opt, hi


def build_engines(bundle_dir: str | Path, fp16: bool = False, workspace_mb: int = 2048, max_batch: int = 64,
                  max_samples: int = 64, log=print) -> dict:
    """Build a plan for every ONNX graph of a verified bundle on this device; record the build in the manifest."""
    bundle = Bundle.load(bundle_dir)  # sha256 of every file: never build from (or re-bless) a tampered bundle
    trt = require_tensorrt()
    key = device_key()
    slug = key_slug(key)
    root, manifest = bundle.root, copy.deepcopy(bundle.manifest)
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11: precision comes from the ONNX types
    fp16_graphs = manifest.variant("fp16")
    if fp16 and strongly_typed and not fp16_graphs:
        raise EngineUnavailable(f"TensorRT {trt.__version__} takes precision from the ONNX types and this bundle "
                                f"has no fp16 graphs; re-export it with `sglora-edge export --fp16`, or build "
                                f"without --fp16 (fp32)")
    out = root / "tensorrt" / slug
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = out / TIMING_CACHE
    max_sequence = int(manifest.semantic.get("max_length", 128))
    engines = {}
    for graph, io in manifest.graphs.items():
        onnx_file = fp16_graphs.get(graph, io["file"]) if fp16 and strongly_typed else io["file"]
        log(f"building {graph} from {onnx_file} ...")
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(root / onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {onnx_file}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        timing = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(timing, False)
        if fp16 and not strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profiles = {}
        for name, dims in io["inputs"].items():
            opt_batch = 32 if graph.startswith("visual") else 1  # galleries go in batches; descriptions one at a time
            lo, opt, hi = _profile_shapes(dims, opt_batch, max_batch, max_samples, max_sequence)
            profile.set_shape(name, lo, opt, hi)
            profiles[name] = {"min": lo, "opt": opt, "max": hi}
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT failed to build an engine for {onnx_file} (see the log above)")
        write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
        file = f"tensorrt/{slug}/{graph}.plan"
        write_bytes(root / file, bytes(plan))
        batch_dims = [d for dims in io["inputs"].values() for d in dims[:1] if d in ("batch", "samples")]
        built_fp16 = fp16 and (onnx_file != io["file"] or not strongly_typed)  # TensorRT 11: no fp16 variant, fp32
        engines[graph] = {"file": file, "onnx": onnx_file, "precision": "fp16" if built_fp16 else "fp32",
                          "profiles": profiles,
                          "max_batch": max_samples if "samples" in batch_dims else max_batch}
    precision = "fp16" if fp16 else "fp32"
    record = {"key": key, "precision": precision, "strongly_typed": strongly_typed, "workspace_mb": workspace_mb,
              "engines": engines}
    manifest.tensorrt = manifest.tensorrt or {}
    manifest.tensorrt.setdefault("builds", {})[slug] = record
    # add the new files' hashes only: the verified ones stay as exported
    prefix = out.relative_to(root).as_posix()
    manifest.files = {**manifest.files, **{f"{prefix}/{rel}": entry for rel, entry in file_table(out).items()}}
    write_manifest(root, manifest)
    return record
