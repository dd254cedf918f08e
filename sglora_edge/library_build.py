"""Building the expert library from a folder of expert checkpoints (with the measured choice of
semantic encoder), and adding or removing experts in a saved one. Shared by the CLI and `reproduce`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from runtime.artifacts import ArtifactError, read_meta

from .backbone import TINY_MODELS, Backbone
from .config import CVAEConfig, LoRASpec, SemanticChoice
from .data import Dataset
from .errors import SGLoRAError
from .experts import load_checkpoints, trained_task_file
from .library import SEMANTIC_ENCODERS, Library, SemanticEncoder
from .lora import delta_weights
from .metrics import mean_r1
from .retrieval import evaluate_gallery, prepare_gallery


def experts_spec(experts_dir: str | Path, tasks: list[str]) -> LoRASpec:
    """The LoRA spec the checkpoints in a folder were trained with (they must all agree)."""
    specs = {t: read_meta(trained_task_file(experts_dir, t))["lora_spec"] for t in tasks}
    distinct = {tuple(sorted((k, str(v)) for k, v in s.items())) for s in specs.values()}
    if len(distinct) > 1:
        raise ArtifactError(f"checkpoints in {experts_dir} were trained with different LoRA specs; "
                            f"retrain them with one spec")
    return LoRASpec.from_dict(next(iter(specs.values())))


def topk_routing_score(lib: Library, encoder: SemanticEncoder, dataset: Dataset, backbone: Backbone,
                       tasks: list[str], k: int, tau: float, split: str = "val") -> float:
    """Mean R@1 (both directions) of the Top-K weighted LoRA that `encoder` routes to, on `tasks`' split."""
    embs = encoder.encode([dataset.tasks[t].description for t in tasks])
    scores = []
    for t, e in zip(tasks, embs):
        if not dataset.split_pairs(split, t):
            continue
        agg = lib.aggregate(e, k=min(k, len(lib) - (t in lib.names)), tau=tau,
                            exclude={t} if t in lib.names else set())
        r = evaluate_gallery(backbone, prepare_gallery(backbone, dataset, t, split),
                             delta_weights(lib.spec, torch.from_numpy(agg.mu)))
        scores.append(mean_r1(r))
    return float(np.mean(scores)) if scores else float("nan")


def build_library(dataset: Dataset, backbone: Backbone, experts_dir: str | Path, tasks: list[str] | None = None,
                  semantic: SemanticChoice = "auto", k: int = CVAEConfig.k, tau: float = CVAEConfig.tau) -> Library:
    """Library of `tasks` (default: the expert-role tasks). semantic="auto": the CLIP text tower for real
    backbones (the paper's choice); for tiny backbones whichever encoder routes better on the train-role
    tasks (Top-K weighted R@1 on their val split), measured here and recorded in the library."""
    tasks = tasks or dataset.task_names(role="expert")
    if not tasks:
        raise SGLoRAError(f"{dataset.root} has no expert-role tasks; pass --tasks explicitly")
    spec = experts_spec(experts_dir, tasks)
    ckpts = [load_checkpoints(experts_dir, t, backbone.ident, spec) for t in tasks]

    def make(kind: str) -> Library:
        enc = SemanticEncoder(kind, backbone)
        return Library.build(tasks, [dataset.tasks[t].description for t in tasks], ckpts, enc, spec, backbone.ident,
                             [dataset.tasks[t].family for t in tasks], [dataset.tasks[t].domain for t in tasks])

    info = {"backbone_spec": backbone.spec, "semantic_requested": semantic}
    if semantic == "auto":
        if backbone.model_name not in TINY_MODELS:
            semantic = "backbone"
            info["semantic_reason"] = "real backbone: its text tower (the paper's choice)"
        else:
            probe = dataset.task_names(role="train")
            measured = {kind: topk_routing_score(make(kind), SemanticEncoder(kind, backbone), dataset, backbone,
                                                 probe, k, tau) for kind in SEMANTIC_ENCODERS}
            semantic = max(SEMANTIC_ENCODERS, key=lambda kind: (np.nan_to_num(measured[kind], nan=-1), kind))
            info["semantic_measured_val_r1"] = measured
            info["semantic_reason"] = (f"tiny backbone: Top-K weighted R@1 on the val split of {len(probe)} "
                                       f"train-role tasks, higher wins")
    elif semantic not in SEMANTIC_ENCODERS:
        raise SGLoRAError(f"--semantic {semantic!r} is unknown; choose auto, {', '.join(SEMANTIC_ENCODERS)}")
    lib = make(semantic)
    lib.info = info
    return lib


def update_library(path: str | Path, dataset: Dataset, backbone: Backbone, experts_dir: str | Path,
                   add: Sequence[str] = (), remove: Sequence[str] = ()) -> Library:
    """The library saved at `path` with the experts in `remove` taken out and the tasks in `add` put in
    (from their checkpoints in `experts_dir`); no retraining: the CVAE only sees aggregated conditions."""
    lib = Library.load(path, backbone=backbone.ident)
    for name in remove:
        lib.remove(name)
    encoder = SemanticEncoder(lib.semantic_kind, backbone)
    for name in add:
        if name not in dataset.tasks:
            raise SGLoRAError(f"unknown task {name!r} in {dataset.root}")
        t = dataset.tasks[name]
        lib.add(name, t.description, load_checkpoints(experts_dir, name, backbone.ident, lib.spec), encoder,
                t.family, t.domain)
    return lib
