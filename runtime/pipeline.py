"""The device pipeline: description -> embedding -> top-K aggregation -> CVAE -> LoRA -> retrieval.

The visual tower runs in two graphs. The prefix (everything before the first adapted block)
does not depend on the LoRA, so a gallery's prefix activations are computed once and cached
(in memory, optionally on disk keyed by each file's content hash); a new description re-runs
only the suffix (the adapted blocks, pooling, projection).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .aggregate import Aggregation, aggregate
from .bundle import Bundle
from .engine import Engine
from .errors import PathNotFound, SGLoRAError
from .sessions import max_batch, open_session
from .tokenizer import ClipTokenizer, WordPieceTokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def list_gallery(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PathNotFound(f"gallery folder {folder} not found")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SGLoRAError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def preprocess_image(path: str | Path, cfg: dict) -> np.ndarray:
    """[3, H, W] float32, equal to open_clip's eval transform: RGB, bicubic resize of the shorter side
    (torchvision's size rule), center crop (torchvision's rounding), /255, normalise."""
    with Image.open(path) as im:
        im = im.convert(cfg.get("mode", "RGB"))
    w, h = im.size
    side = cfg["resize_shorter_side"]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), RESAMPLE[cfg["interpolation"]])
    crop_h, crop_w = cfg["image_size"]
    top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
    im = im.crop((left, top, left + crop_w, top + crop_h))
    x = np.asarray(im, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def content_key(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]


@dataclass
class GalleryCache:
    """A gallery encoded up to the first adapted block: what a task switch does not need to recompute."""
    paths: list[Path]
    keys: list[str]  # content hash of each image file
    activations: np.ndarray | None  # [N, L, W] prefix activations (None when the bundle disables the cache)
    pixels: np.ndarray | None = None  # [N, 3, H, W], kept instead of activations when the cache is off

    def __len__(self) -> int:
        return len(self.paths)


class SGLoRARuntime:
    def __init__(self, bundle: Bundle | str | Path, engine: Engine = "onnxruntime", batch_size: int = 32):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.engine = engine
        self.batch_size = batch_size
        m = self.bundle.manifest
        self.clip_tokenizer = ClipTokenizer(self.bundle.path(m["text"]["vocab"]), m["text"]["context_length"])
        self.semantic = m["semantic"]
        self._sessions: dict = {}
        self._semantic_tokenizer = None

    # -- engines ---------------------------------------------------------------------------------------------
    def session(self, graph: str):
        if graph not in self._sessions:
            self._sessions[graph] = open_session(self.bundle, graph, self.engine)
        return self._sessions[graph]

    def _batched(self, graph: str, feeds: dict[str, np.ndarray], batched: tuple[str, ...]) -> np.ndarray:
        """Run `graph` over the leading axis of the `batched` inputs in engine-sized chunks."""
        session = self.session(graph)
        n = len(feeds[batched[0]])
        step = max_batch(self.bundle, graph, self.engine, self.batch_size)
        out = [session.run({k: (v[i:i + step] if k in batched else v) for k, v in feeds.items()})[0]
               for i in range(0, n, step)]
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    # -- semantics and generation ----------------------------------------------------------------------------
    def embed_description(self, text: str) -> np.ndarray:
        """Unit-norm description embedding [D] with the library's semantic encoder."""
        if not text or not text.strip():
            raise SGLoRAError('empty task description: describe the task in a few words, e.g. "a photo of a persian"')
        if self.semantic["kind"] == "backbone":
            return self.text_features([text])[0]
        if self._semantic_tokenizer is None:
            self._semantic_tokenizer = WordPieceTokenizer(self.bundle.path(self.semantic["tokenizer"]),
                                                          self.semantic["max_length"],
                                                          self.semantic.get("pad_token", "[PAD]"))
        return self.session(self.semantic["graph"]).run(self._semantic_tokenizer([text]))[0][0]

    def aggregate(self, embedding: np.ndarray) -> Aggregation:
        """Top-K experts for a description embedding and the condition {mu*, sigma*2} they give."""
        b = self.bundle
        if b.k > len(b.names):
            raise SGLoRAError(f"the bundle's CVAE uses K={b.k} experts but its library has {len(b.names)}")
        return aggregate(b.names, b.embeddings, b.mu, b.var, embedding, b.k, b.tau)

    def condition(self, text: str) -> Aggregation:
        return self.aggregate(self.embed_description(text))

    def decode(self, agg: Aggregation, eps: np.ndarray) -> np.ndarray:
        """The generator graph: [S, P] LoRA vectors for the condition and noise eps [S, Z]."""
        eps = np.asarray(eps, dtype=np.float32)
        if eps.ndim != 2 or eps.shape[1] != self.bundle.latent:
            raise SGLoRAError(f"eps must be [S, {self.bundle.latent}], got {list(eps.shape)}")
        return self._batched("generator", {"mu": agg.mu, "var": agg.var, "eps": eps}, ("eps",))

    def generate(self, text: str, samples: int = 1, seed: int = 0, mean: bool = False,
                 eps: np.ndarray | None = None) -> tuple[np.ndarray, Aggregation]:
        """[S, P] LoRA vectors and the aggregation behind them. eps [S, Z] defaults to zeros (mean=True: the
        prior mean) or numpy default_rng(seed) normal draws."""
        if samples < 1:
            raise SGLoRAError(f"samples must be >= 1, got {samples}")
        agg = self.condition(text)
        if eps is None:
            shape = (samples, self.bundle.latent)
            eps = np.zeros(shape, np.float32) if mean else np.random.default_rng(seed).standard_normal(shape, np.float32)
        return self.decode(agg, eps), agg

    # -- images and text -------------------------------------------------------------------------------------
    def preprocess(self, paths: list[Path]) -> np.ndarray:
        cfg = self.bundle.manifest["image"]
        return np.stack([preprocess_image(p, cfg) for p in paths]) if paths else \
            np.zeros((0, 3, *cfg["image_size"]), np.float32)

    def prefix(self, pixels: np.ndarray) -> np.ndarray:
        return self._batched("visual_prefix", {"pixels": pixels}, ("pixels",))

    def suffix(self, activations: np.ndarray, lora: np.ndarray) -> np.ndarray:
        lora = np.asarray(lora, dtype=np.float32).reshape(-1)
        if lora.shape[0] != self.bundle.lora_size:
            raise SGLoRAError(f"LoRA vector has {lora.shape[0]} entries, the bundle needs {self.bundle.lora_size}")
        return self._batched("visual_suffix", {"activations": activations, "lora": lora}, ("activations",))

    def encode_gallery(self, paths: list[str | Path], cache_dir: str | Path | None = None) -> GalleryCache:
        """Prefix activations of every image; with cache_dir, stored as <cache_dir>/<prefix graph>/<content hash>.npy
        and reused by any later call (any gallery holding the same file)."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise SGLoRAError("the gallery is empty: pass at least one image")
        keys = [content_key(p) for p in paths]
        if not self.bundle.manifest.get("prefix_cache", True):
            return GalleryCache(paths, keys, None, self.preprocess(paths))
        folder = None
        if cache_dir is not None:
            folder = Path(cache_dir) / self.bundle.manifest["files"]["visual_prefix.onnx"]["sha256"][:16]
            folder.mkdir(parents=True, exist_ok=True)
        found = {k: np.load(folder / f"{k}.npy") for k in set(keys) if folder and (folder / f"{k}.npy").is_file()}
        todo = [i for i, k in enumerate(keys) if k not in found]
        if todo:
            acts = self.prefix(self.preprocess([paths[i] for i in todo]))
            for i, a in zip(todo, acts):
                found[keys[i]] = a
                if folder is not None:
                    np.save(folder / f"{keys[i]}.npy", a)
        return GalleryCache(paths, keys, np.stack([found[k] for k in keys]))

    def image_features(self, cache: GalleryCache, lora: np.ndarray) -> np.ndarray:
        """Unit-norm image features [N, D] with the LoRA: only the adapted blocks run when the prefix is cached."""
        acts = cache.activations if cache.activations is not None else self.prefix(cache.pixels)
        return self.suffix(acts, lora)

    def text_features(self, queries: list[str]) -> np.ndarray:
        return self._batched("text_encoder", {"input_ids": self.clip_tokenizer(list(queries))}, ("input_ids",))

    def retrieve(self, cache: GalleryCache, lora: np.ndarray, queries: list[str], top_k: int = 5) -> dict:
        """{query: [{"image", "score"}, ...]} best first, cosine similarity of text and LoRA-adapted image features."""
        return rank(self.text_features(queries) @ self.image_features(cache, lora).T, queries, cache.paths, top_k)


def rank(scores: np.ndarray, queries: list[str], paths: list[Path], top_k: int) -> dict:
    out = {}
    for q, row in zip(queries, scores):
        best = np.argsort(-row, kind="stable")[:top_k]
        out[q] = [{"image": str(paths[i]), "score": float(row[i])} for i in best]
    return out


def run_retrieval(bundle_dir: str | Path, desc: str, gallery_dir: str | Path, queries: list[str] | None = None,
                  top_k: int = 5, engine: Engine = "onnxruntime", cache_dir: str | Path | None = None) -> dict:
    """Description -> LoRA (the CVAE's prior mean: deterministic) -> top-k gallery images per query."""
    if not desc or not desc.strip():
        raise SGLoRAError('empty task description: describe the task in a few words, e.g. "a photo of a persian"')
    if top_k < 1:
        raise SGLoRAError(f"top_k must be >= 1, got {top_k}")
    queries = list(queries or [desc])
    timings = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round((now - clock) * 1000, 3)
        clock = now

    rt = SGLoRARuntime(bundle_dir, engine=engine)
    paths = list_gallery(gallery_dir)
    lap("load_bundle")
    embedding = rt.embed_description(desc)
    lap("embed_description")
    agg = rt.aggregate(embedding)
    lap("aggregate")
    lora = rt.decode(agg, np.zeros((1, rt.bundle.latent), np.float32))[0]
    lap("generate")
    cache = rt.encode_gallery(paths, cache_dir)
    lap("gallery_prefix")
    image = rt.image_features(cache, lora)
    lap("gallery_suffix")
    text = rt.text_features(queries)
    lap("text_queries")
    results = rank(text @ image.T, queries, paths, top_k)
    lap("rank")
    ood = rt.bundle.ood_threshold
    explanation = {**agg.explain(), "out_of_distribution": bool(agg.best_similarity < ood), "ood_threshold": ood,
                   "lora": "prior mean (eps = 0)"}
    return {"description": desc, "bundle": str(bundle_dir), "engine": engine, "gallery": str(gallery_dir),
            "n_images": len(paths), "explanation": explanation, "results": results, "timings_ms": timings}
