"""Recall@K for image-text retrieval within one gallery.

Queries and candidates are matched through a boolean `positive` matrix [images, texts]:
an image may have several captions, and a caption text may describe several images
(identical texts are one query: they cannot be told apart, so every image carrying that
text is a correct answer). A query is found at K if any of its positives is within the
top K. Ties count against the query (pessimistic): a model whose scores are all equal
gets the chance level, never 100.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def positives_from_captions(caption_image: np.ndarray, n_images: int) -> np.ndarray:
    """[n_images, n_captions] mask from caption -> image indices (one image per caption)."""
    owner = np.asarray(caption_image)
    return owner[None, :] == np.arange(n_images)[:, None]


def _hits(sim: np.ndarray, positive: np.ndarray, ks) -> dict[str, float]:
    """Rows are queries: found at K if fewer than K negatives score at least the best positive."""
    best = np.where(positive, sim, -np.inf).max(1, keepdims=True)
    rank = ((sim >= best) & ~positive).sum(1)
    return {f"r{k}": float(100.0 * (rank < k).mean()) for k in ks}


def recall_at_k(similarity: np.ndarray, positive: np.ndarray, ks=KS) -> dict[str, dict[str, float]]:
    """similarity, positive: [n_images, n_texts]. Returns {"i2t": {"r1": %, ...}, "t2i": {...}} in percent."""
    sim = np.asarray(similarity, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if pos.shape != sim.shape:
        raise ValueError(f"positive mask has shape {pos.shape}, similarity {sim.shape}")
    if not pos.any(1).all() or not pos.any(0).all():
        raise ValueError("every image needs at least one caption and every caption at least one image")
    return {"i2t": _hits(sim, pos, ks), "t2i": _hits(sim.T, pos.T, ks)}


def mean_r1(recalls: dict) -> float:
    """The headline number: (image->text R@1 + text->image R@1) / 2 of one {"i2t": .., "t2i": ..} result."""
    return (recalls["i2t"]["r1"] + recalls["t2i"]["r1"]) / 2


def mean_recalls(runs) -> dict[str, dict[str, float]]:
    """Mean of {"i2t": {...}, "t2i": {...}} dicts: a list of them, or a dict's values (tasks, galleries, samples)."""
    tasks = list(runs.values()) if isinstance(runs, dict) else list(runs)
    return {d: {k: float(np.mean([t[d][k] for t in tasks])) for k in tasks[0][d]} for d in ("i2t", "t2i")}


def paired(a, b) -> tuple[float, float]:
    """Mean of a - b over tasks and its standard error (paired over tasks)."""
    s = mean_se(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return s["mean"], s["se"]


def mean_se(values) -> dict:
    """Mean, its standard error and n (SE is NaN for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"),
            "n": len(v)}


def compare(a: list[dict], b: list[dict]) -> dict:
    """Method a vs method b over the same tasks (lists of per-task results, in the same task order).

    diff ± paired SE over tasks, a t-based 95 % interval, `mde80` (the smallest true difference this many tasks
    detect at 2-sided α = 0.05 with 80 % power: (t.975 + t.80) x SE), and, where the per-gallery mean R@1 of
    both is known, the variance of a task's difference split into between galleries of one task (s²_g / G, the
    per-task gallery-bootstrap variance up to (G-1)/G) and between tasks (the rest): more galleries shrink only
    the first, more tasks both."""
    from scipy.stats import t as student
    d = np.array([mean_r1(x) - mean_r1(y) for x, y in zip(a, b)], dtype=np.float64)
    s = mean_se(d)
    mean, se, n = s["mean"], s["se"], s["n"]
    out = {"diff": mean, "se": se, "n_tasks": n}
    if n > 1:
        half = float(student.ppf(0.975, n - 1) * se)
        out.update(ci95=[mean - half, mean + half], mde80=float((student.ppf(0.975, n - 1) + student.ppf(0.8, n - 1)) * se))
    per_gallery = [np.subtract(x["gallery_r1"], y["gallery_r1"]) for x, y in zip(a, b)
                   if "gallery_r1" in x and "gallery_r1" in y]
    if n > 1 and len(per_gallery) == n and min(len(g) for g in per_gallery) > 1:
        within = float(np.mean([g.var(ddof=1) / len(g) for g in per_gallery]))
        total = float(d.var(ddof=1))
        out["variance"] = {"total": total, "between_galleries": within, "between_tasks": max(total - within, 0.0),
                           "galleries_per_task": int(min(len(g) for g in per_gallery))}
    return out
