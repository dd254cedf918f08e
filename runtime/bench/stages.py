"""The stages a bundle is timed on: every runtime stage, cold start, scaling, INT8 and precision comparisons,
thread/optimisation tuning, and the cross-bundle comparisons."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ..bundle import Bundle, Manifest, read_manifest
from ..config import BenchConfig
from ..errors import InputError
from ..modes import MERGED_GRAPH
from ..pipeline import EdgeRuntime, rank
from ..sessions import check_precision, openvino_installed
from .measure import DESC, QUERY, _read, growth, loglog_slope, measure

# -- inputs --------------------------------------------------------------------------------------------------------
def make_gallery(folder: Path, n: int, size: int) -> list[Path]:
    """n random RGB PNGs a little larger than the model input and not square (resize and crop run as in use)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 256, (size * 5 // 4, size * 3 // 2, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def macs_per_image(manifest: Manifest) -> dict:
    """Multiply-adds of one image through the ViT (patch embedding, attention, MLP ratio 4), prefix and suffix
    apart. ViT-B/16 at 224 px: 17.6 G in all."""
    spec, tokens = manifest.lora_spec, manifest.graphs["visual_suffix"]["inputs"]["activations"][1]
    d, n, first = spec["width"], spec["n_blocks"], manifest.first_adapted_block
    h, w = manifest.image["image_size"]
    block = tokens * 12 * d * d + 2 * tokens * tokens * d
    patch = h * w * 3 * d  # (tokens - 1) patches of 3·p² inputs each
    return {"prefix": patch + first * block, "suffix": (n - first) * block, "total": patch + n * block}


# -- one bundle ----------------------------------------------------------------------------------------------------
def label_of(manifest: Manifest) -> str:
    """e.g. "ViT-B-16 L=all random": model, adapted blocks, random or trained weights."""
    spec, backbone = manifest.lora_spec, manifest.backbone
    weights = "random" if "@random" in backbone["ident"] else "trained"
    return f"{backbone['model_name']} L={spec['last_blocks'] or 'all'} {weights}"


def _fresh_lora(lora: np.ndarray, rng) -> np.ndarray:
    """A new LoRA each call (the features cache would answer a repeated one): the vector, rescaled at random."""
    return lora * np.float32(1 + 0.01 * rng.random())


def timer(cfg: BenchConfig):
    """timed(fn, per, heavy) -> stats under the bench's repeats, warmup and stage budget; heavy: whole-gallery
    stages repeat less."""
    def timed(fn, per: int = 1, heavy: bool = False) -> dict:
        return measure(fn, min(cfg.repeats, 5) if heavy else cfg.repeats, min(cfg.warmup, 1) if heavy else cfg.warmup,
                       per, cfg.stage_budget)
    return timed


def bench_bundle(bundle: Path, cfg: BenchConfig, work: Path, role: str = "main", switch_images: int | None = None,
                 log=print, peak_gflops: float | None = None) -> dict:
    """Every stage of one bundle; role "switch": only the cached task switch, over `switch_images` images.
    peak_gflops (the machine's matmul probe) puts the throughput in proportion."""
    rt = EdgeRuntime.load(bundle, backend=cfg.backend, threads=cfg.threads, batch_size=max(cfg.batches),
                          cache_dir=work / "cache")
    m = rt.bundle.manifest
    label, size, rng = label_of(m), m.image["image_size"][0], np.random.default_rng(0)
    lora = rt.generate(DESC).loras[0]
    result = {"label": label, "path": str(bundle), "role": role, "backbone": m.backbone,
              "lora": {"size": m.lora_size, "blocks": m.lora_spec["n_blocks"] - m.first_adapted_block,
                       "last_blocks": m.lora_spec["last_blocks"]},
              "backend": rt.describe(), "stages": {}, "switch_images": switch_images, "cold_start": None,
              "throughput": None, "torch": None}
    paths = make_gallery(work / f"gallery{size}", cfg.gallery_size, size)
    if role == "main":
        log(f"{label}: stages")
        result["stages"] = pipeline_stages(rt, bundle, cfg, work, paths, lora=lora, rng=rng)
        result["throughput"] = throughput(result["stages"], m, max(cfg.batches), peak_gflops)
        # the whole-gallery switch: --switch-gallery images, fewer where re-encoding them would not fit the budget
        per_image = per_image_ms(result["stages"], max(cfg.batches))
        switch_images = min(cfg.switch_gallery,
                            max(max(cfg.batches), int(cfg.stage_budget * 1000 / (3 * per_image))))
        result["switch_images"] = switch_images
    log(f"{label}: task switch over {switch_images} images (building the prefix cache first)")
    result["stages"].update(switch_stages(rt, cfg, work, size, switch_images, lora=lora, rng=rng,
                                          reencode=role == "main"))
    if role == "main":
        result["cold_start"] = cold_start(bundle, cfg, work, paths[:min(8, len(paths))])
    return result


def pipeline_stages(rt: EdgeRuntime, bundle: Path, cfg: BenchConfig, work: Path, paths: list[Path],
                    lora: np.ndarray, rng) -> dict:
    """{stage: stats} of every step from description to ranked results, input and merged mode."""
    timed, batches, stages = timer(cfg), cfg.batches, {}
    tokenizer = rt.semantic_tokenizer() if rt.semantic["kind"] == "minilm" else rt.clip_tokenizer
    emb = rt.embed_description(DESC)[0]
    agg = rt.aggregate(emb)
    z = rt.bundle.latent
    stages["tokenize"] = timed(lambda: tokenizer([DESC]))
    stages["description_embedding"] = timed(lambda: rt.embed_description(DESC))
    stages["aggregation"] = timed(lambda: rt.aggregate(emb))
    for s in (1, 5):
        stages[f"generation_S{s}"] = timed(
            lambda: rt.decode(agg, np.random.default_rng(0).standard_normal((s, z), np.float32)))
    import onnxruntime as ort
    stages["lora_handover_input"] = timed(lambda: ort.OrtValue.ortvalue_from_numpy(lora))
    merged = EdgeRuntime.load(bundle, backend=cfg.backend, threads=cfg.threads, lora_mode="merged",
                              batch_size=max(batches), cache_dir=work / "cache") \
        if MERGED_GRAPH in rt.bundle.manifest.graphs and rt.config.backend not in ("trt", "openvino") else None
    if merged is not None:  # a new LoRA activated: folded into the weights, the session rebuilt
        stages["lora_handover_merged"] = timed(lambda: merged.mode.activate(_fresh_lora(lora, rng)), heavy=True)
    some = paths[:min(32, len(paths))]
    stages["image_preprocess"] = timed(lambda: rt.preprocess(some), per=len(some), heavy=True)
    pixels = rt.preprocess(paths)
    pixels = np.resize(pixels, (max(max(batches), len(pixels)), *pixels.shape[1:]))
    acts = rt.prefix(pixels[:max(batches)])
    for b in batches:
        stages[f"gallery_prefix_b{b}"] = timed(lambda: rt.prefix(pixels[:b]), per=b)
        stages[f"task_switch_suffix_b{b}"] = timed(lambda: rt.suffix(acts[:b], lora), per=b)
        if merged is not None:
            merged.suffix(acts[:1], lora)  # fold this LoRA in once, outside the timing
            stages[f"task_switch_suffix_merged_b{b}"] = timed(lambda: merged.suffix(acts[:b], lora), per=b)
    pixels = acts = merged = None  # freed before the retrieval stages
    stages["text_query"] = timed(lambda: rt.text_features([QUERY]))
    gallery = rt.encode_gallery(paths)
    feats = rt.image_features(gallery, lora)
    text = rt.text_features([QUERY])
    stages["retrieval"] = timed(lambda: rank(text, feats, [QUERY], gallery.paths, 5))

    def end_to_end():
        gen = rt.generate(DESC)
        rt.search(gallery, [QUERY], _fresh_lora(gen.loras, rng), top_k=5)
    stages["end_to_end_warm"] = timed(end_to_end, heavy=True)
    return stages


def per_image_ms(stages: dict, b: int) -> float:
    """One image through the whole visual tower (prefix + input-mode suffix) at batch b."""
    return (stages[f"gallery_prefix_b{b}"]["p50"] + stages[f"task_switch_suffix_b{b}"]["p50"]) / b


def throughput(stages: dict, manifest: Manifest, b: int, peak_gflops: float | None) -> dict:
    """Images a second through the whole visual tower at batch b, and the GFLOP/s that makes."""
    ms = per_image_ms(stages, b)
    macs = macs_per_image(manifest)
    gflops = 2 * macs["total"] / 1e9 / (ms / 1000)
    return {"batch": b, "macs_per_image": macs, "images_per_s": round(1000 / ms, 2),
            "gflops": round(gflops, 2), "fraction_of_peak": round(gflops / peak_gflops, 3) if peak_gflops else None}


def switch_stages(rt: EdgeRuntime, cfg: BenchConfig, work: Path, size: int, n: int, lora: np.ndarray, rng,
                  reencode: bool) -> dict:
    """A new LoRA over n images: from the cached activations, and (reencode) re-running the whole tower."""
    timed, stages = timer(cfg), {}
    paths = make_gallery(work / f"gallery{size}", max(n, cfg.gallery_size), size)[:n]
    switch = rt.encode_gallery(paths)
    stages["switch_cached"] = timed(lambda: rt.image_features(switch, _fresh_lora(lora, rng)), heavy=True)
    if reencode:
        # decoded pixels kept in memory when they fit in 1 GiB (else decoded again: the decode is then in the time)
        decoded = rt.preprocess(paths) if n * 3 * size * size * 4 < 1 << 30 else None

        def run():
            new = _fresh_lora(lora, rng)
            for i in range(0, n, rt.batch_size):
                rt.suffix(rt.prefix(rt.preprocess(paths[i:i + rt.batch_size]) if decoded is None else
                                    decoded[i:i + rt.batch_size]), new)
        stages["switch_reencode"] = timed(run, heavy=True)
    return stages


COLD_CHILD = """
import json, sys, time
start = time.time()
from runtime.bundle import Bundle
from runtime.pipeline import EdgeRuntime
import onnxruntime
t = {"start": start, "imports": time.time()}
bundle, backend, threads, cache, desc, query, precision = sys.argv[1:8]
b = Bundle.load(bundle)
t["bundle_verified"] = time.time()
rt = EdgeRuntime(b, backend=backend, threads=int(threads), cache_dir=cache, precision=precision)
rt.warm()
t["sessions_ready"] = time.time()
gen = rt.generate(desc)
rt.search(rt.encode_gallery(sys.argv[8:]), [query], gen, top_k=5)
t["first_result"] = time.time()
from runtime.bench.measure import peak_rss_mb
print(json.dumps({"t": t, "peak_rss_mb": peak_rss_mb()}))
"""


def cold_start(bundle: Path, cfg: BenchConfig, work: Path, images: list[Path], precision: str = "fp32") -> dict:
    """Fresh processes: spawn -> imports -> bundle verified (sha256 of every file) -> sessions (OpenVINO: compiled
    for this CPU) -> first result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    runs = []
    for i in range(max(1, min(3, cfg.repeats))):
        cache = work / f"cold-cache-{i}"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", COLD_CHILD, str(bundle), cfg.backend, str(cfg.threads),
                            str(cache), DESC, QUERY, precision, *map(str, images)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"cold-start process failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        t = out["t"]
        runs.append({"process_start": t["start"] - t0, "imports": t["imports"] - t["start"],
                     "bundle_verified": t["bundle_verified"] - t["imports"],
                     "sessions_ready": t["sessions_ready"] - t["bundle_verified"],
                     "first_result": t["first_result"] - t["sessions_ready"], "total": t["first_result"] - t0,
                     "peak_rss_mb": out["peak_rss_mb"]})
    med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    return {**{k: round(v * 1000, 1) for k, v in med.items() if k != "peak_rss_mb"},
            "peak_rss_mb": round(med["peak_rss_mb"], 1), "repeats": len(runs), "images": len(images)}


# -- scaling -------------------------------------------------------------------------------------------------------
def scaling(bundle: Path, cfg: BenchConfig, work: Path, log=print) -> dict:
    """Generation against library size (synthetic experts on the bundle's LoRA size, the real generate path),
    retrieval against gallery size (random unit fp16 features, the real ranking)."""
    rt = EdgeRuntime.load(bundle, backend=cfg.backend, threads=cfg.threads, cache_dir=work / "cache")
    b, rng = rt.bundle, np.random.default_rng(0)
    p, d = b.lora_size, b.embeddings.shape[1]
    available = next((int(line.split()[1]) * 1024 for line in (_read("/proc/meminfo") or "").splitlines()
                      if line.startswith("MemAvailable")), 8 << 30)
    lib = {"bundle": label_of(b.manifest), "lora_size": p, "sizes": [], "generate_ms": [], "state_mb": [],
           "peak_mb": [], "skipped": []}
    for e in cfg.library_size_list:
        state = e * (2 * p + d) * 4
        if state > available / 4:
            lib["skipped"].append(f"{e} experts: {state / 2 ** 30:.1f} GiB of state > a quarter of free memory")
            continue
        log(f"scaling: library of {e} experts")
        mu = (b.mu[rng.integers(0, len(b.mu), e)] + 0.01 * rng.standard_normal((e, p), np.float32)).astype(np.float32)
        var = np.abs(b.var[rng.integers(0, len(b.var), e)]).astype(np.float32)
        emb = rng.standard_normal((e, d)).astype(np.float32)
        sized = EdgeRuntime.load(dataclasses.replace(b, names=[f"expert{i}" for i in range(e)],  # its own runtime
                                                     descriptions=[""] * e, embeddings=emb, mu=mu, var=var),
                                 backend=cfg.backend, threads=cfg.threads, cache_dir=work / "cache")
        st = measure(lambda: sized.generate(DESC), max(3, cfg.repeats // 2), 1, budget=cfg.stage_budget)
        tracemalloc.start()
        sized.generate(DESC)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        lib["sizes"].append(e)
        lib["generate_ms"].append(st["p50"])
        lib["state_mb"].append(round(state / 2 ** 20, 2))
        lib["peak_mb"].append(round((state + peak) / 2 ** 20, 2))
        del mu, var, emb
    lib["slope_time"] = loglog_slope(lib["sizes"], lib["generate_ms"])
    lib["slope_memory"] = loglog_slope(lib["sizes"], lib["peak_mb"])
    lib["growth"] = growth(lib["slope_time"])
    text = rt.text_features([QUERY])
    ret = {"sizes": [], "ms": [], "state_mb": []}
    for n in cfg.retrieval_size_list:
        feats = rng.standard_normal((n, text.shape[1])).astype(np.float32)
        feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float16)
        paths = [Path(f"{i}.png") for i in range(n)]
        st = measure(lambda: rank(text, feats, [QUERY], paths, 5), cfg.repeats, cfg.warmup,
                     budget=cfg.stage_budget)
        ret["sizes"].append(n)
        ret["ms"].append(st["p50"])
        ret["state_mb"].append(round(feats.nbytes / 2 ** 20, 2))
    ret["slope_time"] = loglog_slope(ret["sizes"], ret["ms"])
    ret["growth"] = growth(ret["slope_time"])
    return {"library": lib, "retrieval": ret}


# -- precision -----------------------------------------------------------------------------------------------------
def int8_comparison(r: dict, hooks: dict, cfg: BenchConfig, work: Path, log=print) -> dict:
    """The bundle of result `r` against its INT8 copy (hooks from export.precision): the visual tower (prefix +
    suffix, input mode) per call at each batch size, and mean R@1 on a dataset's test galleries when available."""
    src = Path(r["path"])
    dst = hooks["quantize"](src, work / "int8" / r["label"].replace(" ", "_").replace("=", ""))
    log(f"{r['label']}: INT8 copy")
    rt = EdgeRuntime.load(dst, backend=cfg.backend, threads=cfg.threads, batch_size=max(cfg.batches),
                          cache_dir=work / "cache")
    size = rt.bundle.manifest.image["image_size"][0]
    pixels = rt.preprocess(make_gallery(work / f"gallery{size}", max(cfg.batches), size))
    pixels = np.resize(pixels, (max(cfg.batches), *pixels.shape[1:]))
    lora = rt.generate(DESC).loras[0]
    out = {"bundle": str(dst), "quantized": rt.bundle.manifest.quantized}
    for b in cfg.batches:
        st = measure(lambda: rt.suffix(rt.prefix(pixels[:b]), lora), cfg.repeats, cfg.warmup, b,
                     cfg.stage_budget)
        fp32 = r["stages"][f"gallery_prefix_b{b}"]["p50"] + r["stages"][f"task_switch_suffix_b{b}"]["p50"]
        out[f"b{b}"] = {"fp32_ms": round(fp32, 3), "int8_ms": round(st["p50"], 3),
                        "speedup": round(fp32 / st["p50"], 2)}
    before, after = hooks["recall"](src, cfg.threads), hooks["recall"](dst, cfg.threads)
    out["recall"] = None if before is None else {
        "fp32_mean_r1": before["mean_r1"], "int8_mean_r1": after["mean_r1"],
        "change": round(after["mean_r1"] - before["mean_r1"], 2), "tasks": before["tasks"],
        "galleries": f"{before['world']}: test split of the {before['role']} {before['domain']} tasks"}
    return out


PRECISION_ROWS = (  # (engine, backend, precision, which graphs): ONNX Runtime fp32 first, the reference
    ("onnxruntime", "ort-cpu", "fp32", "fp32"),
    ("onnxruntime", "ort-cpu", "int8", "dynamic"),
    ("onnxruntime", "ort-cpu", "int8", "nncf"),
    ("openvino", "openvino", "fp32", "fp32"),
    ("openvino", "openvino", "bf16", "fp32"),
    ("openvino", "openvino", "int8", "nncf"),
)
GRAPHS = {"fp32": "fp32 graphs", "dynamic": "INT8, ONNX Runtime dynamic quantization (bench --int8's copy)",
          "nncf": "INT8, NNCF static QDQ (`sglora-edge quantize`)"}


def precision_comparison(r: dict, hooks: dict, cfg: BenchConfig, work: Path, log=print) -> dict:
    """Every engine and precision on one bundle, in this process: the visual tower (prefix + suffix, LoRA as input)
    per call at each batch size, cold start and peak RSS in fresh processes, the image features' cosine to ONNX
    Runtime fp32, and mean R@1 on a dataset's test galleries when the hooks measure recall (trained weights,
    --recall-world). PyTorch eager (the bench's own torch stages) closes the table. INT8 graphs: NNCF, calibrated
    on --recall-world's train images when given, else the bench's own gallery images."""
    src, batches = Path(r["path"]), cfg.batches
    name = r["label"].replace(" ", "_").replace("=", "")
    size = read_manifest(src).image["image_size"][0]
    gallery = make_gallery(work / f"gallery{size}", max(cfg.gallery_size, 8), size)
    log(f"{r['label']}: INT8 graphs (NNCF) and the dynamic INT8 copy")
    nncf_bundle, calibration = hooks["add_int8"](src, work / "int8-nncf" / name, gallery,
                                                 cfg.calibration_images)
    bundles = {"fp32": src, "nncf": nncf_bundle, "dynamic": hooks["quantize"](src, work / "int8" / name)}
    pixels, rows, ref = None, [], None
    for engine, backend, precision, graphs in PRECISION_ROWS:
        row = {"engine": engine, "backend": backend, "precision": precision, "graphs": GRAPHS[graphs], "ms": {},
               "speedup": {}, "cold_start_ms": None, "sessions_ready_ms": None, "peak_rss_mb": None,
               "min_cosine": None, "mean_r1": None, "r1_change": None, "refused": None}
        rows.append(row)
        bundle = bundles[graphs]
        if backend == "openvino" and not openvino_installed():
            row["refused"] = "openvino is not installed"
            continue
        try:
            check_precision(backend, "fp32" if graphs == "dynamic" else precision, Bundle.load(bundle, verify=False))
        except InputError as e:
            row["refused"] = str(e)
            continue
        log(f"{r['label']}: {engine} {precision} ({graphs})")
        rt = EdgeRuntime.load(bundle, backend=backend, threads=cfg.threads, batch_size=max(batches),
                              cache_dir=work / "cache", precision=None if graphs == "dynamic" else precision)
        if pixels is None:
            pixels = rt.preprocess(gallery)
            pixels = np.resize(pixels, (max(batches), *pixels.shape[1:]))
            lora = rt.generate(DESC).loras[0]
        for b in batches:
            st = measure(lambda: rt.suffix(rt.prefix(pixels[:b]), lora), cfg.repeats, cfg.warmup, b,
                         cfg.stage_budget)
            row["ms"][f"b{b}"] = round(st["p50"], 3)
        feats = rt.suffix(rt.prefix(pixels[:8]), lora)
        ref = feats if ref is None else ref
        row["min_cosine"] = round(float((feats * ref).sum(1).min()), 5)
        rt = None  # its sessions freed before the cold-start process starts
        cs = cold_start(bundle, dataclasses.replace(cfg, backend=backend), work, gallery[:8],
                        "fp32" if graphs == "dynamic" else precision)
        row.update(cold_start_ms=cs["total"], sessions_ready_ms=cs["sessions_ready"], peak_rss_mb=cs["peak_rss_mb"])
        rec = hooks["recall"](bundle, cfg.threads, backend=backend,
                              precision=None if graphs == "dynamic" else precision)
        row["mean_r1"] = rec and rec["mean_r1"]
    base = rows[0]
    for row in rows:
        row["speedup"] = {b: round(base["ms"][b] / ms, 2) for b, ms in row["ms"].items() if base["ms"].get(b)}
        if row["mean_r1"] is not None and base["mean_r1"] is not None:
            row["r1_change"] = round(row["mean_r1"] - base["mean_r1"], 2)
    if r["torch"]:
        ms = {f"b{b}": round(r["torch"][f"gallery_prefix_b{b}"]["p50"] + r["torch"][f"task_switch_suffix_b{b}"]["p50"],
                             3) for b in batches}
        rows.append({"engine": "pytorch eager", "backend": "torch", "precision": "fp32", "graphs": "torch modules",
                     "ms": ms, "speedup": {b: round(base["ms"][b] / v, 2) for b, v in ms.items() if base["ms"]},
                     "cold_start_ms": None, "sessions_ready_ms": None, "peak_rss_mb": None, "min_cosine": None,
                     "mean_r1": None, "r1_change": None, "refused": None})
    return {"batches": batches, "calibration": calibration, "rows": rows,
            "recall_galleries": hooks["recall_galleries"]}


# -- tuning --------------------------------------------------------------------------------------------------------
def tuning(bundle: Path, cfg: BenchConfig, work: Path, log=print) -> dict:
    """The session settings a deployer can pick: the suffix (input mode) per image at batch min(8, largest) under
    each thread count (optimisation "all") and each graph optimisation level (the bench's threads), with the
    session-creation time of each; `best` names the fastest and what it buys over ONNX Runtime's defaults."""
    batch = min(8, max(cfg.batches))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings = [(t, "all") for t in sorted({0, 1, usable})] + [(cfg.threads, o) for o in ("basic", "extended")]
    rows, acts = [], None
    for threads, level in settings:
        log(f"tuning: threads {threads or 'default'}, graph optimisation {level}")
        t = time.perf_counter()
        rt = EdgeRuntime.load(bundle, backend=cfg.backend, threads=threads, optimization=level,
                              batch_size=batch, cache_dir=work / "cache")
        load_ms = (time.perf_counter() - t) * 1000
        if acts is None:
            size = rt.bundle.manifest.image["image_size"][0]
            pixels = rt.preprocess(make_gallery(work / f"gallery{size}", batch, size))
            acts, lora = rt.prefix(pixels), rt.generate(DESC).loras[0]
        st = measure(lambda: rt.suffix(acts, lora), cfg.repeats, cfg.warmup, batch, cfg.stage_budget)
        rows.append({"threads": threads, "graph_optimization": level, "suffix_ms_per_image": st["p50"] / batch,
                     "load_ms": round(load_ms, 1), "n": st["n"]})
    default = next(r for r in rows if r["threads"] == 0 and r["graph_optimization"] == "all")
    best = min(rows, key=lambda r: r["suffix_ms_per_image"])
    return {"bundle": label_of(read_manifest(bundle)), "batch": batch, "usable_cpus": usable,
            "rows": rows, "best": {**best, "speedup_over_default": round(default["suffix_ms_per_image"]
                                                                         / best["suffix_ms_per_image"], 2)}}


# -- comparisons ---------------------------------------------------------------------------------------------------
def comparisons(bundles: list[dict], batches: list[int], training: dict) -> dict:
    out = {"torch_vs_ort": {}, "lora_modes": {}, "generation_vs_training": {}, "task_switch": {}}
    for r in bundles:
        s = r["stages"]
        if r["torch"]:
            out["torch_vs_ort"][r["label"]] = {
                k: {"torch_ms": round(v["p50"], 3), "ort_ms": round(s[k]["p50"], 3),
                    "speedup": round(v["p50"] / s[k]["p50"], 2)} for k, v in r["torch"].items() if k in s}
        if "lora_handover_merged" in s:
            modes = {f"b{b}": {"input_ms": round(s[f"task_switch_suffix_b{b}"]["p50"], 3),
                               "merged_ms": round(s[f"task_switch_suffix_merged_b{b}"]["p50"], 3),
                               "merged_over_input": round(s[f"task_switch_suffix_merged_b{b}"]["p50"]
                                                          / s[f"task_switch_suffix_b{b}"]["p50"], 2)}
                     for b in batches}
            out["lora_modes"][r["label"]] = {**modes, "handover_input_ms": round(s["lora_handover_input"]["p50"], 4),
                                             "handover_merged_ms": round(s["lora_handover_merged"]["p50"], 2)}
        if r["label"] in training and r["role"] == "main":
            t = training[r["label"]]
            gen = s["description_embedding"]["p50"] + s["aggregation"]["p50"] + s["generation_S1"]["p50"]
            out["generation_vs_training"][r["label"]] = {**t, "generate_ms": round(gen, 3),
                                                         "ratio": round(t["train_s"] * 1000 / gen, 1)}
    for r in bundles:
        name = r["label"].replace(f"L={r['lora']['last_blocks'] or 'all'} ", "")  # model and weights
        ts = out["task_switch"].setdefault(name, {"images": None, "reencode_all_ms": None, "cached_ms": {},
                                                  "speedup": {}})
        ts["images"] = ts["images"] or r["switch_images"]
        ts["cached_ms"][str(r["lora"]["last_blocks"] or "all")] = round(r["stages"]["switch_cached"]["p50"], 2)
        if "switch_reencode" in r["stages"]:
            ts["reencode_all_ms"] = round(r["stages"]["switch_reencode"]["p50"], 2)
    for name, ts in out["task_switch"].items():
        if ts["reencode_all_ms"]:
            ts["speedup"] = {k: round(ts["reencode_all_ms"] / v, 2) for k, v in ts["cached_ms"].items()}
    return out
