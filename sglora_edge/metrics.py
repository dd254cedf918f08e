"""Recall@K for image-text retrieval within one gallery.

Ties count against the query (pessimistic), so a model whose scores are all equal
gets the chance level, never 100. An image with several captions is found for
image->text if any of its captions is within the top K.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def recall_at_k(similarity: np.ndarray, caption_image: np.ndarray, ks=KS) -> dict[str, dict[str, float]]:
    """similarity: [n_images, n_captions]; caption_image[j] = index of the image caption j describes.

    Returns {"i2t": {"r1": %, ...}, "t2i": {...}} in percent.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    owner = np.asarray(caption_image)
    n_img, n_cap = sim.shape
    if owner.shape != (n_cap,):
        raise ValueError(f"caption_image has shape {owner.shape}, expected ({n_cap},)")
    positive = owner[None, :] == np.arange(n_img)[:, None]  # [n_img, n_cap]
    if not positive.any(1).all():
        raise ValueError("every image needs at least one caption")
    # i2t: negatives scoring at least the best positive caption
    best_pos = np.where(positive, sim, -np.inf).max(1, keepdims=True)
    i2t_rank = ((sim >= best_pos) & ~positive).sum(1)
    # t2i: other images scoring at least the caption's own image
    own = sim[owner, np.arange(n_cap)]
    t2i_rank = (sim >= own[None, :]).sum(0) - 1
    return {
        "i2t": {f"r{k}": float(100.0 * (i2t_rank < k).mean()) for k in ks},
        "t2i": {f"r{k}": float(100.0 * (t2i_rank < k).mean()) for k in ks},
    }


def mean_recalls(per_task: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Mean over tasks of {"i2t": {...}, "t2i": {...}} dicts."""
    tasks = list(per_task.values())
    return {d: {k: float(np.mean([t[d][k] for t in tasks])) for k in tasks[0][d]} for d in ("i2t", "t2i")}
