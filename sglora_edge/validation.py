"""Choices made on the seen tasks only: cross-validation of the retrieval-trained generator and the rule that
picks the product's default from it (docs/ARCHITECTURE.md, "The generator, and how its default is chosen")."""

from __future__ import annotations

from dataclasses import replace

from .metrics import mean_se
from .train_generator import CV_SPLIT, crossvalidate


def default_generator(configured: str, validation: dict | None) -> str:
    """The rule, fixed before any test split is read: the configured default if one is set, else the
    retrieval-trained generator if its cross-validated gain over Top-K (ΔW) exceeds 2 SE, else the Top-K (ΔW)
    merge itself: the product never ships by default what validation says is worse than its own merge."""
    if configured != "auto":
        return configured
    return "retrieval" if validation and validation["retrieval_generator_wins"] else "topk_dw"


def validate(run, libs: dict, domains: list) -> dict:
    """k-fold cross-validation over each domain's seen tasks of the product generator (and its penalty),
    scored as the paired mean R@1 gain over Top-K (ΔW) on the held-out folds' images (train_generator.CV_SPLIT)."""
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
                              [g.to_dict(), seen, lib.names, cfg.folds, list(cfg.cv_steps), run.bb.ident],
                              lambda: {str(s): v for s, v in crossvalidate(
                                  lib, run.encoder(lib.semantic_kind), run.out / "experts", run.ds, seen,
                                  run.bb, g, cfg.folds, tuple(cfg.cv_steps), progress=run.progress).items()})
            for s, gains in res.items():
                per_step.setdefault(int(s), {}).update(gains)
        curves[str(penalty)] = {str(s): mean_se(list(v.values())) for s, v in sorted(per_step.items())}
    chosen = curves[str(chosen_penalty)].get(str(cfg.generator.steps))
    wins = bool(chosen and chosen["mean"] > 2 * chosen["se"])
    return {"criterion": "paired mean R@1 gain of the prior-mean LoRA over Top-K (ΔW) on the held-out folds' "
                         f"{CV_SPLIT} split (never trained on in that fold)",
            "folds": cfg.folds, "curves_by_penalty": curves, "chosen": {"penalty": cfg.generator.correction_penalty,
                                                                        "steps": cfg.generator.steps, **(chosen or {})},
            "rule": "sglora = the retrieval-trained generator if its CV gain over Top-K (ΔW) > 2 SE, else the "
                    "Top-K (ΔW) merge itself (the paper's CVAE has no cross-validated score: not a candidate)",
            "retrieval_generator_wins": wins}



def choose_default(run, libs: dict, domains: list) -> tuple[dict | None, str]:
    """(the validation record, or None for a quick run, and the default generator the rule picks from it)."""
    validation = None if run.cfg.quick else validate(run, libs, domains)
    return validation, default_generator(run.cfg.default_generator, validation)
