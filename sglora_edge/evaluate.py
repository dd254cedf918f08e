"""The paper's methods and baselines on unseen tasks, the testbed validity checks, and paired statistics.

Every method is a LoRA (or none) applied to the same frozen backbone and evaluated on
each unseen task's own test gallery (retrieval within one class, as in the paper).
The headline number per task is mean R@1 = (i2t R@1 + t2i R@1) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbone import Backbone
from .config import ExpertConfig, LoRASpec
from .data import Dataset
from .generate import Generator
from .library import Library, SemanticEncoder
from .lora import delta_weights
from .methods import BY_NAME, COMPARED_WITH, METHODS
from .metrics import mean_r1, mean_recalls, paired, recall_at_k
from .retrieval import (PreparedGallery, average_galleries, evaluate_galleries, gallery_image_features,
                        prepare_galleries)




def average_runs(runs: list[dict]) -> dict:
    """Recalls (and per-gallery mean R@1) averaged over runs of one method on one task (samples, seeds)."""
    out = mean_recalls(runs)
    if all("gallery_r1" in r for r in runs):
        out["gallery_r1"] = np.mean([r["gallery_r1"] for r in runs], axis=0).tolist()
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr
    return float(spearmanr(x, y).statistic)


@dataclass
class Evaluator:
    """Caches each task's prepared gallery; evaluates LoRA vectors or ΔW merges on it."""
    backbone: Backbone
    dataset: Dataset
    split: str = "test"
    first_block: int = 0
    gallery_size: int | None = None  # the split as disjoint galleries of this many images (None: one gallery)
    _galleries: dict = field(default_factory=dict)

    def galleries(self, task: str) -> list[PreparedGallery]:
        if task not in self._galleries:
            self._galleries[task] = prepare_galleries(self.backbone, self.dataset, task, self.split,
                                                      self.first_block, self.gallery_size)
        return self._galleries[task]

    def deltas(self, task: str, deltas) -> dict:
        return evaluate_galleries(self.backbone, self.galleries(task), deltas)

    def vector(self, task: str, spec: LoRASpec, vec) -> dict:
        return self.deltas(task, delta_weights(spec, torch.as_tensor(np.asarray(vec, dtype=np.float32))))

    def ensemble(self, task: str, spec: LoRASpec, vecs) -> tuple[list[dict], dict]:
        """Recalls of each LoRA, and of the normalised mean of their image features (one pass per gallery each)."""
        deltas = [delta_weights(spec, torch.as_tensor(np.asarray(v, dtype=np.float32))) for v in vecs]
        per_lora, pooled = [[] for _ in vecs], []
        for g in self.galleries(task):
            feats = [gallery_image_features(self.backbone, g, d) for d in deltas]
            score = lambda f: recall_at_k((f @ g.text_features.T).numpy(), g.positive)
            for i, f in enumerate(feats):
                per_lora[i].append(score(f))
            pooled.append(score(torch.nn.functional.normalize(torch.stack(feats).mean(0), dim=-1)))
        return [average_galleries(r) for r in per_lora], average_galleries(pooled)


def unrelated_description(dataset: Dataset, task: str, rng: np.random.Generator) -> str:
    """A description of another task, from another family when families are known (the control)."""
    me = dataset.tasks[task]
    others = [t for t in dataset.task_names() if t != task and
              (me.family is None or dataset.tasks[t].family != me.family) and dataset.tasks[t].domain == me.domain]
    others = others or [t for t in dataset.task_names() if t != task]
    return dataset.tasks[others[rng.integers(len(others))]].description


@dataclass
class Setting:
    """What the methods of one setting share: the expert library and how it is queried, the generators
    (method prefix -> Generator: "sglora" the product's default, "sglora_paper" the paper's CVAE,
    "sglora_retrieval" the retrieval-trained one; the default is one of the other two, evaluated once), and
    the seen-task baselines' inputs (`seen`: a library over experts and train tasks, the LoRAs the
    generator saw; `multi_task`: one LoRA trained on every seen task pooled, `multi_task_by_task` the same with
    task-homogeneous batches; `family_pooled`: family -> one LoRA trained jointly on the family's seen tasks, an
    oracle row since it is routed by the true family)."""
    library: Library
    encoder: SemanticEncoder
    experts_dir: Path
    k: int
    tau: float
    generators: dict[str, Generator] = field(default_factory=dict)
    seen: Library | None = None
    multi_task: np.ndarray | None = None
    multi_task_by_task: np.ndarray | None = None
    family_pooled: dict[str, np.ndarray] | None = None
    merge_ceiling: ExpertConfig | None = None  # the recipe fitting the merge_ceiling row's weights (oracle)


class Task:
    """One unseen task as every method sees it: its description, the condition's aggregation, and the generators'
    samples (each generator evaluated once per description, shared by the rows that read it)."""

    def __init__(self, ev: Evaluator, st: Setting, task: str, samples: int, seed: int):
        self.ev, self.st, self.name, self.samples, self.seed = ev, st, task, samples, seed
        self.lib, self.spec = st.library, st.library.spec
        self.desc = ev.dataset.tasks[task].description
        self.emb = st.encoder.encode([self.desc])[0]
        self.agg = self.lib.aggregate(self.emb, k=st.k, tau=st.tau)
        self.top = np.array([self.lib.names.index(n) for n in self.agg.experts])
        self._memo: dict = {}

    def vector(self, vec) -> dict:
        return self.ev.vector(self.name, self.spec, vec)

    def deltas(self, deltas) -> dict:
        return self.ev.deltas(self.name, deltas)

    def sampled(self, gen: Generator, description: str | None = None) -> tuple[dict, dict]:
        """(recalls averaged over samples + 'sample_r1', recalls of the samples' averaged image features)."""
        description = description or self.desc
        if (id(gen), description) not in self._memo:
            vecs, _ = gen.generate(description, samples=self.samples, seed=self.seed)
            rs, pooled = self.ev.ensemble(self.name, gen.spec, vecs)
            self._memo[id(gen), description] = ({**average_runs(rs), "sample_r1": [mean_r1(r) for r in rs]}, pooled)
        return self._memo[id(gen), description]

    def prior_mean(self, gen: Generator) -> dict:
        if (id(gen), "mean") not in self._memo:
            self._memo[id(gen), "mean"] = self.ev.vector(self.name, gen.spec, gen.generate(self.desc, use_mean=True)[0][0])
        return self._memo[id(gen), "mean"]

    def random_description(self) -> dict | None:
        gen = self.st.generators.get("sglora")
        if gen is None:
            return None
        other = unrelated_description(self.ev.dataset, self.name,
                                      np.random.default_rng([self.seed, len(self.name), ord(self.name[0])]))
        return {**self.sampled(gen, other)[0], "description": other}


def method_results(ev: Evaluator, st: Setting, task: str, samples: int, seed: int,
                   methods=METHODS) -> tuple[dict[str, dict], dict]:
    """Recalls of `methods` on one unseen task (those whose inputs the setting has), and the Top-K explanation
    of its condition. Stochastic methods: mean over samples + 'sample_r1' list."""
    t = Task(ev, st, task, samples, seed)
    out = {}
    for m in methods:
        result = BY_NAME[m].run(t)
        if result is not None:
            out[m] = result
    return out, t.agg.explain()


def summarise(per_task: dict[str, dict], methods=METHODS) -> tuple[dict, list[dict]]:
    """Method means over tasks with paired SE of the gain vs zero-shot; pairwise comparisons for SG-LoRA."""
    tasks = sorted(per_task)
    summary = {}
    zs = [mean_r1(per_task[t]["zero_shot"]) for t in tasks]
    for m in methods:
        if not all(m in per_task[t] for t in tasks):
            continue
        rows = {t: per_task[t][m] for t in tasks}
        s = mean_recalls(rows)
        scores = [mean_r1(rows[t]) for t in tasks]
        gain, se = paired(scores, zs)
        s.update(mean_r1=float(np.mean(scores)), gain=gain, gain_se=se, n_tasks=len(tasks))
        if "sample_r1" in rows[tasks[0]]:
            # spread over samples: std over samples of the task-mean score
            # pooled rotations may mix generators drawing different numbers of samples (a TopKMerge draws one)
            n = min(len(rows[t]["sample_r1"]) for t in tasks)
            per_sample = np.array([rows[t]["sample_r1"][:n] for t in tasks])  # [tasks, samples]
            s.update(sample_std_r1=float(per_sample.mean(0).std(ddof=1)) if per_sample.shape[1] > 1 else 0.0,
                     samples=int(per_sample.shape[1]))
        summary[m] = s
    comparisons = []
    for a in ("sglora", "sglora_mean"):
        for b in COMPARED_WITH:
            if a in summary and b in summary:
                diff, se = paired([mean_r1(per_task[t][a]) for t in tasks], [mean_r1(per_task[t][b]) for t in tasks])
                comparisons.append({"a": a, "b": b, "diff": diff, "se": se,
                                    "within_noise": bool(not np.isfinite(se) or abs(diff) <= 2 * se)})
    return summary, comparisons


def transfer_matrix(ev: Evaluator, lib: Library, encoder: SemanticEncoder, tasks: list[str]) -> dict:
    """Each expert's mean LoRA on each task: gain over zero-shot (mean R@1) and description similarity."""
    zs = {t: mean_r1(ev.deltas(t, None)) for t in tasks}
    task_emb = encoder.encode([ev.dataset.tasks[t].description for t in tasks])
    sim = task_emb @ lib.embeddings.T  # [T, E], unit vectors
    gain = np.full((len(lib), len(tasks)), np.nan)
    for e, name in enumerate(lib.names):
        for j, t in enumerate(tasks):
            if t != name:
                gain[e, j] = mean_r1(ev.vector(t, lib.spec, lib.mu[e])) - zs[t]
    return {"experts": lib.names, "tasks": tasks, "gain": gain.tolist(), "similarity": sim.T.tolist()}


def validity(per_task_oracle: dict[str, tuple[float, float]], matrix: dict, dataset: Dataset) -> dict:
    """Can this testbed rank methods? Oracle gain, within/across-family transfer, Spearman(similarity, gain)."""
    tasks = sorted(per_task_oracle)
    gain, se = paired([per_task_oracle[t][1] for t in tasks], [per_task_oracle[t][0] for t in tasks])
    g = np.array(matrix["gain"], dtype=np.float64)
    s = np.array(matrix["similarity"], dtype=np.float64)
    fam = lambda n: dataset.tasks[n].family
    dom = lambda n: dataset.tasks[n].domain
    within, across = [], []
    have_families = all(fam(n) is not None for n in matrix["experts"] + matrix["tasks"])
    quartile = np.nanpercentile(s, 75) if not have_families else None
    for e, en in enumerate(matrix["experts"]):
        for j, tn in enumerate(matrix["tasks"]):
            if np.isnan(g[e, j]) or dom(en) != dom(tn):
                continue
            close = fam(en) == fam(tn) if have_families else s[e, j] >= quartile
            (within if close else across).append(g[e, j])
    ok = ~np.isnan(g)
    rho = spearman(s[ok], g[ok]) if ok.sum() > 2 else float("nan")
    stat = lambda xs: (float(np.mean(xs)) if xs else float("nan"),
                       float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else float("nan"), len(xs))
    w_mean, w_se, w_n = stat(within)
    a_mean, a_se, a_n = stat(across)
    oracle_ok = gain > 2 * se
    transfer_ok = w_mean > a_mean and w_mean > 0
    premise = bool(oracle_ok and transfer_ok and rho > 0)
    why = []
    if not oracle_ok:
        why.append(f"the Oracle gains only {gain:+.1f} ± {se:.1f} R@1 over zero-shot (no room to adapt)")
    if not transfer_ok:
        why.append(f"a related expert does not help more than an unrelated one "
                   f"(within {w_mean:+.1f} vs across {a_mean:+.1f})")
    if not rho > 0:
        why.append(f"description similarity does not predict transfer (Spearman {rho:+.2f})")
    verdict = ("The premise holds: the Oracle has room, related experts transfer better than unrelated ones, "
               "and description similarity predicts transfer; methods can be ranked."
               if premise else "The premise fails on this dataset: " + "; ".join(why) + ".")
    return {"premise_holds": premise, "verdict": verdict, "oracle_gain": gain, "oracle_gain_se": se,
            "oracle_n_tasks": len(tasks), "grouping": "family" if have_families else "similarity quartile",
            "transfer_within_family": w_mean, "transfer_within_family_se": w_se, "transfer_within_family_n": w_n,
            "transfer_across_family": a_mean, "transfer_across_family_se": a_se, "transfer_across_family_n": a_n,
            "spearman_similarity_vs_gain": rho, "spearman_n_pairs": int(ok.sum()), "transfer_matrix": matrix}
