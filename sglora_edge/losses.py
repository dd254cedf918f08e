"""The CLIP contrastive loss, with repeated captions and images counted as positives.

Class-level captions repeat within a batch ("a photo of an apple" for many images),
so plain InfoNCE would push identical captions apart; here every pair that shares
the caption text or the image is a positive, with the target mass spread over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(caption_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    return (caption_ids[:, None] == caption_ids[None, :]) | (image_ids[:, None] == image_ids[None, :])


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     caption_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs with soft multi-positive targets."""
    logits = logit_scale * image_features @ text_features.T
    pos = positive_mask(caption_ids, image_ids).float()
    targets = pos / pos.sum(1, keepdim=True)  # symmetric mask, so the same targets serve both directions
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
