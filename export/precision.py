"""INT8 copies of a bundle (ONNX Runtime dynamic quantization of the visual graphs) and retrieval recall of a
bundle on a dataset's test galleries, for `sglora-edge bench --int8` (server side: onnx, the dataset reader).

The copy is an ordinary bundle (manifest re-hashed, `quantized` recording what changed), so the runtime needs
nothing new to run it. Quantized: visual_prefix and visual_suffix (weights int8 per channel, activations
quantized on the fly). visual_suffix_merged stays fp32: its W_qkv initializers are overridden per LoRA.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from runtime.bundle import MANIFEST, Bundle
from runtime.errors import InputError

from sglora_edge.artifacts import atomic_dir

from .bundle import file_table, write_manifest

QUANTIZED = ("visual_prefix", "visual_suffix")


def quantize_bundle(src: str | Path, dst: str | Path) -> Path:
    """Write `dst`: the bundle `src` with its visual graphs dynamically quantized to int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, dst = Path(src), Path(dst)
    manifest = Bundle.load(src).manifest
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # quantize_dynamic's advice to pre-process, on every call
        try:
            for graph in QUANTIZED:
                file = manifest["graphs"][graph]["file"]
                quantize_dynamic(src / file, tmp / file, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)
        manifest["quantized"] = {"graphs": list(QUANTIZED), "method": "onnxruntime.quantization.quantize_dynamic",
                                 "weights": "int8 per channel", "activations": "uint8, dynamic", "source": str(src)}
        manifest["files"] = file_table(tmp)
        write_manifest(tmp, manifest)
    return dst


def world_recall(bundle: str | Path, world: str | Path, domain: str = "photo", role: str = "unseen",
                 threads: int = 0) -> dict:
    """Mean R@1 ((i2t + t2i) / 2, percent) over the test galleries of `role` tasks in `domain`, each with the LoRA
    the bundle generates from the task's description (prior mean), computed by the runtime."""
    from runtime.pipeline import EdgeRuntime
    from sglora_edge.data import load_dataset
    from sglora_edge.metrics import mean_r1, recall_at_k

    ds = load_dataset(world)
    tasks = ds.task_names(role=role, domain=domain)
    if not tasks:
        raise InputError(f"{world}: no {role!r} tasks in domain {domain!r}")
    with tempfile.TemporaryDirectory() as cache:
        rt = EdgeRuntime.load(bundle, threads=threads, cache_dir=cache)
        per_task = {}
        for task in tasks:
            g = ds.gallery(task, "test")
            lora = rt.generate(ds.tasks[task].description).loras[0]
            images = rt.suffix(rt.prefix(rt.preprocess(g.images)), lora)
            per_task[task] = round(mean_r1(recall_at_k(images @ rt.text_features(g.captions).T, g.positive)), 2)
    return {"mean_r1": round(float(np.mean(list(per_task.values()))), 2), "tasks": len(tasks), "domain": domain,
            "role": role, "world": str(world), "per_task": per_task}


def hook(world: str | Path | None):
    """What `bench --int8` calls: quantize(src, dst) -> dst, recall(bundle) -> dict or None (no world, or random
    weights: recall would mean nothing)."""
    def recall(bundle: Path, threads: int):
        m = json.loads((Path(bundle) / MANIFEST).read_text())
        if world is None or "@random" in m["backbone"]["ident"]:
            return None
        return world_recall(bundle, world, threads=threads)
    return {"quantize": quantize_bundle, "recall": recall}
