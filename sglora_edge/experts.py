"""Per-task LoRA training with the CLIP contrastive loss (expert LoRAs, and Oracle LoRAs of unseen tasks).

Text tower frozen (caption features computed once); only the LoRA vector trains.
Each epoch is one pass over the task's train images, each image paired with one
of its captions drawn at random, so a batch never holds the same image twice.
The LoRA of each of the last `keep_last` epochs is kept.
"""

from __future__ import annotations

import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime.artifacts import ArtifactError, load_artifact, save_artifact

from .backbone import Backbone
from .config import Executor, ExpertConfig, LoRASpec
from .data import Dataset
from .errors import SGLoRAError, TrainingDiverged
from .lora import a_mask, delta_weights, init_vector, visual_prefix, visual_suffix
from .losses import contrastive_loss

KIND = "expert-checkpoints"


def task_file(out: Path, task: str) -> Path:
    return Path(out) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', task)}.safetensors"


@dataclass
class TaskTrainData:
    """A task's train split ready for LoRA training: LoRA-independent activations entering the first
    adapted block (computed once), frozen caption features, and each image's caption ids."""
    acts: torch.Tensor
    text: torch.Tensor
    captions_of: list[list[int]]
    task_of: np.ndarray  # each image's index in the task list (one task: all 0)

    def batch(self, idx, rng: np.random.Generator) -> torch.Tensor:
        """One caption id drawn at random for each image in idx."""
        return torch.tensor([self.captions_of[i][rng.integers(len(self.captions_of[i]))] for i in idx])

    def loss(self, backbone: Backbone, spec: LoRASpec, idx, deltas, rng: np.random.Generator) -> torch.Tensor:
        """The contrastive loss of the images `idx` (one caption drawn for each) through the visual suffix adapted
        by `deltas`: the one training step every LoRA trainer (task, atoms, merge weights, generator) shares."""
        dev = backbone.model.logit_scale.device  # CPU, or the GPU a Ray worker moved its backbone to
        cap = self.batch(idx, rng).to(dev)
        ids = torch.as_tensor(idx, device=dev)
        feats = torch.nn.functional.normalize(visual_suffix(backbone.visual, self.acts[ids], spec.blocks[0], deltas),
                                              dim=-1)
        return contrastive_loss(feats, self.text[cap], backbone.model.logit_scale.exp().clamp(max=100).detach(),
                                cap, ids)


def task_train_data(backbone: Backbone, spec: LoRASpec, dataset: Dataset, tasks: str | list[str]) -> TaskTrainData:
    """The train pairs of one task (or of several pooled, for a multi-task LoRA)."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    pairs = [p for t in names for p in dataset.split_pairs("train", t)]
    if not pairs:
        raise SGLoRAError(f"task(s) {', '.join(map(repr, names))} have no 'train' pairs in {dataset.root}")
    images = sorted({p.image for p in pairs})
    image_id = {p: i for i, p in enumerate(images)}
    captions = sorted({p.caption for p in pairs})
    caption_id = {c: i for i, c in enumerate(captions)}
    captions_of = [[] for _ in images]
    task_of = np.zeros(len(images), dtype=np.int64)
    for p in pairs:
        captions_of[image_id[p.image]].append(caption_id[p.caption])
        task_of[image_id[p.image]] = names.index(p.task)
    with torch.no_grad():
        acts = visual_prefix(backbone.visual, backbone.load_images(images).to(backbone.model.logit_scale.device),
                             spec.blocks[0])
    return TaskTrainData(acts, backbone.encode_text(captions), captions_of, task_of)


def epoch_batches(task_of: np.ndarray, batch_size: int, by_task: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of image indices: a random permutation cut in batches, or (by_task) each task's images
    cut in batches of their own and the batches shuffled, so every contrastive negative is an image of the same
    task: the test is retrieval inside one class, and mixed-task batches make the negatives easy."""
    if not by_task:
        order = rng.permutation(len(task_of))
        return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
    batches = []
    for t in np.unique(task_of):
        idx = rng.permutation(np.flatnonzero(task_of == t))
        batches += [idx[lo:lo + batch_size] for lo in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_task(backbone: Backbone, spec: LoRASpec, dataset: Dataset, task: str | list[str], cfg: ExpertConfig,
               progress: bool = False, by_task: bool = False) -> tuple[np.ndarray, dict]:
    """Train one task's LoRA (a list of tasks: one LoRA on their pooled pairs, each batch from one task if
    `by_task`: epoch_batches); return (kept checkpoints [keep_last, P], info)."""
    t0 = time.time()
    data = task_train_data(backbone, spec, dataset, task)
    n_images = len(data.captions_of)
    dev = backbone.model.logit_scale.device

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vec = init_vector(spec).to(dev).requires_grad_(True)
    opt = torch.optim.AdamW([vec], lr=cfg.lr, weight_decay=cfg.weight_decay)
    is_a = a_mask(spec).to(dev)
    kept, losses = [], []
    for epoch in tqdm(range(cfg.epochs), desc=task if isinstance(task, str) else "multi-task", disable=not progress, leave=False):
        epoch_loss = []
        for idx in epoch_batches(data.task_of, cfg.batch_size, by_task, rng):
            loss = data.loss(backbone, spec, idx, delta_weights(spec, vec), rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.freeze_a:
                vec.grad[is_a] = 0
            opt.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
        if epoch >= cfg.epochs - cfg.keep_last:
            kept.append(vec.detach().clone())
    ckpts = torch.stack(kept).cpu().numpy()
    if not np.isfinite(ckpts).all():
        raise TrainingDiverged(f"task {task!r}: LoRA training diverged (NaN); lower --lr")
    return ckpts, {"loss_first": losses[0], "loss_last": losses[-1], "seconds": time.time() - t0,
                   "n_images": n_images, "n_captions": sum(map(len, data.captions_of)), "node": platform.node(),
                   "device": str(dev)}


def _finished(path: Path, meta_common: dict) -> dict | None:
    """The training info of a task file written with these exact settings, else None (retrain and replace)."""
    if not path.is_file():
        return None
    try:
        return load_artifact(path, kind=KIND, **meta_common)[1]["info"]
    except ArtifactError:
        return None


class ExecutorError(SGLoRAError):
    """Ray is missing or unreachable, or some tasks failed for good (the others are written)."""


_STATE: dict = {}  # in a worker process: (backbone, dataset), loaded on its first task and reused by the next


def run_task(backbone_spec: str, ident: str, data_root: str, spec: dict, cfg: dict, task: str, threads: int,
             device: str = "cpu") -> tuple[np.ndarray, dict]:
    """Train one task in a worker (a --jobs process or a Ray worker); the checkpoints go back to the driver."""
    torch.set_num_threads(threads)
    key = (backbone_spec, data_root, device)
    if key not in _STATE:
        from .backbone import create_backbone
        from .data import DatasetError, load_dataset
        _STATE.clear()
        bb = create_backbone(backbone_spec)
        if bb.ident != ident:  # e.g. a node without the shared filesystem holding another file at that path
            raise SGLoRAError(f"node {platform.node()} reads backbone {bb.ident} from {backbone_spec}, the driver "
                             f"{ident}; every node must read the same files (a shared filesystem)")
        try:
            ds = load_dataset(data_root, check_images="none")
        except DatasetError as e:  # re-raised as the plain root: DatasetError does not unpickle on the driver
            raise SGLoRAError(f"node {platform.node()}: {e}; every node must read the dataset at the driver's path "
                             f"(a shared filesystem)") from None
        bb.model.to(device)
        _STATE[key] = bb, ds
    bb, ds = _STATE[key]
    return train_task(bb, LoRASpec.from_dict(spec), ds, task, ExpertConfig(**cfg))


def _portable_spec(spec: str) -> str:
    """The backbone spec with an absolute weights path: Ray workers do not share the driver's cwd."""
    from .backbone import _is_path, parse_spec
    name, weights = parse_spec(spec)
    return f"open_clip:{name}@{Path(weights).resolve()}" if _is_path(weights) else spec


def _one_line(e: BaseException) -> str:
    e = getattr(e, "cause", None) or e  # a RayTaskError wraps the exception the task raised
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


# Each executor returns (how many tasks run at once, iterator of (task, (checkpoints, info) or exception)).
def _serial(backbone, spec, dataset, cfg, tasks):
    def results():
        for task in tasks:
            try:
                yield task, train_task(backbone, spec, dataset, task, cfg)
            except Exception as e:  # noqa: BLE001 - named at the end; the other tasks still train
                yield task, e
    return 1, results()


def _pool(args, tasks, jobs):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    jobs = min(jobs, len(tasks))
    threads = max(1, torch.get_num_threads() // jobs)  # oversubscribed OpenMP threads spin and crawl

    def results():
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_task, *args, t, threads): t for t in tasks}
            for f in as_completed(futures):
                yield futures[f], f.exception() or f.result()
    return jobs, results()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'sglora-edge[cluster]'") from None
    return ray


def _ray(ray, ex: Executor, args, tasks):
    """One Ray task per LoRA task."""
    import logging
    if not ray.is_initialized():  # stays up for later calls (reproduce trains several folders); closed at exit
        try:
            ray.init(address=ex.address, include_dashboard=False if ex.address is None else None,
                     logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ExecutorError(f"cannot join the Ray cluster at --ray-address {ex.address} ({_one_line(e)}); "
                                f"check `ray status` on a node, the Ray version and RAY_AUTH_MODE/token, or leave "
                                f"--ray-address out for a local instance") from None
    resources = ray.cluster_resources()
    gpus = ex.gpus_per_task if ex.gpus_per_task is not None else (1 if resources.get("GPU", 0) else 0)
    slots = min(int(resources.get("CPU", 0) // ex.cpus_per_task) if ex.cpus_per_task else len(tasks),
                int(resources.get("GPU", 0) // gpus) if gpus else len(tasks))
    remote = ray.remote(run_task).options(num_cpus=ex.cpus_per_task, num_gpus=gpus, max_retries=ex.max_retries,
                                          retry_exceptions=False)  # same seed, same exception: a rerun cannot help
    threads, device = max(1, int(ex.cpus_per_task)), "cuda" if gpus else "cpu"

    def results():
        refs = {remote.remote(*args, t, threads, device): t for t in tasks}
        waiting = list(refs)
        while waiting:
            (ref,), waiting = ray.wait(waiting, num_returns=1)
            try:
                yield refs[ref], ray.get(ref)
            except ray.exceptions.RayError as e:  # the task raised, or its worker died max_retries + 1 times
                yield refs[ref], e
    return slots, results()


def train_experts(backbone: Backbone, spec: LoRASpec, dataset: Dataset, tasks: list[str], out: str | Path,
                  cfg: ExpertConfig, progress: bool = True, jobs: int = 1, executor: Executor = Executor()
                  ) -> dict[str, dict]:
    """Train every task not already finished in OUT with the same settings (resumable, one file per task).

    Tasks train here, in `jobs` processes, or as Ray tasks (`executor`); every result comes back to
    this process, which writes the task's file atomically. Each task is seeded on its own, so the
    checkpoints do not depend on where it trained (bit-identical at the same torch thread count).
    Tasks that fail are named in one ExecutorError after the others are written."""
    out = Path(out)
    unknown = [t for t in tasks if t not in dataset.tasks]
    if unknown:
        raise SGLoRAError(f"unknown task(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(dataset.task_names()[:12])}...")
    ray = _import_ray() if executor.kind == "ray" else None
    meta_common = {"backbone": backbone.ident, "lora_spec": spec.to_dict(), "config": asdict(cfg)}
    done = {t: info for t in tasks if (info := _finished(task_file(out, t), meta_common)) is not None}
    pending = [t for t in tasks if t not in done]
    args = (_portable_spec(backbone.spec), backbone.ident, str(Path(dataset.root).resolve()), spec.to_dict(),
            asdict(cfg))
    if ray is not None and pending:
        slots, results = _ray(ray, executor, args, pending)
    elif jobs > 1 and len(pending) > 1:
        slots, results = _pool(args, pending, jobs)
    else:
        slots, results = _serial(backbone, spec, dataset, cfg, pending)
    failed: dict[str, BaseException] = {}
    bar = tqdm(total=len(tasks), initial=len(done), desc="experts", disable=not progress, unit="task")
    with bar:
        for n, (task, result) in enumerate(results, 1):
            if isinstance(result, BaseException):
                failed[task] = result
            else:
                ckpts, info = result
                save_artifact(task_file(out, task), {"lora": ckpts}, kind=KIND,
                              meta={**meta_common, "task": task, "role": dataset.tasks[task].role,
                                    "epochs": list(range(cfg.epochs - cfg.keep_last, cfg.epochs)), "info": info})
                done[task] = info
                bar.update(1)
            # "running" counts tasks in flight up to the slots the workers offer (the rest are queued)
            bar.set_postfix(running=min(slots, len(pending) - n), failed=len(failed))
    if failed:
        first = next(iter(failed.values()))
        raise ExecutorError(f"{len(failed)} of {len(pending)} task(s) failed, the others are in {out}: "
                            + "; ".join(f"{t!r} ({_one_line(e)})" for t, e in failed.items())
                            + "; fix the cause and rerun the same command to train only those") from first
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
