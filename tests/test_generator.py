"""The retrieval-trained, anchored generator (sglora) and the validation protocol that chooses it."""

import numpy as np
import pytest
import torch

from runtime.aggregate import aggregate
from sglora_edge.config import CVAEConfig, LoRASpec
from sglora_edge.cvae import SemanticCVAE
from sglora_edge.lora import init_vector


@pytest.fixture(scope="module")
def micro(micro_world):
    from sglora_edge.backbone import create_backbone
    from sglora_edge.data import load_dataset
    return create_backbone("open_clip:sglora-micro@random"), load_dataset(micro_world)


def test_retrieval_gradient_reaches_the_generator_and_not_the_backbone(micro):
    from sglora_edge.experts import task_train_data
    from sglora_edge.train_generator import frozen, retrieval_step_loss
    bb, ds = micro
    spec = LoRASpec.for_visual(bb.visual, rank=2)
    task = ds.task_names(role="train")[0]
    data = task_train_data(bb, spec, ds, task)
    rng = np.random.default_rng(0)
    mu = np.stack([init_vector(spec).numpy() + 0.01 * rng.normal(size=spec.size).astype(np.float32) for _ in range(3)])
    agg = aggregate(["a", "b", "c"], np.eye(3, dtype=np.float32), mu, np.full_like(mu, 1e-4),
                    np.array([1, 0.5, 0], dtype=np.float32), 2, 0.1, set())
    cfg = CVAEConfig(anchor=True, objective="retrieval", latent=4, hidden=16, cond_per_block=2, images_per_task=8)
    model = SemanticCVAE(spec.size, len(spec.blocks), cfg)
    torch.manual_seed(0)
    flags = [p.requires_grad for p in bb.model.parameters()]
    with frozen(bb.model):
        loss, correction = retrieval_step_loss(model, spec, bb, data, agg, cfg, rng)
        (loss + correction).backward()
    assert torch.isfinite(loss) and correction.item() == 0.0  # the zero-initialised correction: X = mu*
    assert model.decoder[-1].weight.grad.abs().sum() > 0  # the contrastive loss reaches the generator ...
    assert all(p.grad is None for p in bb.model.parameters())  # ... and never the backbone
    assert [p.requires_grad for p in bb.model.parameters()] == flags  # `frozen` restores the flags


def test_validation_folds_hold_only_seen_tasks(micro):
    from sglora_edge.train_generator import cv_folds
    _, ds = micro
    for domain in ds.domains():
        seen = ds.seen_tasks(domain)
        unseen = set(ds.task_names(role="unseen"))
        folds = cv_folds(seen, 2, seed=0)
        assert sorted(t for f in folds for t in f) == sorted(seen)  # every seen task held out exactly once
        assert not unseen & {t for f in folds for t in f}
    with pytest.raises(ValueError, match="--folds"):
        cv_folds(["a", "b"], 3)


def test_train_generator_refuses_the_paper_objective(micro):
    from sglora_edge.train_generator import train_generator
    bb, ds = micro
    with pytest.raises(ValueError, match="objective='retrieval'"):
        train_generator(None, None, ".", ds, [], bb, CVAEConfig())
