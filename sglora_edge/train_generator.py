"""Training the generator for what it is used for: retrieval through the frozen backbone.

The paper's CVAE (generate.train_cvae) learns to reconstruct expert checkpoints; on our testbed
its samples sit at the centre of the expert cloud and trail the Top-K merge they are conditioned
on. Here the decoded LoRA is put into the frozen visual encoder and scored with the contrastive
loss on the seen tasks' *train* splits (Text-to-LoRA's end-to-end "SFT" mode), anchored at the
condition: X = mu* + correction(c), the correction's last layer starting at zero (cvae `anchor`),
with a penalty on its size. Each step draws `tasks_per_step` seen tasks, each with a condition
jittered as the device would never see it twice alike: a random K-subset of its 2K nearest experts
(probability `cond_aug`) and a log-uniform tau. Experts train it with leave-one-out conditions.

Nothing here early-stops on a validation score: the number of steps, the penalty and the rest are
chosen by cross-validation over the seen tasks (`crossvalidate`), never on unseen tasks.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime.aggregate import Aggregation

from .backbone import Backbone
from .config import CVAEConfig, LoRASpec
from .cvae import SemanticCVAE
from .data import Dataset
from .errors import SGLoRAError, TrainingDiverged
from .experts import TaskTrainData, load_checkpoints, task_train_data
from .conditions import check_leave_one_out, jittered_condition, task_condition, topk_delta_weights
from .generate import Generator
from .library import Library, SemanticEncoder
from .lora import a_mask, delta_weights
from .metrics import mean_r1
from .retrieval import evaluate_gallery, prepare_gallery


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No parameter of `module` takes a gradient inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def fit_standardisation(model: SemanticCVAE, lib: Library, conditions: dict[str, Aggregation],
                        checkpoints_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardise the correction by the spread of the seen tasks' checkpoints around their conditions;
    returns (X, MU, VAR) rows for the optional reconstruction regulariser."""
    xs, mus, vs = [], [], []
    for t, agg in conditions.items():
        for x in load_checkpoints(checkpoints_dir, t, lib.backbone, lib.spec):
            xs.append(x), mus.append(agg.mu), vs.append(agg.var)
    X, MU, VAR = (torch.from_numpy(np.stack(a)) for a in (xs, mus, vs))
    model.fit_statistics(model.target(X, MU), MU, VAR)
    return X, MU, VAR


def retrieval_step_loss(model: SemanticCVAE, spec: LoRASpec, backbone: Backbone, data: TaskTrainData,
                        agg: Aggregation, cfg: CVAEConfig, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(contrastive loss of the decoded LoRA on a batch of the task's train images, mean squared
    standardised correction) for one task and one condition."""
    mu, var = torch.from_numpy(agg.mu), torch.from_numpy(agg.var)
    x = model.decode(mu, var, torch.randn(1, cfg.latent))[0]
    n = len(data.captions_of)
    idx = rng.choice(n, size=min(cfg.images_per_task, n), replace=False)
    loss = data.loss(backbone, spec, idx, delta_weights(spec, x), rng)
    correction = ((x - mu) / model.x_std.clamp_min(1e-12)).pow(2).mean()
    return loss, correction


# Held-out tasks are scored on their train split: 100 images a task instead of the val split's 20, and
# untouched in a fold (no model evaluated there was fitted to them; their own expert is left out).
CV_SPLIT = "train"


def val_scores(backbone: Backbone, dataset: Dataset, lib: Library, encoder: SemanticEncoder,
               tasks: list[str], cfg: CVAEConfig) -> tuple[dict, dict]:
    """Per-task galleries (CV_SPLIT) and (condition, Top-K (ΔW) mean R@1) for held-out tasks (leave-one-out)."""
    emb = dict(zip(tasks, encoder.encode([dataset.tasks[t].description for t in tasks])))
    galleries = {t: prepare_gallery(backbone, dataset, t, CV_SPLIT) for t in tasks}
    conditions = {t: task_condition(lib, emb[t], t, cfg.k, cfg.tau) for t in tasks}
    return galleries, {t: (agg, mean_r1(evaluate_gallery(backbone, galleries[t], topk_delta_weights(lib, agg))))
                       for t, agg in conditions.items()}


def train_generator(lib: Library, encoder: SemanticEncoder, checkpoints_dir: str | Path, dataset: Dataset,
                    train_tasks: list[str], backbone: Backbone, cfg: CVAEConfig, val_tasks: list[str] = (),
                    eval_steps: tuple[int, ...] = (), progress: bool = True) -> Generator:
    """Fit the anchored generator with the retrieval objective on `train_tasks` (experts among them get
    leave-one-out conditions). If `val_tasks` are given, the mean R@1 gain of the prior-mean LoRA over
    Top-K (ΔW) on their CV_SPLIT images is logged at `eval_steps` into meta["history"] (per task), for
    cross-validation; it never selects a checkpoint."""
    if cfg.objective != "retrieval" or not cfg.anchor:
        raise SGLoRAError("train_generator trains the anchored retrieval generator: objective='retrieval', anchor=True")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    check_leave_one_out(lib, cfg.k)
    emb = dict(zip(train_tasks, encoder.encode([dataset.tasks[t].description for t in train_tasks])))
    clean = {t: task_condition(lib, emb[t], t, cfg.k, cfg.tau) for t in train_tasks}
    data = {t: task_train_data(backbone, lib.spec, dataset, t) for t in train_tasks}
    model = SemanticCVAE(lib.spec.size, len(lib.spec.blocks), cfg)
    X, MU, VAR = fit_standardisation(model, lib, clean, checkpoints_dir)
    if not cfg.correct_a:  # a zero scale pins the A entries to mu*'s, in training and in every export
        model.x_std[a_mask(lib.spec)] = 0.0
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    galleries, val = val_scores(backbone, dataset, lib, encoder, list(val_tasks), cfg) if val_tasks else ({}, {})

    def evaluate(step: int) -> dict:
        model.eval()
        row = {"step": step, "gain_vs_topk_dw": {}}
        with torch.no_grad():
            for t, (agg, topk_dw) in val.items():
                x = model.sample(torch.from_numpy(agg.mu), torch.from_numpy(agg.var), 1, use_mean=True)[0]
                r = mean_r1(evaluate_gallery(backbone, galleries[t], delta_weights(lib.spec, x)))
                row["gain_vs_topk_dw"][t] = r - topk_dw
        model.train()
        return row

    history = [evaluate(0)] if 0 in eval_steps and val else []
    losses = []
    with frozen(backbone.model):
        bar = tqdm(range(1, cfg.steps + 1), desc="generator", disable=not progress, unit="step")
        for step in bar:
            model.train()
            batch = rng.choice(len(train_tasks), size=min(cfg.tasks_per_step, len(train_tasks)), replace=False)
            total, parts = 0.0, []
            for i in batch:
                t = train_tasks[i]
                agg = jittered_condition(lib, emb[t], t, cfg, rng)
                loss, corr = retrieval_step_loss(model, lib.spec, backbone, data[t], agg, cfg, rng)
                total = total + (loss + cfg.correction_penalty * corr) / len(batch)
                parts.append([loss.item(), corr.item()])
            if cfg.recon_weight:
                rows = rng.choice(len(X), size=min(cfg.batch_size, len(X)), replace=False)
                total = total + cfg.recon_weight * model.losses(X[rows], MU[rows], VAR[rows])["loss"] / X.shape[1]
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss, corr = np.mean(parts, 0)
            if not np.isfinite(loss):
                raise TrainingDiverged(f"generator loss became {loss} at step {step}; lower --lr")
            losses.append([float(loss), float(corr)])
            bar.set_postfix(loss=f"{loss:.3f}", corr=f"{corr:.3f}")
            if val and step in eval_steps:
                history.append(evaluate(step))
    model.eval()
    meta = {"backbone": lib.backbone, "lora_spec": lib.spec.to_dict(), "semantic": lib.semantic,
            "config": cfg.to_dict(), "train_tasks": list(train_tasks), "val_tasks": sorted(val),
            "library_experts": lib.names, "n_rows": len(X), "history": history,
            "loss_curve": [losses[i] for i in range(0, len(losses), max(1, len(losses) // 50))],
            "seconds": round(time.time() - t0, 1)}
    return Generator(model, lib, encoder, meta)


def family_clusters(dataset: Dataset, tasks: list[str]) -> list[list[str]]:
    """The tasks grouped by their family (one group when the dataset has no families)."""
    if not all(dataset.tasks[t].family for t in tasks):
        return [sorted(tasks)]
    families = sorted({dataset.tasks[t].family for t in tasks})
    return [sorted(t for t in tasks if dataset.tasks[t].family == f) for f in families]


def cv_folds(dataset: Dataset, tasks: list[str], n_folds: int, seed: int = 0) -> list[list[str]]:
    """Folds over the seen tasks, stratified by family (each family's tasks dealt round-robin in a seeded order),
    so a held-out task keeps siblings in training, as an unseen task does at test time; every task in one fold."""
    if not 2 <= n_folds <= len(tasks):
        raise SGLoRAError(f"--folds must be between 2 and the {len(tasks)} seen tasks, got {n_folds}")
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    slot = 0
    for group in family_clusters(dataset, tasks):
        for i in rng.permutation(len(group)):
            folds[slot % n_folds].append(group[i])
            slot += 1
    return [sorted(f) for f in folds]


def crossvalidate(lib: Library, encoder: SemanticEncoder, checkpoints_dir: str | Path, dataset: Dataset,
                  seen_tasks: list[str], backbone: Backbone, cfg: CVAEConfig, n_folds: int,
                  eval_steps: tuple[int, ...], progress: bool = True) -> dict:
    """Per held-out seen task, the prior-mean LoRA's mean R@1 gain over Top-K (ΔW) on its val split at each
    of `eval_steps`, training on the other folds: {step: {task: gain}}."""
    out: dict[int, dict[str, float]] = {}
    cfg = replace(cfg, steps=max(cfg.steps, *eval_steps))  # the curve goes past the configured steps
    for fold in cv_folds(dataset, seen_tasks, n_folds, cfg.seed):
        train = [t for t in seen_tasks if t not in fold]
        gen = train_generator(lib, encoder, checkpoints_dir, dataset, train, backbone, cfg, val_tasks=fold,
                              eval_steps=eval_steps, progress=progress)
        for row in gen.meta["history"]:
            out.setdefault(row["step"], {}).update(row["gain_vs_topk_dw"])
    return out
