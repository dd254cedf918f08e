"""`run` on bad input (every case of issue 9), the streamed gallery's memory bound, and the run options.

Each bad input must end in a non-zero exit and one line naming the input and the fix — or, for bad
gallery files, a skip with a count — never a traceback and never a half-written output file.
"""

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from runtime.bundle import sha256_file
from sglora_edge.cli import app
from test_export_runtime import DESC, build_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(micro_world, tmp_path_factory):
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_world(micro_world, tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def run(*args, bundle=None, gallery=None, desc=DESC):
    base = ["run", "--bundle", bundle, "--desc", desc, "--gallery", gallery]
    r = CliRunner().invoke(app, [str(a) for a in base + list(args)])
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    return r


def one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def bomb_png(path: Path, side: int = 100_000) -> None:
    """A valid PNG header claiming side x side pixels over a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture()
def bad_gallery(world, tmp_path):
    """Three good images and one of every kind of bad file."""
    g = tmp_path / "gallery"
    g.mkdir()
    good = sorted(world["gallery"].glob("*.png"))[:3]
    for p in good:
        shutil.copy(p, g / p.name)
    (g / "corrupt.jpg").write_bytes(os.urandom(2000))
    (g / "truncated.png").write_bytes(good[0].read_bytes()[:len(good[0].read_bytes()) // 2])
    (g / "zero.png").write_bytes(b"")
    (g / "._holiday.jpg").write_bytes(b"\x00\x05\x16\x07" + os.urandom(100))  # AppleDouble
    (g / "unreadable.png").symlink_to(tmp_path / "gone.png")  # root reads anything chmod 000: a dangling link
    bomb_png(g / "bomb.png")
    return g, [p.name for p in good]


def test_bad_gallery_files_are_skipped_and_listed(world, bad_gallery, tmp_path):
    g, good = bad_gallery
    bundle = world["backbone"]["bundle"]
    r = run("--json", bundle=bundle, gallery=g)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["n_images"] == 3
    reasons = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
    assert set(reasons) == {"corrupt.jpg", "truncated.png", "zero.png", "._holiday.jpg", "unreadable.png", "bomb.png"}
    assert "0 bytes" in reasons["zero.png"] and "AppleDouble" in reasons["._holiday.jpg"]
    assert "unreadable" in reasons["unreadable.png"] and "decompression bomb" in reasons["bomb.png"]
    assert {Path(h["image"]).name for hits in out["results"].values() for h in hits} <= set(good)
    r = run(bundle=bundle, gallery=g)  # table mode: a count and the first few names on stderr
    assert r.exit_code == 0 and "skipped 6 file(s)" in r.stderr and "and 3 more" in r.stderr
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "zero.png").write_bytes(b"")
    assert "none of the 1 image file(s) could be used" in one_error_line(run(bundle=bundle, gallery=only_bad))


def test_every_bad_argument_is_one_line(world, tmp_path):
    bundle, gallery = world["backbone"]["bundle"], world["gallery"]
    (tmp_path / "empty").mkdir()
    cases = [
        (dict(desc=""), "--desc is empty"),
        (dict(desc="  \t "), "--desc is empty"),
        (dict(desc="caf\udce9 cat"), "not valid UTF-8"),
        (dict(gallery=tmp_path / "nowhere"), "--gallery"),
        (dict(gallery=tmp_path / "empty"), "no images"),
        (dict(bundle=tmp_path / "nowhere"), "no bundle there"),
        (dict(args=("--backend", "fastest")), "--backend 'fastest' is unknown"),
        (dict(args=("--backend", "ort-cuda")), "no CUDAExecutionProvider"),
        (dict(args=("--top-k", "0")), "--top-k must be >= 1"),
        (dict(args=("--top-k", "-3")), "--top-k must be >= 1"),
        (dict(args=("-q", "")), "--query '' is empty"),
        (dict(args=("-q", "  ")), "is empty"),
        (dict(args=("--samples", "0")), "--samples must be >= 1"),
        (dict(args=("--lora-mode", "fused")), "--lora-mode 'fused' is unknown"),
        (dict(args=("--threads", "-1")), "--threads must be >= 0"),
    ]
    html = tmp_path / "page.html"
    for case, message in cases:
        kw = {"bundle": bundle, "gallery": gallery, **{k: v for k, v in case.items() if k != "args"}}
        line = one_error_line(run(*case.get("args", ()), "--html", html, "--save-lora", tmp_path / "l.st", **kw))
        assert message in line, (case, line)
    assert not html.exists() and not (tmp_path / "l.st").exists()  # nothing half-written
    assert list(tmp_path.glob(".*tmp")) == []
    line = one_error_line(run("--backend", "trt", bundle=bundle, gallery=gallery))
    assert "no TensorRT engines" in line and "sglora-edge build-engines --bundle" in line


def test_over_long_description_is_cut_with_a_warning(world):
    for semantic in ("backbone", "minilm"):
        r = run(bundle=world[semantic]["bundle"], gallery=world["gallery"], desc="a photo of a lemon " * 400)
        assert r.exit_code == 0, r.output
        assert "warning: --desc is" in r.stderr


def test_broken_bundles_are_one_line(world, tmp_path):
    gallery = world["gallery"]

    def broken(edit) -> str:
        copy = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(world["backbone"]["bundle"], copy)
        edit(copy)
        return one_error_line(run(bundle=copy, gallery=gallery))

    def flip(path: Path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def manifest(root, change):
        m = json.loads((root / "manifest.json").read_text())
        change(m)
        (root / "manifest.json").write_text(json.dumps(m))

    def corrupt_library(root):  # a corrupt library whose hash was re-blessed: the reader must still refuse it
        (root / "library.safetensors").write_bytes(b"\xff" * 64)
        manifest(root, lambda m: m["files"]["library.safetensors"].update(sha256=sha256_file(
            root / "library.safetensors")))

    assert "visual_prefix.onnx is listed in the manifest but missing" in broken(
        lambda b: (b / "visual_prefix.onnx").unlink())
    assert "generator.onnx: sha256 does not match" in broken(lambda b: flip(b / "generator.onnx"))
    assert "text_encoder.onnx: sha256 does not match" in broken(
        lambda b: (b / "text_encoder.onnx").write_bytes((b / "text_encoder.onnx").read_bytes()[:1000]))
    assert "not valid JSON" in broken(
        lambda b: (b / "manifest.json").write_text((b / "manifest.json").read_text()[:200]))
    assert "upgrade the runtime" in broken(lambda b: manifest(b, lambda m: m.update(format_version=2)))
    assert "library.safetensors: not a readable expert library" in broken(corrupt_library)
    assert "the manifest lacks 'graphs'" in broken(lambda b: manifest(b, lambda m: m.pop("graphs")))


def test_manifest_is_typed_checked_and_round_trips(world, tmp_path):
    """Manifest.from_dict / to_dict: an exported manifest comes back unchanged; a missing required key is refused
    naming it; an unknown key is warned about and kept; a bundle from before optional keys existed still loads."""
    import warnings

    from runtime.bundle import REQUIRED, Bundle, BundleError, Manifest, write_manifest
    d = json.loads((world["backbone"]["bundle"] / "manifest.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exported manifest has no unknown key
        assert Manifest.from_dict(d).to_dict() == d
    for key in REQUIRED:
        with pytest.raises(BundleError, match=f"lacks '{key}'; re-export it"):
            Manifest.from_dict({k: v for k, v in d.items() if k != key})
    with pytest.warns(UserWarning, match="unknown manifest key.* from_the_future"):
        m = Manifest.from_dict({**d, "from_the_future": [1]})
    assert m.to_dict() == {**d, "from_the_future": [1]}
    old = tmp_path / "old"
    shutil.copytree(world["backbone"]["bundle"], old)
    for key in ("generator", "prefix_cache", "fp16_graphs", "fp16_min_cosine", "export_max_abs_diff"):
        d.pop(key, None)
    (old / "manifest.json").write_text(json.dumps(d))
    m = Bundle.load(old).manifest
    assert m.generator_kind == "cvae" and m.variant("fp16") == {} and m.to_dict() == d
    write_manifest(old, m)  # rewritten: nothing added
    assert json.loads((old / "manifest.json").read_text()) == d


def test_run_outputs_for_people(world, tmp_path):
    """--samples/--seed, --save-lora (the server's lora artifact), --html (self-contained), --json."""
    from sglora_edge.lora import load_lora
    bundle = world["minilm"]["bundle"]
    html, lora = tmp_path / "out" / "page.html", tmp_path / "out" / "lemon.safetensors"
    r = run("--samples", 3, "--seed", 4, "--save-lora", lora, "--html", html, "--json", "-q", "a lemon",
            bundle=bundle, gallery=world["gallery"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["explanation"]["samples"] == 3 and "seed 4" in out["explanation"]["lora"]
    vectors, meta = load_lora(lora, backbone=world["bb"].ident, spec=world["minilm"]["library"].spec)
    assert vectors.shape == (3, world["minilm"]["library"].spec.size) and meta["description"] == DESC
    page = html.read_text()
    assert DESC in page and page.count("data:image/png;base64,") == 10 and "<table id='experts'>" in page
    assert page.count("<section class='zeroshot'>") == 1 and page.count("zero-shot #") + page.count("new: not") == 5
    assert "src='http" not in page and "<td>cold start</td>" in page
    again = json.loads(run("--samples", 3, "--seed", 4, "--json", "-q", "a lemon", bundle=bundle,
                           gallery=world["gallery"]).stdout)
    assert again["results"] == out["results"]  # seeded: the same draws; the cache gives the same features


class _PageText(HTMLParser):
    """What a browser's DOM holds: the text of each element id'd or classed, and the image sources."""

    def __init__(self):
        super().__init__()
        self.stack, self.text, self.images = [], {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag not in ("br", "meta"):
            self.stack.append(attrs.get("id") or attrs.get("class") or tag)

    def handle_endtag(self, tag):
        if tag not in ("img", "br", "meta") and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        for key in set(self.stack):
            self.text[key] = self.text.get(key, "") + data


@pytest.mark.slow
def test_html_page_renders_in_headless_chromium(world, tmp_path):
    """--html in a real browser (Debian's chromium, headless): the description (escaped), the experts and every
    thumbnail render, the adapted hits beside zero-shot's: a screenshot differs from one of the same page with each
    thumbnail swapped for a white pixel (same layout) over most of the ten thumbnails' area."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    desc = 'a photo of a "lemon" & <b>pear</b>'
    page = tmp_path / "page.html"
    r = run("--html", page, "--json", "-q", "a lemon", bundle=world["minilm"]["bundle"], gallery=world["gallery"],
            desc=desc)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)

    def chromium(*args) -> subprocess.CompletedProcess:
        return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1400",
                               "--force-device-scale-factor=1", *args], capture_output=True, text=True, timeout=120)

    dom = _PageText()
    dom.feed(chromium("--dump-dom", page.as_uri()).stdout)
    assert dom.text["description"] == desc
    for expert, weight in zip(out["explanation"]["experts"], out["explanation"]["weights"]):
        assert expert in dom.text["experts"] and f"{weight:.3f}" in dom.text["experts"]
    assert len(dom.images) == 10 and all(src.startswith("data:image/png;base64,") for src in dom.images)
    assert len(dom.text["adapted"]) > 0 and len(dom.text["zeroshot"]) > 0
    assert "cold start" in dom.text["timings"]

    white = io.BytesIO()
    Image.new("RGB", (1, 1), "white").save(white, format="PNG")
    white = "data:image/png;base64," + base64.b64encode(white.getvalue()).decode()
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r"src='data:image/png;base64,[^']*'", f"src='{white}'", page.read_text()))
    shots = {}
    for p in (page, blank):
        shot = tmp_path / f"{p.stem}.png"
        chromium(f"--screenshot={shot}", p.as_uri())
        with Image.open(shot) as im:
            shots[p.stem] = np.asarray(im.convert("RGB"), np.int16)
    changed = (np.abs(shots["page"] - shots["blank"]).max(-1) > 16).sum()
    assert 10 * 128 * 128 // 2 < changed <= 10 * 130 * 130, changed  # most of the ten thumbnails, nothing else


def test_fp16_cache_ranks_like_fp32(world, tmp_path):
    from runtime.pipeline import EdgeRuntime
    bundle = world["backbone"]["bundle"]
    feats = {}
    for dtype in ("float16", "float32"):
        rt = EdgeRuntime(bundle, cache_dir=tmp_path, cache_dtype=dtype)
        feats[dtype] = np.asarray(rt.image_features(rt.encode_gallery(world["gallery"]), rt.generate(DESC).loras),
                                  np.float32)
    assert np.abs(feats["float16"] - feats["float32"]).max() < 5e-3
    assert {p.name for p in (tmp_path / rt.bundle.hash).iterdir()} == {
        "prefix-float16", "prefix-float32", "features-float16-input", "features-float32-input"}


RSS_SCRIPT = """
import sys
from runtime.pipeline import run_retrieval
out = run_retrieval(sys.argv[1], "a photo of a lemon", sys.argv[2], backend="ort-cpu", cache_dir=sys.argv[3])
assert out["n_images"] == int(sys.argv[4]), out["n_images"]
assert "torch" not in sys.modules
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) pytest parent across fork + exec
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])  # KiB
"""


def tiny_gallery(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def test_peak_memory_does_not_grow_with_the_gallery(world, tmp_path):
    """Peak RSS of a 2,000-image run minus that of a 100-image run (fresh processes, torch never imported)."""
    bundle = world["backbone"]["bundle"]
    peaks = {}
    for n in (100, 2000):
        gallery = tiny_gallery(tmp_path / f"g{n}", n)
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bundle), str(gallery), str(tmp_path / "cache"),
                            str(n)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        peaks[n] = int(r.stdout.split()[-1]) / 1024
    growth = peaks[2000] - peaks[100]
    m = json.loads((bundle / "manifest.json").read_text())
    tokens = (m["image"]["image_size"][0] // 8) ** 2 + 1  # sglora-micro: patch 8
    in_ram = 1900 * (3 * 32 * 32 * 4 + tokens * 64 * 4)  # pixels + prefix activations of the extra images
    bound = 10
    assert in_ram / 2 ** 20 > 2 * bound  # a gallery held in RAM would break the bound
    print(f"peak RSS: 100 images {peaks[100]:.1f} MiB, 2000 images {peaks[2000]:.1f} MiB, growth {growth:.1f} MiB")
    assert growth < bound, peaks


def test_concurrent_suffix_calls_each_run_with_their_own_lora(micro_bundle, micro_world):
    """serve runs requests on threads: a call must never run with another call's LoRA, in either mode."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.pipeline import EdgeRuntime
    images = sorted((micro_world / "images" / "photo" / "lemon").iterdir())[:4]
    for mode in ("input", "merged"):
        rt = EdgeRuntime.load(micro_bundle, backend="ort-cpu", threads=1, lora_mode=mode)
        acts = rt.prefix(rt.preprocess(images))
        rng = np.random.default_rng(0)
        loras = [rng.normal(scale=0.05, size=rt.bundle.lora_size).astype(np.float32) for _ in range(4)]
        expected = [rt.suffix(acts, lora) for lora in loras]
        assert not np.allclose(expected[0], expected[1], atol=1e-4)  # the LoRAs are told apart
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible: a shared-state race shows at once
        try:
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda i: rt.suffix(acts, loras[i % 4]), range(200)))
        finally:
            sys.setswitchinterval(interval)
        for i, features in enumerate(got):
            np.testing.assert_allclose(features, expected[i % 4], atol=1e-5, err_msg=f"{mode} mode, call {i}")
