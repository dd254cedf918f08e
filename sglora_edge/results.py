"""Per-task results combined: over generator seeds, settings and role rotations; the headline intervals."""

from __future__ import annotations

import numpy as np

from .errors import SGLoRAError
from .evaluate import average_runs, summarise
from .methods import GAP_RECOVERED, GENERATED, HEADLINE_PAIRS
from .metrics import compare, mean_r1


def pool(*blocks: dict) -> dict:
    """Per-task results of several settings as one (task names are unique across domains)."""
    return {t: r for b in blocks for t, r in b.items()}


def merge_seeds(per_seed: list[dict]) -> dict:
    """Per-task results over generator seeds: recalls averaged over seeds, 'seed_r1' the per-seed mean R@1.
    Deterministic methods (evaluated with the first seed only) are taken as they are."""
    first = per_seed[0]
    out = {}
    for t, methods in first.items():
        out[t] = dict(methods)
        for m in methods:
            runs = [s[t][m] for s in per_seed if m in s.get(t, {})]
            if m in GENERATED and len(runs) > 1:
                out[t][m] = {**runs[0], **average_runs(runs), "seed_r1": [mean_r1(r) for r in runs]}
    return out


def block(name: str, res: dict, lib_names: list[str], train: list[str], unseen: list[str], seeds: list[int]) -> dict:
    """One setting's report block: its tasks, every method's summary and comparisons, the per-task results."""
    methods, comparisons = summarise(res["per_task"])
    return {"setting": name, "tasks": {"expert": lib_names, "train": sorted(train), "unseen": unseen},
            "methods": methods, "per_task": res["per_task"], "explanations": res["explanations"],
            "comparisons": comparisons, "seeds": seeds}


def intervals(per_task: dict, n_seeds: int) -> dict:
    """SG-LoRA vs each reference, paired over tasks (seed-averaged): metrics.compare (mean, SE, t-based 95 %
    interval, detectable effect at 80 % power, variance split), and the share of the Oracle gap recovered."""
    tasks = sorted(per_task)
    have = lambda m: all(m in per_task[t] for t in tasks)
    out = {f"{a}-{b}": {**compare([per_task[t][a] for t in tasks], [per_task[t][b] for t in tasks]),
                        "n_seeds": n_seeds}
           for a, b in HEADLINE_PAIRS if have(a) and have(b)}
    zs = np.array([mean_r1(per_task[t]["zero_shot"]) for t in tasks])
    gap = np.array([mean_r1(per_task[t]["oracle"]) for t in tasks]) - zs
    for m in GAP_RECOVERED:
        if have(m):
            gain = np.array([mean_r1(per_task[t][m]) for t in tasks]) - zs
            out[f"oracle_gap_recovered:{m}"] = float(gain.mean() / gap.mean()) if gap.mean() > 0 else None
    return out


def pool_rotations(reports: list[dict]) -> dict:
    """One report from every rotation's: the in-dataset settings (every rotation has them) and the headline pool
    every rotation's unseen tasks (each task name once: a class is unseen in one rotation only); cross-domain,
    mixed, the transfer matrix, ablations and diversity are rotation 0's. Each rotation's own headline, default
    generator and validation are kept under `per_rotation`."""
    first, out = reports[0], dict(reports[0])
    if len(reports) > 1:
        out["settings"] = {name: _pooled_block(name, [r["settings"][name] for r in reports])
                           if all(name in r["settings"] for r in reports) else block
                           for name, block in first["settings"].items()}
        out.update(_pooled_block(first["setting"], reports))
        out["interval"] = intervals(out["per_task"], len(first["seeds"]))
    out["rotations"] = len(reports)
    out["galleries_per_task"] = min(len(r["zero_shot"].get("gallery_r1", [0])) for r in out["per_task"].values())
    out["power"] = {pair: v["mde80"] for pair, v in out["interval"].items() if isinstance(v, dict) and "mde80" in v}
    out["per_rotation"] = [{"rotation": i, "default_generator": r["default_generator"], "validation": r["validation"],
                            "tasks": r["tasks"], "methods": {m: {"mean_r1": v["mean_r1"], "gain": v["gain"],
                                                                 "gain_se": v["gain_se"]} for m, v in r["methods"].items()},
                            "interval": r["interval"]} for i, r in enumerate(reports)]
    return out


def _pooled_block(name: str, blocks: list[dict]) -> dict:
    per_task = pool(*(b["per_task"] for b in blocks))
    if len(per_task) != sum(len(b["per_task"]) for b in blocks):
        raise SGLoRAError(f"{name}: a task is unseen in two rotations; use at most as many --rotations as it takes "
                          "to make every class unseen once")
    union = lambda role: sorted({t for b in blocks for t in b["tasks"][role]})
    return block(name, {"per_task": per_task, "explanations": pool(*(b["explanations"] for b in blocks))},
                 union("expert"), union("train"), [t for b in blocks for t in b["tasks"]["unseen"]], blocks[0]["seeds"])
