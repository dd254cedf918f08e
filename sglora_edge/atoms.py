"""Routed atoms trained end to end (issue 17): every seen task owns an atom, a rank-r LoRA initialised from its own
task LoRA, and the atoms are trained for the merge the device will do. Each step takes one seen task's batch and
adapts the backbone with exactly that merge — the Top-K (ΔW) merge of the atoms of the task's description
neighbours, its own atom left out, weighted by the description softmax — and the contrastive loss on that task's
images trains the neighbours' atoms. Separately trained LoRAs are not made to be summed; these are.

A penalty on the drift from the start keeps each atom near its task's LoRA (the atoms see ~32 tasks a domain). The
result is a plain Library (its mu the atoms), so TopKMerge, export and the device take it without special cases.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm import tqdm

from .backbone import Backbone
from .conditions import topk_delta_weights
from .config import ExpertConfig
from .data import Dataset
from .errors import SGLoRAError, TrainingDiverged
from .experts import epoch_batches, task_train_data
from .library import Library
from .lora import average_delta_weights, delta_weights


def neighbour_routes(lib: Library, k: int, tau: float) -> list[tuple[list[int], torch.Tensor]]:
    """Per task of `lib`: (indices of its Top-K description neighbours, itself left out; their softmax weights)."""
    routes = []
    for i, name in enumerate(lib.names):
        agg = lib.aggregate(lib.embeddings[i], k=min(k, len(lib) - 1), tau=tau, exclude={name})
        routes.append(([lib.names.index(n) for n in agg.experts], torch.tensor(agg.weights, dtype=torch.float32)))
    return routes


def train_atoms(backbone: Backbone, lib: Library, dataset: Dataset, cfg: ExpertConfig, *, k: int, tau: float,
                drift: float, progress: bool = False) -> Library:
    """`lib` (the seen tasks, each with its task LoRA) with its mu trained as routed atoms (module docstring).
    `drift`: weight of Σ‖atom − start‖² / Σ‖start‖² over the routed atoms of a step."""
    if len(lib) < 2:
        raise SGLoRAError(f"routed atoms need at least 2 seen tasks (a task never routes to its own atom); got "
                          f"{len(lib)}")
    spec = lib.spec
    data = task_train_data(backbone, spec, dataset, lib.names)  # task_of indexes lib.names
    dev = backbone.model.logit_scale.device
    routes = neighbour_routes(lib, k, tau)
    start = torch.from_numpy(lib.mu).to(dev)
    atoms = start.clone().requires_grad_(True)
    opt = torch.optim.AdamW([atoms], lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    for _ in tqdm(range(cfg.epochs), desc="routed atoms", disable=not progress, leave=False):
        for idx in epoch_batches(data.task_of, cfg.batch_size, True, rng):
            top, weights = routes[data.task_of[idx[0]]]
            loss = data.loss(backbone, spec, idx, average_delta_weights(spec, atoms[top], weights), rng)
            if drift:
                loss = loss + drift * ((atoms[top] - start[top]) ** 2).sum() / (start[top] ** 2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    trained = atoms.detach().cpu().numpy().astype(np.float32)
    if not np.isfinite(trained).all():
        raise TrainingDiverged("routed atoms: training diverged (NaN); lower the multi-task lr")
    return replace(lib, mu=trained, var=np.zeros_like(trained), n_checkpoints=[1] * len(lib),
                   info={**lib.info, "recipe": "routed atoms: trained through the leave-one-out Top-K (ΔW) merge",
                         "atoms": {"k": k, "tau": tau, "drift": drift, "training": asdict(cfg)}})


def fit_merge_weights(backbone: Backbone, lib: Library, agg, dataset: Dataset, task: str, cfg: ExpertConfig
                      ) -> dict[int, torch.Tensor]:
    """The merge_ceiling oracle row: the Top-K (ΔW) merge of the description's experts with its K weights fitted
    (free: any sign or scale) on the task's own train split — the best any merge of these experts can do."""
    spec = lib.spec
    data = task_train_data(backbone, spec, dataset, task)
    dev = backbone.model.logit_scale.device
    with torch.no_grad():
        experts = [delta_weights(spec, torch.from_numpy(lib.mu[lib.names.index(n)]).to(dev)) for n in agg.experts]
    alpha = torch.tensor(agg.weights, dtype=torch.float32, device=dev).requires_grad_(True)
    merged = lambda a: {b: sum(a[i] * e[b] for i, e in enumerate(experts)) for b in experts[0]}
    opt = torch.optim.Adam([alpha], lr=cfg.lr)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.epochs):
        for idx in epoch_batches(data.task_of, cfg.batch_size, False, rng):
            loss = data.loss(backbone, spec, idx, merged(alpha), rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return merged(alpha.detach())


def routed_by_atoms(backbone: Backbone, start: Library, dataset: Dataset, cfg: ExpertConfig, *, k: int, tau: float,
                    drift: float):
    """clusters.crossvalidate_routed's candidate: atoms trained on the other folds' seen tasks (from `start`, the
    library of every seen task's LoRA), routed by the held-out task's description."""
    def route_for(train: list[str]):
        atoms = train_atoms(backbone, start.subset(train), dataset, cfg, k=k, tau=tau, drift=drift)
        return lambda task, emb: topk_delta_weights(atoms, atoms.aggregate(emb, k=min(k, len(atoms)), tau=tau))
    return route_for
