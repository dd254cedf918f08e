"""Merge-side ablations on the seen tasks' val split, leave-one-out conditions; no generator, never an unseen task.

Each ablation is a row of ABLATIONS: its name and what one value changes in the merge's recipe (K, tau, the task
LoRAs' recipe, the adapted blocks). Every other field keeps the run's default, so one variant serves every table
it appears in (computed and cached once)."""

from __future__ import annotations

from dataclasses import replace

from .evaluate import Evaluator, Setting, method_results, summarise
from .library import Library

METHODS = ("zero_shot", "topk_weighted", "topk_weighted_dw", "oracle")
ABLATIONS = (  # (name, the run config's values, value -> what it changes)
    ("k", lambda cfg: cfg.k_values, lambda v: {"k": v}),
    ("tau", lambda cfg: cfg.tau_values, lambda v: {"tau": v}),
    ("freeze_a", lambda cfg: (False, True), lambda v: {"freeze_a": v}),
    ("last_blocks", lambda cfg: cfg.last_blocks_values, lambda v: {"last_blocks": v}),
)


def ablations(run, lib: Library, domain) -> dict:
    """{name: table} for every ablation (K above the library's size minus the held-out expert is skipped)."""
    cfg = run.cfg
    val = Evaluator(run.bb, run.ds, split="val")
    seen = run.ds.seen_tasks(domain)
    out = {}
    for name, values, change in ABLATIONS:
        values = [v for v in values(cfg) if name != "k" or v <= len(lib) - 1]
        runs = {v: variant(run, val, lib, domain, seen, **{"k": cfg.cvae.k, "tau": cfg.cvae.tau, "freeze_a": False,
                                                           "last_blocks": 0, **change(v)}) for v in values}
        out[name] = table(name, values, runs, domain)
    return out


def variant(run, val: Evaluator, lib: Library, domain, seen: list[str], k: int, tau: float, freeze_a: bool,
            last_blocks: int) -> dict:
    """Per seen task: the methods on its val split with this recipe, the task itself left out of the library."""
    cfg = run.cfg
    folder = "experts" + ("_freeze_a" if freeze_a else "") + (f"_last{last_blocks}" if last_blocks else "")
    if folder != "experts":
        run.experts(folder, run.ds.task_names(domain=domain), replace(cfg.expert, freeze_a=freeze_a),
                    last_blocks=last_blocks)
        lib = run.library(folder.replace("experts", "library"), lib.names, folder, semantic=lib.semantic_kind)

    def build():
        st = Setting(lib, run.encoder(lib.semantic_kind), run.out / folder, k, tau)
        return {t: method_results(val, replace(st, library=lib.subset([n for n in lib.names if n != t])), t, 1,
                                  cfg.seed, METHODS)[0] for t in seen}
    return run.cached(f"ablation:{folder}:k{k}:tau{tau}", [lib.names, seen, run.bb.ident, k, tau, folder], build)


def table(param: str, values: list, runs: dict, domain) -> dict:
    methods = [m for m in METHODS if all(m in r[t] for r in runs.values() for t in r)]
    col, se = {m: [] for m in methods}, {m: [] for m in methods}
    for v in values:
        summary, _ = summarise(runs[v])
        for m in methods:
            col[m].append(summary[m]["mean_r1"])
            se[m].append(summary[m]["gain_se"])
    return {"param": param, "setting": f"seen tasks of {domain} (val split, leave-one-out)", "values": list(values),
            "methods": col, "se": se, "metric": "mean_r1", "se_of": "gain vs zero-shot (paired over tasks)"}
