"""Screen retrieval-generator configurations by cross-validation over the seen tasks (never unseen ones).

    python benchmarks/generator_cv.py --run runs/paper --data runs/world --domain photo \
        --config '{"p1": {"correction_penalty": 1.0}}' --steps 0,100,200,400 --out cv.json

Uses the run's backbone, experts and library (`reproduce` writes them), trains the anchored generator on
3 of 4 folds of the domain's seen tasks and scores the prior-mean LoRA's mean R@1 gain over Top-K (ΔW)
on the held-out fold (train_generator.crossvalidate). Each configuration is ReproduceConfig's generator
with the given fields replaced. This is how the README's validation screen was produced.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from sglora_edge.backbone import create_backbone
from sglora_edge.data import load_dataset
from sglora_edge.library import Library, SemanticEncoder
from sglora_edge.config import ReproduceConfig
from sglora_edge.metrics import mean_se
from sglora_edge.train_generator import crossvalidate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a `reproduce` output folder")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--domain", default="photo")
    ap.add_argument("--config", required=True, help='JSON {name: {CVAEConfig field: value}}')
    ap.add_argument("--steps", default="0,100,200,400", help="steps at which held-out tasks are scored")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ds, bb = load_dataset(args.data), create_backbone(str(args.run / "backbone"))
    lib = Library.load(args.run / "models" / f"library_{args.domain}" / "library.safetensors", backbone=bb.ident)
    encoder = SemanticEncoder(lib.semantic_kind, bb)
    steps = tuple(int(s) for s in args.steps.split(","))
    results = {}
    for name, fields in json.loads(args.config).items():
        cfg = replace(ReproduceConfig().generator, **fields, steps=max(steps))
        t0 = time.time()
        per_step = crossvalidate(lib, encoder, args.run / "experts", ds, ds.seen_tasks(args.domain), bb, cfg,
                                 n_folds=args.folds, eval_steps=steps, progress=False)
        summary = {s: mean_se(list(g.values())) for s, g in sorted(per_step.items())}
        results[name] = {"fields": fields, "summary": summary, "per_task": per_step, "seconds": time.time() - t0}
        print(name, {s: f"{v['mean']:+.2f} ± {v['se']:.2f}" for s, v in summary.items()}, flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
