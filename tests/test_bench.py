"""`sglora-edge bench`: the output's shape (schema), torch-free with a bundle, --synthetic with torch. No timing
thresholds: only that every stage, comparison and record is there and well-formed."""

import json

import pytest
from typer.testing import CliRunner

from runtime.bench import MATMUL_ONNX, STATS, check_schema, loglog_slope
from sglora_edge.cli import app
from test_no_torch import run_blocked

SMALL = ["--repeats", "2", "--warmup", "0", "--batch", "1,4", "--gallery-size", "8", "--switch-gallery", "8",
         "--library-sizes", "10,100,1000", "--retrieval-sizes", "100,1000,10000", "--threads", "1"]


def check_stages(stages: dict, batches=(1, 4)) -> None:
    expected = {"tokenize", "description_embedding", "aggregation", "generation_S1", "generation_S5",
                "lora_handover_input", "lora_handover_merged", "image_preprocess", "text_query", "retrieval",
                "end_to_end_warm", "switch_cached", "switch_reencode",
                *(f"{s}_b{b}" for b in batches for s in ("gallery_prefix", "task_switch_suffix",
                                                         "task_switch_suffix_merged"))}
    assert set(stages) == expected
    for st in stages.values():
        assert set(st) == set(STATS) and st["p50"] > 0 and st["std"] >= 0 and st["p99"] >= st["p50"]


def test_bench_on_a_bundle_without_torch(micro_bundle, tmp_path):
    out = tmp_path / "out"
    args = ["bench", "--bundle", str(micro_bundle), "--out", str(out), *SMALL]
    r = run_blocked(f"import sys; sys.argv=['sglora-edge', *{args!r}]\nfrom sglora_edge.cli import app\napp()",
                    blocked=("torch", "torchvision", "open_clip", "export"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "results.json").read_text())
    check_schema(doc)
    (b,) = doc["bundles"]
    check_stages(b["stages"])
    assert b["role"] == "main" and b["torch"] is None and b["backend"]["providers"] == ["CPUExecutionProvider"]
    assert b["cold_start"]["total"] >= b["cold_start"]["first_result"] > 0 and b["cold_start"]["peak_rss_mb"] > 0
    assert 0 < b["throughput"]["fraction_of_peak"]
    assert doc["machine"]["matmul_probe"]["gflops"] > 0 and doc["machine"]["versions"]["torch"]  # installed, unused
    lib, ret = doc["scaling"]["library"], doc["scaling"]["retrieval"]
    assert lib["sizes"] == [10, 100, 1000] and len(lib["generate_ms"]) == 3 and lib["growth"]
    assert ret["sizes"] == [100, 1000, 10000] and ret["slope_time"] is not None
    assert b["label"] == "sglora-micro L=all random"
    c = doc["comparisons"]
    assert c["torch_vs_ort"] == {} and c["generation_vs_training"] == {}
    assert set(c["lora_modes"][b["label"]]) == {"b1", "b4", "handover_input_ms", "handover_merged_ms"}
    assert c["task_switch"]["sglora-micro random"]["speedup"]["all"] > 0
    md = (out / "results.md").read_text()
    assert "Cold start" in md and "LoRA as input vs merged" in md and "Scaling" in md
    assert sorted(doc["charts"]) == ["scaling.png", "stages.png"] and (out / "stages.png").stat().st_size > 0
    assert not list(out.glob(".*.tmp"))
    (t,) = doc["tuning"]
    assert {(r["threads"], r["graph_optimization"]) for r in t["rows"]} >= {(0, "all"), (1, "all"), (1, "basic")}
    assert t["best"]["speedup_over_default"] > 0 and "Session settings" in md


def test_bench_synthetic_compares_torch_and_training(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["bench", "--synthetic", "sglora-micro", "--out", str(out), "--json", *SMALL[:-6],
                                 "--library-sizes", "", "--retrieval-sizes", "", "--threads", "1",
                                 "--no-tuning", "--int8"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    check_schema(doc)
    main, switch = doc["bundles"]
    assert main["role"] == "main" and switch["role"] == "switch" and switch["lora"]["last_blocks"] == 1
    assert set(switch["stages"]) == {"switch_cached"} and doc["scaling"] is None and doc["tuning"] == []
    c = doc["comparisons"]
    tvo = c["torch_vs_ort"][main["label"]]
    assert {"description_embedding", "generation_S1", "gallery_prefix_b4", "task_switch_suffix_b1"} <= set(tvo)
    assert all(v["speedup"] > 0 for v in tvo.values())
    g = c["generation_vs_training"][main["label"]]
    assert g["epochs"] == 40 and g["train_s"] > 0 and g["ratio"] > 0
    assert set(c["task_switch"]["sglora-micro random"]["cached_ms"]) == {"all", "1"}
    q = c["int8"][main["label"]]
    assert q["recall"] is None and q["quantized"]["graphs"] == ["visual_prefix", "visual_suffix"]  # random weights
    assert {k for k in q if k[1:].isdigit()} == {"b1", "b4"} and q["b4"]["speedup"] > 0


def test_int8_copy_runs_and_its_recall_is_measured(micro_bundle, micro_world, tmp_path):
    from export.precision import quantize_bundle, world_recall
    from runtime.bundle import Bundle
    q = quantize_bundle(micro_bundle, tmp_path / "int8")
    assert Bundle.load(q).manifest.quantized["weights"] == "int8 per channel"  # verified: the sha256s match
    before, after = world_recall(micro_bundle, micro_world), world_recall(q, micro_world)
    assert before["tasks"] == after["tasks"] > 0 and 0 <= after["mean_r1"] <= 100
    assert set(before["per_task"]) == set(after["per_task"])


def test_bad_arguments_are_one_line(tmp_path):
    for args, says in ((["--out", str(tmp_path)], "nothing to measure"),
                       (["--bundle", str(tmp_path / "none"), "--out", str(tmp_path)], "no bundle there"),
                       (["--bundle", str(tmp_path), "--batch", "1,x", "--out", str(tmp_path)], "--batch"),
                       (["--synthetic", "ViT-H-14", "--out", str(tmp_path)], "unknown")):
        r = CliRunner().invoke(app, ["bench", *args])
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output


def test_matmul_probe_model_is_one_matmul():
    onnx = pytest.importorskip("onnx")
    m = onnx.load_from_string(MATMUL_ONNX)
    onnx.checker.check_model(m)
    assert [n.op_type for n in m.graph.node] == ["MatMul"]


def test_loglog_slope():
    sizes = [10, 100, 1000, 10000]
    assert loglog_slope(sizes, [5, 7, 70, 700]) == pytest.approx(1.0)
    assert loglog_slope(sizes[:2], [1, 2]) is None


def test_top_indices_match_a_stable_full_sort():
    import numpy as np

    from runtime.pipeline import top_indices
    rng = np.random.default_rng(0)
    for n, k in ((10, 3), (1000, 5), (50, 50), (7, 20)):
        row = rng.integers(0, 4, n).astype(np.float32)  # many ties, also at the k-th place
        assert top_indices(row, k).tolist() == np.argsort(-row, kind="stable")[:k].tolist()
