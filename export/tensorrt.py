"""ONNX -> TensorRT engines (*.plan) for a bundle, built on the device that will run them.

Plans are specific to the GPU and TensorRT version, so this runs on the device (Jetson / CUDA box)
against an exported bundle; the ONNX files stay the portable source. Each dynamic axis gets an
optimisation profile (batch 1..max_batch, samples 1..max_samples, sequence 1..the tokenizer's
max length). The plans and their profiles are recorded in manifest.json (with their sha256).
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import EngineError
from runtime.sessions import require_tensorrt

from .bundle import MANIFEST, file_table, write_manifest


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


def build_engines(bundle_dir: str | Path, fp16: bool = True, max_batch: int = 64, max_samples: int = 64,
                  workspace_gib: float = 2.0) -> dict:
    """Build <graph>.plan for every ONNX graph in the bundle; record them in the manifest. Returns that record."""
    trt = require_tensorrt()  # EngineUnavailable naming the [trt] extra, or saying no CUDA GPU is visible
    root = Path(bundle_dir)
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    logger = trt.Logger(trt.Logger.WARNING)
    max_sequence = int(manifest["semantic"].get("max_length", 128))
    engines = {}
    for graph, io in manifest["graphs"].items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(root / io["file"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {io['file']}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if fp16 and hasattr(trt.BuilderFlag, "FP16"):
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
            raise EngineError(f"TensorRT failed to build an engine for {io['file']} (see the log above)")
        file = f"{graph}.plan"
        (root / file).write_bytes(bytes(plan))
        batch_dims = [d for dims in io["inputs"].values() for d in dims[:1] if d in ("batch", "samples")]
        engines[graph] = {"file": file, "profiles": profiles,
                          "max_batch": max_samples if "samples" in batch_dims else max_batch}
    record = {"tensorrt_version": trt.__version__, "fp16": bool(fp16), "engines": engines}
    manifest["tensorrt"] = record
    manifest["files"] = file_table(root)
    write_manifest(root, manifest)
    return record
