"""Pretrain a tiny CLIP from scratch on a dataset's `pretrain` split (the stand-in for web-scale pretraining)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from tqdm import tqdm

from runtime.artifacts import load_artifact, save_artifact, write_json

from ..config import PretrainConfig
from ..data import load_dataset
from ..errors import SGLoRAError
from ..losses import contrastive_loss
from . import BACKBONE_FILE, TINY_MODELS, create_backbone

CHECKPOINT_FILE = "checkpoint.safetensors"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = torch.from_numpy(value)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


P = PretrainConfig  # the defaults, written once there


def pretrain(data: str | Path, out: str | Path, config: str = P.config, epochs: int = P.epochs,
             batch_size: int = P.batch_size, lr: float = P.lr, weight_decay: float = P.weight_decay,
             seed: int = P.seed, checkpoint_every: int = P.checkpoint_every, resume: bool = True,
             max_steps: int | None = None, progress: bool = True) -> dict:
    """Train `config` from scratch with the contrastive loss; write OUT/backbone.safetensors + pretrain.json.

    Batches come from a seeded permutation per epoch, so a resumed run sees the same batches.
    """
    if config not in TINY_MODELS:
        raise SGLoRAError(f"--config {config!r} is not a tiny model shipped here ({', '.join(TINY_MODELS)}); "
                          f"real backbones (ViT-B-16) come pretrained: pass --backbone open_clip:ViT-B-16@openai")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data)
    pairs = ds.split_pairs("pretrain")
    if not pairs:
        raise SGLoRAError(f"{data}: has no 'pretrain' pairs to train a backbone on")
    t0 = time.time()
    backbone = create_backbone(f"open_clip:{config}@random", seed=seed)
    model = backbone.model
    batches = PretrainData.load(backbone, pairs, batch_size, seed)
    load_s = time.time() - t0

    total = epochs * batches.steps_per_epoch if max_steps is None else max_steps
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    run_config = {"config": config, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                  "weight_decay": weight_decay, "seed": seed, "total_steps": total, "data": str(Path(data))}
    checkpoint = Checkpoint(out / CHECKPOINT_FILE, model, opt, schedule, run_config)
    step, history = checkpoint.load() if resume and checkpoint.path.is_file() else (0, [])
    history = _train(checkpoint, batches, step=step, total=total, history=history, every=checkpoint_every,
                     progress=progress)
    model.eval()
    train_s = time.time() - t0 - load_s
    report = {"model_name": config, "steps": total, "pairs": len(pairs), "images": batches.n_images,
              "final_loss": history[-1][1] if history else None, "first_loss": history[0][1] if history else None,
              "seconds_train": round(train_s, 1), "seconds_load": round(load_s, 1), "run_config": run_config,
              "open_clip_version": open_clip.__version__, "history": history}
    # state dict keys exactly as open_clip names them, so plain open_clip.create_model(..., pretrained=PATH) loads it
    save_artifact(out / BACKBONE_FILE, model.state_dict(), kind="backbone",
                  meta={k: v for k, v in report.items() if k != "history"})
    write_json(out / "pretrain.json", report)
    checkpoint.path.unlink(missing_ok=True)
    return report


@dataclass
class PretrainData:
    """Every pretrain image and caption loaded once; the pairs as indices into them; the seeded batch order."""
    images: torch.Tensor
    tokens: torch.Tensor
    pair_image: torch.Tensor
    pair_text: torch.Tensor
    n_images: int
    batch_size: int
    seed: int

    @classmethod
    def load(cls, backbone, pairs: list, batch_size: int, seed: int) -> "PretrainData":
        image_paths = sorted({p.image for p in pairs})
        image_index = {p: i for i, p in enumerate(image_paths)}
        texts = sorted({p.caption for p in pairs})
        text_index = {t: i for i, t in enumerate(texts)}
        return cls(backbone.load_images(image_paths), backbone.tokenizer(texts),
                   torch.tensor([image_index[p.image] for p in pairs]),
                   torch.tensor([text_index[p.caption] for p in pairs]), len(image_paths), batch_size, seed)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.pair_image) / self.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image ids, text ids) of a step: a seeded permutation per epoch, so a resumed run sees the same."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = torch.from_numpy(np.random.default_rng(self.seed * 100_003 + epoch).permutation(len(self.pair_image)))
        idx = order[offset * self.batch_size:(offset + 1) * self.batch_size]
        return self.pair_image[idx], self.pair_text[idx]


@dataclass
class Checkpoint:
    """The model, optimizer and schedule mid-run, resumed only under the same settings."""
    path: Path
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    schedule: object
    run_config: dict

    def load(self) -> tuple[int, list]:
        config = self.run_config["config"]
        tensors, meta = load_artifact(self.path, kind="pretrain-checkpoint", model_name=config)
        if meta["run_config"] != self.run_config:
            raise SGLoRAError(f"{self.path}: was written with other settings ({meta['run_config']}); "
                              f"delete it or pass the same settings to resume")
        self.model.load_state_dict({k[6:]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer(self.opt, tensors, meta)
        self.schedule.load_state_dict(meta["schedule"])
        return meta["step"], meta["history"]

    def save(self, step: int, history: list) -> None:
        opt_tensors, opt_meta = _optimizer_tensors(self.opt)
        save_artifact(self.path, {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, **opt_tensors},
                      kind="pretrain-checkpoint",
                      meta={"model_name": self.run_config["config"], "step": step, "history": history,
                            "run_config": self.run_config, "schedule": self.schedule.state_dict(), **opt_meta})


def _train(checkpoint: Checkpoint, batches: PretrainData, step: int, total: int, history: list, every: int,
           progress: bool) -> list:
    """Steps from `step` to `total`, checkpointed every `every` steps; returns the loss history ([step, mean loss]
    every 10 steps)."""
    model, opt, schedule = checkpoint.model, checkpoint.opt, checkpoint.schedule
    model.train()
    bar = tqdm(total=total, initial=step, desc=f"pretrain {checkpoint.run_config['config']}", disable=not progress,
               unit="step")
    running = []
    while step < total:
        img_ids, txt_ids = batches.batch(step)
        img_f = model.encode_image(batches.images[img_ids], normalize=True)
        txt_f = model.encode_text(batches.tokens[txt_ids], normalize=True)
        loss = contrastive_loss(img_f, txt_f, model.logit_scale.exp().clamp(max=100), txt_ids, img_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        step += 1
        running.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(running[-20:]):.3f}")
        if step % 10 == 0 or step == total:
            history.append([step, float(np.mean(running[-10:]))])
        if step % every == 0 and step < total:
            checkpoint.save(step, history)
    bar.close()
    return history
