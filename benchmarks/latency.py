"""Device-side latency of every SG-LoRA runtime stage, on ONNX Runtime (CPU here) and TensorRT when available.

    python benchmarks/latency.py                         # builds micro bundles in a temp dir (about a minute)
    python benchmarks/latency.py --bundle runs/bundle    # measures an exported bundle
    python benchmarks/latency.py --backbone open_clip:ViT-B-16@random --semantic backbone --last-blocks 0,4

Without --bundle the artifacts have random weights (latency does not depend on them): a backbone
from --backbone, synthetic expert checkpoints, an untrained CVAE with the default config, and a
gallery of random images. Every stage gets warm-up runs, then --repeats timed runs; the table shows
the median and the 90th percentile in milliseconds. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from runtime.engine import EngineUnavailable  # noqa: E402
from runtime.pipeline import EdgeRuntime  # noqa: E402

DESC = "a photo of a lemon"


def build_bundle(out: Path, backbone_spec: str, semantic: str, last_blocks: int, n_experts: int = 8) -> Path:
    """Random-weight artifacts through the real export path (the server half: torch + open_clip)."""
    import torch

    from export.bundle import export_bundle
    from sglora_edge.backbone import create_backbone
    from sglora_edge.config import CVAEConfig, LoRASpec
    from sglora_edge.cvae import SemanticCVAE
    from sglora_edge.generate import Generator
    from sglora_edge.library import Library, SemanticEncoder
    from sglora_edge.lora import init_vector

    bb = create_backbone(backbone_spec)
    spec = LoRASpec.for_visual(bb.visual, last_blocks=last_blocks)
    g = torch.Generator().manual_seed(0)
    start = init_vector(spec)
    names = [f"task{i}" for i in range(n_experts)]
    ckpts = [(start + 0.01 * torch.randn(3, spec.size, generator=g)).numpy() for _ in names]
    enc = SemanticEncoder(semantic, bb)
    lib = Library.build(names, [f"a photo of a {n}" for n in names], ckpts, enc, spec, bb.ident)
    lib.info = {"backbone_spec": bb.spec}
    lib.save(out / "library.safetensors")
    cfg = CVAEConfig()
    cvae = SemanticCVAE(spec.size, len(spec.blocks), cfg)
    x = torch.from_numpy(np.concatenate(ckpts))
    rows = np.repeat(np.arange(len(names)), 3)  # each checkpoint with its own expert's condition
    cvae.fit_statistics(x, torch.from_numpy(lib.mu[rows]), torch.from_numpy(lib.var[rows]))
    meta = {"backbone": bb.ident, "lora_spec": spec.to_dict(), "semantic": lib.semantic, "config": cfg.to_dict()}
    Generator(cvae.eval(), lib, enc, meta).save(out / "cvae.safetensors")
    bundle = out / f"bundle_L{last_blocks}"
    export_bundle(out / "library.safetensors", out / "cvae.safetensors", bundle)
    return bundle


def make_gallery(folder: Path, n: int, size: int) -> list[Path]:
    """n random RGB PNGs, a little larger than the model input and not square (resize + crop run as in use)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size * 5 // 4, size * 3 // 2, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def measure(fn, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "repeats": repeats}


def bench_engine(rt: EdgeRuntime, paths: list[Path], repeats: int, warmup: int, batch: int) -> dict:
    """Every device stage; per-image numbers are a batch's time divided by its size."""
    heavy = max(3, repeats // 4)  # whole-gallery stages repeat less
    emb = rt.embed_description(DESC)[0]
    agg = rt.aggregate(emb)
    lora = rt.decode(agg, np.zeros((1, rt.bundle.latent), np.float32))[0]
    pixels = rt.preprocess(paths)
    acts = rt.prefix(pixels)
    cache = rt.encode_gallery(paths)  # on disk under --cache-dir (a temp folder here)
    some = slice(0, min(batch, len(paths)))
    eps1, eps5 = (np.zeros((s, rt.bundle.latent), np.float32) for s in (1, 5))
    stages = {
        "description embedding": (lambda: rt.embed_description(DESC)[0], repeats, 1),
        "aggregation (top-K)": (lambda: rt.aggregate(emb), repeats, 1),
        "generation S=1": (lambda: rt.decode(agg, eps1), repeats, 1),
        "generation S=5": (lambda: rt.decode(agg, eps5), repeats, 1),
        "text query (1)": (lambda: rt.text_features([DESC]), repeats, 1),
        "image decode+preprocess / image": (lambda: rt.preprocess(paths[some]), heavy, len(paths[some])),
        "gallery prefix / image": (lambda: rt.prefix(pixels[some]), repeats, len(pixels[some])),
        "suffix (task switch) / image": (lambda: rt.suffix(acts[some], lora), repeats, len(acts[some])),
        f"task switch, {len(paths)} images, prefix cached":
            # a new LoRA each call (scaled at random): the features cache would answer a repeated one
            (lambda: rt.image_features(cache, rt.generate(DESC).loras * (1 + np.random.rand())), heavy, 1),
        f"task switch, {len(paths)} images, no cache":
            (lambda: rt.suffix(rt.prefix(pixels), rt.generate(DESC).loras[0]),
             heavy, 1),
    }
    out = {}
    for name, (fn, n, per) in stages.items():
        r = measure(fn, n, warmup)
        out[name] = {**r, "median_ms": r["median_ms"] / per, "p90_ms": r["p90_ms"] / per, "per": per}
    return out


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, action="append", help="Exported bundle(s) to measure (repeatable).")
    ap.add_argument("--backbone", default="open_clip:sglora-micro@random", help="When building: the backbone.")
    ap.add_argument("--semantic", default="minilm", choices=("minilm", "backbone"), help="When building.")
    ap.add_argument("--last-blocks", default="0,1", help="When building: comma-separated L values, one bundle each.")
    ap.add_argument("--gallery-size", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32, help="Images per engine call.")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--engines", default="ort-cpu,trt", help="--backend values of `run` to measure.")
    ap.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sglora-bench-") as tmp:
        tmp = Path(tmp)
        bundles = args.bundle
        if not bundles:
            print(f"building bundles for {args.backbone} (random weights, semantic {args.semantic}, "
                  f"L in {args.last_blocks}) in {tmp} ...", flush=True)
            bundles = [build_bundle(tmp, args.backbone, args.semantic, int(L)) for L in args.last_blocks.split(",")]
        results, rows, galleries = [], [["bundle", "engine", "stage", "median ms", "p90 ms"]], {}
        for bundle in bundles:
            for engine in args.engines.split(","):
                try:
                    if engine == "trt" and not args.bundle:  # our own temp bundle: build its engines here
                        from runtime.tensorrt import build_engines
                        build_engines(bundle, fp16=True)
                    rt = EdgeRuntime(bundle, backend=engine, batch_size=args.batch, cache_dir=tmp / "cache")
                    m = rt.bundle.manifest
                    size = m["image"]["image_size"][0]
                    if size not in galleries:
                        galleries[size] = make_gallery(tmp / f"gallery{size}", args.gallery_size, size)
                    stages = bench_engine(rt, galleries[size], args.repeats, args.warmup, args.batch)
                except EngineUnavailable as e:
                    print(f"skipping {engine} for {bundle}: {e}")
                    results.append({"bundle": str(bundle), "engine": engine, "skipped": str(e)})
                    continue
                spec = m["lora_spec"]
                label = (f"{m['backbone']['model_name']} L={spec['last_blocks'] or spec['n_blocks']}"
                         f"/{spec['n_blocks']}")
                print(f"measured {bundle}: backbone {m['backbone']['ident']}, semantic {m['semantic']['name']}, "
                      f"LoRA {m['lora_size']} params on blocks {m['first_adapted_block']}..{spec['n_blocks'] - 1}, "
                      f"engine {engine}", flush=True)
                results.append({"bundle": str(bundle), "label": label, "engine": engine,
                                "backbone": m["backbone"], "semantic": m["semantic"]["name"], "lora_spec": spec,
                                "gallery_size": args.gallery_size, "stages": stages})
                rows += [[label, engine, name, f"{s['median_ms']:.3f}", f"{s['p90_ms']:.3f}"]
                         for name, s in stages.items()]
    import onnxruntime
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                          "providers": onnxruntime.get_available_providers()},
              "settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
