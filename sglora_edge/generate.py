"""Training the semantic CVAE and generating LoRAs from a description.

Python API (the CLI only wraps it):

    lib = Library.load("runs/library.safetensors")
    gen = Generator.load("runs/cvae.safetensors", lib, backbone)      # backbone: for retrieval / text tower
    loras, why = gen.generate("a photo of a persian", samples=5, seed=0)
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime.aggregate import Aggregation
from runtime.lora import stack_topk, stacked_spec

from runtime.artifacts import ArtifactError, load_artifact, save_artifact

from .backbone import Backbone
from .conditions import augmented_conditions, check_leave_one_out, task_condition
from .config import CVAEConfig, LoRASpec
from .cvae import SemanticCVAE
from .data import Dataset
from .errors import SGLoRAError, TrainingDiverged
from .experts import load_checkpoints
from .library import Library, SemanticEncoder
from .lora import delta_weights
from .metrics import mean_r1
from .retrieval import evaluate_gallery, prepare_gallery

KIND = "semantic-cvae"


@dataclass
class Generator:
    cvae: SemanticCVAE
    library: Library
    encoder: SemanticEncoder
    meta: dict

    @property
    def spec(self) -> LoRASpec:
        return self.library.spec

    def condition(self, description: str, exclude=()) -> Aggregation:
        cfg = self.cvae.cfg
        if cfg.k > len(self.library) - len(set(exclude) & set(self.library.names)):
            raise SGLoRAError(f"the CVAE was trained with K={cfg.k}, but the library has only "
                              f"{len(self.library)} expert(s) available; add experts or retrain with a smaller --k")
        return self.library.aggregate(self.encoder.encode([description])[0], k=cfg.k, tau=cfg.tau,
                                      exclude=set(exclude))

    def generate(self, description: str, samples: int = 1, seed: int = 0, use_mean: bool = False,
                 exclude=()) -> tuple[np.ndarray, Aggregation]:
        """[samples, P] LoRA vectors for a description, and the aggregation that conditioned them."""
        if samples < 1:
            raise SGLoRAError(f"--samples must be >= 1, got {samples}")
        agg = self.condition(description, exclude)
        self.cvae.eval()
        x = self.cvae.sample(torch.from_numpy(agg.mu), torch.from_numpy(agg.var), samples,
                             torch.Generator().manual_seed(seed), use_mean=use_mean)
        return x.numpy(), agg

    def save(self, path: str | Path) -> None:
        save_artifact(path, self.cvae.state_dict(), kind=KIND, meta=self.meta)

    @classmethod
    def load(cls, path: str | Path, library: Library, backbone: Backbone | None = None,
             encoder: SemanticEncoder | None = None) -> "Generator":
        """encoder: default, the library's own kind (MiniLM or the backbone's text tower)."""
        tensors, meta = load_artifact(path, kind=KIND)
        for key, lib_value in (("backbone", library.backbone), ("lora_spec", library.spec.to_dict()),
                               ("semantic", library.semantic)):
            if meta[key] != lib_value:
                raise ArtifactError(f"{path} was trained with {key} {meta[key]!r} but the library has "
                                    f"{lib_value!r}; use a library and CVAE built on the same {key}")
        if backbone is not None and backbone.ident != library.backbone:
            raise ArtifactError(f"library and CVAE were built on {library.backbone}, not on {backbone.ident}")
        cfg = CVAEConfig(**meta["config"])
        cvae = SemanticCVAE(library.spec.size, len(library.spec.blocks), cfg)
        cvae.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
        return cls(cvae.eval(), library, encoder or SemanticEncoder(library.semantic_kind, backbone), meta)


@dataclass
class TopKMerge:
    """The Top-K (ΔW) merge as a generator: Σ α_k γ B_k A_k over the description's top-K experts, returned as one
    LoRA of rank K·r (runtime.lora.stack_topk, the same numpy the device runs) in `spec` = the library's spec
    stacked K times. Deterministic: one LoRA however many samples are asked (identical draws would only repeat
    the same work). The product's default when no trained generator
    beats it on validation (docs/ARCHITECTURE.md)."""
    library: Library
    encoder: SemanticEncoder
    k: int
    tau: float

    @property
    def spec(self) -> LoRASpec:
        return LoRASpec.from_dict(stacked_spec(self.library.spec.to_dict(), self.k))

    @property
    def meta(self) -> dict:
        # the library's own cache key where it has one (its recipe: retrained atoms or clusters keep their names)
        return {"key": f"topk_dw:k{self.k}:tau{self.tau}:{','.join(self.library.names)}:{self.library.info.get('key')}"}

    def generate(self, description: str, samples: int = 1, seed: int = 0, use_mean: bool = False,
                 exclude=()) -> tuple[np.ndarray, Aggregation]:
        if samples < 1:
            raise SGLoRAError(f"--samples must be >= 1, got {samples}")
        agg = self.library.aggregate(self.encoder.encode([description])[0], k=self.k, tau=self.tau,
                                     exclude=set(exclude))
        top = [self.library.names.index(n) for n in agg.experts]
        vec = stack_topk(self.library.spec.to_dict(), self.library.mu[top], agg.weights, self.k)
        return vec[None], agg


def split_validation_tasks(tasks: list[str], fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out a seeded fraction of the train-role tasks (at least one) for early stopping."""
    if len(tasks) < 2:
        return list(tasks), []
    order = np.random.default_rng(seed).permutation(len(tasks))
    n_val = max(1, int(round(fraction * len(tasks))))
    val = sorted(tasks[i] for i in order[:n_val])
    return sorted(set(tasks) - set(val)), val


def cvae_rows(lib: Library, emb: dict, checkpoints_dir: str | Path, train_tasks: list[str], cfg: CVAEConfig,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """The CVAE's training rows: every kept checkpoint of the train tasks (X), its task's leave-one-out condition
    (MU, VAR), and the task's augmented conditions (cfg.cond_aug)."""
    xs, conds, aug = [], [], []
    for t in train_tasks:
        ck = load_checkpoints(checkpoints_dir, t, lib.backbone, lib.spec)
        agg = task_condition(lib, emb[t], t, cfg.k, cfg.tau)
        extra = augmented_conditions(lib, emb[t], t, cfg.k, cfg.tau, 8, rng) if cfg.cond_aug > 0 else []
        for x in ck:
            xs.append(x)
            conds.append((agg.mu, agg.var))
            aug.append(extra)
    if not xs:
        raise SGLoRAError("no training checkpoints: train the train-role tasks first (`sglora-edge train-experts`)")
    return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack([c[0] for c in conds])),
            torch.from_numpy(np.stack([c[1] for c in conds])), aug)


def cvae_epoch(model: SemanticCVAE, opt, X, MU, VAR, aug: list, cfg: CVAEConfig, rng: np.random.Generator
               ) -> tuple[float, float, float]:
    """One pass over the rows in shuffled batches (a row's condition swapped for an augmented one with probability
    cfg.cond_aug); the epoch's mean (loss, recon, kl)."""
    order = rng.permutation(len(X))
    totals = []
    for lo in range(0, len(order), cfg.batch_size):
        idx = order[lo:lo + cfg.batch_size]
        mu, var = MU[idx].clone(), VAR[idx].clone()
        if cfg.cond_aug > 0:
            for j, i in enumerate(idx):
                if aug[i] and rng.random() < cfg.cond_aug:
                    a = aug[i][rng.integers(len(aug[i]))]
                    mu[j], var[j] = torch.from_numpy(a.mu), torch.from_numpy(a.var)
        out = model.losses(X[idx], mu, var)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        totals.append([out["loss"].item(), out["recon"].item(), out["kl"].item()])
    return tuple(np.mean(totals, 0))


def train_cvae(lib: Library, encoder: SemanticEncoder, checkpoints_dir: str | Path, dataset: Dataset,
               train_tasks: list[str], val_tasks: list[str], backbone: Backbone, cfg: CVAEConfig,
               progress: bool = True) -> Generator:
    """Fit the CVAE on every kept checkpoint of `train_tasks`; early-stop on `val_tasks`' retrieval (val split)."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    check_leave_one_out(lib, cfg.k)
    descs = {t: dataset.tasks[t].description for t in train_tasks + val_tasks}
    emb = dict(zip(descs, encoder.encode(list(descs.values()))))
    X, MU, VAR, aug = cvae_rows(lib, emb, checkpoints_dir, train_tasks, cfg, rng)
    model = SemanticCVAE(lib.spec.size, len(lib.spec.blocks), cfg)
    model.fit_statistics(model.target(X, MU), MU, VAR)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    galleries = {t: prepare_gallery(backbone, dataset, t, "val") for t in val_tasks if dataset.split_pairs("val", t)}
    val_conds = {t: task_condition(lib, emb[t], t, cfg.k, cfg.tau) for t in galleries}

    def val_score() -> float:
        model.eval()
        scores = []
        for t, g in galleries.items():
            c = val_conds[t]
            x = model.sample(torch.from_numpy(c.mu), torch.from_numpy(c.var), 1, use_mean=True)[0]
            r = evaluate_gallery(backbone, g, delta_weights(lib.spec, x))
            scores.append(mean_r1(r))
        model.train()
        return float(np.mean(scores))

    history, best, best_state, best_epoch, stale = [], -np.inf, None, 0, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="cvae", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        loss, recon, kl = cvae_epoch(model, opt, X, MU, VAR, aug, cfg, rng)
        if not np.isfinite(loss):
            raise TrainingDiverged(f"CVAE loss became {loss} at epoch {epoch}; lower --lr or use --recon mean")
        row = {"epoch": epoch, "loss": float(loss), "recon": float(recon), "kl": float(kl)}
        if galleries and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            row["val_r1"] = val_score()
            if row["val_r1"] > best:
                best, best_state, best_epoch, stale = row["val_r1"], copy.deepcopy(model.state_dict()), epoch, 0
            else:
                stale += 1
        history.append(row)
        bar.set_postfix(loss=f"{loss:.1f}", kl=f"{kl:.2f}", val=f"{best:.1f}")
        if galleries and stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = history[-1]["epoch"]
    model.eval()
    with torch.no_grad():
        kl_per_dim = model.losses(X, MU, VAR)["kl_per_dim"].tolist()
    meta = {"backbone": lib.backbone, "lora_spec": lib.spec.to_dict(), "semantic": lib.semantic,
            "config": cfg.to_dict(), "train_tasks": train_tasks, "val_tasks": sorted(galleries),
            "library_experts": lib.names, "n_rows": len(X), "best_epoch": best_epoch,
            "best_val_r1": None if best == -np.inf else best, "history": history,
            "kl_per_latent_dim": kl_per_dim, "active_latent_dims": int(sum(v > 0.01 for v in kl_per_dim)),
            "seconds": round(time.time() - t0, 1)}
    return Generator(model, lib, encoder, meta)

