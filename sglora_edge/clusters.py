"""Adapters trained together, routed by the description (issue 17): the seen tasks are clustered, one LoRA is
trained per cluster on the pooled train splits (task-homogeneous batches), and a description's Top-K routes over
the cluster LoRAs exactly as it routes over experts. A cluster library is a plain Library (one "expert" per
cluster, its embedding the mean of its members' description embeddings), so TopKMerge, export and the device take
it without special cases.

Clusters come from the description embeddings (seeded k-means on the unit sphere): nothing a new task lacks.
Grouping by the true family instead is the `family_pooled` oracle row and the validation gate.
"""

from __future__ import annotations

import numpy as np

from .backbone import Backbone
from .conditions import task_condition, topk_delta_weights
from .config import ExpertConfig, LoRASpec
from .data import Dataset
from .errors import SGLoRAError
from .experts import train_task
from .library import Library, SemanticEncoder
from .metrics import mean_r1
from .retrieval import evaluate_gallery, prepare_gallery
from .train_generator import cv_folds, family_clusters


def kmeans(embeddings: np.ndarray, n: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Cluster labels of unit vectors by cosine k-means (k-means++ seeding, seeded): deterministic."""
    x = np.asarray(embeddings, dtype=np.float64)
    if not 1 <= n <= len(x):
        raise SGLoRAError(f"cannot make {n} clusters of {len(x)} tasks")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, n):
        d = np.clip(1 - np.max(x @ np.array(centres).T, axis=1), 0, None)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    c = np.array(centres)
    labels = np.full(len(x), -1)
    for _ in range(iters):
        new = np.argmax(x @ c.T, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(n):
            if (labels == j).any():
                m = x[labels == j].mean(0)
                c[j] = m / np.linalg.norm(m)
    return labels


def description_clusters(tasks: list[str], embeddings: np.ndarray, tasks_per_cluster: int, seed: int = 0
                         ) -> list[list[str]]:
    """The tasks grouped by their descriptions, about `tasks_per_cluster` a cluster (non-empty clusters only)."""
    labels = kmeans(embeddings, max(1, round(len(tasks) / tasks_per_cluster)), seed)
    return [sorted(t for t, l in zip(tasks, labels) if l == j) for j in sorted(set(labels))]


def cluster_library(backbone: Backbone, spec: LoRASpec, dataset: Dataset, encoder: SemanticEncoder,
                    clusters: list[list[str]], cfg: ExpertConfig) -> Library:
    """One LoRA per cluster, trained jointly on its tasks with task-homogeneous batches."""
    emb = encoder.encode([dataset.tasks[t].description for c in clusters for t in c])
    names, descriptions, embeddings, mu = [], [], [], []
    pos = 0
    for c in clusters:
        centre = emb[pos:pos + len(c)].mean(0)
        pos += len(c)
        names.append("cluster: " + ", ".join(c))
        descriptions.append("; ".join(dataset.tasks[t].description for t in c))
        embeddings.append(centre / np.linalg.norm(centre))
        mu.append(train_task(backbone, spec, dataset, c, cfg, by_task=True)[0][-1])
    mu = np.stack(mu).astype(np.float32)
    return Library(names, descriptions, embeddings=np.stack(embeddings).astype(np.float32), mu=mu,
                   var=np.zeros_like(mu), spec=spec, backbone=backbone.ident, semantic=encoder.name,
                   n_checkpoints=[1] * len(names), families=[None] * len(names), domains=[None] * len(names),
                   info={"clusters": clusters, "backbone_spec": backbone.spec,
                         "recipe": "joint LoRA per cluster, task-homogeneous batches"})


def crossvalidate_routed(lib: Library, encoder: SemanticEncoder, dataset: Dataset, seen: list[str],
                        backbone: Backbone, route_for, *, k: int, tau: float, n_folds: int, seed: int = 0
                        ) -> dict[str, float]:
    """Per held-out seen task: mean R@1 of a candidate minus Top-K (ΔW) over the expert library (leave-one-out), on
    the task's train split (never trained on in its fold). `route_for(train tasks)` builds the candidate from the
    other folds' tasks and returns (task, description embedding) -> its ΔW for a held-out task."""
    emb = dict(zip(seen, encoder.encode([dataset.tasks[t].description for t in seen])))
    gains = {}
    for fold in cv_folds(dataset, seen, n_folds, seed):
        route = route_for([t for t in seen if t not in fold])
        for t in fold:
            g = prepare_gallery(backbone, dataset, t, "train")
            base = topk_delta_weights(lib, task_condition(lib, emb[t], t, k, tau))
            gains[t] = mean_r1(evaluate_gallery(backbone, g, route(t, emb[t]))) - \
                mean_r1(evaluate_gallery(backbone, g, base))
    return gains


def routed_by_clusters(backbone: Backbone, spec: LoRASpec, dataset: Dataset, encoder: SemanticEncoder,
                       cfg: ExpertConfig, *, k: int, tau: float, tasks_per_cluster: int, by_family: bool, seed: int = 0):
    """crossvalidate_routed's candidate: the cluster-routed joint LoRAs (clusters by description), or, by_family,
    the family-pooled LoRA routed to the task's true family (the oracle gate)."""
    def route_for(train: list[str]):
        clusters = family_clusters(dataset, train) if by_family else description_clusters(
            train, encoder.encode([dataset.tasks[t].description for t in train]), tasks_per_cluster, seed)
        clib = cluster_library(backbone, spec, dataset, encoder, clusters, cfg)

        def route(task: str, emb: np.ndarray):
            if by_family:  # the oracle routes to the task's own family
                own = next(n for n, c in zip(clib.names, clusters)
                           if dataset.tasks[c[0]].family == dataset.tasks[task].family)
                return topk_delta_weights(clib, clib.subset([own]).aggregate(emb, k=1, tau=tau))
            return topk_delta_weights(clib, clib.aggregate(emb, k=min(k, len(clib)), tau=tau))
        return route
    return route_for
