"""The device pipeline: description -> embedding -> top-K aggregation -> CVAE -> LoRA -> retrieval.

    rt = EdgeRuntime.load("bundle/")                     # verifies every file, opens the sessions
    gen = rt.generate("a photo of a persian", seed=0)    # LoRA(s), experts and weights, OOD flag, warnings
    hits = rt.search("my_photos/", ["a sleepy cat"], gen, top_k=5)

The visual tower runs in two graphs. The prefix (everything before the first adapted block)
does not depend on the LoRA, so a gallery's prefix activations are computed once and cached on
disk (runtime/gallery.py); a new description re-runs only the suffix (the adapted blocks, pooling,
projection). The suffix takes the LoRA in one of the modes of runtime/modes.py: input (a graph input),
merged (folded into the weights once per LoRA) or baked (`export --merge-desc`: one LoRA in the graph, no
generator); the runtime hands each LoRA to its mode (`activate`) and runs the mode's suffix.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .aggregate import Aggregation, aggregate
from .artifacts import atomic_path
from .bundle import Bundle
from .config import EngineConfig, RunConfig
from .errors import InputError
from .gallery import (ActivationStore, BadImage, Gallery, content_key, default_cache_dir, list_gallery,
                      preprocess_image, read_file)
from .lora import save_lora, stack_topk
from .modes import BakedMode, Graphs, LoRAMode, lora_hash, mode_class
from .sessions import PRECISIONS, Backend, Optimization, Precision, SessionConfig, check_precision, resolve_backend
from .text import check_description, check_queries
from .tokenizer import ClipTokenizer, WordPieceTokenizer

@dataclass
class Generation:
    """LoRA vectors for a description and why: the experts, their weights, the OOD flag."""
    description: str
    loras: np.ndarray  # [S, P]
    aggregation: Aggregation
    ood_threshold: float
    seed: int | None  # None: the CVAE's prior mean (eps = 0)
    warnings: list[str] = field(default_factory=list)
    generator: str = "cvae"  # or "topk_dw": the Top-K (ΔW) merge, deterministic

    @property
    def out_of_distribution(self) -> bool:
        return self.aggregation.best_similarity < self.ood_threshold

    def explain(self) -> dict:
        return {**self.aggregation.explain(), "out_of_distribution": self.out_of_distribution,
                "ood_threshold": self.ood_threshold, "samples": len(self.loras),
                "lora": "the Top-K (ΔW) merge of these experts" if self.generator == "topk_dw" else
                "prior mean (eps = 0)" if self.seed is None else f"{len(self.loras)} draw(s), seed {self.seed}"}


class EdgeRuntime:
    def __init__(self, bundle: Bundle | str | Path, backend: Backend = "ort-cpu", threads: int = 0,
                 lora_mode: LoRAMode = "input", batch_size: int = EngineConfig.batch_size, cache_dir: str | Path | None = None,
                 cache_dtype: str = "float16", optimization: Optimization = "all",
                 precision: Precision | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        mode = mode_class(self.bundle, lora_mode)
        if threads < 0:
            raise InputError(f"--threads must be >= 0 (0 = ONNX Runtime's default), got {threads}")
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        name, self.backend_reason = resolve_backend(backend, self.bundle, lora_mode, precision)
        mode.check_engine(self.bundle, name, precision)
        self.config = SessionConfig(name, threads, optimization, self._precision(name, precision))
        self.batch_size = batch_size
        self.graphs = Graphs(self.bundle, self.config, batch_size)
        self.mode = mode(self.graphs)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dtype = np.dtype(cache_dtype)
        m = self.bundle.manifest
        self.clip_tokenizer = ClipTokenizer(self.bundle.path(m.text["vocab"]), m.text["context_length"])
        self.semantic = m.semantic
        self._semantic_tokenizer = None
        self._store: ActivationStore | None = None

    @property
    def lora_mode(self) -> str:
        return self.mode.name

    @property
    def baked(self) -> BakedMode | None:
        """The baked mode of an `export --merge-desc` bundle: no semantic encoder, library or generator."""
        return self.mode if isinstance(self.mode, BakedMode) else None

    def _precision(self, backend: str, precision: str | None) -> str:
        """fp32 unless asked; on TensorRT the engines' own precision (asking for another is refused)."""
        root = self.bundle.root
        if precision is not None and precision not in PRECISIONS:
            raise InputError(f"--precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        if backend == "trt":
            from .tensorrt import engines_for_this_device
            built = engines_for_this_device(self.bundle)["precision"]
            if precision not in (None, built):
                raise InputError(f"--precision {precision}: the TensorRT engines in {root} were built {built}; "
                                 f"rebuild them with `sglora-edge build-engines --bundle {root}"
                                 f"{' --fp16' if precision == 'fp16' else ''}`, or leave --precision out")
            return built
        check_precision(backend, precision or "fp32", self.bundle)
        return precision or "fp32"

    @classmethod
    def load(cls, bundle: str | Path, **kwargs) -> "EdgeRuntime":
        """Verify the bundle and open every session now, so later calls measure only the work."""
        rt = cls(bundle, **kwargs)
        rt.warm()
        return rt

    def warm(self) -> None:
        graphs = ["text_encoder", "visual_prefix"]
        if not self.baked:  # the generation side: semantic encoder and generator
            graphs += [*(["generator"] if self.bundle.generator == "cvae" else []), self.semantic["graph"]]
        for g in dict.fromkeys(graphs + list(self.mode.graphs)):
            self.graphs.session(g)
        if self.semantic["kind"] == "minilm" and not self.baked:
            self.semantic_tokenizer()

    def describe(self) -> dict:
        providers = sorted({p for s in self.graphs.sessions.values() for p in s.providers[:1]})
        return {**self.config.describe(), "picked_because": self.backend_reason, "providers": providers,
                "lora_mode": self.lora_mode}

    def run_graph(self, graph: str, feeds: dict[str, np.ndarray], batched: tuple[str, ...]) -> np.ndarray:
        return self.graphs.run(graph, feeds, batched)

    # -- semantics and generation ----------------------------------------------------------------------------
    def semantic_tokenizer(self) -> WordPieceTokenizer:
        if self._semantic_tokenizer is None:
            self._semantic_tokenizer = WordPieceTokenizer(self.bundle.path(self.semantic["tokenizer"]),
                                                          self.semantic["max_length"],
                                                          self.semantic.get("pad_token", "[PAD]"))
        return self._semantic_tokenizer

    def embed_description(self, text: str) -> tuple[np.ndarray, list[str]]:
        """(unit-norm description embedding [D] with the library's semantic encoder, warnings)."""
        text, warnings = check_description(text)
        return self._embed(text, warnings)

    def _embed(self, text: str, warnings: list[str]) -> tuple[np.ndarray, list[str]]:
        """embed_description of an already checked text."""
        if self.baked:
            raise self.baked.refuse_description()
        if self.semantic["kind"] == "backbone":
            n, limit = len(self.clip_tokenizer.encode(text)), self.clip_tokenizer.context_length - 2
            if n > limit:
                warnings.append(f"--desc is {n} tokens; the text encoder reads the first {limit} (the rest is cut)")
            return self.text_features([text])[0], warnings
        tok = self.semantic_tokenizer()
        if tok.truncated(text):
            warnings.append(f"--desc is longer than the semantic encoder's {tok.max_length} tokens; the rest is cut")
        return self.run_graph(self.semantic["graph"], tok([text]), ("input_ids", "attention_mask"))[0], warnings

    def aggregate(self, embedding: np.ndarray) -> Aggregation:
        """Top-K experts for a description embedding and the condition {mu*, sigma*2} they give."""
        b = self.bundle
        if b.k > len(b.names):
            raise InputError(f"{b.root}: the generator uses K={b.k} experts but the library has {len(b.names)}; "
                             f"re-export the bundle")
        return aggregate(b.names, b.embeddings, b.mu, b.var, embedding, b.k, b.tau)

    def condition(self, text: str) -> Aggregation:
        return self.aggregate(self.embed_description(text)[0])

    def decode(self, agg: Aggregation, eps: np.ndarray) -> np.ndarray:
        """[S, P] LoRA vectors for the condition: the generator graph on the noise eps [S, Z], or (a Top-K (ΔW)
        bundle) the merge itself as one rank-K·r LoRA: [1, P], deterministic."""
        b = self.bundle
        if b.generator == "topk_dw":
            top = [b.names.index(n) for n in agg.experts]
            vec = stack_topk(b.manifest.generator["expert_lora_spec"], b.mu[top], agg.weights, b.k)
            return vec[None]
        eps = np.asarray(eps, dtype=np.float32)
        if eps.ndim != 2 or eps.shape[1] != self.bundle.latent:
            raise InputError(f"eps must be [S, {self.bundle.latent}], got {list(eps.shape)}")
        return self.run_graph("generator", {"mu": agg.mu, "var": agg.var, "eps": eps}, ("eps",))

    def generate(self, desc: str, samples: int = 1, seed: int | None = None,
                 eps: np.ndarray | None = None) -> Generation:
        """LoRA vectors for a description: the CVAE's prior mean (seed None: deterministic), or `samples` draws
        with numpy default_rng(seed), or the given noise eps [S, Z]."""
        if samples < 1:
            raise InputError(f"--samples must be >= 1, got {samples}")
        if self.baked:
            agg, warnings = self.baked.aggregation(desc, samples, seed, eps)
            return Generation(self.baked.description, self.baked.lora(), agg, self.bundle.ood_threshold, None,
                              warnings)
        text, warnings = check_description(desc)
        embedding, warnings = self._embed(text, warnings)
        agg = self.aggregate(embedding)
        if self.bundle.generator == "topk_dw":
            if samples > 1 or seed is not None:
                warnings.append(f"{self.bundle.root}'s generator is the Top-K (ΔW) merge: deterministic, so "
                                f"--samples/--seed would give {samples} identical LoRA(s); one is used")
            eps = np.zeros((1, 0), np.float32)
        elif eps is None:
            shape = (samples, self.bundle.latent)
            eps = np.zeros(shape, np.float32) if seed is None else \
                np.random.default_rng(seed).standard_normal(shape, np.float32)
        return Generation(text, self.decode(agg, eps), agg, self.bundle.ood_threshold, seed, warnings,
                          self.bundle.generator)

    def save_lora(self, path: str | Path, gen: Generation) -> None:
        m = self.bundle.manifest
        save_lora(path, gen.loras, m.backbone["ident"], m.lora_spec,
                  {"description": gen.description, "explanation": gen.aggregation.explain(), "seed": gen.seed,
                   "mean": gen.seed is None, "bundle": str(self.bundle.root)})

    # -- images ----------------------------------------------------------------------------------------------
    def preprocess(self, paths: list[Path]) -> np.ndarray:
        cfg = self.bundle.manifest.image
        return np.stack([preprocess_image(p, cfg) for p in paths]) if paths else \
            np.zeros((0, 3, *cfg["image_size"]), np.float32)

    def prefix(self, pixels: np.ndarray) -> np.ndarray:
        return self.run_graph("visual_prefix", {"pixels": pixels}, ("pixels",))

    def suffix(self, activations: np.ndarray, lora: np.ndarray) -> np.ndarray:
        """Image features of prefix activations with this LoRA, through the mode (which folds it in once per LoRA)."""
        lora = np.asarray(lora, dtype=np.float32).reshape(-1)
        if lora.shape[0] != self.bundle.lora_size:
            raise InputError(f"LoRA vector has {lora.shape[0]} entries, the bundle needs {self.bundle.lora_size}")
        return self.mode.run(activations, lora)

    def encode_gallery(self, gallery: str | Path | list, progress=None) -> Gallery:
        """One streaming pass over a gallery folder (or a list of files): every file read and hashed, unusable
        ones skipped with the reason, prefix activations computed in batches for what the cache lacks."""
        if isinstance(gallery, (str, Path)):
            paths, skipped = list_gallery(gallery)
        else:
            paths, skipped = [Path(p) for p in gallery], []
            if not paths:
                raise InputError("the gallery is empty: pass at least one image")
        use_prefix = self.bundle.manifest.prefix_cache is not False
        root = self.cache_dir / self.bundle.hash
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--cache-dir {self.cache_dir}: cannot write there ({e.strerror or e}); pass a "
                             f"writable folder") from e
        store = self.activation_store() if use_prefix else None
        cfg = self.bundle.manifest.image
        good, keys = [], []
        for start in range(0, len(paths), self.batch_size):
            batch = []  # (path, data, key) of the usable files
            for p in paths[start:start + self.batch_size]:
                try:
                    data = read_file(p)
                except BadImage as e:
                    skipped.append((str(p), str(e)))
                    continue
                batch.append((p, data, content_key(data)))
            cached = store.has([k for _, _, k in batch]) if store is not None else set()
            todo = {}  # key -> pixels of what the store lacks
            for p, data, key in batch:
                if key not in cached and key not in todo:
                    try:
                        pixels = preprocess_image(data, cfg)  # also checks it decodes
                    except BadImage as e:
                        skipped.append((str(p), str(e)))
                        continue
                    if store is not None:
                        todo[key] = pixels
                good.append(p)
                keys.append(key)
            if todo:  # one transaction a batch: a killed pass keeps the batches it finished
                store.put(zip(todo, self.prefix(np.stack(list(todo.values())))))
            if progress:
                progress(min(start + self.batch_size, len(paths)), len(paths))
        if not good:
            first = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped[:3])
            raise InputError(f"--gallery: none of the {len(skipped)} image file(s) could be used ({first}); "
                             f"pass a folder of readable images")
        return Gallery(good, keys, store, root, skipped, recompute=lambda ps: self.prefix(self.preprocess(ps)))

    def activation_store(self) -> ActivationStore:
        """The prefix activations of every image this bundle has seen at this precision (one per runtime)."""
        if self._store is None:
            folder = self.cache_dir / self.bundle.hash / f"prefix-{self.cache_dtype.name}{self._graphs_tag()}"
            self._store = ActivationStore(folder / "activations.sqlite", self.cache_dtype)
        return self._store

    def _graphs_tag(self) -> str:
        """Cache folders of fp16/bf16/int8 graphs are kept apart: their activations differ from the fp32 graphs'."""
        return "" if self.config.precision == "fp32" else f"-{self.config.precision}-graphs"

    def _activations(self, gallery: Gallery, start: int, stop: int) -> np.ndarray:
        if gallery.store is not None:
            return gallery.activations(start, stop)
        return self.prefix(self.preprocess(gallery.paths[start:stop]))  # prefix cache off: decode again

    def image_features(self, gallery: Gallery, loras: np.ndarray) -> np.ndarray:
        """Unit-norm image features [N, D] with the LoRA (mean over the rows of a [S, P] stack, i.e. the average
        cosine score over samples), memory-mapped from the cache; computed in batches when not cached yet."""
        loras = np.atleast_2d(np.asarray(loras, dtype=np.float32))
        folder = gallery.cache_dir / f"features-{self.cache_dtype.name}-{self.lora_mode}{self._graphs_tag()}"
        key = hashlib.sha256((lora_hash(loras) + "".join(gallery.keys)).encode()).hexdigest()[:32]
        path = folder / f"{key}.npy"
        if path.is_file():
            return np.load(path, mmap_mode="r")
        with atomic_path(path) as tmp:  # a unique temp name: two writers never share one
            out = self.features_into(gallery, loras, lambda shape: np.lib.format.open_memmap(
                tmp, mode="w+", dtype=self.cache_dtype, shape=shape))
            out.flush()
            del out
        return np.load(path, mmap_mode="r")

    def features_into(self, gallery: Gallery, loras: np.ndarray, allocate) -> np.ndarray:
        """The gallery's image features averaged over `loras`, summed into allocate((n, D)) (zeroed here, in the
        cache dtype: a memory map on disk, or an array in RAM for serve's few new images)."""
        out = None
        for lora in loras:  # samples outside: merged mode folds each LoRA in once
            for start in range(0, len(gallery), self.batch_size):
                stop = min(start + self.batch_size, len(gallery))
                feats = self.suffix(self._activations(gallery, start, stop), lora) / len(loras)
                if out is None:
                    out = allocate((len(gallery), feats.shape[1]))
                    out[:] = 0
                out[start:stop] += feats.astype(self.cache_dtype)
        return out

    # -- text and search -------------------------------------------------------------------------------------
    def text_features(self, queries: list[str]) -> np.ndarray:
        return self.run_graph("text_encoder", {"input_ids": self.clip_tokenizer(list(queries))}, ("input_ids",))

    def search(self, gallery: Gallery | str | Path, queries: list[str], lora: Generation | np.ndarray,
               top_k: int = RunConfig.top_k) -> dict:
        """{query: [{"image", "score"}, ...]} best first: cosine similarity of the text and the LoRA-adapted images."""
        queries = check_queries(queries)
        check_top_k(top_k)
        if not isinstance(gallery, Gallery):
            gallery = self.encode_gallery(gallery)
        loras = lora.loras if isinstance(lora, Generation) else lora
        return rank(self.text_features(queries), self.image_features(gallery, loras), queries, gallery.paths, top_k)


def check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {top_k}")


def top_indices(row: np.ndarray, k: int) -> np.ndarray:
    """The k best scores' indices, best first, ties in gallery order: what a stable full sort gives, in O(N)
    (argpartition finds the k-th score; every index scoring at least that is sorted)."""
    if k < len(row):
        kth = np.partition(row, len(row) - k)[len(row) - k]
        row_idx = np.flatnonzero(row >= kth)
        return row_idx[np.argsort(-row[row_idx], kind="stable")][:k]
    return np.argsort(-row, kind="stable")[:k]


def rank(text: np.ndarray, features: np.ndarray, queries: list[str], paths: list[Path], top_k: int,
         chunk: int = 8192) -> dict:
    """Top-k per query, reading the (memory-mapped) features a chunk at a time."""
    scores = np.concatenate([text @ np.asarray(features[i:i + chunk], np.float32).T
                             for i in range(0, len(features), chunk)], axis=1)
    out = {}
    for q, row in zip(queries, scores):
        best = top_indices(row, top_k)
        out[q] = [{"image": str(paths[i]), "score": float(row[i])} for i in best]
    return out


def run_retrieval(bundle_dir: str | Path, desc: str, gallery_dir: str | Path, queries: list[str] | None = None,
                  top_k: int = RunConfig.top_k, backend: Backend = "auto", cache_dir: str | Path | None = None, samples: int = 1,
                  seed: int | None = None, lora_mode: LoRAMode = "input", threads: int = 0, batch_size: int = EngineConfig.batch_size,
                  save_lora_to: str | Path | None = None, progress=None, precision: Precision | None = None,
                  zero_shot: bool = False) -> dict:
    """`sglora-edge run`: description -> LoRA -> top-k gallery images per query, with the timings of each stage
    (cold start — bundle verification and session creation — apart from the work). zero_shot: also rank with
    the all-zero LoRA (B = 0: the frozen CLIP encoder), "zero_shot_results" (None on a baked bundle)."""
    desc, _ = check_description(desc)  # fail on bad arguments before the slow part
    queries = check_queries(queries or [desc])
    check_top_k(top_k)
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    timings = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round((now - clock) * 1000, 3)
        clock = now

    rt = EdgeRuntime.load(bundle_dir, backend=backend, threads=threads, lora_mode=lora_mode, batch_size=batch_size,
                          cache_dir=cache_dir, precision=precision)
    lap("cold_start")
    gen = rt.generate(desc, samples=samples, seed=seed if seed is not None or samples == 1 else 0)
    lap("generate")
    gallery = rt.encode_gallery(gallery_dir, progress=progress)
    lap("gallery_prefix")
    features = rt.image_features(gallery, gen.loras)
    lap("gallery_suffix")
    text = rt.text_features(queries)
    lap("text_queries")
    results = rank(text, features, queries, gallery.paths, top_k)
    lap("rank")
    zero_results = None
    if zero_shot and not rt.baked:
        zero = rt.image_features(gallery, np.zeros((1, rt.bundle.lora_size), np.float32))
        zero_results = rank(text, zero, queries, gallery.paths, top_k)
        lap("zero_shot")
    if save_lora_to is not None:  # only once the whole run succeeded: a failed run writes nothing
        rt.save_lora(save_lora_to, gen)
    return {"description": gen.description, "bundle": str(bundle_dir), "backend": rt.describe(),
            "gallery": str(gallery_dir), "n_images": len(gallery), "cache_dir": str(rt.cache_dir),
            "skipped": [{"path": p, "reason": why} for p, why in gallery.skipped],
            "skipped_summary": gallery.skipped_summary() if gallery.skipped else None,
            "warnings": gen.warnings, "explanation": gen.explain(), "results": results,
            "zero_shot_results": zero_results,
            "timings_ms": {"cold_start": timings.pop("cold_start"), **timings}}
