"""Per-task LoRA training with the CLIP contrastive loss (expert LoRAs, and Oracle LoRAs of unseen tasks).

Text tower frozen (caption features computed once); only the LoRA vector trains.
Each epoch is one pass over the task's train images, each image paired with one
of its captions drawn at random, so a batch never holds the same image twice.
The LoRA of each of the last `keep_last` epochs is kept.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import ArtifactError, load_artifact, save_artifact
from .backbone import Backbone
from .config import ExpertConfig, LoRASpec
from .data import Dataset
from .errors import SGLoRAError, TrainingDiverged
from .lora import a_mask, delta_weights, init_vector, visual_prefix, visual_suffix
from .losses import contrastive_loss

KIND = "expert-checkpoints"


def task_file(out: Path, task: str) -> Path:
    return Path(out) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', task)}.safetensors"


def train_task(backbone: Backbone, spec: LoRASpec, dataset: Dataset, task: str, cfg: ExpertConfig,
               progress: bool = False) -> tuple[np.ndarray, dict]:
    """Train one task's LoRA; return (kept checkpoints [keep_last, P], info)."""
    pairs = dataset.split_pairs("train", task)
    if not pairs:
        raise SGLoRAError(f"task {task!r} has no 'train' pairs in {dataset.root}")
    t0 = time.time()
    images = sorted({p.image for p in pairs})
    image_id = {p: i for i, p in enumerate(images)}
    captions = sorted({p.caption for p in pairs})
    caption_id = {c: i for i, c in enumerate(captions)}
    captions_of = [[] for _ in images]
    for p in pairs:
        captions_of[image_id[p.image]].append(caption_id[p.caption])
    visual = backbone.visual
    first = spec.blocks[0]
    with torch.no_grad():
        acts = visual_prefix(visual, backbone.load_images(images), first)  # LoRA-independent, computed once
    text = backbone.encode_text(captions)
    scale = backbone.model.logit_scale.exp().clamp(max=100).detach()

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vec = init_vector(spec).requires_grad_(True)
    opt = torch.optim.AdamW([vec], lr=cfg.lr, weight_decay=cfg.weight_decay)
    is_a = a_mask(spec)
    kept, losses = [], []
    for epoch in tqdm(range(cfg.epochs), desc=task, disable=not progress, leave=False):
        order = rng.permutation(len(images))
        epoch_loss = []
        for lo in range(0, len(order), cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]
            cap = torch.tensor([captions_of[i][rng.integers(len(captions_of[i]))] for i in idx])
            feats = torch.nn.functional.normalize(visual_suffix(visual, acts[idx], first, delta_weights(spec, vec)),
                                                  dim=-1)
            loss = contrastive_loss(feats, text[cap], scale, cap, torch.as_tensor(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.freeze_a:
                vec.grad[is_a] = 0
            opt.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
        if epoch >= cfg.epochs - cfg.keep_last:
            kept.append(vec.detach().clone())
    ckpts = torch.stack(kept).numpy()
    if not np.isfinite(ckpts).all():
        raise TrainingDiverged(f"task {task!r}: LoRA training diverged (NaN); lower --lr")
    return ckpts, {"loss_first": losses[0], "loss_last": losses[-1], "seconds": time.time() - t0,
                   "n_images": len(images), "n_captions": len(pairs)}


def _finished(path: Path, meta_common: dict) -> dict | None:
    """The training info of a task file written with these exact settings, else None (retrain and replace)."""
    if not path.is_file():
        return None
    try:
        return load_artifact(path, kind=KIND, **meta_common)[1]["info"]
    except ArtifactError:
        return None


def _train_and_save(backbone, spec, dataset, task, cfg, out, meta_common) -> dict:
    ckpts, info = train_task(backbone, spec, dataset, task, cfg)
    save_artifact(task_file(out, task), {"lora": ckpts}, kind=KIND,
                  meta={**meta_common, "task": task, "role": dataset.tasks[task].role,
                        "epochs": list(range(cfg.epochs - cfg.keep_last, cfg.epochs)), "info": info})
    return info


def _worker(backbone_spec: str, data_root: str, spec: dict, cfg: dict, out: str, tasks: list[str],
            threads: int) -> dict[str, dict]:
    """One process of `train_experts(jobs>1)`: its own backbone, dataset and thread budget."""
    from .backbone import create_backbone
    from .data import load_dataset
    torch.set_num_threads(threads)
    bb, ds = create_backbone(backbone_spec), load_dataset(data_root, check_images="none")
    lora_spec, config = LoRASpec.from_dict(spec), ExpertConfig(**cfg)
    meta_common = {"backbone": bb.ident, "lora_spec": spec, "config": cfg}
    return {t: _train_and_save(bb, lora_spec, ds, t, config, Path(out), meta_common) for t in tasks}


def train_experts(backbone: Backbone, spec: LoRASpec, dataset: Dataset, tasks: list[str], out: str | Path,
                  cfg: ExpertConfig, progress: bool = True, jobs: int = 1) -> dict[str, dict]:
    """Train every task not already finished in OUT with the same settings (resumable, one file per task).

    jobs > 1 trains tasks in that many processes, splitting the cores between them (each task is
    seeded on its own, so results do not depend on which process trains it)."""
    out = Path(out)
    unknown = [t for t in tasks if t not in dataset.tasks]
    if unknown:
        raise SGLoRAError(f"unknown task(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(dataset.task_names()[:12])}...")
    meta_common = {"backbone": backbone.ident, "lora_spec": spec.to_dict(), "config": asdict(cfg)}
    done = {t: info for t in tasks if (info := _finished(task_file(out, t), meta_common)) is not None}
    pending = [t for t in tasks if t not in done]
    bar = tqdm(total=len(tasks), initial=len(done), desc="experts", disable=not progress, unit="task")
    if jobs > 1 and len(pending) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        jobs = min(jobs, len(pending))
        threads = max(1, torch.get_num_threads() // jobs)  # oversubscribed OpenMP threads spin and crawl
        chunks = [pending[i::jobs] for i in range(jobs)]
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, backbone.spec, str(dataset.root), spec.to_dict(), asdict(cfg), str(out),
                                   chunk, threads) for chunk in chunks]
            for f in as_completed(futures):
                done.update(f.result())
                bar.update(len(f.result()))
    else:
        for task in pending:
            info = _train_and_save(backbone, spec, dataset, task, cfg, out, meta_common)
            done[task] = info
            bar.update(1)
            bar.set_postfix(task=task[:16], loss=f"{info['loss_last']:.3f}")
    bar.close()
    return {t: done[t] for t in tasks}


def load_checkpoints(out: str | Path, task: str, backbone: str | None = None, spec: LoRASpec | None = None
                     ) -> np.ndarray:
    """Kept LoRA checkpoints [M, P] of one task, checked against the backbone and spec in use."""
    tensors, _ = load_artifact(trained_task_file(out, task), kind=KIND, backbone=backbone,
                               lora_spec=spec.to_dict() if spec else None)
    return tensors["lora"]


def trained_task_file(out: str | Path, task: str) -> Path:
    """The checkpoint file of a task, or the error that says how to train it."""
    path = task_file(out, task)
    if not path.is_file():
        raise ArtifactError(f"no LoRA checkpoints for task {task!r} in {out} (expected {path.name}); "
                            f"train them with `sglora-edge train-experts --tasks {task!r}`")
    return path
