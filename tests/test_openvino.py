"""--backend openvino and --precision bf16|int8: parity with ONNX Runtime fp32 on the micro bundle, one-line refusals,
`auto`'s choice, NNCF INT8 graphs written into the bundle (calibrated on train images only) and the bench's table of
engines and precisions. Skipped where openvino (and, for INT8, nncf) is not installed; `make test` installs both."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("openvino")

from runtime import sessions  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from runtime.pipeline import EdgeRuntime, run_retrieval  # noqa: E402
from sglora_edge.cli import app  # noqa: E402
from test_no_torch import run_blocked  # noqa: E402

DESC = "a photo of a lemon"


@pytest.fixture(scope="module")
def int8_bundle(micro_bundle, micro_world, tmp_path_factory):
    """The micro bundle with NNCF INT8 graphs, calibrated on a copy of the micro world whose val and test images
    are deleted: had calibration opened one of them, it would fail."""
    pytest.importorskip("nncf")
    from sglora_edge.data import load_dataset
    root = tmp_path_factory.mktemp("int8")
    world = root / "world"
    shutil.copytree(micro_world, world)
    ds = load_dataset(world, check_images="none")
    train = {p.image for p in ds.split_pairs("train")}
    held_out = {p.image for split in ("val", "test") for p in ds.split_pairs(split)} - train
    assert held_out
    for image in held_out:
        image.unlink()
    bundle = root / "bundle"
    r = CliRunner().invoke(app, ["quantize", "--bundle", str(micro_bundle), "--out", str(bundle), "--world",
                                 str(world), "--calibration-images", "16", "--json"])
    assert r.exit_code == 0, r.output
    return bundle, json.loads(r.stdout), ds, train


def features(rt, images, lora):
    return rt.suffix(rt.prefix(rt.preprocess(images)), lora)


def gallery_images(micro_world, n=8):
    return sorted((micro_world / "images" / "photo" / "lemon").iterdir())[:n]


def test_openvino_fp32_matches_onnx_runtime(micro_bundle, micro_world):
    ort = EdgeRuntime.load(micro_bundle, backend="ort-cpu", threads=1)
    ov = EdgeRuntime.load(micro_bundle, backend="openvino", threads=1)
    assert ov.describe()["providers"] == ["OpenVINO CPU (f32)"] and ov.config.precision == "fp32"
    gen_ort, gen_ov = ort.generate(DESC), ov.generate(DESC)
    np.testing.assert_allclose(gen_ov.loras, gen_ort.loras, atol=1e-5)
    assert gen_ov.aggregation.experts == gen_ort.aggregation.experts
    images = gallery_images(micro_world)
    np.testing.assert_allclose(features(ov, images, gen_ort.loras[0]), features(ort, images, gen_ort.loras[0]),
                               atol=1e-4)
    np.testing.assert_allclose(ov.text_features(["a lemon", "a red sofa"]),
                               ort.text_features(["a lemon", "a red sofa"]), atol=1e-5)


def test_run_on_openvino_ranks_like_onnx_runtime(micro_bundle, micro_world, tmp_path):
    gallery = micro_world / "images" / "photo" / "lemon"
    out = {b: run_retrieval(micro_bundle, DESC, gallery, backend=b, cache_dir=tmp_path / b, top_k=5, threads=1)
           for b in ("ort-cpu", "openvino")}
    assert out["openvino"]["backend"]["backend"] == "openvino"
    for q, hits in out["ort-cpu"]["results"].items():
        got = out["openvino"]["results"][q]
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in hits], atol=1e-3)


def test_openvino_runs_without_torch(micro_bundle, micro_world):
    args = ["run", "--bundle", str(micro_bundle), "--desc", DESC, "--gallery",
            str(micro_world / "images" / "photo" / "lemon"), "--backend", "openvino", "--json"]
    r = run_blocked(f"import sys; sys.argv=['sglora-edge', *{args!r}]\nfrom sglora_edge.cli import app\napp()",
                    blocked=("torch", "torchvision", "open_clip", "export"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backend"]["providers"] == ["OpenVINO CPU (f32)"]


def test_bf16_where_the_cpu_has_it(micro_bundle, micro_world, monkeypatch):
    if "BF16" not in sessions.openvino_capabilities():
        with pytest.raises(InputError, match="--precision bf16: OpenVINO says this CPU has no native BF16"):
            EdgeRuntime(micro_bundle, backend="openvino", precision="bf16")
        return
    ort = EdgeRuntime.load(micro_bundle, backend="ort-cpu", threads=1)
    bf16 = EdgeRuntime.load(micro_bundle, backend="openvino", precision="bf16", threads=1)
    assert "OpenVINO CPU (bf16)" in bf16.describe()["providers"]
    lora = ort.generate(DESC).loras[0]
    np.testing.assert_allclose(bf16.generate(DESC).loras[0], lora, atol=1e-5)  # the generator stays fp32
    images = gallery_images(micro_world)
    a, b = features(bf16, images, lora), features(ort, images, lora)
    assert (a * b).sum(1).min() > 0.99 and np.abs(a - b).max() > 1e-5  # close, and bf16 did run
    if "FP16" in sessions.openvino_capabilities():  # OpenVINO's f16 hint: no fp16 graphs needed in the bundle
        f16 = EdgeRuntime.load(micro_bundle, backend="openvino", precision="fp16", threads=1)
        assert "OpenVINO CPU (f16)" in f16.describe()["providers"]
        a = features(f16, images, lora)
        assert (a * b).sum(1).min() > 0.99 and np.abs(a - b).max() > 1e-5


def test_refusals_are_one_line(micro_bundle, micro_world, monkeypatch, tmp_path):
    cases = [(dict(backend="openvino", lora_mode="merged"), "--lora-mode merged runs on ONNX Runtime backends"),
             (dict(backend="ort-cpu", precision="bf16"), "--precision bf16: ONNX Runtime has no bf16 kernels"),
             (dict(backend="openvino", precision="int8"), "--precision int8: .* has no int8 graphs; add them with "
                                                          "`sglora-edge quantize"),
             (dict(backend="ort-cpu", precision="int4"), "--precision 'int4' is unknown")]
    for kwargs, says in cases:
        with pytest.raises(InputError, match=says):
            EdgeRuntime(micro_bundle, **kwargs)
    monkeypatch.setattr(sessions, "openvino_capabilities", lambda: ["FP32", "INT8"])  # a CPU without bf16
    with pytest.raises(InputError, match="OpenVINO says this CPU has no native BF16 .*it has FP32, INT8"):
        EdgeRuntime(micro_bundle, backend="openvino", precision="bf16")
    monkeypatch.undo()
    gallery = micro_world / "images" / "photo" / "lemon"
    for args in (["--backend", "openvino", "--lora-mode", "merged"], ["--precision", "bf16", "--backend", "ort-cpu"]):
        r = CliRunner().invoke(app, ["run", "--bundle", str(micro_bundle), "--desc", DESC, "--gallery", str(gallery),
                                     "--cache-dir", str(tmp_path), *args])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "error: " in r.output, r.output


def test_auto_picks_openvino_on_an_x86_cpu_and_says_so(micro_bundle, monkeypatch):
    monkeypatch.setattr(sessions, "x86", lambda: True)
    rt = EdgeRuntime(micro_bundle, backend="auto")
    assert rt.config.backend == "openvino" and "x86 CPU with OpenVINO installed" in rt.backend_reason
    merged = EdgeRuntime(micro_bundle, backend="auto", lora_mode="merged")
    assert merged.config.backend == "ort-cpu" and "merged runs on ONNX Runtime" in merged.backend_reason
    monkeypatch.setattr(sessions, "x86", lambda: False)
    rt = EdgeRuntime(micro_bundle, backend="auto")
    assert rt.config.backend == "ort-cpu" and "OpenVINO is for x86 CPUs" in rt.backend_reason
    monkeypatch.setattr(sessions, "x86", lambda: True)
    monkeypatch.setattr(sessions, "openvino_installed", lambda: False)
    rt = EdgeRuntime(micro_bundle, backend="auto")
    assert rt.config.backend == "ort-cpu" and "sglora-edge[openvino]" in rt.backend_reason


def test_int8_graphs_are_written_into_the_bundle_with_their_calibration(int8_bundle, micro_world):
    bundle, record, ds, train = int8_bundle
    m = Bundle.load(bundle).manifest  # verified: the sha256 of every file, the new graphs included
    assert m.int8_graphs == {"visual_prefix": "visual_prefix.int8.onnx", "visual_suffix": "visual_suffix.int8.onnx"}
    assert m.int8 == record and record["calibration"]["split"] == "train"
    assert record["calibration"]["images"] == 16 and record["calibration"]["of"] == len(
        {p.image for p in ds.split_pairs("train") if ds.tasks[p.task].role != "unseen"})
    assert "nncf.quantize" in record["method"] and min(record["min_cosine_to_fp32"].values()) > 0.99
    images = gallery_images(micro_world)
    ref = EdgeRuntime.load(bundle, backend="ort-cpu", threads=1)
    lora = ref.generate(DESC).loras[0]
    fp32 = features(ref, images, lora)
    for backend in ("ort-cpu", "openvino"):
        rt = EdgeRuntime.load(bundle, backend=backend, precision="int8", threads=1)
        q = features(rt, images, lora)
        assert (q * fp32).sum(1).min() > 0.98 and np.abs(q - fp32).max() > 1e-5, backend  # int8 ran, stayed close


def test_calibration_reads_only_train_images(micro_world):
    from export.precision import calibration_images
    from sglora_edge.data import load_dataset
    ds = load_dataset(micro_world, check_images="none")
    paths, record = calibration_images(world=micro_world, n=10 ** 6)
    held_out = {p.image for s in ("val", "test") for p in ds.split_pairs(s)}
    unseen = {p.image for p in ds.split_pairs("train") if ds.tasks[p.task].role == "unseen"}
    assert paths and not set(paths) & (held_out | unseen) and record["split"] == "train"
    with pytest.raises(InputError, match="pass --images DIR .* or --world DIR"):
        calibration_images()


def test_int8_recall_is_measured_through_the_runtime(int8_bundle, micro_world):
    from export.precision import world_recall
    bundle = int8_bundle[0]
    fp32 = world_recall(bundle, micro_world)
    for backend in ("ort-cpu", "openvino"):
        q = world_recall(bundle, micro_world, backend=backend, precision="int8")
        assert q["tasks"] == fp32["tasks"] > 0 and 0 <= q["mean_r1"] <= 100 and set(q["per_task"]) == set(
            fp32["per_task"])


def test_bench_table_of_engines_and_precisions(micro_bundle, tmp_path):
    pytest.importorskip("nncf")
    from runtime.bench import check_schema
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["bench", "--bundle", str(micro_bundle), "--out", str(out), "--repeats", "2",
                                 "--warmup", "1", "--batch", "1,4", "--gallery-size", "8", "--switch-gallery", "8",
                                 "--library-sizes", "", "--retrieval-sizes", "", "--threads", "1", "--no-tuning",
                                 "--openvino", "--calibration-images", "8", "--backend", "openvino", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    check_schema(doc)
    (b,) = doc["bundles"]  # every stage on OpenVINO; merged mode is ONNX Runtime's, so it is left out
    assert b["backend"]["providers"] == ["OpenVINO CPU (f32)"] and "lora_handover_merged" not in b["stages"]
    m = doc["machine"]
    assert m["kernel"] and isinstance(m["cpu_flags"], list) and "FP32" in m["openvino_capabilities"]
    assert m["versions"]["openvino"] and m["versions"]["nncf"]
    (pc,) = doc["comparisons"]["precisions"].values()
    rows = {(row["backend"], row["precision"], row["graphs"].split(",")[0]): row for row in pc["rows"]}
    assert set(rows) == {("ort-cpu", "fp32", "fp32 graphs"), ("ort-cpu", "int8", "INT8"),
                         ("openvino", "fp32", "fp32 graphs"), ("openvino", "bf16", "fp32 graphs"),
                         ("openvino", "int8", "INT8")} and len(pc["rows"]) == 6
    for row in pc["rows"]:
        if row["refused"]:  # only bf16, and only on a CPU without it
            assert row["precision"] == "bf16" and "BF16" not in m["openvino_capabilities"]
            continue
        assert set(row["ms"]) == set(row["speedup"]) == {"b1", "b4"} and isinstance(row["cold_start_ms"], float)
        assert row["peak_rss_mb"] > 0 and row["min_cosine"] > 0.98 and row["mean_r1"] is None  # random weights
    assert pc["calibration"]["images"] == 8 and "Engines and precisions" in (out / "results.md").read_text()
