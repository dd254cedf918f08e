"""Every method the evaluation reports, once: name, label, whether a generator draws it, whether it is an oracle
row, and how it runs on one task (evaluate.Task). Evaluation, the report and the comparisons all read this
registry. Torch-free at import (the report is written without torch): runners import what they need when run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # as the report prints it
    run: Callable  # (evaluate.Task) -> recalls on that task, or None where the setting lacks the method's inputs
    generated: bool = False  # drawn by a generator: evaluated for every generator seed
    oracle: bool = False  # reads what a description-only method cannot know: headroom, never the default
    reads: str | None = None  # the Setting input it needs beyond the library (a cached result depends on it)


def _generated(prefix: str, label: str) -> list[Method]:
    """A generator's rows: its samples, its prior mean and (the default only) the samples' features averaged."""
    gen = lambda t: t.st.generators.get(prefix)
    reads = f"generators.{prefix}"
    rows = [Method(prefix, label, lambda t: gen(t) and t.sampled(gen(t))[0], generated=True, reads=reads),
            Method(f"{prefix}_mean", f"{label} (mean)", lambda t: gen(t) and t.prior_mean(gen(t)), generated=True,
                   reads=reads)]
    if prefix == "sglora":
        rows.append(Method("sglora_ensemble", "SG-LoRA (features of the samples averaged)",
                           lambda t: gen(t) and t.sampled(gen(t))[1], generated=True, reads=reads))
    return rows


def _soup_dw(t):
    import torch
    from .lora import average_delta_weights
    return t.deltas(average_delta_weights(t.spec, torch.from_numpy(t.lib.mu), torch.full((len(t.lib),), 1 / len(t.lib))))


def _topk_dw(t):
    from .conditions import topk_delta_weights
    return t.deltas(topk_delta_weights(t.lib, t.agg))


def _seen(t, k: int):
    return None if t.st.seen is None else t.vector(t.st.seen.aggregate(t.emb, k=k, tau=t.st.tau).mu)


def _lora(vec):
    return lambda t: None if vec(t) is None else t.vector(vec(t))


def _family(t):
    family = t.ev.dataset.tasks[t.name].family
    return t.vector(t.st.family_pooled[family]) if t.st.family_pooled and family in t.st.family_pooled else None


def _merge_ceiling(t):
    from .atoms import fit_merge_weights
    if t.st.merge_ceiling is None:
        return None
    return t.deltas(fit_merge_weights(t.ev.backbone, t.lib, t.agg, t.ev.dataset, t.name, t.st.merge_ceiling))


def _oracle(t):
    from .experts import load_checkpoints
    return t.vector(load_checkpoints(t.st.experts_dir, t.name, t.lib.backbone, t.spec)[-1])


REGISTRY: tuple[Method, ...] = (
    Method("zero_shot", "Zero-shot", lambda t: t.deltas(None)),
    Method("model_soups", "Model Soups", lambda t: t.vector(t.lib.mu.mean(0))),
    Method("model_soups_dw", "Model Soups (ΔW)", _soup_dw),
    Method("adapter_soup", "AdapterSoup", lambda t: t.vector(t.lib.mu[t.top].mean(0))),
    Method("topk_weighted", "Top-K weighted", lambda t: t.vector(t.agg.mu)),
    Method("topk_weighted_dw", "Top-K weighted (ΔW)", _topk_dw),
    Method("topk_weighted_seen", "Top-K weighted (seen tasks)", lambda t: _seen(t, t.st.k), reads="seen"),
    Method("nearest_seen", "Nearest seen task", lambda t: _seen(t, 1), reads="seen"),
    Method("multi_task_lora", "Multi-task LoRA", _lora(lambda t: t.st.multi_task), reads="multi_task"),
    Method("multi_task_lora_by_task", "Multi-task LoRA, task-homogeneous batches",
           _lora(lambda t: t.st.multi_task_by_task), reads="multi_task_by_task"),
    Method("family_pooled", "Family-pooled LoRA (oracle: true family)", _family, oracle=True, reads="family_pooled"),
    Method("cluster_routed", "Cluster-routed joint LoRAs (description clusters)",
           lambda t: t.st.generators.get("cluster_routed") and t.prior_mean(t.st.generators["cluster_routed"]),
           reads="generators.cluster_routed"),
    Method("routed_atoms", "Routed atoms (trained through the merge)",
           lambda t: t.st.generators.get("routed_atoms") and t.prior_mean(t.st.generators["routed_atoms"]),
           reads="generators.routed_atoms"),
    Method("merge_ceiling", "Merge ceiling (oracle: Top-K weights fitted on the task)", _merge_ceiling, oracle=True,
           reads="merge_ceiling"),
    *_generated("sglora_paper", "SG-LoRA, paper's CVAE"),
    *_generated("sglora_retrieval", "SG-LoRA, retrieval-trained"),
    *_generated("sglora", "SG-LoRA"),
    Method("random_description", "Random description", lambda t: t.random_description(), generated=True,
           reads="generators.sglora"),
    Method("oracle", "Oracle", _oracle, oracle=True),
)
BY_NAME = {m.name: m for m in REGISTRY}
METHODS = tuple(m.name for m in REGISTRY)
GENERATED = tuple(m.name for m in REGISTRY if m.generated)
ORACLE_ROWS = tuple(m.name for m in REGISTRY if m.oracle)
LABELS = {m.name: m.label for m in REGISTRY}
# What each setting's comparisons put SG-LoRA (sglora, sglora_mean) against, and the headline's pairs (A, B)
COMPARED_WITH = ("zero_shot", "model_soups", "adapter_soup", "topk_weighted", "topk_weighted_dw", "topk_weighted_seen",
                 "nearest_seen", "multi_task_lora", "multi_task_lora_by_task", "family_pooled", "cluster_routed",
                 "routed_atoms", "merge_ceiling", "sglora_paper",
                 "random_description", "oracle")
HEADLINE_PAIRS = tuple((a, b) for a in ("sglora", "sglora_mean", "sglora_retrieval", "sglora_paper")
                       for b in ("topk_weighted_dw", "topk_weighted", "multi_task_lora", "multi_task_lora_by_task",
                                 "family_pooled", "cluster_routed", "routed_atoms", "merge_ceiling", "topk_weighted_seen",
                                 "sglora_paper", "zero_shot",
                                 "oracle") if a != b)
GAP_RECOVERED = ("sglora", "sglora_mean", "sglora_retrieval", "sglora_paper", "topk_weighted_dw", "multi_task_lora",
                 "multi_task_lora_by_task", "family_pooled", "cluster_routed", "routed_atoms",
                 "merge_ceiling")  # the rows whose share of the Oracle gap is reported
