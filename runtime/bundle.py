"""The bundle format, read and written here only: manifest.json (format version, settings), the sha256 of every
file, the library. Export, INT8 variants and engine builds write the manifest through write_manifest."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .artifacts import META_KEY, write_bytes
from .errors import SGLoRAError

BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REEXPORT = "re-export it with `sglora-edge export --library ... [--cvae ...] --out <bundle>`"


class BundleError(SGLoRAError):
    """A bundle is malformed, of another format version, or its files do not match the manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under root except the manifest and hidden temp files."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}


REQUIRED = ("format_version", "files", "graphs", "lora_size", "image", "text", "semantic", "aggregation", "cvae",
            "ood_threshold")  # what every version-1 bundle has; the rest are optional (older bundles lack some)


@dataclass
class Manifest:
    """manifest.json, typed at the top level (the entries below it stay the JSON objects export writes). Loaded as
    peft loads its configs: a missing required key is refused naming it, an unknown key is warned about and kept,
    so that rewriting the manifest (INT8 graphs, engine builds) never drops what a newer exporter wrote."""
    format_version: int
    files: dict[str, dict]  # {relative path: {sha256, bytes}} of every file but the manifest
    graphs: dict[str, dict]  # {graph: {file, inputs {name: shape}, outputs}}
    lora_size: int
    image: dict  # the eval transform: image_size, resize_shorter_side, interpolation, mean, std, ...
    text: dict  # the CLIP tokenizer: vocab, context_length, ...
    semantic: dict  # the description encoder: name, kind (backbone | minilm), graph, dim, tokenizer, max_length
    aggregation: dict  # {k, tau}
    cvae: dict | None  # the generator graph's settings (latent, ...); None: the Top-K (ΔW) merge
    ood_threshold: float
    format: str = "sglora-edge-bundle"
    exporter: dict | None = None
    backbone: dict | None = None  # {ident, model_name, spec}
    lora_spec: dict | None = None
    first_adapted_block: int | None = None
    prefix_cache: bool | None = None  # False: the runtime keeps no prefix cache (absent: keep one)
    generator: dict | None = None  # {kind: cvae | topk_dw, ...}; absent: cvae
    embed_dim: int | None = None
    library: dict | None = None  # {file, experts, source}; file None on a baked bundle
    export_max_abs_diff: dict | None = None
    fp16_graphs: dict | None = None  # {graph: file} of `export --fp16`
    fp16_min_cosine: dict | None = None
    merged: dict | None = None  # merged mode: {graph, base_weights, initializers, layout}
    baked: dict | None = None  # export --merge-desc: {description, lora, lora_file, graph, explanation}
    quantized: dict | None = None  # bench --int8's dynamic INT8 copy
    int8_graphs: dict | None = None  # {graph: file} of `quantize` (NNCF)
    int8: dict | None = None  # how those were made and calibrated
    tensorrt: dict | None = None  # {builds: {device slug: engines}}
    extra: dict = field(default_factory=dict)  # unknown keys, kept as read

    @classmethod
    def from_dict(cls, d: dict, where: str | Path = MANIFEST) -> "Manifest":
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise BundleError(f"{where}: the manifest lacks {missing[0]!r}; {REEXPORT}")
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"{where}: unknown manifest key(s) {', '.join(unknown)} (written by a newer exporter?); "
                          f"kept as they are, not used", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: d[k] for k in unknown})

    def to_dict(self) -> dict:
        """The JSON object: every required key, the optional ones that are set, the unknown ones as read."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if k in REQUIRED or v is not None}, **self.extra}

    @property
    def generator_kind(self) -> str:
        """"cvae" (generator.onnx) or "topk_dw" (the Top-K (ΔW) merge as a rank-K·r LoRA, numpy)."""
        return (self.generator or {"kind": "cvae"})["kind"]

    def variant(self, precision: str) -> dict:
        """{graph: file} of a precision's graph variants (fp16, int8); {} where the bundle has none."""
        return {"fp16": self.fp16_graphs, "int8": self.int8_graphs}.get(precision) or {}


def write_manifest(root: Path, manifest: Manifest) -> None:
    """The one writer of a bundle's manifest.json (atomically)."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    write_bytes(Path(root) / MANIFEST, text.encode())


def read_manifest(root: str | Path) -> Manifest:
    """The manifest of the bundle at root, its format and version checked (its files are not: Bundle.load)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"--bundle {root}: no bundle there ({MANIFEST} not found); copy the exported bundle "
                          f"folder here, or export one with `sglora-edge export --library ... --cvae ... "
                          f"--out {root}`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON (truncated or corrupted: {e}); copy the bundle again or "
                          f"{REEXPORT}") from e
    if not isinstance(d, dict) or d.get("format") != "sglora-edge-bundle":
        raise BundleError(f"{path}: not an sglora-edge bundle manifest; {REEXPORT}")
    version = d.get("format_version")
    if isinstance(version, int) and version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format version {version} is newer than this runtime reads "
                          f"({BUNDLE_FORMAT_VERSION}); upgrade the runtime: pip install -U sglora-edge")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format version {version!r} is not supported (this runtime reads "
                          f"version {BUNDLE_FORMAT_VERSION}); {REEXPORT}")
    manifest = Manifest.from_dict(d, path)
    # export --merge-desc: one LoRA baked in, no library to choose experts from
    what, need = ("baked", ("description", "lora_file", "graph")) if manifest.baked else ("library", ("file",))
    entry = getattr(manifest, what)
    if entry is None:
        raise BundleError(f"{path}: the manifest lacks {what!r}; {REEXPORT}")
    for key in need:
        if key not in entry:
            raise BundleError(f"{path}: the manifest's {what!r} entry lacks {key!r}; {REEXPORT}")
    return manifest


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    names: list[str]
    descriptions: list[str]
    embeddings: np.ndarray  # [E, D]
    mu: np.ndarray  # [E, P]
    var: np.ndarray  # [E, P]

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Bundle":
        """Read and check a bundle; verify=False skips the sha256 pass (large backbones take a second)."""
        root = Path(root)
        manifest = read_manifest(root)
        for name, entry in manifest.files.items():
            file = root / name
            if not file.is_file():
                raise BundleError(f"{root}: {name} is listed in the manifest but missing; copy the whole bundle "
                                  f"folder again or {REEXPORT}")
            if verify and "sha256" not in entry:
                raise BundleError(f"{root}: the manifest's entry for {name} lacks its sha256; {REEXPORT}")
            if verify and sha256_file(file) != entry["sha256"]:
                raise BundleError(f"{file}: sha256 does not match the manifest (the file was changed, truncated "
                                  f"or corrupted after export); copy the bundle again or {REEXPORT}")
        if manifest.baked:
            names, descriptions = [], []
            tensors = {k: np.zeros((0, 0), np.float32) for k in ("embeddings", "mu", "var")}
        else:
            names, descriptions, tensors = read_library(root / manifest.library["file"])
        return cls(root, manifest, names, descriptions, tensors["embeddings"], tensors["mu"], tensors["var"])

    @property
    def hash(self) -> str:
        """What caches are keyed by: the manifest lists the sha256 of every file, so its own hash names them all."""
        return sha256_file(self.root / MANIFEST)[:16]

    def path(self, name: str) -> Path:
        return self.root / name

    def graph_file(self, graph: str, precision: str = "fp32") -> Path:
        """The ONNX file of a graph; fp16 and int8 pick the graph's variant (manifest `fp16_graphs`, `int8_graphs`)
        where the bundle has one (only the visual graphs have variants: the rest stay fp32)."""
        return self.root / (self.manifest.variant(precision).get(graph) or self.manifest.graphs[graph]["file"])

    @property
    def k(self) -> int:
        return int(self.manifest.aggregation["k"])

    @property
    def tau(self) -> float:
        return float(self.manifest.aggregation["tau"])

    @property
    def generator(self) -> str:
        return self.manifest.generator_kind

    @property
    def latent(self) -> int:
        return int(self.manifest.cvae["latent"])

    @property
    def lora_size(self) -> int:
        return int(self.manifest.lora_size)

    @property
    def ood_threshold(self) -> float:
        return float(self.manifest.ood_threshold)


def read_library(path: Path) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in ("embeddings", "mu", "var")}
    except (SafetensorError, OSError, KeyError, ValueError) as e:  # ValueError: bad JSON in the header
        raise BundleError(f"{path}: not a readable expert library ({type(e).__name__}: {e}); copy the bundle "
                          f"again or {REEXPORT}") from e
    if len(meta["names"]) != len(tensors["mu"]):
        raise BundleError(f"{path}: {len(meta['names'])} names for {len(tensors['mu'])} experts; {REEXPORT}")
    return meta["names"], meta["descriptions"], tensors
