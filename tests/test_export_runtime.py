"""Export (torch -> ONNX bundle) and the torch-free runtime agree with the server code they mirror.

Artifacts are built once per module on the micro world with a random micro backbone: a few
experts (3 epochs), a library per semantic encoder (MiniLM with the last block adapted, the
CLIP text tower with every block adapted), a tiny CVAE each, and one bundle each.
"""

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from export.bundle import BundleExportError, export_bundle
from runtime.config import ExportConfig
from runtime.bundle import Bundle, BundleError
from runtime.engine import EngineUnavailable
from runtime.errors import InputError
from runtime.pipeline import EdgeRuntime, list_gallery, preprocess_image, run_retrieval
from runtime.tokenizer import ClipTokenizer, _fix_text_without_ftfy
from sglora_edge import __version__
from sglora_edge.backbone import create_backbone
from sglora_edge.cli import app
from sglora_edge.config import CVAEConfig, ExpertConfig, LoRASpec
from sglora_edge.data import load_dataset
from sglora_edge.experts import load_checkpoints, train_experts
from sglora_edge.conditions import OOD_SIMILARITY
from sglora_edge.generate import Generator, train_cvae
from sglora_edge.library import Library, SemanticEncoder
from sglora_edge.lora import delta_weights, encode_images

BACKBONE = "open_clip:sglora-micro@random"
SETUPS = {"minilm": 1, "backbone": 0}  # semantic encoder -> LoRA on the last L blocks (0 = all)
DESC = "a photo of a lemon"
ATOL = 1e-4


@pytest.fixture(scope="module")
def world(micro_world, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro models: extra threads only add overhead (and thrash on a busy 2-core box)
    try:
        yield build_world(micro_world, tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def build_world(micro_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ds = load_dataset(micro_world)
    bb = create_backbone(BACKBONE)
    experts, train = ds.task_names(role="expert")[:4], ds.task_names(role="train")[:2]
    out = {"root": root, "dataset": ds, "bb": bb, "gallery": micro_world / "images" / "photo" / "lemon"}
    for semantic, last in SETUPS.items():
        spec = LoRASpec.for_visual(bb.visual, last_blocks=last)
        ex = root / f"experts_{semantic}"
        train_experts(bb, spec, ds, experts + train, ex, ExpertConfig(epochs=3, keep_last=2), progress=False)
        enc = SemanticEncoder(semantic, bb)
        lib = Library.build(experts, [ds.tasks[t].description for t in experts],
                            [load_checkpoints(ex, t) for t in experts], enc, spec, bb.ident)
        lib.info = {"backbone_spec": bb.spec}
        lib.save(root / f"library_{semantic}.safetensors")
        cfg = CVAEConfig(latent=8, hidden=32, k=2, epochs=3, residual=semantic == "minilm")
        gen = train_cvae(lib, enc, ex, ds, train, [], bb, cfg, progress=False)
        gen.save(root / f"cvae_{semantic}.safetensors")
        summary = export_bundle(ExportConfig(library=root / f"library_{semantic}.safetensors",
                                             cvae=root / f"cvae_{semantic}.safetensors", out=root / f"bundle_{semantic}",
                                             fp16=semantic == "backbone"))
        out[semantic] = {"library": lib, "generator": Generator.load(root / f"cvae_{semantic}.safetensors", lib, bb),
                         "bundle": root / f"bundle_{semantic}", "summary": summary}
    return out


def test_manifest_describes_the_bundle(world):
    for semantic in SETUPS:
        lib, gen, root = world[semantic]["library"], world[semantic]["generator"], world[semantic]["bundle"]
        m = json.loads((root / "manifest.json").read_text())
        assert m["format_version"] == 1 and m["exporter"]["version"] == __version__
        assert m["backbone"] == {"ident": lib.backbone, "model_name": "sglora-micro", "spec": BACKBONE}
        assert m["lora_spec"] == lib.spec.to_dict() and m["lora_size"] == lib.spec.size
        assert m["first_adapted_block"] == lib.spec.blocks[0]
        assert m["semantic"]["name"] == lib.semantic
        assert m["aggregation"] == {"k": 2, "tau": gen.cvae.cfg.tau}
        assert m["cvae"]["latent"] == 8 and m["cvae"]["residual"] == (semantic == "minilm")
        assert m["ood_threshold"] == OOD_SIMILARITY
        assert m["image"]["image_size"] == [32, 32] and m["image"]["interpolation"] == "bicubic"
        assert m["image"]["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
        assert m["image"]["std"] == pytest.approx(open_clip.OPENAI_DATASET_STD)
        assert m["text"]["context_length"] == 24
        on_disk = sorted(p.name for p in root.iterdir() if p.name != "manifest.json")
        assert sorted(m["files"]) == on_disk
        assert all(len(f["sha256"]) == 64 for f in m["files"].values())
        assert m["graphs"]["visual_suffix"]["inputs"]["activations"][0] == "batch"
        assert m["graphs"]["generator"]["inputs"]["eps"] == ["samples", 8]
        assert max(m["export_max_abs_diff"].values()) < ATOL
    assert "semantic_encoder.onnx" in world["minilm"]["summary"]["files"]
    assert "semantic_encoder.onnx" not in world["backbone"]["summary"]["files"]
    assert json.loads((world["backbone"]["bundle"] / "manifest.json").read_text())["semantic"]["graph"] == "text_encoder"


TEXTS = ["a photo of a cat", "A Photo Of A CAT!!!", "it's a dog's life, isn't it? we'll see; they've gone",
         "  multiple   spaces\tand\nnewlines  ", "numbers 1234567 and 3.14159 and 1,000,000", "café crème brûlée",
         "emoji 🐱🐶 and symbols @#$%^&*()", "html &amp; entities &lt;b&gt;", "hyphen-ated words and under_scores",
         "\u201ccurly quotes\u201d and \u2018single\u2019 ones", "\ufb01ne ligature and ＦＵＬＬＷＩＤＴＨ", "日本語のテキスト",
         "", "a", "x" * 100, " ".join(["a grey tabby cat asleep on a red sofa"] * 12), "I'M SHOUTING 'QUOTED' TEXT",
         "ends with punctuation...", "½ ² ③ numerals", "a sketch of an owl"]


def test_runtime_tokenizer_matches_open_clip(world):
    vocab = world["backbone"]["bundle"] / "bpe_simple_vocab_16e6.txt.gz"
    for ctx in (24, 77):
        want = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)(TEXTS).numpy()
        for fix_text in (None, _fix_text_without_ftfy):  # with ftfy, and the fallback used where it is missing
            got = ClipTokenizer(vocab, ctx, fix_text=fix_text)(TEXTS)
            assert got.dtype == np.int64
            assert [t for t, a, b in zip(TEXTS, got, want) if not np.array_equal(a, b)] == []
    assert np.array_equal(ClipTokenizer(vocab, 24)(TEXTS), world["bb"].tokenizer(TEXTS).numpy())


@pytest.mark.parametrize("semantic", list(SETUPS))
def test_aggregation_and_generation_match_torch(world, semantic):
    gen, rt = world[semantic]["generator"], EdgeRuntime(world[semantic]["bundle"])
    want_agg = gen.condition(DESC)
    got = rt.condition(DESC)
    assert got.experts == want_agg.experts
    assert np.allclose(got.weights, want_agg.weights, atol=ATOL)
    assert np.abs(got.mu - want_agg.mu).max() < ATOL and np.abs(got.var - want_agg.var).max() < ATOL

    loras = rt.generate(DESC, samples=2).loras  # seed None: the prior mean
    want, _ = gen.generate(DESC, samples=2, use_mean=True)
    assert loras.shape == (2, world[semantic]["library"].spec.size)
    assert np.abs(loras - want).max() < ATOL
    # the same noise torch draws for seed 3 gives the same samples
    eps = torch.randn((3, 8), generator=torch.Generator().manual_seed(3)).numpy()
    got_s = rt.generate(DESC, eps=eps).loras
    want_s, _ = gen.generate(DESC, samples=3, seed=3)
    assert np.abs(got_s - want_s).max() < ATOL
    a = rt.generate(DESC, samples=2, seed=1).loras
    b = rt.generate(DESC, samples=2, seed=1).loras
    assert np.array_equal(a, b) and not np.allclose(a[0], a[1])


def test_minilm_description_embedding_matches_sentence_transformers(world):
    rt = EdgeRuntime(world["minilm"]["bundle"])
    enc = SemanticEncoder("minilm")
    for text in (DESC, "Sunflowers & tulips: a sketch!", "x"):
        assert np.abs(rt.embed_description(text)[0] - enc.encode([text])[0]).max() < ATOL
    with pytest.raises(ValueError, match="--desc is empty"):
        rt.embed_description("  ")


@pytest.mark.parametrize("semantic", list(SETUPS))
def test_image_features_match_torch(world, semantic, tmp_path):
    """Input mode == merged mode == torch within 1e-4 (fp32 cache), through the streamed, cached gallery."""
    bb, spec = world["bb"], world[semantic]["library"].spec
    rt = EdgeRuntime(world[semantic]["bundle"], cache_dir=tmp_path / "cache", cache_dtype="float32", batch_size=4)
    merged = EdgeRuntime(world[semantic]["bundle"], cache_dir=tmp_path / "cache", cache_dtype="float32",
                         lora_mode="merged", batch_size=4)
    paths = list_gallery(world["gallery"])[0][:6]
    with Image.open(paths[0]) as im:  # a non-square, larger image exercises resize + center crop
        im.convert("RGB").resize((53, 37), Image.NEAREST).save(tmp_path / "odd.png")
    paths.append(tmp_path / "odd.png")
    for p in (paths[0], paths[-1]):
        with Image.open(p) as im:
            want = bb.preprocess(im.convert("RGB")).numpy()
        assert np.abs(preprocess_image(p, rt.bundle.manifest.image) - want).max() < 1e-6

    lora = rt.generate(DESC, seed=0).loras[0] * 3  # scaled so the adapter visibly changes the features
    want = encode_images(bb.visual, bb.load_images(paths), delta_weights(spec, torch.from_numpy(lora))).numpy()
    gallery = rt.encode_gallery(paths)
    got = np.asarray(rt.image_features(gallery, lora))
    assert np.abs(got - want).max() < ATOL
    got_merged = np.asarray(merged.image_features(merged.encode_gallery(paths), lora))
    assert np.abs(got_merged - want).max() < ATOL
    plain = encode_images(bb.visual, bb.load_images(paths)).numpy()
    assert np.abs(want - plain).max() > 1e-3  # the LoRA mattered
    acts = rt.prefix(rt.preprocess(paths))
    assert np.abs(rt.suffix(acts, lora) - got).max() < 1e-6
    assert np.abs(merged.suffix(acts, lora) - rt.suffix(acts, lora)).max() < ATOL
    other = lora * -0.5  # a second LoRA rebuilds the merged session: no trace of the first may remain
    want_other = encode_images(bb.visual, bb.load_images(paths), delta_weights(spec, torch.from_numpy(other))).numpy()
    assert np.abs(merged.suffix(acts, other) - want_other).max() < ATOL
    store = rt.activation_store()  # one store for the gallery, not one file per image
    assert len(store) == len(paths) and {f.name.split("-")[0] for f in store.path.parent.iterdir()} == {store.path.name}
    again = rt.encode_gallery(paths)  # read back from the disk cache
    assert again.keys == gallery.keys and np.array_equal(again.activations(0, len(paths)), acts)


def test_merge_desc_bakes_the_lora_in(world, tmp_path):
    """export --merge-desc: a one-task bundle whose encoder == the input-mode bundle fed the same LoRA (1e-4)."""
    from sglora_edge.lora import load_lora
    root, out, lib = world["root"], tmp_path / "baked", world["minilm"]["library"]
    r = cli("export", "--library", root / "library_minilm.safetensors", "--cvae", root / "cvae_minilm.safetensors",
            "--out", out, "--merge-desc", DESC)
    assert r.exit_code == 0 and f'baked in: the LoRA for "{DESC}"' in r.stdout, r.output
    want_lora, agg = world["minilm"]["generator"].generate(DESC, use_mean=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["baked"]["description"] == DESC and m["baked"]["lora"] == "prior mean (eps = 0)"
    assert m["baked"]["explanation"]["experts"] == agg.experts
    assert np.allclose(m["baked"]["explanation"]["weights"], agg.weights, atol=1e-6)
    assert set(m["graphs"]) == {"text_encoder", "visual_prefix", "visual_suffix_baked"} and "merged" not in m
    assert sorted(m["files"]) == ["baked_lora.safetensors", "bpe_simple_vocab_16e6.txt.gz", "text_encoder.onnx",
                                  "visual_prefix.onnx", "visual_suffix_baked.onnx"]
    vectors, meta = load_lora(out / "baked_lora.safetensors", backbone=lib.backbone, spec=lib.spec)
    assert np.abs(vectors - want_lora).max() < ATOL and meta["description"] == DESC

    baked, fed = EdgeRuntime(out, cache_dir=tmp_path / "c"), EdgeRuntime(world["minilm"]["bundle"], cache_dir=tmp_path)
    gen = baked.generate(" A photo of a  LEMON")  # case and spacing do not matter
    assert gen.aggregation.experts == agg.experts and np.array_equal(gen.loras, vectors)
    paths = list_gallery(world["gallery"])[0][:6]
    acts = fed.prefix(fed.preprocess(paths))
    want = fed.suffix(acts, gen.loras[0])
    assert np.abs(baked.suffix(acts, gen.loras[0]) - want).max() < ATOL
    assert np.abs(want - fed.suffix(acts, np.zeros_like(gen.loras[0]))).max() > 1e-3  # the LoRA mattered
    with pytest.raises(InputError, match=f'baked in .*pass --desc "{DESC}"'):
        baked.generate("a photo of a pear")
    with pytest.raises(InputError, match="nothing to draw"):
        baked.generate(DESC, seed=1)
    with pytest.raises(InputError, match="cannot take another"):
        baked.suffix(acts, gen.loras[0] * 2)
    with pytest.raises(InputError, match="--lora-mode merged: .*baked"):
        EdgeRuntime(out, lora_mode="merged")
    r = cli("run", "--bundle", out, "--desc", DESC, "--gallery", world["gallery"], "--cache-dir", tmp_path / "c")
    assert r.exit_code == 0 and "lora mode baked" in r.stdout and "pear" in r.stdout, r.output


def test_fp16_graphs_stay_close_to_fp32(world, tmp_path):
    """export --fp16: the visual graphs (not the merged one) in fp16 with fp32 inputs/outputs; run --precision fp16
    gives features with cosine > FP16_MIN_COSINE to the fp32 graphs'."""
    import onnx

    from export.onnx_export import FP16_MIN_COSINE
    bundle = world["backbone"]["bundle"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["fp16_graphs"] == {"visual_prefix": "visual_prefix.fp16.onnx", "visual_suffix": "visual_suffix.fp16.onnx"}
    assert all(c > FP16_MIN_COSINE for c in m["fp16_min_cosine"].values())
    for file in m["fp16_graphs"].values():
        model = onnx.load(str(bundle / file))
        weights = {t.data_type for t in model.graph.initializer if np.prod(t.dims) > 16}
        assert weights == {onnx.TensorProto.FLOAT16}, file
        assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} == {
            onnx.TensorProto.FLOAT}
    feats = {}
    for precision in ("fp16", "fp32"):
        rt = EdgeRuntime(bundle, precision=precision, cache_dir=tmp_path, cache_dtype="float32")
        feats[precision] = np.asarray(rt.image_features(rt.encode_gallery(world["gallery"]),
                                                        rt.generate(DESC).loras * 3))
    cosine = (feats["fp16"] * feats["fp32"]).sum(1)
    assert cosine.min() > FP16_MIN_COSINE and np.abs(feats["fp16"] - feats["fp32"]).max() > 0  # fp16 graphs ran
    assert {p.name for p in (tmp_path / rt.bundle.hash).iterdir()} == {
        "prefix-float32", "prefix-float32-fp16-graphs", "features-float32-input", "features-float32-input-fp16-graphs"}
    with pytest.raises(InputError, match="--precision fp16: .* has no fp16 graphs; re-export it with .*--fp16"):
        EdgeRuntime(world["minilm"]["bundle"], precision="fp16")
    r = cli("run", "--bundle", bundle, "--desc", DESC, "--gallery", world["gallery"], "--precision", "fp16")
    assert r.exit_code == 0 and "fp16 graphs" in r.stdout, r.output


@pytest.mark.parametrize("targets,last", [(("q", "k", "v"), 0), (("q", "v"), 1)])
def test_low_rank_side_path_matches_the_dense_graph(world, tmp_path, targets, last):
    """The bundle's input graph, h·Wᵀ + (h·Aᵀ)·Bᵀ with W a constant MatMul weight, == the graph that forms
    W + γ·B·A per call, within 1e-4 (a target left out exercises the zero rows of the block-diagonal B)."""
    import dataclasses

    import onnx
    import onnxruntime as ort

    from export import onnx_export as ox
    from sglora_edge.lora import low_rank
    bb = world["bb"]
    spec = LoRASpec.for_visual(bb.visual, targets=targets, last_blocks=last)
    vec = 0.3 * torch.randn(spec.size, generator=torch.Generator().manual_seed(1))
    dense = delta_weights(spec, vec)
    assert all(torch.allclose(bm @ a, dense[b], atol=1e-6) for b, (a, bm) in low_rank(spec, vec).items())
    side = ox.visual_exports(bb.visual, spec, (32, 32), vec.numpy())[1]
    rebuilt = dataclasses.replace(side, name="dense", module=ox.VisualSuffixGraph(bb.visual, spec, low_rank=False))
    feeds = {"activations": np.random.default_rng(0).standard_normal((5, 17, spec.width)).astype(np.float32),
             "lora": vec.numpy()}
    out = {}
    for decl in (side, rebuilt):
        ox.export_graph(decl, tmp_path)
        out[decl.name] = ort.InferenceSession(str(tmp_path / decl.file), providers=["CPUExecutionProvider"]).run(
            None, feeds)[0]
        model = onnx.load(str(tmp_path / decl.file))
        qkv = {t.name for t in model.graph.initializer if sorted(t.dims) == [spec.width, 3 * spec.width]}
        users = {n.op_type for n in model.graph.node if set(n.input) & qkv}
        assert len(qkv) == len(spec.blocks) and users == ({"MatMul"} if decl is side else {"Add"}), users
    assert np.abs(out["visual_suffix"] - out["dense"]).max() < ATOL
    assert np.abs(out["dense"] - ort.InferenceSession(str(tmp_path / "dense.onnx"), providers=[
        "CPUExecutionProvider"]).run(None, {**feeds, "lora": np.zeros_like(feeds["lora"])})[0]).max() > 1e-3


def test_numpy_delta_weights_match_torch(world):
    from runtime.lora import delta_weights as np_delta_weights
    spec = world["minilm"]["library"].spec
    vec = torch.randn(spec.size, generator=torch.Generator().manual_seed(0))
    want = delta_weights(spec, vec)
    got = np_delta_weights(spec.to_dict(), vec.numpy())
    assert sorted(got) == sorted(want)
    assert all(np.abs(got[b] - want[b].numpy()).max() < 1e-6 for b in want)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_run_end_to_end(world):
    r = cli("run", "--bundle", world["minilm"]["bundle"], "--desc", DESC, "--gallery", world["gallery"],
            "-q", "a lemon", "-q", "a sketch of a lemon", "--top-k", 3, "--json")
    assert r.exit_code == 0, r.output + repr(r.exception)
    out = json.loads(r.stdout)
    assert set(out["results"]) == {"a lemon", "a sketch of a lemon"}
    n_images = len(list_gallery(world["gallery"])[0])
    assert out["n_images"] == n_images
    for hits in out["results"].values():
        assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all(str(world["gallery"]) in h["image"] for h in hits)
    e = out["explanation"]
    assert len(e["experts"]) == 2 and abs(sum(e["weights"]) - 1) < 1e-6
    assert isinstance(e["out_of_distribution"], bool) and -1 <= e["best_similarity"] <= 1
    assert list(out["timings_ms"])[0] == "cold_start"
    assert {"generate", "gallery_prefix", "gallery_suffix", "rank"} <= set(out["timings_ms"])
    from runtime.sessions import openvino_installed, x86
    auto = "openvino" if x86() and openvino_installed() else "ort-cpu"  # no GPU here (test_openvino: the choice)
    assert out["backend"]["backend"] == auto and out["backend"]["providers"] == \
        (["OpenVINO CPU (f32)"] if auto == "openvino" else ["CPUExecutionProvider"])
    assert "no CUDA provider" in out["backend"]["picked_because"]
    r = cli("run", "--bundle", world["backbone"]["bundle"], "--desc", DESC, "--gallery", world["gallery"])
    assert r.exit_code == 0, r.output
    assert "experts" in r.stdout and "similarity" in r.stdout and "timings ms: cold start" in r.stdout


def test_clear_errors(world, tmp_path):
    bundle = world["backbone"]["bundle"]
    with pytest.raises(ValueError, match="--desc is empty"):
        run_retrieval(bundle, " ", world["gallery"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        run_retrieval(bundle, DESC, tmp_path / "empty")
    with pytest.raises(BundleError, match="no bundle there"):
        run_retrieval(tmp_path / "nowhere", DESC, world["gallery"])
    r = cli("run", "--bundle", tmp_path / "nowhere", "--desc", DESC, "--gallery", world["gallery"])
    assert r.exit_code == 2 and "sglora-edge export" in r.output
    r = cli("export", "--library", tmp_path / "nope.safetensors", "--cvae", tmp_path / "nope", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "not found" in r.output
    root = world["root"]
    with pytest.raises(BundleExportError, match="built on"):  # another backbone than the library's
        export_bundle(ExportConfig(library=root / "library_backbone.safetensors", cvae=root / "cvae_backbone.safetensors",
                                   out=tmp_path / "b", backbone="open_clip:sglora-tiny@random"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleExportError, match="not a bundle"):
        export_bundle(ExportConfig(library=root / "library_backbone.safetensors", cvae=root / "cvae_backbone.safetensors",
                                   out=tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_tampered_bundle_fails_the_checksum(world, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(world["backbone"]["bundle"], copy)
    Bundle.load(copy)
    data = bytearray((copy / "generator.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "generator.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"generator\.onnx: sha256 does not match.*re-export"):
        Bundle.load(copy)
    r = cli("run", "--bundle", copy, "--desc", DESC, "--gallery", world["gallery"])
    assert r.exit_code == 2 and "generator.onnx" in r.output and "re-export" in r.output
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version 99 is newer than this runtime.*upgrade the runtime"):
        Bundle.load(copy)


def test_cli_export_then_tensorrt(world, tmp_path):
    """The export command writes a loadable bundle; --tensorrt builds engines, or says clearly why it cannot."""
    root, out = world["root"], tmp_path / "bundle"
    r = cli("export", "--library", root / "library_backbone.safetensors", "--cvae", root / "cvae_backbone.safetensors",
            "--out", out, "--json", "--tensorrt")
    if r.exit_code != 0:
        assert r.exit_code == 2 and "wrote the ONNX bundle" in r.output
        assert "tensorrt" in r.output.lower() and ("[trt]" in r.output or "CUDA" in r.output)
    bundle = Bundle.load(out)
    assert bundle.names == world["backbone"]["library"].names
    from runtime.tensorrt import build_engines
    try:
        record = build_engines(out, fp16=True)
    except EngineUnavailable as e:
        pytest.skip(f"TensorRT unavailable here: {e}")
    assert set(record["engines"]) == set(bundle.manifest.graphs)
    rt_trt, rt_ort = EdgeRuntime(out, backend="trt"), EdgeRuntime(out)
    lora = rt_ort.generate(DESC).loras[0]
    assert np.abs(rt_trt.generate(DESC).loras[0] - lora).max() < 5e-2  # fp16 engines
    paths = list_gallery(world["gallery"])[0][:4]
    got = rt_trt.image_features(rt_trt.encode_gallery(paths), lora)
    assert np.abs(got - rt_ort.image_features(rt_ort.encode_gallery(paths), lora)).max() < 5e-2


def test_topk_dw_bundle_runs_the_server_merge_exactly(world, tmp_path):
    """A bundle exported without --cvae: the device builds the rank-K·r LoRA from the library in numpy and its
    image features equal the server's Top-K (ΔW) merge (TopKMerge, evaluate.topk_delta_weights) within 1e-4,
    in input and merged mode; no generator graph is shipped."""
    from sglora_edge.conditions import topk_delta_weights
    from sglora_edge.generate import TopKMerge
    bb, lib = world["bb"], world["minilm"]["library"]
    summary = export_bundle(ExportConfig(library=world["root"] / "library_minilm.safetensors", out=tmp_path / "topk",
                                         k=2, tau=0.1))
    manifest = json.loads((tmp_path / "topk" / "manifest.json").read_text())
    assert summary["generator"] == "topk_dw" and manifest["cvae"] is None and "generator" not in manifest["graphs"]
    assert manifest["lora_spec"]["rank"] == 2 * lib.spec.rank and summary["lora_size"] == 2 * lib.spec.size
    server = TopKMerge(lib, SemanticEncoder("minilm", bb), k=2, tau=0.1)
    want_vec, agg = server.generate(DESC, use_mean=True)
    rt = EdgeRuntime(tmp_path / "topk", cache_dir=tmp_path / "cache", cache_dtype="float32", batch_size=4)
    gen = rt.generate(DESC)
    assert gen.aggregation.experts == agg.experts
    np.testing.assert_allclose(gen.loras[0], want_vec[0], atol=1e-5)
    paths = list_gallery(world["gallery"])[0][:5]
    want = encode_images(bb.visual, bb.load_images(paths), topk_delta_weights(lib, agg)).numpy()
    for mode in ("input", "merged"):
        rt = EdgeRuntime(tmp_path / "topk", cache_dir=tmp_path / "cache", cache_dtype="float32", lora_mode=mode)
        assert np.abs(np.asarray(rt.image_features(rt.encode_gallery(paths), gen.loras[0])) - want).max() < ATOL
    assert "identical" in rt.generate(DESC, samples=3, seed=1).warnings[0]
