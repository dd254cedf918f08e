"""The commands' options as configs: each field carries its default and its help once; the CLI builds its options
from them (`sglora_edge.cli.option`) and the commands take one config instead of a row of values. ExportConfig is
the server's, but lives here with the device's: the CLI imports every config at start, and a device-only install
has no export package."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError


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

    @property
    def batches(self) -> list[int]:
        return ints(self.batch, "--batch")

    @property
    def library_size_list(self) -> list[int]:
        return ints(self.library_sizes, "--library-sizes") if self.library_sizes else []

    @property
    def retrieval_size_list(self) -> list[int]:
        return ints(self.retrieval_sizes, "--retrieval-sizes") if self.retrieval_sizes else []

    def check(self) -> None:
        """Refuse, in one line, settings the bench cannot run with."""
        if self.repeats < 2 or self.warmup < 0 or self.gallery_size < 1 or self.switch_gallery < 1 \
                or not self.stage_budget > 0:
            raise InputError("--repeats must be >= 2, --warmup >= 0, --gallery-size and --switch-gallery >= 1, "
                             "--stage-budget > 0")
        self.batches, self.library_size_list, self.retrieval_size_list  # each list parses, or names its option

    def settings(self) -> dict:
        """What results.json records of the run's settings."""
        return {"backend": self.backend, "threads": self.threads, "batches": self.batches,
                "gallery_size": self.gallery_size, "switch_gallery": self.switch_gallery, "repeats": self.repeats,
                "warmup": self.warmup, "stage_budget": self.stage_budget, "tuning": self.tuning, "int8": self.int8,
                "openvino": self.openvino, "calibration_images": self.calibration_images,
                "library_sizes": self.library_size_list, "retrieval_sizes": self.retrieval_size_list}


def ints(value: str, what: str) -> list[int]:
    """A comma-separated list of positive integers (an option's value)."""
    try:
        out = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {value!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if any(v < 1 for v in out):
        raise InputError(f"{what} {value!r}: every value must be >= 1")
    return out


@dataclass(frozen=True)
class ExportConfig:
    """`sglora-edge export`: library + generator (+ the backbone they were built on) -> a device bundle."""
    library: Path
    out: Path
    cvae: Path | None = field(default=None, metadata={
        "help": "A trained generator (cvae.safetensors or generator_s0.safetensors); without it the bundle's "
                "generator is the Top-K (ΔW) merge (--k, --tau), the default when no trained generator beats it on "
                "validation."})
    k: int | None = None  # the Top-K (ΔW) merge's K and tau; None: the CVAE recipe's (CVAEConfig, where the CLI's
    tau: float | None = None  # --k and --tau take their defaults and help); a trained generator brings its own
    backbone: str | None = field(default=None, metadata={"help": "Default: the spec the library was built with."})
    opset: int | None = field(default=None, metadata={"help": "ONNX opset (default: export.onnx_export.OPSET)."})
    fp16: bool = field(default=False, metadata={
        "help": "Also write fp16 variants of the visual graphs (for `build-engines --fp16`, `run --precision fp16`; "
                "with --tensorrt: fp16 engines)."})
    merge_desc: str | None = field(default=None, metadata={
        "help": "Bake this description's LoRA (the CVAE's prior mean) into the visual encoder: a one-task bundle; "
                "`run` then takes only this description."})
    tensorrt: bool = field(default=False, metadata={
        "help": "Also build TensorRT engines (same as `build-engines [--fp16]`; needs a CUDA GPU)."})
    # False only records that the runtime should keep no prefix cache (the prefix/suffix split is always written)
    last_blocks_cache: bool = True
    as_json: bool = False
