"""Semantic aggregation of expert LoRAs (numpy only; the server imports this same code).

For a description embedding d*: cosine similarity to every expert embedding d_e,
top-K, alpha = softmax(sim / tau) over the top-K, and
    mu*     = sum_k alpha_k mu_k
    sigma*2 = sum_k alpha_k sigma2_k + sum_k alpha_k (mu_k - mu*)^2   (law of total variance)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SGLoRAError


@dataclass
class Aggregation:
    mu: np.ndarray  # [P]
    var: np.ndarray  # [P]
    experts: list[str]  # top-K, most similar first
    similarities: list[float]
    weights: list[float]

    @property
    def best_similarity(self) -> float:
        return self.similarities[0]

    def explain(self) -> dict:
        return {"experts": self.experts, "similarities": self.similarities, "weights": self.weights,
                "best_similarity": self.best_similarity}


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_k(names: list[str], embeddings: np.ndarray, query: np.ndarray, k: int,
          exclude: set[str] | frozenset = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities of the k most similar experts not in `exclude` (ties: library order)."""
    allowed = np.array([n not in exclude for n in names])
    if k < 1 or k > allowed.sum():
        raise SGLoRAError(f"K={k} but the library offers {int(allowed.sum())} expert(s) here "
                          f"({len(names)} in all, {len(names) - int(allowed.sum())} excluded); use 1 <= K <= "
                          f"{int(allowed.sum())}")
    sims = normalize(embeddings) @ normalize(query)
    sims = np.where(allowed, sims, -np.inf)
    idx = np.argsort(-sims, kind="stable")[:k]
    return idx, sims[idx]


def softmax_weights(similarities: np.ndarray, tau: float) -> np.ndarray:
    if tau <= 0:
        raise SGLoRAError(f"temperature tau must be > 0, got {tau}")
    z = np.asarray(similarities, dtype=np.float64) / tau
    w = np.exp(z - z.max())
    return w / w.sum()


def aggregate(names: list[str], embeddings: np.ndarray, mu: np.ndarray, var: np.ndarray, query: np.ndarray,
              k: int = 4, tau: float = 0.1, exclude: set[str] | frozenset = frozenset(),
              weights: np.ndarray | None = None) -> Aggregation:
    """The condition c = {mu*, sigma*2} for one description (exclude: leave-one-out for an expert's own task).

    `weights` overrides the softmax (AdapterSoup uses equal weights over the same top-K).
    """
    idx, sims = top_k(names, embeddings, query, k, exclude)
    alpha = softmax_weights(sims, tau) if weights is None else np.asarray(weights, dtype=np.float64)
    mus = mu[idx].astype(np.float64)
    mean = alpha @ mus
    variance = alpha @ var[idx].astype(np.float64) + alpha @ (mus - mean) ** 2
    return Aggregation(mean.astype(np.float32), variance.astype(np.float32), [names[i] for i in idx],
                       [float(s) for s in sims], [float(a) for a in alpha])
