"""INT8 for the visual graphs, two ways, and retrieval recall of a bundle on a dataset's test galleries.

- `add_int8_graphs` (`sglora-edge quantize`, `bench --openvino`): NNCF post-training static quantisation,
  calibrated on images the user gives or a dataset's *train* images (never val or test), written into the bundle
  as `<graph>.int8.onnx` beside each quantized graph (QDQ ONNX: ONNX Runtime and OpenVINO both run it), listed
  in the manifest's `int8_graphs` with the calibration recorded under `int8`; `run --precision int8` picks them.
- `quantize_bundle` (`bench --int8`): a copy of the bundle whose visual graphs ONNX Runtime quantized
  dynamically (weights int8 per channel, activations quantized on the fly; `quantized` records it).

Quantized: visual_prefix and visual_suffix. visual_suffix_merged stays fp32: its W_qkv initializers are
overridden per LoRA. Both write through the bundle's one manifest writer (`runtime.bundle.write_manifest`).
Torch-free: onnx, nncf (its ONNX backend) and the runtime; the dataset reader only for --world.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from runtime.bundle import Bundle, read_manifest
from runtime.errors import InputError

from runtime.artifacts import atomic_dir

from runtime.bundle import file_table, write_manifest

from .bundle import BundleExportError

QUANTIZED = ("visual_prefix", "visual_suffix")
CALIBRATION_ROLES = ("expert", "train")  # tasks whose train images calibrate; unseen tasks' images are never read
CALIBRATION_IMAGES = 300  # NNCF's default subset size


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
                file = manifest.graphs[graph]["file"]
                quantize_dynamic(src / file, tmp / file, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)
        manifest.quantized = {"graphs": list(QUANTIZED), "method": "onnxruntime.quantization.quantize_dynamic",
                                 "weights": "int8 per channel", "activations": "uint8, dynamic", "source": str(src)}
        manifest.files = file_table(tmp)
        write_manifest(tmp, manifest)
    return dst


def calibration_images(images: str | Path | None = None, world: str | Path | None = None,
                       n: int = CALIBRATION_IMAGES, seed: int = 0) -> tuple[list[Path], dict]:
    """(image paths, what they are) for INT8 calibration: every image under `images` (the user's), or the train
    split of a dataset's expert and train tasks (`world`), at most n, chosen with a seeded shuffle. Only
    `split_pairs("train")` of the dataset is looked at: val and test images are never listed, let alone read."""
    if (images is None) == (world is None):
        raise InputError("calibration: pass --images DIR (your own images) or --world DIR (a dataset: its train "
                         "images), one of them")
    if n < 1:
        raise InputError(f"--calibration-images must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if images is not None:
        from runtime.gallery import list_gallery
        paths = list_gallery(images)[0]
        record = {"source": "images", "folder": str(images)}
    else:
        from sglora_edge.data import load_dataset
        ds = load_dataset(world, check_images="none")
        tasks = {t for role in CALIBRATION_ROLES for t in ds.task_names(role=role)}
        paths = sorted({p.image for p in ds.split_pairs("train") if p.task in tasks})
        if not paths:
            raise InputError(f"--world {world}: no train images of {' or '.join(CALIBRATION_ROLES)} tasks to "
                             f"calibrate on; pass --images DIR")
        record = {"source": "dataset", "world": str(world), "split": "train", "roles": list(CALIBRATION_ROLES),
                  "tasks": len(tasks)}
    chosen = [paths[i] for i in sorted(rng.permutation(len(paths))[:n])]
    return chosen, {**record, "images": len(chosen), "of": len(paths), "seed": seed}


def _nop_casts_as_identity(model):
    """A Cast to the type its input already has, feeding a graph output, becomes an Identity: NNCF's own pass
    that drops such casts looks up the output's value_info, which graph outputs lack (KeyError)."""
    import onnx
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                              *model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and node.output[0] in outputs and types.get(node.input[0]) == to:
            node.op_type = "Identity"
            del node.attribute[:]
    return model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def add_int8_graphs(src: str | Path, dst: str | Path | None = None, images: str | Path | None = None,
                    world: str | Path | None = None, n: int = CALIBRATION_IMAGES, seed: int = 0, log=print) -> dict:
    """Write `dst` (default: `src` itself, replaced atomically): the bundle with NNCF INT8 variants of its visual
    graphs, calibrated on `images` or `world`'s train images; returns the manifest's `int8` record.

    The prefix calibrates on the images' pixels, the suffix on their fp32 prefix activations with the library's
    expert LoRAs as the LoRA input (cycled), so the LoRA side path sees the values generated LoRAs take."""
    import nncf
    import onnx

    from runtime.pipeline import EdgeRuntime
    src = Path(src)
    dst = src if dst is None else Path(dst)
    rt = EdgeRuntime(src, backend="ort-cpu")  # verifies the bundle
    m = rt.bundle.manifest
    if m.baked:
        raise BundleExportError(f"{src}: a bundle with a LoRA baked in (export --merge-desc) has no INT8 path; "
                                f"quantize a bundle exported without --merge-desc")
    paths, calibration = calibration_images(images, world, n, seed)
    log(f"calibration: {len(paths)} images ({calibration['source']})")
    pixels = rt.preprocess(paths)
    acts = rt.prefix(pixels)
    loras = rt.bundle.mu
    feeds = {"visual_prefix": [{"pixels": pixels[i:i + 1]} for i in range(len(pixels))],
             "visual_suffix": [{"activations": acts[i:i + 1], "lora": loras[i % len(loras)]} for i in range(len(acts))]}
    settings = {"model_type": "transformer", "preset": "performance (symmetric activations)",
                "target_device": "CPU", "subset_size": len(paths)}
    files = {}
    root = logging.getLogger()
    level = root.level
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        try:
            root.setLevel(logging.WARNING)  # NNCF's per-step INFO lines
            for graph in QUANTIZED:
                file = m.graphs[graph]["file"]
                log(f"{graph}: NNCF post-training quantisation")
                model = _nop_casts_as_identity(onnx.load(str(src / file)))
                with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: keep stdout for --json
                    q = nncf.quantize(model, nncf.Dataset(feeds[graph]), subset_size=len(paths),
                                      model_type=nncf.ModelType.TRANSFORMER, target_device=nncf.TargetDevice.CPU,
                                      preset=nncf.QuantizationPreset.PERFORMANCE)
                files[graph] = file.replace(".onnx", ".int8.onnx")
                onnx.save(q, str(tmp / files[graph]))
        finally:
            root.setLevel(level)
        record = {"graphs": list(QUANTIZED), "method": f"nncf.quantize {nncf.__version__} (post-training, static, "
                  f"QDQ ONNX)", "settings": settings, "weights": "int8 per channel, symmetric",
                  "activations": "int8 per tensor, calibrated", "calibration": {**calibration, "loras":
                  f"the library's {len(loras)} expert LoRAs, cycled (suffix)"}, "source": str(src)}
        m = read_manifest(tmp)
        m.int8_graphs, m.int8 = files, record
        m.files = file_table(tmp)
        write_manifest(tmp, m)
        # the written variant, run as `run --precision int8` runs it, against fp32 on the first images
        q, few = EdgeRuntime(tmp, backend="ort-cpu", precision="int8"), min(8, len(pixels))
        record["min_cosine_to_fp32"] = {
            "visual_prefix": round(_cosine(q.prefix(pixels[:few]), acts[:few]), 5),
            "visual_suffix": round(_cosine(q.suffix(acts[:few], loras[0]), rt.suffix(acts[:few], loras[0])), 5)}
        write_manifest(tmp, m)  # the same files: only the record grew
    return record


def world_recall(bundle: str | Path, world: str | Path, domain: str = "photo", role: str = "unseen",
                 threads: int = 0, backend: str = "ort-cpu", precision: str | None = None) -> dict:
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
        rt = EdgeRuntime.load(bundle, threads=threads, cache_dir=cache, backend=backend, precision=precision)
        per_task = {}
        for task in tasks:
            g = ds.gallery(task, "test")
            lora = rt.generate(ds.tasks[task].description).loras[0]
            images = rt.suffix(rt.prefix(rt.preprocess(g.images)), lora)
            per_task[task] = round(mean_r1(recall_at_k(images @ rt.text_features(g.captions).T, g.positive)), 2)
    return {"mean_r1": round(float(np.mean(list(per_task.values()))), 2), "tasks": len(tasks), "domain": domain,
            "role": role, "world": str(world), "per_task": per_task}


def hook(world: str | Path | None):
    """What `bench --int8` / `--openvino` call: quantize(src, dst) -> dst (dynamic copy); add_int8(src, dst,
    gallery, n) -> (dst, calibration record): NNCF graphs calibrated on `world`'s train images when given, else
    on the bench's gallery; recall(bundle, threads, backend, precision) -> dict or None (no world, or random
    weights: recall would mean nothing)."""
    def recall(bundle: Path, threads: int, backend: str = "ort-cpu", precision: str | None = None):
        if world is None or "@random" in read_manifest(bundle).backbone["ident"]:
            return None
        return world_recall(bundle, world, threads=threads, backend=backend, precision=precision)

    def add_int8(src: Path, dst: Path, gallery: list[Path], n: int):
        if world is not None:
            record = add_int8_graphs(src, dst, world=world, n=n, log=lambda s: None)
        else:
            folder = Path(gallery[0]).parent
            record = add_int8_graphs(src, dst, images=folder, n=n, log=lambda s: None)
            record["calibration"]["what"] = "the bench's gallery (random pixels): fine for speed, not for recall"
        return dst, record["calibration"]
    galleries = None if world is None else f"the test split of the unseen photo tasks of {world}"
    return {"quantize": quantize_bundle, "recall": recall, "add_int8": add_int8, "recall_galleries": galleries}
