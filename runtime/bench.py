"""`sglora-edge bench`: the latency harness a deployer runs on their own device (numpy + ONNX Runtime, no torch).

    sglora-edge bench --bundle bundle/ --out bench/                    # any exported bundle, torch-free
    sglora-edge bench --synthetic sglora-tiny --synthetic ViT-B-16 --out bench/   # random weights (needs torch)

Every timing is ms per call after `warmup` untimed calls: p50 / p90 / p99 / mean / std over `repeats`
calls (fewer, at least 2, where a stage would overrun --stage-budget seconds; `n` records how many).
ONNX Runtime's `run()` returns host arrays, so a GPU's work is finished inside the timed region.
Nothing here asserts on time; compare numbers only from one machine under one load.

results.json (schema "sglora-edge-bench/1", `check_schema` holds it):

    schema, created (UTC ISO), command (argv), settings {backend, threads, batches, gallery_size,
        switch_gallery, repeats, warmup, library_sizes, retrieval_sizes}
    machine     cpu_model, cpu_flags (the instruction sets results depend on: avx2, avx512*, *vnni, *bf16, amx_*),
                kernel, logical_cpus, usable_cpus, memory_gb, load_average, gpu (nvidia-smi rows or null),
                jetson_power_mode (or null), versions {python, numpy, onnxruntime, tensorrt, torch, openvino, nncf},
                openvino_capabilities (what OpenVINO's CPU plugin computes natively, or null),
                ort_available_providers, env {OMP_NUM_THREADS, ...}, matmul_probe {gflops, n, threads}
    bundles     one per bundle: label, path, role ("main": every stage; "switch": task switch only), switch_images
                (--switch-gallery, or fewer where re-encoding them 3 times would overrun --stage-budget),
                backbone, lora {size, blocks, last_blocks}, backend (what `run` records, with the providers used),
                stages {name: stats}, cold_start (main only), throughput (main only), torch ({name: stats} or null)
        stats       {p50, p90, p99, mean, std (ms per call), n (timed calls), per (items per call)}
        stage names tokenize, description_embedding (tokenize + graph), aggregation, generation_S1 and _S5
                    (noise draw + prior + decode), lora_handover_input (binding the vector), lora_handover_merged
                    (fold γ·B·A into W and build the session), image_preprocess (decode + resize + crop +
                    normalise, per = images), gallery_prefix_b<B>, task_switch_suffix_b<B> (input mode),
                    task_switch_suffix_merged_b<B>, text_query, retrieval (rank one query over the gallery's
                    cached features), end_to_end_warm (description -> ranked results on a cached gallery),
                    switch_cached (switch_gallery images: a new LoRA -> features from cached activations),
                    switch_reencode (the same, re-running the whole visual tower on decoded pixels)
        cold_start  {process_start, imports, bundle_verified, sessions_ready, first_result, total (ms from the
                    parent's spawn), peak_rss_mb, repeats}: each phase in a fresh process, first result =
                    generate + search over a cold cache of min(gallery_size, 8) images
        throughput  {macs_per_image {prefix, suffix, total}, images_per_s, gflops, fraction_of_peak}
                    at the largest batch, from the prefix + suffix p50s and the matmul probe
    comparisons torch_vs_ort {label: {stage: {torch_ms, ort_ms, speedup}}}, lora_modes {label: {b<B>: {input_ms,
                merged_ms, merged_over_input}, handover_input_ms, handover_merged_ms}}, generation_vs_training
                {label: {generate_ms, train_s, epochs, images, ratio}}, task_switch {backbone: {images,
                reencode_all_ms, cached_ms {L: ms}, speedup {L: x}}}, int8 (with --int8) {label: {bundle, quantized,
                b<B>: {fp32_ms, int8_ms, speedup} (prefix + suffix), recall {fp32_mean_r1, int8_mean_r1, change,
                tasks, galleries} or null (no --recall-world, or random weights)}}, precisions (with --openvino)
                {label: {batches, calibration, rows [{engine, backend, precision, graphs, ms {b<B>: prefix + suffix
                p50}, speedup {b<B>: over ONNX Runtime fp32}, cold_start_ms, sessions_ready_ms, peak_rss_mb,
                min_cosine (image features against ONNX Runtime fp32), mean_r1, r1_change, refused (why a row
                could not run, else null)}]}}
    tuning      per main bundle (unless --no-tuning): {bundle, batch, usable_cpus, rows [{threads,
                graph_optimization, suffix_ms_per_image, load_ms, n}], best {..., speedup_over_default}}
    scaling     library {sizes, generate_ms, state_mb, peak_mb, slope_time, slope_memory, growth, skipped},
                retrieval {sizes, ms, state_mb, slope_time, growth}; slopes are log-log least squares over
                the sizes >= the second one (the smallest is dominated by fixed costs)
    peak_rss_mb this harness's own peak; gpu_memory_mb (what it holds on the GPU at the end, null without one);
    notes (what was skipped and why); charts (PNG files written beside it)
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .artifacts import write_bytes
from .bundle import Bundle
from .config import BenchConfig
from .errors import InputError
from .pipeline import MERGED_GRAPH, EdgeRuntime, rank
from .sessions import check_precision, open_session, openvino_capabilities, openvino_installed

SCHEMA = "sglora-edge-bench/1"
DESC, QUERY = "a photo of a lemon", "a small red lemon"
STATS = ("p50", "p90", "p99", "mean", "std", "n", "per")
CPU_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "asimd", "sve", "i8mm", "bf16", "dotprod")
# ONNX model bytes of one MatMul a[n,k] @ b[k,m] (opset 17), made with onnx.helper (tests/test_bench.py rebuilds
# it): the probe measures the engine and thread setting the graphs run with, without the onnx package.
MATMUL_ONNX = base64.b64decode("CAgSC3NnbG9yYS1lZGdlOl8KEQoBYQoBYhIBYyIGTWF0TXVsEgVwcm9iZVoVCgFhEhAKDggBEgoKAxIBbgoDEgF"
                               "rWhUKAWISEAoOCAESCgoDEgFrCgMSAW1iFQoBYxIQCg4IARIKCgMSAW4KAxIBbUIECgAQEQ==")


# -- timing --------------------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss survives exec, so a child would report its parent's)."""
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)  # macOS: bytes
    return round(kb / 1024, 1)


def gpu_memory_mb() -> float | None:
    """GPU memory this process holds (nvidia-smi; ONNX Runtime's CUDA arena keeps its peak); None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(",") for line in out.splitlines() if line.count(",") == 1]
    return sum(float(m) for p, m in rows if p.strip() == str(os.getpid()))


def summarize(ms, per: int = 1) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "std": float(a.std()), "n": len(a),
            "per": per}


def measure(fn, repeats: int, warmup: int, per: int = 1, budget: float | None = None) -> dict:
    """Stats of fn() in ms per call after `warmup` untimed calls. With a budget (seconds) a slow stage stops early:
    warm-up after a quarter of it (at least one call), timing after all of it (at least two calls); `n` says how
    many calls were timed."""
    start = time.perf_counter()
    for i in range(warmup):
        fn()
        if budget and time.perf_counter() - start > budget / 4:
            break
    start, times = time.perf_counter(), []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
        if budget and len(times) >= 2 and time.perf_counter() - start > budget:
            break
    return summarize(times, per)


def loglog_slope(sizes, values) -> float | None:
    """Least-squares slope of log(value) on log(size) over the sizes from the second on (None under 2 points)."""
    x, y = np.asarray(sizes[1:], float), np.asarray(values[1:], float)
    if len(x) < 2 or (y <= 0).any():
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def growth(slope: float | None) -> str:
    if slope is None:
        return "not fitted (fewer than 3 sizes)"
    return "flat" if slope < 0.2 else "sub-linear" if slope < 0.8 else "linear" if slope < 1.2 else "super-linear"


# -- the machine ---------------------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    for dist in {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "tensorrt": ("tensorrt", "tensorrt-cu12")}.get(
            module, (module,)):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def matmul_probe(threads: int, n: int = 1024, repeats: int = 5) -> dict:
    """Peak GFLOP/s of one float32 n×n MatMul on ONNX Runtime's CPU provider with the bench's thread setting."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    s = ort.InferenceSession(MATMUL_ONNX, options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    st = measure(lambda: s.run(None, {"a": a, "b": a}), repeats, 2)
    best = min(st["p50"], st["mean"])
    return {"gflops": round(2 * n ** 3 / (best / 1000) / 1e9, 1), "n": n, "threads": threads or "ORT default",
            "engine": "onnxruntime CPUExecutionProvider"}


def machine_record(threads: int) -> dict:
    cpuinfo = _read("/proc/cpuinfo") or ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith(("model name", "Model", "Hardware"))), platform.processor() or platform.machine())
    mem = next((int(line.split()[1]) / 1024 ** 2 for line in (_read("/proc/meminfo") or "").splitlines()
                if line.startswith("MemTotal")), None)
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            cuda = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
            cuda = next((w.split("CUDA Version:")[1].split()[0] for w in cuda.splitlines() if "CUDA Version" in w),
                        None)
            gpu = {"gpus": [r.strip() for r in out.splitlines() if r.strip()], "cuda": cuda}
        except (OSError, subprocess.SubprocessError):
            gpu = None
    power = None
    if shutil.which("nvpmodel"):
        try:
            power = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            power = None
    if power is None and _read("/etc/nvpmodel.conf") is not None:
        power = "see /etc/nvpmodel.conf (nvpmodel -q not readable)"
    import onnxruntime as ort
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    capabilities = None
    if openvino_installed():
        capabilities = openvino_capabilities()
    return {"cpu_model": model, "cpu_flags": sorted(f for f in flags if f.startswith(CPU_FLAG_PREFIXES)),
            "kernel": platform.release(), "machine": platform.machine(), "os": platform.platform(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": threads or "ORT default (one per physical core)",
            "memory_gb": round(mem, 1) if mem else None,
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "gpu": gpu, "jetson_power_mode": power,
            "versions": {"python": platform.python_version(), "numpy": np.__version__,
                         "onnxruntime": _version("onnxruntime"), "tensorrt": _version("tensorrt"),
                         "torch": _version("torch"), "openvino": _version("openvino"), "nncf": _version("nncf")},
            "openvino_capabilities": capabilities,
            "ort_available_providers": ort.get_available_providers(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                    if k in os.environ},
            "matmul_probe": matmul_probe(threads)}


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


def macs_per_image(manifest: dict) -> dict:
    """Multiply-adds of one image through the ViT (patch embedding, attention, MLP ratio 4), prefix and suffix
    apart. ViT-B/16 at 224 px: 17.6 G in all."""
    spec, tokens = manifest["lora_spec"], manifest["graphs"]["visual_suffix"]["inputs"]["activations"][1]
    d, n, first = spec["width"], spec["n_blocks"], manifest["first_adapted_block"]
    h, w = manifest["image"]["image_size"]
    block = tokens * 12 * d * d + 2 * tokens * tokens * d
    patch = h * w * 3 * d  # (tokens - 1) patches of 3·p² inputs each
    return {"prefix": patch + first * block, "suffix": (n - first) * block, "total": patch + n * block}


# -- one bundle ----------------------------------------------------------------------------------------------------
def label_of(manifest: dict) -> str:
    """e.g. "ViT-B-16 L=all random": model, adapted blocks, random or trained weights."""
    spec, backbone = manifest["lora_spec"], manifest["backbone"]
    weights = "random" if "@random" in backbone["ident"] else "trained"
    return f"{backbone['model_name']} L={spec['last_blocks'] or 'all'} {weights}"


def _fresh_lora(lora: np.ndarray, rng) -> np.ndarray:
    """A new LoRA each call (the features cache would answer a repeated one): the vector, rescaled at random."""
    return lora * np.float32(1 + 0.01 * rng.random())


def bench_bundle(bundle: Path, opts: dict, work: Path, role: str = "main", switch_images: int | None = None,
                 log=print) -> dict:
    """Every stage of one bundle; role "switch": only the cached task switch, over `switch_images` images."""
    batches, repeats, warmup, budget = opts["batches"], opts["repeats"], opts["warmup"], opts["stage_budget"]

    def timed(fn, per: int = 1, heavy: bool = False) -> dict:  # heavy: whole-gallery stages repeat less
        return measure(fn, min(repeats, 5) if heavy else repeats, min(warmup, 1) if heavy else warmup, per, budget)

    rt = EdgeRuntime.load(bundle, backend=opts["backend"], threads=opts["threads"], batch_size=max(batches),
                          cache_dir=work / "cache")
    m = rt.bundle.manifest
    label, size, rng = label_of(m), m["image"]["image_size"][0], np.random.default_rng(0)
    lora = rt.generate(DESC).loras[0]
    stages = {}
    result = {"label": label, "path": str(bundle), "role": role, "backbone": m["backbone"],
              "lora": {"size": m["lora_size"], "blocks": m["lora_spec"]["n_blocks"] - m["first_adapted_block"],
                       "last_blocks": m["lora_spec"]["last_blocks"]},
              "backend": rt.describe(), "stages": stages, "switch_images": switch_images, "cold_start": None,
              "throughput": None, "torch": None}
    paths = make_gallery(work / f"gallery{size}", opts["gallery_size"], size)
    if role == "main":
        log(f"{label}: stages")
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
        merged = EdgeRuntime.load(bundle, backend=opts["backend"], threads=opts["threads"], lora_mode="merged",
                                  batch_size=max(batches), cache_dir=work / "cache") \
            if MERGED_GRAPH in m["graphs"] and rt.config.backend not in ("trt", "openvino") else None
        if merged is not None:
            stages["lora_handover_merged"] = timed(
                lambda: open_session(merged.bundle, MERGED_GRAPH, merged.config,
                                     merged.merged_weights(_fresh_lora(lora, rng))), heavy=True)
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
        del pixels, acts, merged
        stages["text_query"] = timed(lambda: rt.text_features([QUERY]))
        gallery = rt.encode_gallery(paths)
        feats = rt.image_features(gallery, lora)
        text = rt.text_features([QUERY])
        stages["retrieval"] = timed(lambda: rank(text, feats, [QUERY], gallery.paths, 5))

        def end_to_end():
            gen = rt.generate(DESC)
            rt.search(gallery, [QUERY], _fresh_lora(gen.loras, rng), top_k=5)
        stages["end_to_end_warm"] = timed(end_to_end, heavy=True)
        b = max(batches)
        per_image_ms = (stages[f"gallery_prefix_b{b}"]["p50"] + stages[f"task_switch_suffix_b{b}"]["p50"]) / b
        macs = macs_per_image(m)
        gflops = 2 * macs["total"] / 1e9 / (per_image_ms / 1000)
        result["throughput"] = {"batch": b, "macs_per_image": macs, "images_per_s": round(1000 / per_image_ms, 2),
                                "gflops": round(gflops, 2), "fraction_of_peak": round(gflops / opts["peak_gflops"], 3)
                                if opts.get("peak_gflops") else None}
        # the whole-gallery switch: --switch-gallery images, fewer where re-encoding them would not fit the budget
        switch_images = min(opts["switch_gallery"], max(b, int(budget * 1000 / (3 * per_image_ms))))
        result["switch_images"] = switch_images
    switch_paths = make_gallery(work / f"gallery{size}", max(switch_images, opts["gallery_size"]), size)
    switch_paths = switch_paths[:switch_images]
    log(f"{label}: task switch over {switch_images} images (building the prefix cache first)")
    switch = rt.encode_gallery(switch_paths)
    stages["switch_cached"] = timed(lambda: rt.image_features(switch, _fresh_lora(lora, rng)), heavy=True)
    if role == "main":
        # decoded pixels kept in memory when they fit in 1 GiB (else decoded again: the decode is then in the time)
        decoded = rt.preprocess(switch_paths) if switch_images * 3 * size * size * 4 < 1 << 30 else None

        def reencode():
            new = _fresh_lora(lora, rng)
            for i in range(0, switch_images, rt.batch_size):
                rt.suffix(rt.prefix(rt.preprocess(switch_paths[i:i + rt.batch_size]) if decoded is None else
                                    decoded[i:i + rt.batch_size]), new)
        stages["switch_reencode"] = timed(reencode, heavy=True)
        del decoded
        result["cold_start"] = cold_start(bundle, opts, work, paths[:min(8, len(paths))])
    return result


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
from runtime.bench import peak_rss_mb
print(json.dumps({"t": t, "peak_rss_mb": peak_rss_mb()}))
"""


def cold_start(bundle: Path, opts: dict, work: Path, images: list[Path], precision: str = "fp32") -> dict:
    """Fresh processes: spawn -> imports -> bundle verified (sha256 of every file) -> sessions (OpenVINO: compiled
    for this CPU) -> first result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    runs = []
    for i in range(max(1, min(3, opts["repeats"]))):
        cache = work / f"cold-cache-{i}"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", COLD_CHILD, str(bundle), opts["backend"], str(opts["threads"]),
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
def scaling(bundle: Path, opts: dict, work: Path, log=print) -> dict:
    """Generation against library size (synthetic experts on the bundle's LoRA size, the real generate path),
    retrieval against gallery size (random unit fp16 features, the real ranking)."""
    rt = EdgeRuntime.load(bundle, backend=opts["backend"], threads=opts["threads"], cache_dir=work / "cache")
    b, rng = rt.bundle, np.random.default_rng(0)
    p, d = b.lora_size, b.embeddings.shape[1]
    available = next((int(line.split()[1]) * 1024 for line in (_read("/proc/meminfo") or "").splitlines()
                      if line.startswith("MemAvailable")), 8 << 30)
    lib = {"bundle": label_of(b.manifest), "lora_size": p, "sizes": [], "generate_ms": [], "state_mb": [],
           "peak_mb": [], "skipped": []}
    for e in opts["library_sizes"]:
        state = e * (2 * p + d) * 4
        if state > available / 4:
            lib["skipped"].append(f"{e} experts: {state / 2 ** 30:.1f} GiB of state > a quarter of free memory")
            continue
        log(f"scaling: library of {e} experts")
        mu = (b.mu[rng.integers(0, len(b.mu), e)] + 0.01 * rng.standard_normal((e, p), np.float32)).astype(np.float32)
        var = np.abs(b.var[rng.integers(0, len(b.var), e)]).astype(np.float32)
        emb = rng.standard_normal((e, d)).astype(np.float32)
        rt.bundle = dataclasses.replace(b, names=[f"expert{i}" for i in range(e)],
                                        descriptions=[""] * e, embeddings=emb, mu=mu, var=var)
        st = measure(lambda: rt.generate(DESC), max(3, opts["repeats"] // 2), 1, budget=opts["stage_budget"])
        tracemalloc.start()
        rt.generate(DESC)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        lib["sizes"].append(e)
        lib["generate_ms"].append(st["p50"])
        lib["state_mb"].append(round(state / 2 ** 20, 2))
        lib["peak_mb"].append(round((state + peak) / 2 ** 20, 2))
        del mu, var, emb
    rt.bundle = b
    lib["slope_time"] = loglog_slope(lib["sizes"], lib["generate_ms"])
    lib["slope_memory"] = loglog_slope(lib["sizes"], lib["peak_mb"])
    lib["growth"] = growth(lib["slope_time"])
    text = rt.text_features([QUERY])
    ret = {"sizes": [], "ms": [], "state_mb": []}
    for n in opts["retrieval_sizes"]:
        feats = rng.standard_normal((n, text.shape[1])).astype(np.float32)
        feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float16)
        paths = [Path(f"{i}.png") for i in range(n)]
        st = measure(lambda: rank(text, feats, [QUERY], paths, 5), opts["repeats"], opts["warmup"],
                     budget=opts["stage_budget"])
        ret["sizes"].append(n)
        ret["ms"].append(st["p50"])
        ret["state_mb"].append(round(feats.nbytes / 2 ** 20, 2))
    ret["slope_time"] = loglog_slope(ret["sizes"], ret["ms"])
    ret["growth"] = growth(ret["slope_time"])
    return {"library": lib, "retrieval": ret}


# -- precision -----------------------------------------------------------------------------------------------------
def int8_comparison(r: dict, hooks: dict, opts: dict, work: Path, log=print) -> dict:
    """The bundle of result `r` against its INT8 copy (hooks from export.precision): the visual tower (prefix +
    suffix, input mode) per call at each batch size, and mean R@1 on a dataset's test galleries when available."""
    src = Path(r["path"])
    dst = hooks["quantize"](src, work / "int8" / r["label"].replace(" ", "_").replace("=", ""))
    log(f"{r['label']}: INT8 copy")
    rt = EdgeRuntime.load(dst, backend=opts["backend"], threads=opts["threads"], batch_size=max(opts["batches"]),
                          cache_dir=work / "cache")
    size = rt.bundle.manifest["image"]["image_size"][0]
    pixels = rt.preprocess(make_gallery(work / f"gallery{size}", max(opts["batches"]), size))
    pixels = np.resize(pixels, (max(opts["batches"]), *pixels.shape[1:]))
    lora = rt.generate(DESC).loras[0]
    out = {"bundle": str(dst), "quantized": rt.bundle.manifest["quantized"]}
    for b in opts["batches"]:
        st = measure(lambda: rt.suffix(rt.prefix(pixels[:b]), lora), opts["repeats"], opts["warmup"], b,
                     opts["stage_budget"])
        fp32 = r["stages"][f"gallery_prefix_b{b}"]["p50"] + r["stages"][f"task_switch_suffix_b{b}"]["p50"]
        out[f"b{b}"] = {"fp32_ms": round(fp32, 3), "int8_ms": round(st["p50"], 3),
                        "speedup": round(fp32 / st["p50"], 2)}
    before, after = hooks["recall"](src, opts["threads"]), hooks["recall"](dst, opts["threads"])
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


def precision_comparison(r: dict, hooks: dict, opts: dict, work: Path, log=print) -> dict:
    """Every engine and precision on one bundle, in this process: the visual tower (prefix + suffix, LoRA as input)
    per call at each batch size, cold start and peak RSS in fresh processes, the image features' cosine to ONNX
    Runtime fp32, and mean R@1 on a dataset's test galleries when the hooks measure recall (trained weights,
    --recall-world). PyTorch eager (the bench's own torch stages) closes the table. INT8 graphs: NNCF, calibrated
    on --recall-world's train images when given, else the bench's own gallery images."""
    src, batches = Path(r["path"]), opts["batches"]
    name = r["label"].replace(" ", "_").replace("=", "")
    size = Bundle.load(src, verify=False).manifest["image"]["image_size"][0]
    gallery = make_gallery(work / f"gallery{size}", max(opts["gallery_size"], 8), size)
    log(f"{r['label']}: INT8 graphs (NNCF) and the dynamic INT8 copy")
    nncf_bundle, calibration = hooks["add_int8"](src, work / "int8-nncf" / name, gallery,
                                                 opts["calibration_images"])
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
        rt = EdgeRuntime.load(bundle, backend=backend, threads=opts["threads"], batch_size=max(batches),
                              cache_dir=work / "cache", precision=None if graphs == "dynamic" else precision)
        if pixels is None:
            pixels = rt.preprocess(gallery)
            pixels = np.resize(pixels, (max(batches), *pixels.shape[1:]))
            lora = rt.generate(DESC).loras[0]
        for b in batches:
            st = measure(lambda: rt.suffix(rt.prefix(pixels[:b]), lora), opts["repeats"], opts["warmup"], b,
                         opts["stage_budget"])
            row["ms"][f"b{b}"] = round(st["p50"], 3)
        feats = rt.suffix(rt.prefix(pixels[:8]), lora)
        ref = feats if ref is None else ref
        row["min_cosine"] = round(float((feats * ref).sum(1).min()), 5)
        rt = None  # its sessions freed before the cold-start process starts
        cs = cold_start(bundle, {**opts, "backend": backend}, work, gallery[:8],
                        "fp32" if graphs == "dynamic" else precision)
        row.update(cold_start_ms=cs["total"], sessions_ready_ms=cs["sessions_ready"], peak_rss_mb=cs["peak_rss_mb"])
        rec = hooks["recall"](bundle, opts["threads"], backend=backend,
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
def tuning(bundle: Path, opts: dict, work: Path, log=print) -> dict:
    """The session settings a deployer can pick: the suffix (input mode) per image at batch min(8, largest) under
    each thread count (optimisation "all") and each graph optimisation level (the bench's threads), with the
    session-creation time of each; `best` names the fastest and what it buys over ONNX Runtime's defaults."""
    batch = min(8, max(opts["batches"]))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings = [(t, "all") for t in sorted({0, 1, usable})] + [(opts["threads"], o) for o in ("basic", "extended")]
    rows, acts = [], None
    for threads, level in settings:
        log(f"tuning: threads {threads or 'default'}, graph optimisation {level}")
        t = time.perf_counter()
        rt = EdgeRuntime.load(bundle, backend=opts["backend"], threads=threads, optimization=level,
                              batch_size=batch, cache_dir=work / "cache")
        load_ms = (time.perf_counter() - t) * 1000
        if acts is None:
            size = rt.bundle.manifest["image"]["image_size"][0]
            pixels = rt.preprocess(make_gallery(work / f"gallery{size}", batch, size))
            acts, lora = rt.prefix(pixels), rt.generate(DESC).loras[0]
        st = measure(lambda: rt.suffix(acts, lora), opts["repeats"], opts["warmup"], batch, opts["stage_budget"])
        rows.append({"threads": threads, "graph_optimization": level, "suffix_ms_per_image": st["p50"] / batch,
                     "load_ms": round(load_ms, 1), "n": st["n"]})
    default = next(r for r in rows if r["threads"] == 0 and r["graph_optimization"] == "all")
    best = min(rows, key=lambda r: r["suffix_ms_per_image"])
    return {"bundle": label_of(Bundle.load(bundle, verify=False).manifest), "batch": batch, "usable_cpus": usable,
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


def check_schema(doc: dict) -> None:
    """Raise InputError naming the first key results.json lacks (the schema in this module's docstring)."""
    def need(obj, keys, where):
        for k in keys:
            if not isinstance(obj, dict) or k not in obj:
                raise InputError(f"results.json: {where} lacks {k!r}")
    need(doc, ("schema", "created", "command", "settings", "machine", "bundles", "comparisons", "tuning", "scaling",
               "peak_rss_mb", "gpu_memory_mb", "notes", "charts"), "the top level")
    if doc["schema"] != SCHEMA:
        raise InputError(f"results.json: schema {doc['schema']!r}, expected {SCHEMA!r}")
    need(doc["machine"], ("cpu_model", "cpu_flags", "kernel", "openvino_capabilities", "logical_cpus", "usable_cpus", "memory_gb", "gpu", "jetson_power_mode",
                          "versions", "ort_available_providers", "matmul_probe"), "machine")
    need(doc["machine"]["versions"], ("python", "numpy", "onnxruntime", "tensorrt", "torch"), "machine.versions")
    for r in doc["bundles"]:
        need(r, ("label", "path", "role", "backbone", "lora", "backend", "stages", "cold_start", "throughput",
                 "torch", "switch_images"), "a bundle")
        need(r["backend"], ("backend", "providers", "threads", "graph_optimization"), "bundle.backend")
        for name, st in list(r["stages"].items()) + list((r["torch"] or {}).items()):
            need(st, STATS, f"stage {name}")
        if r["role"] == "main":
            need(r["cold_start"], ("process_start", "imports", "bundle_verified", "sessions_ready", "first_result",
                                   "total", "peak_rss_mb"), "cold_start")
            need(r["throughput"], ("macs_per_image", "images_per_s", "gflops", "fraction_of_peak"), "throughput")
    need(doc["comparisons"], ("torch_vs_ort", "lora_modes", "generation_vs_training", "task_switch", "int8",
                              "precisions"), "comparisons")
    for label, pc in doc["comparisons"]["precisions"].items():
        need(pc, ("batches", "calibration", "rows"), f"precisions {label}")
        for row in pc["rows"]:
            need(row, ("engine", "backend", "precision", "graphs", "ms", "speedup", "cold_start_ms", "peak_rss_mb",
                       "min_cosine", "mean_r1", "r1_change", "refused"), f"precisions {label} row")
    for t in doc["tuning"]:
        need(t, ("bundle", "batch", "rows", "best"), "tuning")
        for r in t["rows"]:
            need(r, ("threads", "graph_optimization", "suffix_ms_per_image", "load_ms", "n"), "tuning row")
    if doc["scaling"] is not None:
        need(doc["scaling"]["library"], ("sizes", "generate_ms", "state_mb", "peak_mb", "slope_time", "growth"),
             "scaling.library")
        need(doc["scaling"]["retrieval"], ("sizes", "ms", "slope_time", "growth"), "scaling.retrieval")


# -- the run -------------------------------------------------------------------------------------------------------
def run_bench(bundles: list[Path], out: Path, opts: dict, switch_bundles: list[Path] = (), torch_timers=None,
              training=None, notes=None, command: str = "", log=print, int8_hooks=None) -> dict:
    """Measure every bundle, compare, scale, record the machine; write results.json, results.md and charts into
    `out`. torch_timers {bundle path: fn(opts) -> {stage: stats}} and training {label: {...}} come from the
    server side (`export.synthetic`) when torch is present."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes or [])
    log("machine record and matmul probe")
    machine = machine_record(opts["threads"])
    opts = {**opts, "peak_gflops": machine["matmul_probe"]["gflops"]}
    with tempfile.TemporaryDirectory(prefix="sglora-bench-") as tmp:
        work = Path(tmp)
        results, switch_images = [], {}
        for role, paths in (("main", bundles), ("switch", switch_bundles)):
            for b in paths:
                log(f"bundle {b} ({role})")
                m = Bundle.load(b, verify=False).manifest
                model = (m["backbone"]["model_name"], "@random" in m["backbone"]["ident"])
                r = bench_bundle(Path(b), opts, work, role, switch_images.get(model, opts["switch_gallery"]), log)
                switch_images.setdefault(model, r["switch_images"])
                timer = (torch_timers or {}).get(str(b))
                if timer is not None and role == "main":
                    log(f"{r['label']}: PyTorch eager")
                    r["torch"] = timer(opts)
                results.append(r)
        int8 = {r["label"]: int8_comparison(r, int8_hooks, opts, work, log) for r in results
                if r["role"] == "main"} if int8_hooks and opts.get("int8", True) else {}
        precisions = {r["label"]: precision_comparison(r, int8_hooks, opts, work, log) for r in results
                      if r["role"] == "main"} if int8_hooks and opts.get("openvino") else {}
        tune = [tuning(Path(b), opts, work, log) for b in bundles] if opts["tuning"] else []
        scale = None
        if opts["library_sizes"] or opts["retrieval_sizes"]:
            scale = scaling(Path(bundles[0]), opts, work, log)
            notes += scale["library"]["skipped"]
    if not torch_timers:
        notes.append("PyTorch eager not measured (torch absent, or bundles given with --bundle: pass --synthetic)")
    comp = comparisons(results, opts["batches"], training or {})
    comp["int8"] = int8
    comp["precisions"] = precisions
    doc = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command, "settings": {k: v for k, v in opts.items() if k != "peak_gflops"},
           "machine": machine, "bundles": results,
           "comparisons": comp, "tuning": tune, "scaling": scale,
           "peak_rss_mb": peak_rss_mb(), "gpu_memory_mb": gpu_memory_mb(), "notes": notes}
    doc["charts"] = charts(doc, out)
    check_schema(doc)
    write_bytes(out / "results.json", (json.dumps(doc, indent=2) + "\n").encode())
    write_bytes(out / "results.md", markdown(doc).encode())
    return doc


def _ms(v) -> str:
    return "—" if v is None else f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"


def _table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def markdown(doc: dict) -> str:
    m, c = doc["machine"], doc["comparisons"]
    b0 = doc["bundles"][0]["backend"] if doc["bundles"] else {}
    lines = [f"# sglora-edge bench: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, {b0.get('backend')}", "",
             f"`{doc['command']}`  ({doc['created']})", "",
             f"Machine: {m['cpu_model']} ({m['machine']}, kernel {m.get('kernel')}; flags "
             f"{' '.join(m.get('cpu_flags') or []) or 'unknown'}"
             + (f"; OpenVINO CPU capabilities {', '.join(m['openvino_capabilities'])}"
                if m.get("openvino_capabilities") else "") + f"), {m['logical_cpus']} logical / {m['usable_cpus']} usable "
             f"CPUs, {m['memory_gb']} GB, load average at start {m['load_average']}; GPU {m['gpu'] or 'none'}; "
             f"Jetson power mode {m['jetson_power_mode'] or 'n/a'}; versions "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
             + f"; ORT providers used {', '.join(b0.get('providers', []))}, threads {b0.get('threads') or 'default'}"
             f", graph optimisation {b0.get('graph_optimization')}; matmul probe {m['matmul_probe']['gflops']} "
             f"GFLOP/s (float32 {m['matmul_probe']['n']}², {m['matmul_probe']['engine']}).", "",
             "All times in ms per call (per-item: divided by the items of one call); p50/p90/p99/mean/std after "
             f"{doc['settings']['warmup']} warm-up calls.", ""]
    for r in doc["bundles"]:
        if r["role"] != "main":
            continue
        lines += [f"## {r['label']} ({r['backbone']['ident']}, LoRA {r['lora']['size']:,} numbers on "
                  f"{r['lora']['blocks']} blocks)", ""]
        rows = [[k, st["per"], *(_ms(st[q]) for q in ("p50", "p90", "p99", "mean", "std")),
                 _ms(st["p50"] / st["per"]), st["n"]] for k, st in r["stages"].items()]
        lines += _table(["stage", "items", "p50", "p90", "p99", "mean", "std", "p50 / item", "n"], rows)
        cs, tp = r["cold_start"], r["throughput"]
        lines += [f"Cold start (fresh process, median of {cs['repeats']}): process start {_ms(cs['process_start'])}, "
                  f"imports {_ms(cs['imports'])}, bundle verified {_ms(cs['bundle_verified'])}, sessions ready "
                  f"{_ms(cs['sessions_ready'])}, first result ({cs['images']} images, cold cache) "
                  f"{_ms(cs['first_result'])}; total {_ms(cs['total'])} ms; peak RSS {cs['peak_rss_mb']} MB.", "",
                  f"Image encoding at batch {tp['batch']}: {tp['images_per_s']} images/s, "
                  f"{tp['macs_per_image']['total'] / 1e9:.3g} G multiply-adds per image, {tp['gflops']} GFLOP/s"
                  + (f" = {100 * tp['fraction_of_peak']:.0f} % of the matmul probe" if tp["fraction_of_peak"] else "")
                  + ".", ""]
    lines += ["## Comparisons (ratios from this run)", ""]
    for label, stages in c["torch_vs_ort"].items():
        lines += [f"PyTorch eager vs ONNX Runtime, {label} (speed-up = torch / ORT):", ""]
        lines += _table(["stage", "torch p50", "ORT p50", "speed-up"],
                        [[k, _ms(v["torch_ms"]), _ms(v["ort_ms"]), f"{v['speedup']:.2f}×"] for k, v in stages.items()])
    for label, modes in c["lora_modes"].items():
        rows = [[k, _ms(v["input_ms"]), _ms(v["merged_ms"]), f"{v['merged_over_input']:.2f}×"]
                for k, v in modes.items() if k[1:].isdigit()]
        lines += [f"LoRA as input vs merged, {label} (suffix per call; hand-over: input "
                  f"{modes['handover_input_ms']} ms, merge {_ms(modes['handover_merged_ms'])} ms):", ""]
        lines += _table(["batch", "input", "merged", "merged / input"], rows)
    for label, g in c["generation_vs_training"].items():
        lines += [f"Generation vs training, {label}: generating a LoRA from a description {_ms(g['generate_ms'])} ms; "
                  f"training the Oracle LoRA for one task with the expert recipe ({g['epochs']} epochs, "
                  f"{g['images']} images, task {g['task']}) {g['train_s']:.1f} s: **{g['ratio']:,.0f}×**.", ""]
    for name, ts in c["task_switch"].items():
        rows = [[f"prefix cached, {'all' if k == 'all' else 'last ' + k} block(s) re-run", _ms(v),
                 f"{ts['speedup'].get(k, 0):.1f}×"] for k, v in ts["cached_ms"].items()]
        lines += [f"Task switch, {name}, {ts['images']} images (new LoRA -> every image's "
                  f"features; cached: fp16 activations read from the on-disk cache and the features written back, "
                  f"as `run` does; re-encode: decoded pixels in memory, whole visual tower):", ""]
        lines += _table(["path", "ms", "speed-up"],
                        [["re-encode everything", _ms(ts["reencode_all_ms"]), "1×"], *rows])
    for label, q in c["int8"].items():
        rec = q["recall"]
        lines += [f"INT8 (dynamic quantization of the visual graphs) vs fp32, {label}: "
                  + (f"mean R@1 {rec['fp32_mean_r1']} -> {rec['int8_mean_r1']} ({rec['change']:+.2f}) on "
                     f"{rec['tasks']} galleries ({rec['galleries']})" if rec else
                     "recall not measured (random weights, or no --recall-world)") + ":", ""]
        lines += _table(["batch", "fp32 visual ms", "int8 visual ms", "speed-up"],
                        [[k, _ms(v["fp32_ms"]), _ms(v["int8_ms"]), f"{v['speedup']:.2f}×"]
                         for k, v in q.items() if k[1:].isdigit()])
    for label, pc in c["precisions"].items():
        cal = pc["calibration"]
        lines += [f"Engines and precisions, {label}: visual tower (prefix + suffix, LoRA as input) p50 ms per call; "
                  f"speed-up over ONNX Runtime fp32; cold start and peak RSS of a fresh process (OpenVINO: compile "
                  f"included); cosine of the image features to ONNX Runtime fp32 (min over 8 images); mean R@1 on "
                  + (pc["recall_galleries"] or "no galleries (random weights, or no --recall-world)")
                  + f". INT8 (NNCF) calibrated on {cal['images']} "
                  + (f"train images of {cal['world']}" if cal["source"] == "dataset" else f"images of {cal['folder']}")
                  + ".", ""]
        bs = [f"b{b}" for b in pc["batches"]]
        rows = []
        for row in pc["rows"]:
            if row["refused"]:
                rows.append([row["engine"], row["precision"], row["graphs"], *["—"] * (len(bs) * 2 + 4),
                             f"refused: {row['refused']}"])
                continue
            rows.append([row["engine"], row["precision"], row["graphs"], *(_ms(row["ms"].get(b)) for b in bs),
                         *(f"{row['speedup'][b]:.2f}×" if b in row["speedup"] else "—" for b in bs),
                         _ms(row["cold_start_ms"]), row["peak_rss_mb"] or "—",
                         "—" if row["min_cosine"] is None else f"{row['min_cosine']:.4f}",
                         "—" if row["mean_r1"] is None else f"{row['mean_r1']}"
                         + ("" if row["r1_change"] is None else f" ({row['r1_change']:+.2f})"), ""])
        lines += _table(["engine", "precision", "graphs", *(f"{b} ms" for b in bs), *(f"{b} ×" for b in bs),
                         "cold start ms", "peak RSS MB", "cosine", "mean R@1", "note"], rows)
    for t in doc["tuning"]:
        lines += [f"Session settings, {t['bundle']} (suffix at batch {t['batch']}, ms per image; threads 0 = ONNX "
                  f"Runtime's default; {t['usable_cpus']} usable CPUs):", ""]
        lines += _table(["threads", "graph optimisation", "ms / image", "session load ms"],
                        [[r["threads"] or "default", r["graph_optimization"], _ms(r["suffix_ms_per_image"]),
                          _ms(r["load_ms"])] for r in t["rows"]])
        b = t["best"]
        lines += [f"Fastest: threads {b['threads'] or 'default'}, optimisation {b['graph_optimization']}: "
                  f"{b['speedup_over_default']:.2f}× ONNX Runtime's defaults.", ""]
    s = doc["scaling"]
    if s:
        lib, ret = s["library"], s["retrieval"]
        lines += [f"## Scaling ({lib['bundle']})", "",
                  f"Generation (description -> LoRA) against library size, LoRA {lib['lora_size']:,} numbers: "
                  f"{lib['growth']} in time (log-log slope {lib['slope_time'] and round(lib['slope_time'], 2)}), "
                  f"memory slope {lib['slope_memory'] and round(lib['slope_memory'], 2)}.", ""]
        lines += _table(["experts", "generate p50 ms", "library state MB", "peak MB"],
                        [[e, _ms(t), m_, p] for e, t, m_, p in zip(lib["sizes"], lib["generate_ms"], lib["state_mb"],
                                                                    lib["peak_mb"])])
        lines += [f"Retrieval (one query, top-5) against cached gallery size: {ret['growth']} "
                  f"(log-log slope {ret['slope_time'] and round(ret['slope_time'], 2)}).", ""]
        lines += _table(["images", "rank p50 ms", "features MB"],
                        [[n, _ms(t), mb] for n, t, mb in zip(ret["sizes"], ret["ms"], ret["state_mb"])])
    lines += [f"Peak RSS of the harness: {doc['peak_rss_mb']} MB"
              + (f"; GPU memory held {doc['gpu_memory_mb']} MB" if doc["gpu_memory_mb"] is not None else "") + ".", ""]
    if doc["notes"]:
        lines += ["Notes:", "", *(f"- {n}" for n in doc["notes"]), ""]
    return "\n".join(lines)


def charts(doc: dict, out: Path) -> list[str]:
    """stages.png (p50 per stage and bundle) and scaling.png, when matplotlib is installed; else none."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        doc["notes"].append("charts skipped: matplotlib is not installed")
        return []
    written = []
    mains = [r for r in doc["bundles"] if r["role"] == "main"]
    if mains:
        fig, axes = plt.subplots(1, len(mains), figsize=(6 * len(mains), 7), squeeze=False)
        for ax, r in zip(axes[0], mains):
            names = list(r["stages"])
            ax.barh(names, [r["stages"][k]["p50"] for k in names], label="ONNX Runtime")
            if r["torch"]:
                ax.barh(names, [r["torch"].get(k, {}).get("p50", 0) for k in names], height=0.35,
                        label="PyTorch eager")
            ax.set_xscale("log")
            ax.invert_yaxis()
            ax.set_xlabel("p50 ms per call")
            ax.set_title(r["label"])
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "stages.png", dpi=90)
        plt.close(fig)
        written.append("stages.png")
    s = doc["scaling"]
    if s:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.loglog(s["library"]["sizes"], s["library"]["generate_ms"], "o-", label="generate ms")
        a.loglog(s["library"]["sizes"], s["library"]["peak_mb"], "s--", label="peak MB")
        a.set_xlabel("experts in the library")
        a.set_title(f"generation: {s['library']['growth']}")
        a.legend()
        b.loglog(s["retrieval"]["sizes"], s["retrieval"]["ms"], "o-")
        b.set_xlabel("cached gallery images")
        b.set_ylabel("rank ms (one query)")
        b.set_title(f"retrieval: {s['retrieval']['growth']}")
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=90)
        plt.close(fig)
        written.append("scaling.png")
    return written


def _ints(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {value!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if any(v < 1 for v in out):
        raise InputError(f"{what} {value!r}: every value must be >= 1")
    return out


def bench_command(cfg: BenchConfig, prepare=None, int8_hooks=None) -> int:
    """Body of `sglora-edge bench`. `prepare` (export.synthetic.prepare, passed in by the CLI when --synthetic is
    given) builds random-weight bundles with torch and returns the PyTorch timers and the Oracle training times;
    `int8_hooks` (export.precision.hook, with --int8 or --openvino) quantizes bundles and measures their recall;
    `int8` runs the ONNX Runtime INT8 comparison, `openvino` the table of every engine and precision."""
    from .commands import _say, guarded

    bundles, synthetic, switch_bundles, out, as_json = cfg.bundles, cfg.synthetic, cfg.switch_bundles, cfg.out, cfg.as_json

    def body() -> int:
        if not bundles and not synthetic:
            raise InputError("nothing to measure: pass --bundle DIR (an exported bundle) or --synthetic NAME "
                             "(sglora-micro, sglora-tiny, ViT-B-16; needs torch)")
        if cfg.repeats < 2 or cfg.warmup < 0 or cfg.gallery_size < 1 or cfg.switch_gallery < 1 or not cfg.stage_budget > 0:
            raise InputError("--repeats must be >= 2, --warmup >= 0, --gallery-size and --switch-gallery >= 1, "
                             "--stage-budget > 0")
        opts = {"backend": cfg.backend, "threads": cfg.threads, "batches": _ints(cfg.batch, "--batch"),
                "gallery_size": cfg.gallery_size, "switch_gallery": cfg.switch_gallery, "repeats": cfg.repeats,
                "warmup": cfg.warmup, "stage_budget": cfg.stage_budget, "tuning": cfg.tuning, "int8": cfg.int8,
                "openvino": cfg.openvino, "calibration_images": cfg.calibration_images,
                "library_sizes": _ints(cfg.library_sizes, "--library-sizes") if cfg.library_sizes else [],
                "retrieval_sizes": _ints(cfg.retrieval_sizes, "--retrieval-sizes") if cfg.retrieval_sizes else []}
        for b in list(bundles) + list(switch_bundles):
            Bundle.load(b, verify=False)  # a missing or malformed bundle fails now, in one line
        log = (lambda s: None) if as_json else (lambda s: _say(s, "0"))
        mains, switches, timers, training, notes = list(bundles), list(switch_bundles), {}, {}, []
        with tempfile.TemporaryDirectory(prefix="sglora-bench-build-") as build:
            if synthetic:
                if prepare is None:
                    raise InputError("--synthetic needs torch and the export extra (pip install "
                                     "'sglora-edge[train,export]'); on a device pass --bundle")
                made = prepare(synthetic, Path(build), opts, cfg.oracle_world, log)
                mains += made["bundles"]
                switches += made["switch_bundles"]
                timers, training, notes = made["torch_timers"], made["training"], made["notes"]
            doc = run_bench(mains, out, opts, switches, timers, training, notes,
                            shlex.join(["sglora-edge", *sys.argv[1:]]), log, int8_hooks)
        if as_json:
            print(json.dumps(doc, indent=2))
        else:
            print(markdown(doc))
            print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
                  + "".join(f", {out / c}" for c in doc["charts"]))
        return 0
    return guarded(body)
