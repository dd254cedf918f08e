"""Choices made on the seen tasks only (docs/ARCHITECTURE.md, "The generator, and how its default is chosen").

Cross-validation over each domain's seen tasks, folds stratified by family (train_generator.cv_folds): every
candidate is scored per held-out task as its mean R@1 gain over Top-K (ΔW) (the expert library, leave-one-out) on
that task's train split, which no candidate trained on in that fold. Candidates: the retrieval-trained generator
(at the configured penalty and steps), the cluster-routed joint LoRAs and the routed atoms (atoms.py). The gate: the family-pooled joint LoRA
routed by the true family (an oracle: it is not a candidate) — if even it does not beat Top-K (ΔW) by 1 R@1 on
validation, no description-routed joint adapter can be expected to.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from .atoms import routed_by_atoms
from .clusters import crossvalidate_routed, routed_by_clusters
from .metrics import mean_se
from .train_generator import CV_SPLIT, crossvalidate

RULE = ("sglora = the candidate (retrieval-trained generator, cluster-routed joint LoRAs, routed atoms) with the highest "
        "cross-validated gain over Top-K (ΔW) if that gain exceeds 2 SE, else the Top-K (ΔW) merge itself; the "
        "paper's CVAE has no cross-validated score (it would need a CVAE per fold) and is not a candidate")
GATE = 1.0  # R@1 the family oracle must gain over Top-K (ΔW) on validation for joint training to have room


def default_generator(configured: str, validation: dict | None) -> str:
    """The rule, fixed before any test split is read: the configured default if one is set, else RULE. The product
    never ships by default what validation says is worse than its own merge."""
    if configured != "auto":
        return configured
    return validation["default"] if validation else "topk_dw"


def validate(run, libs: dict, domains: list) -> dict:
    cfg = run.cfg
    curves = {}
    chosen_penalty = cfg.generator.correction_penalty
    for penalty in sorted({*cfg.penalty_values, chosen_penalty}) if cfg.ablations else (chosen_penalty,):
        g = replace(cfg.generator, correction_penalty=penalty)
        per_step: dict = {}
        for d in domains:
            lib = libs[d or "all"]
            seen = run.ds.seen_tasks(d)
            res = run.cached(f"validation:{d}:penalty{penalty}",
                             [g.to_dict(), seen, lib.names, cfg.folds, list(cfg.cv_steps), run.bb.ident, "stratified"],
                             lambda: {str(s): v for s, v in crossvalidate(
                                 lib, run.encoder(lib.semantic_kind), run.out / "experts", run.ds, seen,
                                 run.bb, g, n_folds=cfg.folds, eval_steps=tuple(cfg.cv_steps),
                                 progress=run.progress).items()})
            for s, gains in res.items():
                per_step.setdefault(int(s), {}).update(gains)
        curves[str(penalty)] = {str(s): mean_se(list(v.values())) for s, v in sorted(per_step.items())}
    retrieval = curves[str(chosen_penalty)].get(str(cfg.generator.steps))
    joint = {kind: mean_se(list(joint_gains(run, libs, domains, kind).values())) for kind in ("clusters", "atoms", "family")}
    candidates = {"retrieval": retrieval, "cluster": joint["clusters"], "atoms": joint["atoms"]}
    default = pick_default(candidates)
    return {"criterion": "paired mean R@1 gain over Top-K (ΔW) on the held-out folds' "
                         f"{CV_SPLIT} split (never trained on in that fold); folds stratified by family",
            "folds": cfg.folds, "curves_by_penalty": curves,
            "chosen": {"penalty": cfg.generator.correction_penalty, "steps": cfg.generator.steps, **(retrieval or {})},
            "candidates": candidates, "gate": {"family_pooled": joint["family"], "needed": GATE,
                                               "passed": joint["family"]["mean"] >= GATE},
            "rule": RULE, "default": default, "retrieval_generator_wins": default == "retrieval"}


def pick_default(candidates: dict[str, dict | None]) -> str:
    """RULE on {candidate: mean_se of its gain over Top-K (ΔW), or None where it has no score}."""
    scored = {c: v for c, v in candidates.items() if v and v.get("n", 0) > 1}
    if not scored:
        return "topk_dw"
    best = max(scored, key=lambda c: scored[c]["mean"])
    return best if scored[best]["mean"] > 2 * scored[best]["se"] else "topk_dw"


def joint_gains(run, libs: dict, domains: list, kind: str) -> dict[str, float]:
    """Held-out seen task -> gain of a joint candidate over Top-K (ΔW): "clusters" (cluster-routed joint LoRAs),
    "atoms" (routed atoms) or "family" (the family oracle's joint LoRA: the gate)."""
    cfg, gains = run.cfg, {}
    for d in domains:
        lib, seen = libs[d or "all"], run.ds.seen_tasks(d)
        enc = run.encoder(lib.semantic_kind)
        if kind == "atoms":
            start = run.seen_library(f"library_seen_{d or 'all'}", lib, seen, "experts")
            key = [seen, lib.names, start.info.get("key"), cfg.folds, cfg.seed, asdict(cfg.atoms), cfg.atoms_drift,
                   cfg.cvae.k, cfg.cvae.tau, run.bb.ident]
            route_for = routed_by_atoms(run.bb, start, run.ds, cfg.atoms, k=cfg.cvae.k, tau=cfg.cvae.tau,
                                        drift=cfg.atoms_drift)
        else:
            key = [seen, lib.names, cfg.folds, cfg.cluster_size, asdict(cfg.multi_task), cfg.cvae.k, cfg.cvae.tau,
                   run.bb.ident]
            route_for = routed_by_clusters(run.bb, lib.spec, run.ds, enc, cfg.multi_task, k=cfg.cvae.k,
                                           tau=cfg.cvae.tau, tasks_per_cluster=cfg.cluster_size,
                                           by_family=kind == "family", seed=cfg.seed)
        gains.update(run.cached(f"validation:{d}:{kind}", key, lambda: crossvalidate_routed(
            lib, enc, run.ds, seen, run.bb, route_for, k=cfg.cvae.k, tau=cfg.cvae.tau, n_folds=cfg.folds,
            seed=cfg.seed)))
    return gains


def choose_default(run, libs: dict, domains: list) -> tuple[dict | None, str]:
    """(the validation record, or None for a quick run, and the default generator the rule picks from it)."""
    validation = None if run.cfg.quick else validate(run, libs, domains)
    return validation, default_generator(run.cfg.default_generator, validation)
