"""The bundle format, read and written here only: manifest.json (format version, settings), the sha256 of every
file, the library. Export, INT8 variants and engine builds write the manifest through write_manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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


def write_manifest(root: Path, manifest: dict) -> None:
    """The one writer of a bundle's manifest.json (atomically)."""
    write_bytes(Path(root) / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


@dataclass
class Bundle:
    root: Path
    manifest: dict
    names: list[str]
    descriptions: list[str]
    embeddings: np.ndarray  # [E, D]
    mu: np.ndarray  # [E, P]
    var: np.ndarray  # [E, P]

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Bundle":
        """Read and check a bundle; verify=False skips the sha256 pass (large backbones take a second)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"--bundle {root}: no bundle there ({MANIFEST} not found); copy the exported bundle "
                              f"folder here, or export one with `sglora-edge export --library ... --cvae ... "
                              f"--out {root}`")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path}: not valid JSON (truncated or corrupted: {e}); copy the bundle again or "
                              f"{REEXPORT}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != "sglora-edge-bundle":
            raise BundleError(f"{path}: not an sglora-edge bundle manifest; {REEXPORT}")
        version = manifest.get("format_version")
        if isinstance(version, int) and version > BUNDLE_FORMAT_VERSION:
            raise BundleError(f"{root}: bundle format version {version} is newer than this runtime reads "
                              f"({BUNDLE_FORMAT_VERSION}); upgrade the runtime: pip install -U sglora-edge")
        if version != BUNDLE_FORMAT_VERSION:
            raise BundleError(f"{root}: bundle format version {version!r} is not supported (this runtime reads "
                              f"version {BUNDLE_FORMAT_VERSION}); {REEXPORT}")
        try:
            for name, entry in manifest["files"].items():
                file = root / name
                if not file.is_file():
                    raise BundleError(f"{root}: {name} is listed in the manifest but missing; copy the whole bundle "
                                      f"folder again or {REEXPORT}")
                if verify and sha256_file(file) != entry["sha256"]:
                    raise BundleError(f"{file}: sha256 does not match the manifest (the file was changed, truncated "
                                      f"or corrupted after export); copy the bundle again or {REEXPORT}")
            if manifest.get("baked"):  # export --merge-desc: one LoRA baked in, no library to choose experts from
                manifest["baked"]["description"], manifest["baked"]["lora_file"], manifest["baked"]["graph"]
                names, descriptions, tensors = [], [], {k: np.zeros((0, 0), np.float32) for k in ("embeddings", "mu",
                                                                                                     "var")}
            else:
                names, descriptions, tensors = read_library(root / manifest["library"]["file"])
            for key in ("graphs", "aggregation", "cvae", "lora_size", "image", "text", "semantic", "ood_threshold"):
                manifest[key]
        except KeyError as e:
            raise BundleError(f"{path}: the manifest lacks {e}; {REEXPORT}") from e
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
        variant = self.manifest.get(f"{precision}_graphs", {}).get(graph) if precision in ("fp16", "int8") else None
        return self.root / (variant or self.manifest["graphs"][graph]["file"])

    @property
    def k(self) -> int:
        return int(self.manifest["aggregation"]["k"])

    @property
    def tau(self) -> float:
        return float(self.manifest["aggregation"]["tau"])

    @property
    def generator(self) -> str:
        """"cvae" (generator.onnx) or "topk_dw" (the Top-K (ΔW) merge as a rank-K·r LoRA, numpy)."""
        return self.manifest.get("generator", {"kind": "cvae"})["kind"]

    @property
    def latent(self) -> int:
        return int(self.manifest["cvae"]["latent"])

    @property
    def lora_size(self) -> int:
        return int(self.manifest["lora_size"])

    @property
    def ood_threshold(self) -> float:
        return float(self.manifest["ood_threshold"])


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
