import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sglora_edge.config import LoRASpec
from sglora_edge.evaluate import Setting, method_results, summarise
from sglora_edge.methods import METHODS
from sglora_edge.library import Library
from sglora_edge.lora import average_delta_weights, delta_weights
from sglora_edge.metrics import KS, paired


class RecordingEvaluator:
    """Stands in for Evaluator: records what each method asks to evaluate."""

    def __init__(self, dataset):
        self.dataset, self.calls = dataset, []

    def deltas(self, task, deltas):
        self.calls.append(deltas)
        return {"i2t": {"r1": 10.0 * len(self.calls)}, "t2i": {"r1": 0.0}}

    def vector(self, task, spec, vec):
        return self.deltas(task, delta_weights(spec, torch.as_tensor(np.asarray(vec, dtype=np.float32))))


class FixedEncoder:
    name = "fixed"

    def encode(self, texts):
        return np.array([[1.0, 0.0, 0.0]] * len(texts), dtype=np.float32)


def test_each_baseline_lora_matches_its_definition(micro_world, tmp_path):
    from sglora_edge.data import load_dataset
    from sglora_edge.experts import task_file
    from runtime.artifacts import save_artifact
    ds = load_dataset(micro_world)
    spec = LoRASpec(n_blocks=2, width=8, rank=1)
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(3, spec.size)).astype(np.float32)
    lib = Library(names=["e0", "e1", "e2"], descriptions=["d0", "d1", "d2"],
                  embeddings=np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], dtype=np.float32), mu=mu,
                  var=np.ones_like(mu), spec=spec, backbone="bb", semantic="fixed", n_checkpoints=[1, 1, 1])
    task = ds.task_names(role="unseen")[0]
    oracle = rng.normal(size=(2, spec.size)).astype(np.float32)
    save_artifact(task_file(tmp_path, task), {"lora": oracle}, kind="expert-checkpoints",
                  meta={"backbone": "bb", "lora_spec": spec.to_dict()})
    # the seen library adds a train task (t0) that is closer to the query than any expert
    seen_mu = np.concatenate([mu, rng.normal(size=(1, spec.size)).astype(np.float32)])
    seen = Library(names=lib.names + ["t0"], descriptions=lib.descriptions + ["dt"],
                   embeddings=np.concatenate([lib.embeddings, np.array([[1, 0.05, 0]], dtype=np.float32)]),
                   mu=seen_mu, var=np.ones_like(seen_mu), spec=spec, backbone="bb", semantic="fixed",
                   n_checkpoints=[1, 1, 1, 1])
    multi = rng.normal(size=spec.size).astype(np.float32)
    ev = RecordingEvaluator(ds)
    methods = ("zero_shot", "model_soups", "model_soups_dw", "adapter_soup", "topk_weighted", "topk_weighted_dw",
               "topk_weighted_seen", "nearest_seen", "multi_task_lora", "oracle")
    st = Setting(lib, FixedEncoder(), tmp_path, k=2, tau=0.1, seen=seen, multi_task=multi)
    out, why = method_results(ev, st, task, samples=1, seed=0, methods=methods)
    zs, soup, soup_dw, adapter, topk, topk_dw, topk_seen, nearest, multi_task, orc = ev.calls
    agg = lib.aggregate(np.array([1.0, 0, 0]), k=2, tau=0.1)
    assert zs is None
    expect = lambda v: delta_weights(spec, torch.from_numpy(np.asarray(v, dtype=np.float32)))
    close = lambda a, b: all(torch.allclose(a[i], b[i], atol=1e-5) for i in b)
    assert close(soup, expect(mu.mean(0)))
    assert close(soup_dw, average_delta_weights(spec, torch.from_numpy(mu), torch.full((3,), 1 / 3)))
    assert close(adapter, expect(mu[:2].mean(0)))  # top-2 by similarity, equal weights
    assert close(topk, expect(agg.mu))
    assert close(topk_dw, average_delta_weights(spec, torch.from_numpy(mu[:2]), torch.tensor(agg.weights)))
    assert close(orc, expect(oracle[-1]))  # the Oracle is the task's own final-epoch LoRA
    assert not close(soup, soup_dw)  # averaging A and B separately is not the ΔW average
    assert close(topk_seen, expect(seen.aggregate(np.array([1.0, 0, 0]), k=2, tau=0.1).mu))  # over experts ∪ train
    assert close(nearest, expect(seen_mu[0]))  # e0 (similarity 1) beats t0 (0.999)
    assert close(multi_task, expect(multi))
    assert set(out) == set(methods)
    assert why["experts"] == ["e0", "e1"]


def test_summary_gain_and_paired_se():
    per_task = {t: {"zero_shot": {"i2t": {"r1": z}, "t2i": {"r1": z}}, "oracle": {"i2t": {"r1": o}, "t2i": {"r1": o}}}
                for t, z, o in (("a", 10.0, 14.0), ("b", 20.0, 22.0), ("c", 30.0, 36.0))}
    summary, _ = summarise(per_task, methods=("zero_shot", "oracle"))
    assert summary["oracle"]["gain"] == pytest.approx(4.0)
    assert summary["oracle"]["gain_se"] == pytest.approx(np.std([4, 2, 6], ddof=1) / np.sqrt(3))
    assert paired([1, 2], [1, 2]) == (0.0, 0.0)


def test_summary_of_a_generated_row_pooled_over_generators_that_draw_different_sample_counts():
    r = lambda x, samples: {"i2t": {"r1": x}, "t2i": {"r1": x}, **({"sample_r1": samples} if samples else {})}
    per_task = {"a": {"zero_shot": r(10.0, None), "sglora": r(12.0, [11.0, 13.0, 12.0])},
                "b": {"zero_shot": r(20.0, None), "sglora": r(21.0, [21.0])}}  # a rotation whose default draws one
    summary, _ = summarise(per_task, methods=("zero_shot", "sglora"))
    assert summary["sglora"]["samples"] == 1 and summary["sglora"]["mean_r1"] == pytest.approx(16.5)


REQUIRED = {"dataset": str, "backbone": str, "setting": str, "tasks": dict, "methods": dict, "per_task": dict,
            "config": dict, "timings_s": dict, "validity": dict, "rotations": int, "galleries_per_task": int,
            "power": dict}


def check_schema(report):
    for key, typ in REQUIRED.items():
        assert isinstance(report[key], typ), key
    assert set(report["tasks"]) == {"expert", "train", "unseen"}
    assert set(report["methods"]) == set(METHODS)
    for m, r in report["methods"].items():
        for d in ("i2t", "t2i"):
            assert set(r[d]) == {f"r{k}" for k in KS} and all(0 <= v <= 100 for v in r[d].values())
    assert set(report["per_task"]) == set(report["tasks"]["unseen"])
    for res in report["per_task"].values():
        assert set(METHODS) <= set(res)
    v = report["validity"]
    for key in ("oracle_gain", "oracle_gain_se", "transfer_within_family", "transfer_across_family",
                "spearman_similarity_vs_gain", "premise_holds", "verdict"):
        assert key in v


def test_micro_reproduce_writes_a_complete_deterministic_report(micro_world, tmp_path):
    from sglora_edge.reproduce import reproduce
    a = reproduce(micro_world, tmp_path / "a", preset="micro", progress=False)
    check_schema(json.loads((tmp_path / "a" / "report.json").read_text()))
    assert set(a["settings"]) == {"in_dataset:photo", "in_dataset:sketch", "cross_domain:photo->sketch",
                                  "cross_domain:sketch->photo", "mixed_source"}
    # the headline pools both in-dataset settings
    assert set(a["tasks"]["unseen"]) == set(a["settings"]["in_dataset:photo"]["tasks"]["unseen"]) | set(
        a["settings"]["in_dataset:sketch"]["tasks"]["unseen"])
    assert set(a["ablations"]) == {"k", "tau", "freeze_a", "last_blocks"}
    assert "seen tasks" in a["ablations"]["k"]["setting"]  # ablations never read the unseen tasks
    assert a["validation"]["curves_by_penalty"] and "retrieval_generator_wins" in a["validation"]
    assert "sglora-topk_weighted_dw" in a["interval"] and set(a["diversity"]) == {"sglora_paper", "sglora_retrieval"}
    assert a["ablations"]["last_blocks"]["values"] == [0, 1]
    # the rule: without a cross-validated win the default is the Top-K (ΔW) merge itself, exactly
    if not a["validation"]["retrieval_generator_wins"]:
        assert a["default_generator"] == "topk_dw"
        for r in a["per_task"].values():
            assert r["sglora"]["i2t"] == r["topk_weighted_dw"]["i2t"] and r["sglora"]["t2i"] == r["topk_weighted_dw"]["t2i"]
    assert all("family_pooled" in r and "multi_task_lora_by_task" in r for r in a["per_task"].values())
    md = (tmp_path / "a" / "report.md").read_text()
    assert a["validity"]["verdict"] in md
    for png in ("recall.png", "lora_space.png"):
        assert (tmp_path / "a" / "plots" / png).stat().st_size > 1000
    b = reproduce(micro_world, tmp_path / "b", preset="micro", backbone=str(tmp_path / "a" / "backbone"),
                  progress=False)
    for key in ("methods", "per_task", "validity", "ablations", "settings"):
        assert json.dumps(a[key], sort_keys=True) == json.dumps(b[key], sort_keys=True), key
    # a second run in the same folder resumes from the caches and gives the same report
    c = reproduce(micro_world, tmp_path / "a", preset="micro", progress=False)
    assert json.dumps(a["methods"], sort_keys=True) == json.dumps(c["methods"], sort_keys=True)


def test_demo_ends_on_the_device_with_torch_blocked(micro_world, tmp_path, capfd):
    """`make demo`'s last step: export the run's bundle, then `run` on an unseen task in a torch-free process."""
    from sglora_edge.demo import main
    from sglora_edge.reproduce import reproduce
    reproduce(micro_world, tmp_path / "run", preset="micro", ablations=False, progress=False)
    assert main(["--run", str(tmp_path / "run"), "--data", str(micro_world)]) == 0
    out = capfd.readouterr().out
    html = out.strip().splitlines()[-1].removeprefix("Contact sheet: ")
    assert "On the device (torch blocked)" in out and "experts" in out and Path(html).stat().st_size > 1000


def test_rotations_pool_every_class_once_and_reuse_the_task_loras(micro_world, tmp_path, monkeypatch):
    import sglora_edge.experts as experts
    from sglora_edge.data import load_dataset
    from sglora_edge.reproduce import reproduce
    trained = []
    real = experts.train_task
    monkeypatch.setattr(experts, "train_task", lambda bb, spec, ds, task, cfg, **kw: (
        trained.append(task), real(bb, spec, ds, task, cfg, **kw))[1])
    r = reproduce(micro_world, tmp_path / "rot", preset="micro", ablations=False, rotations=3, progress=False)
    check_schema(json.loads((tmp_path / "rot" / "report.json").read_text()))
    ds = load_dataset(micro_world)
    singles = [t for t in trained if isinstance(t, str)]
    assert sorted(singles) == ds.task_names()  # each task's LoRA trained once, reused in every role
    assert sorted(r["tasks"]["unseen"]) == ds.task_names()  # every class unseen exactly once, pooled
    assert r["rotations"] == 3 and len(r["per_rotation"]) == 3 and r["galleries_per_task"] == 3
    assert all(len(g["zero_shot"]["gallery_r1"]) == 3 for g in r["per_task"].values())
    pair = "sglora_retrieval-topk_weighted_dw"
    assert r["power"][pair] > 0 and "variance" in r["interval"][pair]
    assert (tmp_path / "rot" / "rotation2" / "models").is_dir()
    unseen = [set(p["tasks"]["unseen"]) for p in r["per_rotation"]]
    assert not (unseen[0] & unseen[1]) and not (unseen[1] & unseen[2])
    assert "## Each rotation" in (tmp_path / "rot" / "report.md").read_text()


def test_task_homogeneous_batches_hold_one_task_each():
    from sglora_edge.experts import epoch_batches
    task_of = np.repeat(np.arange(3), [70, 64, 5])
    rng = np.random.default_rng(0)
    batches = epoch_batches(task_of, 32, True, rng)
    assert all(len(set(task_of[b])) == 1 for b in batches)
    assert sorted(np.concatenate(batches)) == list(range(len(task_of)))  # every image once
    mixed = epoch_batches(task_of, 32, False, np.random.default_rng(0))
    assert any(len(set(task_of[b])) > 1 for b in mixed)
    # the mixed order is the permutation the expert recipe always drew (cached task LoRAs stay valid)
    assert np.array_equal(np.concatenate(mixed), np.random.default_rng(0).permutation(len(task_of)))


def test_evaluation_is_cached_per_method(micro_world, tmp_path, monkeypatch):
    """A rerun evaluates nothing; a method whose input changed is evaluated alone."""
    import sglora_edge.reproduce as R
    a = R.reproduce(micro_world, tmp_path / "r", preset="micro", ablations=False, progress=False)
    asked = []
    real = R.method_results
    monkeypatch.setattr(R, "method_results", lambda ev, st, t, s, seed, methods: (asked.append(tuple(methods)),
                                                                                  real(ev, st, t, s, seed, methods))[1])
    b = R.reproduce(micro_world, tmp_path / "r", preset="micro", ablations=False, progress=False)
    assert asked == [] and json.dumps(a["per_task"], sort_keys=True) == json.dumps(b["per_task"], sort_keys=True)
    real_multi = R.Run.multi_task
    monkeypatch.setattr(R.Run, "multi_task", lambda self, name, tasks, by_task=False: (
        np.zeros(self.spec().size, np.float32) if not by_task else real_multi(self, name, tasks, by_task)))
    c = R.reproduce(micro_world, tmp_path / "r", preset="micro", ablations=False, progress=False)
    assert asked and set(asked) == {("multi_task_lora",)}
    for t, r in c["per_task"].items():
        assert r["multi_task_lora"]["i2t"] == r["zero_shot"]["i2t"]  # a zero LoRA is zero-shot
        assert r["oracle"] == a["per_task"][t]["oracle"]

