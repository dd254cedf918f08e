"""report.md / report.json / plots from a small fake report in the harness's shape."""

import copy
import json

import numpy as np
import pytest
from PIL import Image

from sglora_edge.report import METHOD_NAMES, _pca2, write_report

ORDER = ["zero_shot", "model_soups", "model_soups_dw", "adapter_soup", "topk_weighted", "topk_weighted_dw",
         "sglora", "sglora_mean", "random_description", "oracle"]
# i2t R@1 per method; t2i R@1 is 10 lower, so mean R@1 = i2t R@1 - 5. The Oracle is highest but must not be bold.
I2T_R1 = {"zero_shot": 20.0, "model_soups": 22.0, "model_soups_dw": 23.0, "adapter_soup": 21.0,
          "topk_weighted": 24.0, "topk_weighted_dw": 26.0, "sglora": 27.0, "sglora_mean": 25.0,
          "random_description": 21.5, "oracle": 40.0}
TASKS = {"expert": ["apple", "pear"], "train": ["plum"], "unseen": ["lemon", "lime", "kiwi"]}


def _result(i2t_r1: float) -> dict:
    return {"i2t": {"r1": i2t_r1, "r5": i2t_r1 + 20, "r10": i2t_r1 + 30},
            "t2i": {"r1": i2t_r1 - 10, "r5": i2t_r1 + 5, "r10": i2t_r1 + 15}}


def _setting(name: str, shift: float) -> dict:
    methods = {}
    for m, r1 in I2T_R1.items():
        res = _result(r1 + shift)
        res.update(mean_r1=r1 + shift - 5, gain=r1 - I2T_R1["zero_shot"], gain_se=1.0, n_tasks=3)
        methods[m] = res
    methods["sglora"].update(sample_std_r1=0.8, samples=5)
    per_task = {t: {m: _result(r1 + shift + j) for m, r1 in I2T_R1.items()} for j, t in enumerate(TASKS["unseen"])}
    return {"setting": name, "tasks": TASKS, "methods": methods, "per_task": per_task,
            "comparisons": [{"a": "sglora", "b": "topk_weighted", "diff": 3.0, "se": 0.9, "within_noise": False},
                            {"a": "sglora", "b": "random_description", "diff": 0.4, "se": 1.1, "within_noise": True}]}


def fake_report() -> dict:
    top = _setting("in_dataset:photo", 0.0)
    return {
        "dataset": "runs/world", "backbone": "open_clip:sglora-tiny@sha256:0123abcd", **top,
        "method_order": ORDER,
        "config": {"k": 4, "tau": 0.1},
        "timings_s": {"pretrain": 300.0, "experts": 400.0, "total": 700.0},
        "command": "sglora-edge reproduce --out runs/x",
        "validity": {"premise_holds": False, "verdict": "Experts do not transfer here.",
                     "oracle_gain": 15.2, "oracle_gain_se": 2.0, "oracle_n_tasks": 3,
                     "transfer_within_family": -0.8, "transfer_within_family_se": 1.0, "transfer_within_family_n": 4,
                     "transfer_across_family": -3.2, "transfer_across_family_se": 0.2, "transfer_across_family_n": 6,
                     "spearman_similarity_vs_gain": -0.01, "spearman_n_pairs": 6},
        "settings": {"cross_domain:photo->sketch": _setting("cross_domain:photo->sketch", -3.0)},
        "ablations": {
            "k": {"param": "k", "setting": "in_dataset:photo", "values": [1, 2, 4], "metric": "mean_r1",
                  "methods": {"topk_weighted": [15.0, 16.0, 17.0], "sglora_mean": [15.5, 16.0, 17.5]},
                  "se": {"topk_weighted": [1.0, 1.0, 1.0]}},
            "freeze_a": {"param": "freeze_a", "values": [False, True], "metric": "mean_r1",
                         "methods": {"sglora": [18.0, 19.5]}, "se": {}},
        },
    }


@pytest.fixture
def report() -> dict:
    return fake_report()


def fake_lora_points(rng, n_ckpt=5, width=300, experts=TASKS["expert"], unseen=TASKS["unseen"]):
    """Experts and unseen tasks as clusters in a wide LoRA space (more columns than rows, as in real LoRAs)."""
    centres = {t: rng.normal(size=width) * 3 for t in experts + unseen}
    points, labels = {}, {}

    def add(group, tasks, n, noise):
        points[group] = np.stack([centres[t] + noise * rng.normal(size=width) for t in tasks for _ in range(n)])
        labels[group] = [t for t in tasks for _ in range(n)]
    add("expert_ckpt", experts, n_ckpt, 0.5)
    add("expert_mean", experts, 1, 0.0)
    add("oracle_ckpt", unseen, n_ckpt, 0.5)
    add("sglora_sample", unseen, 3, 1.0)
    add("topk_weighted", unseen, 1, 2.0)
    points["model_soups"] = points["expert_mean"].mean(axis=0, keepdims=True)
    labels["model_soups"] = ["all"]
    return points, labels


def _row(md: str, method: str) -> list[str]:
    """Cells of the first table row for `method` (the top-level main table comes first)."""
    line = next(l for l in md.splitlines() if l.startswith(f"| {METHOD_NAMES[method]} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.width >= 800 and img.height >= 400


def test_write_report(tmp_path, report):
    points, labels = fake_lora_points(np.random.default_rng(0))
    write_report(report, tmp_path, points=points, labels=labels)

    assert json.loads((tmp_path / "report.json").read_text()) == report
    md = (tmp_path / "report.md").read_text()
    lines = [l for l in md.splitlines() if l.strip()]
    assert lines[0].startswith("# ")
    assert "premise fails" in lines[1] and "not meaningful" in lines[1] and "Experts do not transfer here." in lines[1]

    # best / second best i2t R@1 among non-Oracle methods, by hand: sglora 27, topk_weighted_dw 26
    ranked = sorted((r1, m) for m, r1 in I2T_R1.items() if m != "oracle")
    best, second = ranked[-1][1], ranked[-2][1]
    assert (best, second) == ("sglora", "topk_weighted_dw")
    assert _row(md, best)[1] == "**27.0**"
    assert _row(md, second)[1] == "<u>26.0</u>"
    assert _row(md, "oracle")[1] == "40.0"  # uses target data: never marked
    assert _row(md, "zero_shot")[1] == "20.0"
    assert "± 0.8" in _row(md, "sglora")[7]  # sample std on SG-LoRA's mean R@1

    # oracle-gap recovered for Top-K weighted: (19 - 15) / (35 - 15) = 20 %
    assert _row(md, "topk_weighted")[-1] == "20.0 %"
    assert _row(md, "oracle")[-1] == "100.0 %"

    for heading in ("## Validity", "## Main results: in_dataset:photo", "## Setting: cross_domain:photo->sketch",
                    "## Ablations", "### k", "### freeze_a", "## Per-task mean R@1", "## Timings", "<details>"):
        assert heading in md, heading
    order = [md.index(h) for h in ("## Validity", "## Main results", "## Setting:", "## Ablations",
                                   "## Per-task", "## Timings", "<details>", "Produced by: `sglora-edge reproduce")]
    assert order == sorted(order)
    assert "within noise" in md and "outside noise" in md
    assert "| 4 | 17.0 ± 1.0 | 17.5 |" in md  # ablation row: se only where given

    _check_png(tmp_path / "plots" / "recall.png")
    _check_png(tmp_path / "plots" / "lora_space.png")


def test_premise_holds_and_sparse_report(tmp_path, report):
    report = copy.deepcopy(report)
    report["validity"]["premise_holds"] = True
    report["settings"]["mixed_source"] = {}  # a setting or ablation that did not run must not crash
    report["ablations"]["tau"] = {}
    del report["methods"]["oracle"], report["command"]
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "premise fails" not in md and "Premise holds" in md
    assert "## Setting: mixed_source" in md and "_Not run._" in md
    assert _row(md, "topk_weighted")[-1] == "—"  # no Oracle, no gap
    assert not (tmp_path / "plots" / "lora_space.png").exists()
    _check_png(tmp_path / "plots" / "recall.png")


def test_pca_on_wide_vectors_matches_plain_svd():
    x = np.random.default_rng(1).normal(size=(12, 50)) * np.linspace(3, 0.1, 50)
    mean, components, ratio = _pca2(x)
    _, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(ratio, s[:2] ** 2 / (s ** 2).sum(), rtol=1e-8)
    np.testing.assert_allclose(np.abs(components @ vt[:2].T), np.eye(2), atol=1e-8)
