"""Conditions c = {mu*, sigma*2}: how a description's top-K experts are gathered for every use — leave-one-out for
a seen task, augmented and jittered ones for training, the exact Top-K (ΔW) merge, and the out-of-distribution
threshold. The aggregation itself (top-K, softmax, law of total variance) is runtime.aggregate, shared with the
device."""

from __future__ import annotations

import numpy as np
import torch

from runtime.aggregate import Aggregation, softmax_weights, top_k

from .config import CVAEConfig
from .errors import SGLoRAError
from .library import Library
from .lora import average_delta_weights

OOD_SIMILARITY = 0.3  # below this best-expert similarity a description is out of the library's distribution


def check_leave_one_out(lib: Library, k: int) -> None:
    """Training conditions leave an expert's own task out, so K must stay below the library size."""
    if k > len(lib) - 1:
        raise SGLoRAError(f"K={k} needs at least {k + 1} experts in the library (leave-one-out), it has {len(lib)}")


def task_condition(lib: Library, query: np.ndarray, task: str | None, k: int, tau: float) -> Aggregation:
    """c for a task's description; leave-one-out when the task is itself an expert."""
    return lib.aggregate(query, k=k, tau=tau, exclude={task} if task in lib.names else set())


def augmented_conditions(lib: Library, query: np.ndarray, task: str, k: int, tau: float, n: int,
                         rng: np.random.Generator) -> list[Aggregation]:
    """Conditions from random K-subsets of the 2K nearest experts (drawn by softmax weight):
    more distinct conditions for the CVAE, which sees few tasks."""
    exclude = {task} if task in lib.names else set()
    pool = min(2 * k, len(lib) - len(exclude))
    if pool <= k:
        return []
    idx, sims = top_k(lib.names, lib.embeddings, query, pool, exclude)
    p = softmax_weights(sims, tau)
    out = []
    for _ in range(n):
        chosen = rng.choice(len(idx), size=k, replace=False, p=p)
        sub = lib.subset([lib.names[i] for i in idx[chosen]])
        out.append(sub.aggregate(query, k=k, tau=tau))
    return out


def jittered_condition(lib: Library, query: np.ndarray, task: str, cfg: CVAEConfig,
                       rng: np.random.Generator) -> Aggregation:
    """A training condition: tau drawn log-uniformly around cfg.tau, and with probability cond_aug a
    random K-subset of the 2K nearest experts (leave-one-out for an expert's own task)."""
    tau = cfg.tau * float(np.exp(rng.uniform(-cfg.tau_jitter, cfg.tau_jitter))) if cfg.tau_jitter else cfg.tau
    if cfg.cond_aug and rng.random() < cfg.cond_aug:
        subsets = augmented_conditions(lib, query, task, cfg.k, tau, 1, rng)
        if subsets:
            return subsets[0]
    return task_condition(lib, query, task, cfg.k, tau)


def topk_delta_weights(lib: Library, agg) -> dict[int, torch.Tensor]:
    """The Top-K (ΔW) merge of an aggregation: Σ α_k γ B_k A_k over its experts (exact in ΔW space)."""
    top = [lib.names.index(n) for n in agg.experts]
    return average_delta_weights(lib.spec, torch.from_numpy(lib.mu[top]), torch.tensor(agg.weights, dtype=torch.float32))
