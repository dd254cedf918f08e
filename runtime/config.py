"""The device commands' options as configs: each field carries its default and its help once; the CLI builds its
options from them (`sglora_edge.cli.option`) and the commands take one config instead of a row of values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    """How the bundle's graphs run: what `EdgeRuntime` takes besides the bundle."""
    backend: str = field(default="auto", metadata={
        "help": "auto, ort-cpu, ort-cuda, ort-trt, trt or openvino (auto says what it picked)."})
    lora_mode: str = field(default="input", metadata={
        "help": "input: the LoRA is a graph input; merged: folded into the q/k/v weights once per description."})
    threads: int = field(default=0, metadata={"help": "ONNX Runtime intra-op threads (0 = its default)."})
    batch_size: int = field(default=32, metadata={"help": "Images per engine call."})
    cache_dir: Path | None = field(default=None, metadata={
        "help": "Where gallery activations and features are cached (default: $XDG_CACHE_HOME/sglora-edge)."})
    precision: str | None = field(default=None, metadata={
        "help": "fp32, fp16 (the bundle's fp16 graphs, `export --fp16`), bf16 (OpenVINO on a CPU with AVX512-BF16/"
                "AMX) or int8 (the bundle's INT8 graphs, `quantize`); default fp32, on TensorRT the engines'."})

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """`sglora-edge run`: one description, one gallery, a few queries."""
    bundle: Path
    desc: str
    gallery: Path
    queries: tuple[str, ...] = ()
    top_k: int = field(default=5, metadata={"help": "Results per query."})
    samples: int = field(default=1, metadata={
        "help": "LoRAs to draw; scores are averaged over them. 1 without --seed: the generator's prior mean."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the LoRA draws."})
    save_lora: Path | None = field(default=None, metadata={"help": "Also write the generated LoRA(s) here (.safetensors)."})
    html: Path | None = field(default=None, metadata={
        "help": "Also write a self-contained HTML page of the results (adapted beside zero-shot)."})
    as_json: bool = False
    engine: EngineConfig = EngineConfig()


@dataclass(frozen=True)
class ServeConfig:
    """`sglora-edge serve`: the runtime kept loaded behind a local HTTP API."""
    bundle: Path
    gallery: Path
    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to listen on; the default, loopback, keeps it on this machine (0.0.0.0: every network, "
                "no authentication)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on (0: any free one, printed at start)."})
    max_tasks: int = field(default=64, metadata={
        "help": "Task descriptions whose LoRAs are kept (least recently used out)."})
    features_mb: float = field(default=256, metadata={
        "help": "RAM for the tasks' gallery features (least recently used out; recomputed when searched again)."})
    max_upload_mb: float = field(default=20, metadata={"help": "Largest image upload, in MiB (JSON requests: 64 KiB)."})
    max_image_pixels: int = field(default=40_000_000, metadata={"help": "Largest uploaded image, in pixels."})
    engine: EngineConfig = EngineConfig()


@dataclass(frozen=True)
class BenchConfig:
    """`sglora-edge bench`: what to measure and how long."""
    out: Path
    bundles: tuple[Path, ...] = ()
    synthetic: tuple[str, ...] = ()
    switch_bundles: tuple[Path, ...] = ()
    backend: str = field(default="ort-cpu", metadata={"help": "ort-cpu, ort-cuda, ort-trt, trt, openvino or auto."})
    threads: int = field(default=0, metadata={"help": "ONNX Runtime (and PyTorch) intra-op threads (0 = their default)."})
    batch: str = field(default="1,8,32", metadata={"help": "Batch sizes of the visual stages, comma-separated."})
    gallery_size: int = field(default=100, metadata={"help": "Images in the gallery the retrieval stages use."})
    switch_gallery: int = field(default=1000, metadata={"help": "Images in the task-switch gallery."})
    repeats: int = field(default=20, metadata={"help": "Timed calls per stage (whole-gallery stages: at most 5)."})
    warmup: int = field(default=3, metadata={"help": "Untimed calls before each stage."})
    stage_budget: float = field(default=60.0, metadata={
        "help": "Seconds one stage may take; a slower one stops early (at least 2 timed calls) and the task-switch "
                "gallery shrinks."})
    library_sizes: str = field(default="10,100,1000,10000", metadata={"help": "Synthetic library sizes ('' skips)."})
    retrieval_sizes: str = field(default="100,1000,10000", metadata={
        "help": "Cached gallery sizes for ranking ('' skips)."})
    oracle_world: Path | None = field(default=None, metadata={
        "help": "With --synthetic: the dataset the Oracle LoRA trains on (default: the micro world)."})
    tuning: bool = True
    int8: bool = False
    openvino: bool = False
    calibration_images: int = field(default=128, metadata={
        "help": "With --openvino: images that calibrate the INT8 graphs."})
    as_json: bool = False
