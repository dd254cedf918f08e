"""How the visual suffix takes a LoRA: three modes, each owning its graphs and sessions (in the manner of
onnxruntime-genai's adapters: `activate` makes a LoRA the one the suffix runs with, `release` frees what the mode
holds for it). `run(activations, lora)` takes the LoRA with every call, so concurrent callers (serve's threads)
never run with each other's LoRA: input mode keeps no LoRA state at all, merged mode swaps its session under a lock.

    input   the LoRA vector is a graph input; the adapted blocks add it as a low-rank side path,
            h·Wᵀ + (h·Aᵀ)·Bᵀ, so W stays a constant that ONNX Runtime pre-packs (W + γ·B·A is never formed)
    merged  γ·B·A is folded into the q/k/v weights once per LoRA, which override the merged graph's
            initializers (ONNX Runtime's SessionOptions.add_initializer); the graph then runs on constants
    baked   `export --merge-desc TEXT`: one LoRA baked into the suffix graph; the bundle has no semantic encoder,
            library or generator, and refuses any description other than TEXT (compared ignoring case and runs
            of whitespace)
"""

from __future__ import annotations

import hashlib
import threading
from typing import Literal, get_args

import numpy as np

from .aggregate import Aggregation
from .bundle import Bundle, BundleError
from .errors import InputError
from .lora import delta_weights
from .sessions import SessionConfig, max_batch, open_session
from .text import check_description

LoRAMode = Literal["input", "merged"]  # what --lora-mode takes; a baked bundle (export --merge-desc) runs "baked"
LORA_MODES = get_args(LoRAMode)
MERGED_GRAPH = "visual_suffix_merged"


def lora_hash(loras: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(loras, dtype=np.float32).tobytes()).hexdigest()[:16]


class Graphs:
    """The bundle's sessions on one backend, each opened once, run over the leading axis in engine-sized chunks."""

    def __init__(self, bundle: Bundle, config: SessionConfig, batch_size: int):
        self.bundle, self.config, self.batch_size = bundle, config, batch_size
        self.sessions: dict = {}
        self._steps: dict[str, int] = {}  # rows a call of each graph takes (max_batch asks the engines: once a graph)

    def session(self, graph: str):
        if graph not in self.sessions:
            self.sessions[graph] = open_session(self.bundle, graph, self.config)
        return self.sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray], batched: tuple[str, ...], session=None) -> np.ndarray:
        """The graph (or `session`, a session of it opened elsewhere) on feeds, chunked along the `batched` inputs."""
        session = session or self.session(graph)
        n = len(feeds[batched[0]])
        if graph not in self._steps:
            self._steps[graph] = max_batch(self.bundle, graph, self.config, self.batch_size)
        step = self._steps[graph]
        out = [session.run({k: (v[i:i + step] if k in batched else v) for k, v in feeds.items()})[0]
               for i in range(0, n, step)]
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


class InputMode:
    """The LoRA vector is fed to the suffix graph with every call: activating one costs nothing."""
    name = "input"
    graphs = ("visual_suffix",)

    def __init__(self, graphs: Graphs):
        self._graphs = graphs

    @staticmethod
    def check_engine(bundle: Bundle, backend: str, precision: str | None) -> None:
        """Every backend and precision runs it."""

    def activate(self, lora: np.ndarray) -> None:
        """Nothing to prepare: the LoRA is a graph input."""

    def release(self) -> None:
        """Nothing held."""

    def run(self, activations: np.ndarray, lora: np.ndarray) -> np.ndarray:
        return self._graphs.run("visual_suffix", {"activations": activations, "lora": lora}, ("activations",))


class MergedMode:
    """γ·B·A folded into the q/k/v weights: one session per LoRA, built when it is activated."""
    name = "merged"
    graphs = ()  # its session is built per LoRA, by activate

    def __init__(self, graphs: Graphs):
        self._graphs = graphs
        self.active: tuple[str, object] | None = None  # (LoRA hash, its session)
        self._base_qkv: dict[str, np.ndarray] | None = None  # the q/k/v weights every LoRA folds into
        self._lock = threading.Lock()  # one activation at a time; a running call keeps its own session

    @staticmethod
    def check_engine(bundle: Bundle, backend: str, precision: str | None) -> None:
        if backend == "trt":
            raise InputError("--lora-mode merged runs on ONNX Runtime backends (TensorRT refit is not implemented); "
                             "use --lora-mode input with --backend trt")
        if backend == "openvino":
            raise InputError("--lora-mode merged runs on ONNX Runtime backends (OpenVINO would recompile the graph "
                             "for every LoRA); use --lora-mode input with --backend openvino")

    def weights(self, lora: np.ndarray) -> dict[str, np.ndarray]:
        """{initializer name: (W_qkv + γ·B·A)ᵀ} for the merged suffix graph (its MatMuls take Wᵀ directly)."""
        bundle = self._graphs.bundle
        merged = bundle.manifest.merged
        if self._base_qkv is None:  # read once; every new LoRA folds into the same base weights
            from safetensors.numpy import load_file
            self._base_qkv = load_file(str(bundle.path(merged["base_weights"])))
        return {merged["initializers"][str(b)]: np.ascontiguousarray((self._base_qkv[str(b)] + dw).T)
                for b, dw in delta_weights(bundle.manifest.lora_spec, lora).items()}

    def activate(self, lora: np.ndarray):
        """The session with this LoRA folded in (built once per LoRA, not per batch)."""
        key = lora_hash(lora)
        with self._lock:
            if self.active is None or self.active[0] != key:
                self.active = None  # the previous session freed before the next is built (a running call keeps it)
                g = self._graphs
                self.active = (key, open_session(g.bundle, MERGED_GRAPH, g.config, self.weights(lora)))
            return self.active[1]

    def release(self) -> None:
        self.active = None

    def run(self, activations: np.ndarray, lora: np.ndarray) -> np.ndarray:
        return self._graphs.run(MERGED_GRAPH, {"activations": activations}, ("activations",), self.activate(lora))


class BakedMode:
    """One LoRA baked into the suffix graph (export --merge-desc); it is the only one that can be activated."""
    name = "baked"

    def __init__(self, graphs: Graphs):
        self._graphs, self.entry = graphs, graphs.bundle.manifest.baked  # {description, lora_file, graph, ...}
        self.graphs = (self.entry["graph"],)
        self._lora: np.ndarray | None = None

    @staticmethod
    def check_engine(bundle: Bundle, backend: str, precision: str | None) -> None:
        if precision in ("int8", "bf16"):
            raise InputError(f"--precision {precision}: {bundle.root} has a LoRA baked in (export --merge-desc) and "
                             f"no {precision} variant of its graph; leave --precision out")

    @property
    def description(self) -> str:
        return self.entry["description"]

    def lora(self) -> np.ndarray:
        """The baked LoRA [1, P] (the `lora` artifact beside the graph), read once."""
        if self._lora is None:
            from safetensors.numpy import load_file
            bundle = self._graphs.bundle
            path = bundle.path(self.entry["lora_file"])
            lora = load_file(str(path)).get("lora")
            if lora is None or lora.shape != (1, bundle.lora_size):
                raise BundleError(f"{path}: not the [1, {bundle.lora_size}] LoRA the manifest promises; "
                                  f"re-export the bundle with `sglora-edge export --merge-desc ...`")
            self._lora = lora.astype(np.float32)
        return self._lora

    def refuse_description(self) -> InputError:
        """Why another description cannot be embedded here."""
        return InputError(f"{self._graphs.bundle.root} has the LoRA for \"{self.description}\" baked in (export "
                          f"--merge-desc): no semantic encoder or library to adapt to another description; use a "
                          f"bundle exported without --merge-desc")

    def aggregation(self, desc: str, samples: int, seed: int | None, eps) -> tuple[Aggregation, list[str]]:
        """What generation returns on a baked bundle: no generation, the experts behind the baked LoRA."""
        text, warnings = check_description(desc)
        want, root = self.description, self._graphs.bundle.root
        if " ".join(text.split()).casefold() != " ".join(want.split()).casefold():
            raise InputError(f"--desc \"{text}\": {root} has the LoRA for \"{want}\" baked in (export "
                             f"--merge-desc); pass --desc \"{want}\", or a bundle exported without --merge-desc for "
                             f"other descriptions")
        if samples != 1 or seed is not None or eps is not None:
            raise InputError(f"--samples/--seed: {root} has the CVAE's prior-mean LoRA for \"{want}\" "
                             f"baked in, nothing to draw; leave them out")
        e = self.entry["explanation"]
        agg = Aggregation(np.zeros(0, np.float32), np.zeros(0, np.float32), list(e["experts"]),
                          [float(x) for x in e["similarities"]], [float(x) for x in e["weights"]])
        return agg, warnings

    def activate(self, lora: np.ndarray) -> None:
        if not np.array_equal(np.asarray(lora).reshape(-1), self.lora().reshape(-1)):
            raise InputError(f"{self._graphs.bundle.root} has one LoRA baked in (export --merge-desc) and cannot "
                             f"take another; use a bundle exported without --merge-desc")

    def release(self) -> None:
        """Nothing to free: the LoRA is part of the graph."""

    def run(self, activations: np.ndarray, lora: np.ndarray) -> np.ndarray:
        self.activate(lora)
        return self._graphs.run(self.entry["graph"], {"activations": activations}, ("activations",))


MODES = {"input": InputMode, "merged": MergedMode}


def mode_class(bundle: Bundle, lora_mode: str) -> type[InputMode | MergedMode | BakedMode]:
    """The mode a --lora-mode value runs on this bundle (a baked bundle runs its own), refused in one line where
    the bundle cannot run it."""
    if lora_mode not in LORA_MODES:
        raise InputError(f"--lora-mode {lora_mode!r} is unknown; choose one of {', '.join(LORA_MODES)}")
    baked = bundle.manifest.baked
    if baked and lora_mode != "input":
        raise InputError(f"--lora-mode {lora_mode}: {bundle.root} has the LoRA for \"{baked['description']}\" baked "
                         f"into its visual encoder already (export --merge-desc); leave --lora-mode out")
    if lora_mode == "merged" and MERGED_GRAPH not in bundle.manifest.graphs:
        raise InputError(f"--lora-mode merged: {bundle.root} has no {MERGED_GRAPH} graph (exported "
                         f"before merged mode existed); re-export the bundle or use --lora-mode input")
    return BakedMode if baked else MODES[lora_mode]
