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
        folds = cv_folds(ds, seen, 2, seed=0)
        assert sorted(t for f in folds for t in f) == sorted(seen)  # every seen task held out exactly once
        assert not unseen & {t for f in folds for t in f}
        for family in {ds.tasks[t].family for t in seen}:  # stratified: a family spreads over the folds
            sizes = [sum(ds.tasks[t].family == family for t in f) for f in folds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="--folds"):
        cv_folds(ds, ["a", "b"], 3)


def test_train_generator_refuses_the_paper_objective(micro):
    from sglora_edge.train_generator import train_generator
    bb, ds = micro
    with pytest.raises(ValueError, match="objective='retrieval'"):
        train_generator(None, None, ".", ds, [], bb, CVAEConfig())


def test_the_default_rule_falls_back_to_the_merge_and_never_takes_an_oracle_row():
    from sglora_edge.methods import BY_NAME, ORACLE_ROWS
    from sglora_edge.validation import default_generator, pick_default
    assert pick_default({"retrieval": {"mean": 0.3, "se": 0.2, "n": 64}, "cluster": {"mean": -0.1, "se": 0.1, "n": 64}}) \
        == "topk_dw"  # nothing clears 2 SE: the Top-K (ΔW) merge itself
    assert pick_default({"retrieval": {"mean": 0.9, "se": 0.4, "n": 64}, "cluster": {"mean": 1.2, "se": 0.5, "n": 64}}) \
        == "cluster"  # the highest gain, and it clears 2 SE
    assert pick_default({"retrieval": None, "cluster": {"mean": 5.0, "se": 0.1, "n": 1}}) == "topk_dw"  # no SE
    assert default_generator("auto", None) == "topk_dw" and default_generator("paper", None) == "paper"
    assert set(ORACLE_ROWS) == {"family_pooled", "merge_ceiling", "oracle"} and all(BY_NAME[m].oracle for m in ORACLE_ROWS)


def test_clusters_are_deterministic_and_cluster_cv_never_trains_on_the_held_out_task(micro, monkeypatch):
    import sglora_edge.clusters as C
    from sglora_edge.config import ExpertConfig, LoRASpec
    from sglora_edge.library import Library
    bb, ds = micro
    emb = np.random.default_rng(0).normal(size=(12, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert np.array_equal(C.kmeans(emb, 3, seed=1), C.kmeans(emb, 3, seed=1))
    seen = ds.seen_tasks("photo")
    spec = LoRASpec.for_visual(bb.visual, rank=1)
    current = []  # the clusters of the fold being scored
    real_library = C.cluster_library
    monkeypatch.setattr(C, "cluster_library", lambda b, s, d, e, clusters, cfg: (
        current.__setitem__(slice(None), clusters), real_library(b, s, d, e, clusters, cfg))[1])
    scored = []
    real_gallery = C.prepare_gallery
    monkeypatch.setattr(C, "prepare_gallery", lambda b, d, t, split: (
        scored.append((t, [set(c) for c in current])), real_gallery(b, d, t, split))[1])
    lib = Library(names=[t for t in seen if ds.tasks[t].role == "expert"], descriptions=[], embeddings=np.zeros((0, 0)),
                  mu=None, var=None, spec=spec, backbone=bb.ident, semantic="backbone", n_checkpoints=[])
    from sglora_edge.library import SemanticEncoder
    enc = SemanticEncoder("backbone", bb)
    rng = np.random.default_rng(0)
    mu = rng.normal(scale=0.01, size=(len(lib.names), spec.size)).astype(np.float32)
    lib = Library(names=lib.names, descriptions=[ds.tasks[t].description for t in lib.names],
                  embeddings=enc.encode([ds.tasks[t].description for t in lib.names]), mu=mu, var=np.zeros_like(mu),
                  spec=spec, backbone=bb.ident, semantic=enc.name, n_checkpoints=[1] * len(mu))
    route_for = C.routed_by_clusters(bb, spec, ds, enc, ExpertConfig(epochs=1, keep_last=1), k=1, tau=0.1,
                                     tasks_per_cluster=2, by_family=False)
    gains = C.crossvalidate_routed(lib, enc, ds, seen, bb, route_for, k=1, tau=0.1, n_folds=2)
    assert set(gains) == set(seen)  # every seen task scored once
    assert len(scored) == len(seen)
    for task, clusters in scored:  # the clusters a held-out task is routed over never trained on it
        assert clusters and all(task not in members for members in clusters)


def _seen_library(bb, ds, tasks, rank=1):
    from sglora_edge.config import LoRASpec
    from sglora_edge.library import Library, SemanticEncoder
    spec = LoRASpec.for_visual(bb.visual, rank=rank)
    enc = SemanticEncoder("backbone", bb)
    mu = np.random.default_rng(0).normal(scale=0.02, size=(len(tasks), spec.size)).astype(np.float32)
    return Library.build(tasks, [ds.tasks[t].description for t in tasks], [m[None] for m in mu], enc, spec,
                         bb.ident), enc


def test_routed_atoms_never_route_a_task_to_its_own_atom_and_cv_never_trains_on_the_held_out_task(micro, monkeypatch):
    import sglora_edge.atoms as A
    from sglora_edge.clusters import crossvalidate_routed
    from sglora_edge.config import ExpertConfig
    from sglora_edge.generate import TopKMerge
    bb, ds = micro
    seen = ds.seen_tasks("photo")
    start, enc = _seen_library(bb, ds, seen)
    for i, (top, weights) in enumerate(A.neighbour_routes(start, k=2, tau=0.1)):
        assert i not in top and len(top) == 2 and abs(float(weights.sum()) - 1) < 1e-5
    cfg = ExpertConfig(epochs=1, keep_last=1, lr=1e-2)
    atoms = A.train_atoms(bb, start, ds, cfg, k=2, tau=0.1, drift=1.0)
    assert atoms.names == start.names and not np.allclose(atoms.mu, start.mu)  # the atoms moved
    assert np.array_equal(A.train_atoms(bb, start, ds, cfg, k=2, tau=0.1, drift=1.0).mu, atoms.mu)  # seeded
    vecs, _ = TopKMerge(atoms, enc, 2, 0.1).generate(ds.tasks[seen[0]].description, samples=1)  # a plain library
    assert vecs.shape[1] >= atoms.spec.size
    trained_on = []
    real = A.train_atoms
    monkeypatch.setattr(A, "train_atoms", lambda b, lib, *a, **kw: (trained_on.append(set(lib.names)),
                                                                      real(b, lib, *a, **kw))[1])
    lib = start.subset([t for t in seen if ds.tasks[t].role == "expert"])
    scored = []
    import sglora_edge.clusters as C
    real_gallery = C.prepare_gallery
    monkeypatch.setattr(C, "prepare_gallery", lambda b, d, t, split: (scored.append((t, trained_on[-1])),
                                                                      real_gallery(b, d, t, split))[1])
    gains = crossvalidate_routed(lib, enc, ds, seen, bb, A.routed_by_atoms(bb, start, ds, cfg, k=2, tau=0.1, drift=0.0),
                                 k=2, tau=0.1, n_folds=2)
    assert set(gains) == set(seen) and len(scored) == len(seen)
    assert all(task not in atoms_of for task, atoms_of in scored)


def test_the_merge_ceiling_starts_from_the_description_merge_and_fits_its_weights(micro):
    import torch
    from sglora_edge.atoms import fit_merge_weights
    from sglora_edge.conditions import topk_delta_weights
    from sglora_edge.config import ExpertConfig
    bb, ds = micro
    seen = ds.seen_tasks("photo")
    lib, enc = _seen_library(bb, ds, seen)
    task = ds.task_names(role="unseen", domain="photo")[0]
    agg = lib.aggregate(enc.encode([ds.tasks[task].description])[0], k=2, tau=0.1)
    exact = topk_delta_weights(lib, agg)
    unfitted = fit_merge_weights(bb, lib, agg, ds, task, ExpertConfig(epochs=1, keep_last=1, lr=0.0))
    assert all(torch.allclose(unfitted[b], exact[b], atol=1e-6) for b in exact)
    fitted = fit_merge_weights(bb, lib, agg, ds, task, ExpertConfig(epochs=2, keep_last=1, lr=0.5))
    assert not all(torch.allclose(fitted[b], exact[b], atol=1e-4) for b in exact)
