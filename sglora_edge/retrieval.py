"""Per-task retrieval galleries and their evaluation with or without a LoRA.

A gallery is one task's split (images + all their captions), as in the paper:
retrieval within one class. Caption features are computed once (the text tower
is frozen); image features depend on the LoRA, so images are kept preprocessed
and, when only the last blocks are adapted, as activations before the first one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .backbone import Backbone
from .data import Dataset
from .errors import SGLoRAError
from .lora import encode_images, visual_prefix, visual_suffix
from .metrics import mean_r1, mean_recalls, recall_at_k


@dataclass
class PreparedGallery:
    task: str
    images: torch.Tensor  # preprocessed pixels, or cached activations entering block `first_block`
    first_block: int
    text_features: torch.Tensor  # normalised
    positive: np.ndarray  # bool [n_images, n_captions]

    def __len__(self) -> int:
        return len(self.images)


def prepare_gallery(backbone: Backbone, dataset: Dataset, task: str, split: str = "test",
                    first_block: int = 0) -> PreparedGallery:
    """The task's whole split as one gallery."""
    return _prepare(backbone, dataset.gallery(task, split), dataset, task, split, first_block)


def prepare_galleries(backbone: Backbone, dataset: Dataset, task: str, split: str = "test", first_block: int = 0,
                      size: int | None = None) -> list[PreparedGallery]:
    """The task's split as disjoint galleries of about `size` images (Gallery.partition)."""
    return [_prepare(backbone, g, dataset, task, split, first_block) for g in dataset.galleries(task, split, size)]


def _prepare(backbone: Backbone, g, dataset: Dataset, task: str, split: str, first_block: int) -> PreparedGallery:
    if not g.images:
        raise SGLoRAError(f"task {task!r} has no {split!r} pairs in {dataset.root}")
    pixels = backbone.load_images(g.images)
    with torch.no_grad():
        acts = visual_prefix(backbone.visual, pixels, first_block) if first_block else pixels
    return PreparedGallery(task, acts, first_block, backbone.encode_text(g.captions), g.positive)


@torch.no_grad()
def gallery_image_features(backbone: Backbone, gallery: PreparedGallery,
                           deltas: dict[int, torch.Tensor] | None = None, batch_size: int = 256) -> torch.Tensor:
    if deltas and min(deltas) < gallery.first_block:
        raise SGLoRAError(f"the LoRA adapts block {min(deltas)}, but the gallery cached activations up to "
                          f"block {gallery.first_block}")
    out = []
    for i in range(0, len(gallery), batch_size):
        x = gallery.images[i:i + batch_size]
        if gallery.first_block:
            f = torch.nn.functional.normalize(visual_suffix(backbone.visual, x, gallery.first_block, deltas), dim=-1)
        else:
            f = encode_images(backbone.visual, x, deltas)
        out.append(f)
    return torch.cat(out)


def evaluate_gallery(backbone: Backbone, gallery: PreparedGallery,
                     deltas: dict[int, torch.Tensor] | None = None) -> dict:
    """Recall@1/5/10 both directions (percent) on one gallery with the given weight deltas."""
    img = gallery_image_features(backbone, gallery, deltas)
    return recall_at_k((img @ gallery.text_features.T).numpy(), gallery.positive)


def average_galleries(recalls: list[dict]) -> dict:
    """One task's result over its galleries: every recall averaged, and each gallery's mean R@1 kept
    ('gallery_r1') for the split of the variance into between tasks and between galleries of a task."""
    out = mean_recalls(recalls)
    out["gallery_r1"] = [mean_r1(r) for r in recalls]
    return out


def evaluate_galleries(backbone: Backbone, galleries: list[PreparedGallery],
                       deltas: dict[int, torch.Tensor] | None = None) -> dict:
    """evaluate_gallery on each gallery, averaged (average_galleries)."""
    return average_galleries([evaluate_gallery(backbone, g, deltas) for g in galleries])
