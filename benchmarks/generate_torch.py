"""Server-side generation latency in PyTorch: description -> condition -> CVAE sample(s).

    .venv/bin/python benchmarks/generate_torch.py \
        --library runs/demo/models/library_photo/library.safetensors --cvae runs/demo/models/in_dataset_photo/cvae.safetensors

Reports the median and p90 over repeats (after warm-up) of: semantic embedding of the
description, aggregation (top-K + law of total variance), CVAE decoding (S=1, S=5), and the
whole `Generator.generate` call. Needs a finished `reproduce` (or library + CVAE files).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from latency import measure  # the same median/p90 timing as the device benchmark (same folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default="runs/demo/models/library_photo/library.safetensors")
    ap.add_argument("--cvae", default="runs/demo/models/in_dataset_photo/cvae.safetensors")
    ap.add_argument("--desc", default="a photo of a lemon")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sglora_edge.backbone import create_backbone
    from sglora_edge.generate import Generator
    from sglora_edge.library import Library
    lib = Library.load(args.library)
    bb = create_backbone(lib.info["backbone_spec"])
    gen = Generator.load(args.cvae, lib, bb)
    emb = gen.encoder.encode([args.desc])[0]
    agg = gen.condition(args.desc)
    mu, var = torch.from_numpy(agg.mu), torch.from_numpy(agg.var)
    results = {
        "semantic_embedding": measure(lambda: gen.encoder.encode([args.desc]), args.repeats, 3),
        "aggregation": measure(lambda: lib.aggregate(emb, k=gen.cvae.cfg.k, tau=gen.cvae.cfg.tau), args.repeats, 3),
        "cvae_decode_S1": measure(lambda: gen.cvae.sample(mu, var, 1), args.repeats, 3),
        "cvae_decode_S5": measure(lambda: gen.cvae.sample(mu, var, 5), args.repeats, 3),
        "generate_S1": measure(lambda: gen.generate(args.desc, samples=1), args.repeats, 3),
        "generate_S5": measure(lambda: gen.generate(args.desc, samples=5), args.repeats, 3),
    }
    meta = {"library": args.library, "cvae": args.cvae, "semantic": lib.semantic, "lora_parameters": lib.spec.size,
            "experts": len(lib), "torch_threads": torch.get_num_threads(), "description": args.desc}
    print(f"PyTorch generation latency ({meta})")
    for name, r in results.items():
        print(f"  {name:20s} median {r['median_ms']:8.2f} ms   p90 {r['p90_ms']:8.2f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
