"""Measuring: per-call timings, peak memory, the machine record and the matmul probe."""

from __future__ import annotations

import base64
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..sessions import openvino_capabilities, openvino_installed, package_version

DESC, QUERY = "a photo of a lemon", "a small red lemon"
STATS = ("p50", "p90", "p99", "mean", "std", "n", "per")
CPU_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "asimd", "sve", "i8mm", "bf16", "dotprod")
# ONNX model bytes of one MatMul a[n,k] @ b[k,m] (opset 17), made with onnx.helper (tests/test_bench.py rebuilds
# it): the probe measures the engine and thread setting the graphs run with, without the onnx package.
MATMUL_ONNX = base64.b64decode("CAgSC3NnbG9yYS1lZGdlOl8KEQoBYQoBYhIBYyIGTWF0TXVsEgVwcm9iZVoVCgFhEhAKDggBEgoKAxIBbgoDEgF"
                               "rWhUKAWISEAoOCAESCgoDEgFrCgMSAW1iFQoBYxIQCg4IARIKCgMSAW4KAxIBbUIECgAQEQ==")


# -- timing --------------------------------------------------------------------------------------------------------


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
                         "onnxruntime": package_version("onnxruntime"), "tensorrt": package_version("tensorrt"),
                         "torch": package_version("torch"), "openvino": package_version("openvino"),
                         "nncf": package_version("nncf")},
            "openvino_capabilities": capabilities,
            "ort_available_providers": ort.get_available_providers(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                    if k in os.environ},
            "matmul_probe": matmul_probe(threads)}


# -- inputs --------------------------------------------------------------------------------------------------------
