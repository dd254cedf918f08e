"""Turn the evaluation harness's `report.json` dict into report.md and plots, without torch.

The markdown opens with whether the testbed can rank methods at all (the premise
check), because a ranking on a dataset where experts do not transfer is noise.
Plots use matplotlib's Agg backend; matplotlib is imported only when plotting.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from runtime.artifacts import atomic_path

from .methods import LABELS as METHOD_NAMES
from .metrics import mean_r1

RECALL_COLUMNS = [("i2t", "r1", "i2t R@1"), ("i2t", "r5", "i2t R@5"), ("i2t", "r10", "i2t R@10"),
                  ("t2i", "r1", "t2i R@1"), ("t2i", "r5", "t2i R@5"), ("t2i", "r10", "t2i R@10")]
DASH = "—"


def method_name(key: str) -> str:
    return METHOD_NAMES.get(key, key)


def _num(value, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return DASH
    return fmt.format(value)


def _pm(value, se, fmt: str = "{:+.1f}") -> str:
    return _num(value, fmt) + (f" ± {se:.1f}" if se is not None and value is not None else "")


def _ordered_methods(methods: dict, order: list[str]) -> list[str]:
    """Methods in `method_order`, then any the order does not name (so none is silently dropped)."""
    return [m for m in order if m in methods] + sorted(m for m in methods if m not in order)


def _mean_r1(result: dict):
    """A summary's stored mean R@1, else the one of its recalls; None where a side is missing."""
    if result.get("mean_r1") is not None:
        return result["mean_r1"]
    return None if any(result.get(side, {}).get("r1") is None for side in ("i2t", "t2i")) else mean_r1(result)


def _write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# ---------------------------------------------------------------- markdown

def _validity_lines(validity: dict | None) -> tuple[list[str], list[str]]:
    """(the plain statement that goes right under the title, the validity section)."""
    if not validity:
        return ["> **Validity not measured:** nothing here shows that this testbed can rank methods."], []
    verdict = validity.get("verdict", "")
    if validity.get("premise_holds"):
        statement = f"**Premise holds on this dataset:** related experts' LoRAs transfer. Verdict: \"{verdict}\""
    else:
        statement = ("> **The premise fails on this dataset: the method ranking below is not meaningful.** "
                     f"Verdict: \"{verdict}\"")
    v = validity.get
    rows = [
        ["Oracle gain over zero-shot (mean R@1)", _pm(v("oracle_gain"), v("oracle_gain_se")), f"{v('oracle_n_tasks', DASH)} tasks"],
        ["One expert on a task of its family", _pm(v("transfer_within_family"), v("transfer_within_family_se")),
         f"{v('transfer_within_family_n', DASH)} pairs"],
        ["One expert on a task of another family", _pm(v("transfer_across_family"), v("transfer_across_family_se")),
         f"{v('transfer_across_family_n', DASH)} pairs"],
        ["Spearman(description similarity, transfer gain)", _num(v("spearman_similarity_vs_gain"), "{:+.2f}"),
         f"{v('spearman_n_pairs', DASH)} pairs"],
    ]
    section = ["## Validity: can this testbed rank methods?", "",
               *_table(["check", "value ± SE", "n"], rows), "",
               "SG-LoRA assumes a related task's LoRA is a good start for a new one: the Oracle must leave room "
               "over zero-shot, experts must help siblings more than strangers, and description similarity "
               "must predict transfer.", ""]
    return [statement], section


def _rank_marks(values: list) -> list[str]:
    """'**' for the best shown value, '<u>' for the second best (ties share a mark)."""
    shown = sorted({round(v, 1) for v in values if v is not None}, reverse=True)
    marks = []
    for v in values:
        r = round(v, 1) if v is not None else None
        marks.append("**" if shown and r == shown[0] else "<u>" if len(shown) > 1 and r == shown[1] else "")
    return marks


def _mark(text: str, mark: str) -> str:
    return {"**": f"**{text}**", "<u>": f"<u>{text}</u>", "": text}[mark]


def _main_table(methods: dict, order: list[str]) -> list[str]:
    keys = _ordered_methods(methods, order)
    if not keys:
        return ["_No results._", ""]
    zs_r1 = _mean_r1(methods["zero_shot"]) if "zero_shot" in methods else None
    oracle_r1 = _mean_r1(methods["oracle"]) if "oracle" in methods else None
    oracle_gap = oracle_r1 - zs_r1 if None not in (zs_r1, oracle_r1) else None
    ranked = [k for k in keys if k != "oracle"]  # the Oracle uses target data, so it does not compete
    columns = [(lambda m, s=side, r=rank: methods[m].get(s, {}).get(r)) for side, rank, _ in RECALL_COLUMNS]
    columns.append(lambda m: _mean_r1(methods[m]))
    marks = {}
    for c, get in enumerate(columns):
        for k, mark in zip(ranked, _rank_marks([get(k) for k in ranked])):
            marks[k, c] = mark
    rows = []
    for k in keys:
        res = methods[k]
        cells = [method_name(k)]
        for c, get in enumerate(columns):
            text = _num(get(k))
            if c == len(columns) - 1 and res.get("sample_std_r1") is not None:
                text += f" ± {res['sample_std_r1']:.1f}"
            cells.append(_mark(text, marks.get((k, c), "")))
        cells.append(_pm(res.get("gain"), res.get("gain_se")) if k != "zero_shot" else "(reference)")
        if oracle_gap is not None and oracle_gap > 0 and _mean_r1(res) is not None:
            cells.append(f"{100 * (_mean_r1(res) - zs_r1) / oracle_gap:.1f} %")
        else:
            cells.append(DASH)
        rows.append(cells)
    header = ["method", *(label for *_, label in RECALL_COLUMNS), "mean R@1", "gain vs zero-shot ± SE",
              "oracle-gap recovered"]
    n_tasks = next((methods[k]["n_tasks"] for k in keys if "n_tasks" in methods[k]), DASH)
    samples = [f"{method_name(k)}: {methods[k]['samples']}" for k in keys if "samples" in methods[k]]
    notes = [f"Recall in percent over {n_tasks} tasks; gain = paired mean difference from zero-shot over tasks ± its SE.",
             "**Bold** = best, <u>underlined</u> = second best; the Oracle row is left out of both because it "
             "trains on the target task's own data.",
             "Oracle-gap recovered = (method − zero-shot) / (Oracle − zero-shot) in mean R@1 (— when the Oracle "
             "does not beat zero-shot)."]
    if samples:
        notes.append("± after an SG-LoRA mean R@1 = std over generated samples (" + ", ".join(samples) + ").")
    return [*_table(header, rows), "", *(f"- {n}" for n in notes), ""]


def _comparisons_table(comparisons: list[dict]) -> list[str]:
    if not comparisons:
        return []
    rows = [[method_name(c["a"]), method_name(c["b"]), _pm(c.get("diff"), c.get("se")),
             "within noise" if c.get("within_noise") else "**outside noise**"] for c in comparisons]
    return ["**Comparisons** (paired over tasks, mean R@1):", "",
            *_table(["A", "B", "A − B ± SE", "verdict"], rows), ""]


def _setting_lines(block: dict, order: list[str]) -> list[str]:
    tasks = block.get("tasks", {})
    counts = ", ".join(f"{len(v)} {k}" for k, v in tasks.items())
    return ([f"Tasks: {counts}.", ""] if counts else []) + _main_table(block.get("methods", {}), order) + \
        _comparisons_table(block.get("comparisons", []))


def _interval_lines(interval: dict) -> list[str]:
    pairs = {k: v for k, v in (interval or {}).items() if isinstance(v, dict)}
    if not pairs:
        return []
    def split(v):
        var = v.get("variance")
        return f"{100 * var['between_galleries'] / var['total']:.0f} %" if var and var["total"] > 0 else DASH
    rows = [[method_name(k.split("-")[0]), method_name(k.split("-", 1)[1]), _pm(v["diff"], v["se"]),
             f"[{v['ci95'][0]:+.1f}, {v['ci95'][1]:+.1f}]" if "ci95" in v else DASH,
             f"{v['mde80']:.1f}" if "mde80" in v else DASH, split(v), str(v["n_tasks"]), str(v["n_seeds"])]
            for k, v in pairs.items()]
    recovered = [f"{method_name(k.split(':', 1)[1])} {100 * v:.0f} %" for k, v in interval.items()
                 if k.startswith("oracle_gap_recovered:") and v is not None]
    return ["**Headline intervals** (paired over tasks, generator seeds averaged per task; t-based 95 % interval; "
            "detectable = the smallest true difference found at 80 % power; gallery share = the part of a task's "
            "variance that comes from which images its galleries hold, the rest is between tasks):",
            "", *_table(["A", "B", "A − B ± SE", "95 % interval", "detectable", "gallery share", "tasks", "seeds"],
                        rows), "",
            *([f"Oracle gap recovered: {', '.join(recovered)}.", ""] if recovered else [])]


def _rotation_lines(report: dict) -> list[str]:
    rotations = report.get("per_rotation") or []
    if len(rotations) < 2:
        return []
    methods = [m for m in ("zero_shot", "topk_weighted_dw", "multi_task_lora_by_task", "cluster_routed", "routed_atoms",
                           "sglora", "merge_ceiling", "family_pooled", "oracle") if all(m in r["methods"] for r in rotations)]
    rows = [[str(r["rotation"]), str(len(r["tasks"]["unseen"])), r["default_generator"],
             *(_num(r["methods"][m]["mean_r1"]) for m in methods)] for r in rotations]
    return ["## Each rotation", "",
            f"Roles rotate inside each (domain, family); over {len(rotations)} rotations every class is unseen once, "
            f"and the headline pools them ({report.get('galleries_per_task', '?')} test galleries per task). "
            "Each rotation rebuilds its libraries and generators and decides its default on its own validation.", "",
            *_table(["rotation", "unseen tasks", "default", *map(method_name, methods)], rows), ""]


def _validation_lines(validation: dict | None) -> list[str]:
    if not validation or not validation.get("curves_by_penalty"):
        return []
    curves = validation["curves_by_penalty"]
    steps = sorted({int(s) for c in curves.values() for s in c})
    rows = [[f"penalty {p}"] + [_pm(c[str(s)]["mean"], c[str(s)]["se"]) if str(s) in c else DASH for s in steps]
            for p, c in curves.items()]
    chosen = validation.get("chosen", {})
    names = {"retrieval": "retrieval-trained generator", "cluster": "cluster-routed joint LoRAs",
             "atoms": "routed atoms", "topk_dw": "the Top-K (ΔW) merge itself"}
    candidates = [[names.get(c, c), _pm(v["mean"], v["se"]), str(v["n"])]
                  for c, v in (validation.get("candidates") or {}).items() if v]
    gate = validation.get("gate")
    gate_line = ([f"Gate: the family-pooled joint LoRA routed by the true family (an oracle) gains "
                  f"{_pm(gate['family_pooled']['mean'], gate['family_pooled']['se'])} over Top-K (ΔW) on validation "
                  f"(needed ≥ {gate['needed']:+.1f}): " + ("**passed**, joint training has room." if gate["passed"] else
                  "**not passed**: no description-routed joint adapter can be expected to win here."), ""]
                 if gate else [])
    return ["## Validation: how the default was chosen (seen tasks only)", "",
            f"Criterion: {validation.get('criterion')}; {validation.get('folds')} folds per domain. "
            f"Rule, fixed before the test split was read: {validation.get('rule')}.", "",
            "Retrieval-trained generator by penalty and steps:", "",
            *_table(["generator \\ steps", *map(str, steps)], rows), "",
            f"Configured: penalty {chosen.get('penalty')}, {chosen.get('steps')} steps.", "",
            *(["Candidates (gain over Top-K (ΔW) ± SE over held-out seen tasks):", "",
               *_table(["candidate", "gain", "tasks"], candidates), ""] if candidates else []),
            *gate_line,
            f"Verdict: the default (`sglora`) is **{names.get(validation.get('default'), 'the retrieval-trained generator' if validation.get('retrieval_generator_wins') else names['topk_dw'])}**.", ""]


def _diversity_lines(diversity: dict | None) -> list[str]:
    if not diversity:
        return []
    rows = [[method_name(m), f"{v['within_task_sample_distance']:.4f}", f"{v['topk_dw_to_oracle_distance']:.4f}",
             f"{v['ratio']:.3f}"] for m, v in diversity.items()]
    return ["## Do samples mean something?", "",
            *_table(["generator", "mean pairwise ΔW distance within a task", "Top-K (ΔW) → Oracle distance",
                     "ratio"], rows), "",
            "A ratio near 0 means the samples of a task are one point: sampling buys nothing and the prior mean "
            "is what `run` uses by default.", ""]


def _ablation_lines(name: str, ablation: dict) -> list[str]:
    head = f"### {name}"
    values, methods = ablation.get("values", []), ablation.get("methods", {})
    if not values or not methods:
        return [head, "", "_Not run._", ""]
    se = ablation.get("se", {})
    rows = [[str(v)] + [_num(methods[m][i]) + (f" ± {se[m][i]:.1f}" if m in se and se[m][i] is not None else "")
                        for m in methods] for i, v in enumerate(values)]
    where = f", setting `{ablation['setting']}`" if ablation.get("setting") else ""
    return [head, "", f"Metric: {ablation.get('metric', 'mean_r1')}{where}.", "",
            *_table([ablation.get("param", name), *map(method_name, methods)], rows), ""]


def _per_task_lines(block: dict, order: list[str]) -> list[str]:
    per_task = block.get("per_task", {})
    if not per_task:
        return ["_No per-task results._", ""]
    known = block.get("tasks", {}).get("unseen", [])
    tasks = [t for t in known if t in per_task] + sorted(t for t in per_task if t not in known)
    methods = _ordered_methods({m: 1 for t in tasks for m in per_task[t]}, order)
    rows = [[t] + [_num(_mean_r1(per_task[t].get(m, {}))) for m in methods] for t in tasks]
    return [*_table(["task", *map(method_name, methods)], rows), ""]


def write_markdown(report: dict, path: str | Path) -> None:
    order = report.get("method_order", [])
    setting = report.get("setting", "?")
    statement, validity_section = _validity_lines(report.get("validity"))
    settings = report.get("settings", {})
    lines = ["# SG-LoRA evaluation report", "", *statement, "",
             f"Dataset `{report.get('dataset', '?')}` · backbone `{report.get('backbone', '?')}` · "
             f"setting `{setting}`", "", *validity_section,
             f"## Main results: {setting}", "", *_setting_lines(report, order),
             *_interval_lines(report.get("interval")), *_rotation_lines(report),
             *_validation_lines(report.get("validation")),
             *_diversity_lines(report.get("diversity"))]
    for name, block in settings.items():
        lines += [f"## Setting: {name}", "", *(_setting_lines(block, order) if block else ["_Not run._", ""])]
    if report.get("ablations"):
        lines += ["## Ablations", ""]
        for name, ablation in report["ablations"].items():
            lines += _ablation_lines(name, ablation)
    lines += ["## Per-task mean R@1", "", f"### {setting}", "", *_per_task_lines(report, order)]
    for name, block in settings.items():
        lines += [f"### {name}", "", *_per_task_lines(block, order)]
    timings = report.get("timings_s", {})
    if timings:
        lines += ["## Timings", "", *_table(["stage", "seconds", "minutes"],
                                            [[k, f"{v:.1f}", f"{v / 60:.1f}"] for k, v in timings.items()]), ""]
    lines += ["<details><summary>Config</summary>", "", "```json",
              json.dumps(report.get("config", {}), indent=2, sort_keys=True, default=_jsonable), "```", "",
              "</details>", "",
              f"Produced by: `{report['command']}`" if report.get("command") else "Produced by: (command not recorded)", ""]
    _write_text(path, "\n".join(lines))


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def plot_recall_bars(report: dict, path: str | Path) -> None:
    """Grouped bars: one group per setting, one bar per method; zero-shot grey, Oracle black."""
    plt = _pyplot()
    blocks = {report.get("setting", "main"): report.get("methods", {})}
    blocks.update({k: v.get("methods", {}) for k, v in report.get("settings", {}).items() if v})
    keys = _ordered_methods({m: 1 for b in blocks.values() for m in b}, report.get("method_order", []))
    palette = itertools.cycle(plt.get_cmap("tab20").colors)
    colours = {k: "#9e9e9e" if k == "zero_shot" else "#212121" if k == "oracle" else next(palette) for k in keys}
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(max(10, 2.5 * len(blocks)), 5.5))
    labelled = set()
    for g, methods in enumerate(blocks.values()):
        for i, k in enumerate(keys):
            if k in methods and _mean_r1(methods[k]) is not None:
                ax.bar(g - 0.4 + (i + 0.5) * width, _mean_r1(methods[k]), width, yerr=methods[k].get("gain_se") or 0,
                       color=colours[k], capsize=2, label=None if k in labelled else method_name(k))
                labelled.add(k)
        if "zero_shot" in methods:  # a dashed zero-shot level across the group makes gains readable
            ax.hlines(_mean_r1(methods["zero_shot"]), g - 0.42, g + 0.42, colors="#616161", linestyles="--", lw=1)
    ax.set_xticks(range(len(blocks)), [name.replace(":", ":\n", 1) for name in blocks])
    ax.set_xlabel("setting")
    ax.set_ylabel("mean R@1 (%), error bar = paired SE of gain")
    ax.set_title(f"Mean R@1 per method — {report.get('dataset', '')} (dashed: zero-shot)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _pca2(fit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, 2 x P components, explained-variance ratio of each) of the rows of `fit`."""
    mean = fit.mean(axis=0)
    centred = (fit - mean).astype(np.float64)
    if centred.shape[0] < centred.shape[1]:  # LoRA vectors are long: SVD the small Gram matrix instead
        u, s2, _ = np.linalg.svd(centred @ centred.T)
        s = np.sqrt(np.clip(s2, 0, None))
        components = (centred.T @ u[:, :2] / np.where(s[:2] > 0, s[:2], 1)).T
    else:
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        components, s2 = vt[:2], s ** 2
    components = np.vstack([components, np.zeros((2 - len(components), fit.shape[1]))])  # fewer than 2 rows
    total = s2.sum() or 1.0
    ratio = np.pad(s2[:2] / total, (0, 2 - len(s2[:2])))
    return mean, components, ratio


# group -> (marker, size, alpha, legend text); checkpoints small and translucent, means and merges large
GROUP_STYLE = {
    "expert_ckpt": ("o", 8, 0.25, "expert checkpoint"), "expert_mean": ("s", 70, 0.9, "expert mean"),
    "oracle_ckpt": ("^", 16, 0.4, "Oracle checkpoint"), "sglora_sample": ("*", 90, 0.85, "SG-LoRA sample"),
    "topk_weighted": ("D", 90, 1.0, "Top-K weighted"), "adapter_soup": ("P", 110, 1.0, "AdapterSoup"),
    "model_soups": ("h", 160, 1.0, "Model Soups (all experts)"), "random_description": ("X", 110, 1.0, "random description"),
}
def _style(group: str) -> tuple[str, int, float, str]:
    return GROUP_STYLE.get(group, ("v", 60, 0.9, group))


SHARED_GROUPS = {"expert_ckpt", "expert_mean", "model_soups"}  # not about one unseen task


def plot_lora_space(points: dict[str, np.ndarray], labels: dict[str, list[str]], path: str | Path,
                    title: str = "") -> None:
    """PCA of LoRA vectors: do SG-LoRA samples land near each unseen task's Oracle checkpoints?"""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    points = {g: np.asarray(p, dtype=np.float32).reshape(len(p), -1) for g, p in points.items() if len(p)}
    fit_groups = [g for g in ("expert_ckpt", "oracle_ckpt") if g in points] or list(points)
    mean, components, ratio = _pca2(np.concatenate([points[g] for g in fit_groups]))
    project = {g: (p - mean) @ components.T for g, p in points.items()}
    # up to 4 unseen tasks, in order of first appearance among oracle checkpoints, then samples and merges
    groups = ("oracle_ckpt", "sglora_sample", "topk_weighted", "adapter_soup", "random_description")
    unseen = list(dict.fromkeys(t for g in groups for t in labels.get(g, [])))[:4]
    task_colour = dict(zip(unseen, plt.get_cmap("tab10").colors[:4]))
    fig, ax = plt.subplots(figsize=(11, 6.5))
    fig.subplots_adjust(right=0.75)  # room for the legends, which are figure legends so savefig keeps them
    for g, xy in project.items():
        marker, size, alpha, _ = _style(g)
        if g in SHARED_GROUPS:
            colour = "#9e9e9e" if g == "expert_ckpt" else "#424242"
            ax.scatter(xy[:, 0], xy[:, 1], s=size, marker=marker, c=colour, alpha=alpha, linewidths=0, zorder=1)
            continue
        rows = [i for i, t in enumerate(labels.get(g, [])) if t in task_colour]
        ax.scatter(xy[rows, 0], xy[rows, 1], s=size, marker=marker, alpha=alpha,
                   c=[task_colour[labels[g][i]] for i in rows], edgecolors="black" if size >= 90 else "none",
                   linewidths=0.6, zorder=3 if size >= 90 else 2)  # unseen tasks' points above the experts
    for i, task in enumerate(labels.get("expert_mean", [])):
        ax.annotate(task, project["expert_mean"][i], fontsize=7, color="#424242", xytext=(3, 3), textcoords="offset points")
    for task in unseen:  # name each unseen task beside the centre of its Oracle checkpoints
        rows = [i for i, t in enumerate(labels.get("oracle_ckpt", [])) if t == task]
        if rows:
            ax.annotate(task, project["oracle_ckpt"][rows].mean(axis=0), fontsize=9, fontweight="bold",
                        color=task_colour[task], xytext=(5, -10), textcoords="offset points")
    group_handles = [Line2D([], [], ls="", marker=_style(g)[0], markersize=8, label=_style(g)[3],
                            color="#9e9e9e" if g == "expert_ckpt" else "#424242") for g in project]
    task_handles = [Line2D([], [], ls="", marker="o", color=c, markersize=8, label=t) for t, c in task_colour.items()]
    fig.legend(handles=group_handles, title="what", loc="upper left", bbox_to_anchor=(0.76, 0.88), fontsize=8)
    if task_handles:
        fig.legend(handles=task_handles, title="unseen task", loc="lower left", bbox_to_anchor=(0.76, 0.11), fontsize=8)
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f} % of variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f} % of variance)")
    basis = " + ".join(GROUP_STYLE[g][3] + "s" for g in fit_groups) if "expert_ckpt" in fit_groups or \
        "oracle_ckpt" in fit_groups else "all points"
    ax.set_title((f"{title}\n" if title else "") + f"PCA of LoRA parameter space (fit on {basis}; "
                 f"PC1 {100 * ratio[0]:.1f} %, PC2 {100 * ratio[1]:.1f} % explained variance)", fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------- everything

def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report(report: dict, out_dir: str | Path, points=None, labels=None) -> None:
    """Write out_dir/report.json, report.md and plots/*.png (lora_space.png only when points are given)."""
    out_dir = Path(out_dir)
    _write_text(out_dir / "report.json", json.dumps(report, indent=2, sort_keys=True, default=_jsonable) + "\n")
    write_markdown(report, out_dir / "report.md")
    plot_recall_bars(report, out_dir / "plots" / "recall.png")
    if points:
        plot_lora_space(points, labels or {}, out_dir / "plots" / "lora_space.png",
                        title=f"{report.get('dataset', '')} · {report.get('setting', '')}")
