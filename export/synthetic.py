"""Random-weight bundles for `sglora-edge bench --synthetic` (server side: torch + open_clip), built through the
real export path, with PyTorch eager timings of the same stages and the time to train one Oracle LoRA.

Latency does not depend on the weights, so random ones are enough: a backbone with random weights, synthetic
expert checkpoints around the LoRA's seeded start, an untrained CVAE with the default config.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from runtime.bench import DESC, QUERY, measure
from runtime.config import BenchConfig
from runtime.errors import InputError

SYNTHETIC = {  # name -> (backbone spec, semantic encoder: what each backbone uses in the product)
    "sglora-micro": ("open_clip:sglora-micro@random", "minilm"),
    "sglora-tiny": ("open_clip:sglora-tiny@random", "minilm"),
    "ViT-B-16": ("open_clip:ViT-B-16@random", "backbone"),
}
SWITCH_LAST_BLOCKS = (2, 1)  # the prefix-cached variants measured for the task switch, beside L = all


def build_bundle(out: Path, backbone_spec: str, semantic: str, last_blocks: int, n_experts: int = 16, bb=None,
                 enc=None):
    """(bundle path, the torch objects behind it) for random-weight artifacts exported like a real bundle."""
    import torch

    from export.bundle import export_bundle
    from runtime.config import ExportConfig
    from sglora_edge.backbone import create_backbone
    from sglora_edge.cvae import CVAEConfig, SemanticCVAE
    from sglora_edge.generate import Generator
    from sglora_edge.library import Library, SemanticEncoder
    from sglora_edge.lora import LoRASpec, init_vector

    bb = bb or create_backbone(backbone_spec)
    enc = enc or SemanticEncoder(semantic, bb)
    spec = LoRASpec.for_visual(bb.visual, last_blocks=last_blocks)
    g = torch.Generator().manual_seed(0)
    start = init_vector(spec)
    names = [f"task{i}" for i in range(n_experts)]
    ckpts = [(start + 0.01 * torch.randn(3, spec.size, generator=g)).numpy() for _ in names]
    lib = Library.build(names, [f"a photo of a {n}" for n in names], ckpts, enc, spec, bb.ident)
    lib.info = {"backbone_spec": bb.spec}
    folder = out / f"{bb.model_name}_L{last_blocks}"
    folder.mkdir(parents=True, exist_ok=True)
    lib.save(folder / "library.safetensors")
    cfg = CVAEConfig()
    cvae = SemanticCVAE(spec.size, len(spec.blocks), cfg)
    rows = np.repeat(np.arange(len(names)), 3)  # each checkpoint with its own expert's condition
    cvae.fit_statistics(torch.from_numpy(np.concatenate(ckpts)), torch.from_numpy(lib.mu[rows]),
                        torch.from_numpy(lib.var[rows]))
    meta = {"backbone": bb.ident, "lora_spec": spec.to_dict(), "semantic": lib.semantic, "config": cfg.to_dict()}
    gen = Generator(cvae.eval(), lib, enc, meta)
    gen.save(folder / "cvae.safetensors")
    bundle = folder / "bundle"
    export_bundle(ExportConfig(library=folder / "library.safetensors", cvae=folder / "cvae.safetensors", out=bundle))
    return bundle, {"bb": bb, "enc": enc, "lib": lib, "gen": gen, "spec": spec}


def torch_timer(ctx: dict):
    """fn(bench config) -> {stage: stats}: PyTorch eager on the same stages the ONNX Runtime bench names alike."""
    def run(bench: BenchConfig) -> dict:
        import torch
        import torch.nn.functional as F

        from sglora_edge.lora import delta_weights, visual_prefix, visual_suffix
        bb, enc, lib, gen, spec = ctx["bb"], ctx["enc"], ctx["lib"], ctx["gen"], ctx["spec"]
        threads = torch.get_num_threads()
        if bench.threads:
            torch.set_num_threads(bench.threads)
        r, w, budget, batches = bench.repeats, bench.warmup, bench.stage_budget, bench.batches

        def measure_(fn, *args):
            return measure(fn, *args, budget=budget)
        cfg, first = gen.cvae.cfg, spec.blocks[0]
        try:
            with torch.inference_mode():
                emb = enc.encode([DESC])[0]
                agg = lib.aggregate(emb, k=cfg.k, tau=cfg.tau)
                mu, var = torch.from_numpy(agg.mu), torch.from_numpy(agg.var)
                out = {"description_embedding": measure_(lambda: enc.encode([DESC]), r, w),
                       "aggregation": measure_(lambda: lib.aggregate(emb, k=cfg.k, tau=cfg.tau), r, w)}
                for s in (1, 5):
                    out[f"generation_S{s}"] = measure_(lambda: gen.cvae.sample(mu, var, s), r, w)
                size = bb.visual.image_size
                size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
                pixels = torch.randn(max(batches), 3, *size, generator=torch.Generator().manual_seed(0))
                acts = visual_prefix(bb.visual, pixels, first)
                deltas = delta_weights(spec, torch.from_numpy(lib.mu[0]))
                for b in batches:
                    out[f"gallery_prefix_b{b}"] = measure_(lambda: visual_prefix(bb.visual, pixels[:b], first), r, w, b)
                    out[f"task_switch_suffix_b{b}"] = measure_(
                        lambda: F.normalize(visual_suffix(bb.visual, acts[:b], first, deltas), dim=-1),
                        r, w, b)
                out["text_query"] = measure_(lambda: bb.encode_text([QUERY]), r, w)
        finally:
            torch.set_num_threads(threads)
        return out
    return run


def oracle_training(ctx: dict, world: Path, threads: int) -> dict:
    """Seconds to train one task's Oracle LoRA with the expert recipe (ExpertConfig defaults) on this machine."""
    import torch

    from sglora_edge.data import load_dataset
    from sglora_edge.experts import ExpertConfig, train_task
    ds = load_dataset(world)
    task = (ds.task_names(role="unseen") or ds.task_names())[0]
    cfg = ExpertConfig()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        _, info = train_task(ctx["bb"], ctx["spec"], ds, task, cfg)
        seconds = time.perf_counter() - t
    finally:
        torch.set_num_threads(before)
    return {"task": task, "world": str(world), "epochs": cfg.epochs, "images": info["n_images"],
            "train_s": round(seconds, 2)}


def prepare(bench: BenchConfig, work: Path, log=print) -> dict:
    """Build the bundles `bench --synthetic` measures: per name one with every block adapted (every stage) and
    the last-L variants (task switch); PyTorch timers; Oracle training on the small backbones (on
    bench.oracle_world, default the micro world)."""
    names = bench.synthetic
    unknown = [n for n in names if n not in SYNTHETIC]
    if unknown:
        raise InputError(f"--synthetic {', '.join(unknown)}: unknown; choose from {', '.join(SYNTHETIC)}")
    out = {"bundles": [], "switch_bundles": [], "torch_timers": {}, "training": {}, "notes": []}
    for name in dict.fromkeys(names):
        spec, semantic = SYNTHETIC[name]
        log(f"building {name} bundles (random weights, semantic {semantic}) through the export path")
        t = time.perf_counter()
        bundle, ctx = build_bundle(work, spec, semantic, 0)
        out["bundles"].append(bundle)
        out["torch_timers"][str(bundle)] = torch_timer(ctx)
        for last in SWITCH_LAST_BLOCKS:
            if last < ctx["spec"].n_blocks:
                out["switch_bundles"].append(build_bundle(work, spec, semantic, last, bb=ctx["bb"], enc=ctx["enc"])[0])
        log(f"built {name} bundles in {time.perf_counter() - t:.0f} s")
        size = ctx["bb"].visual.image_size
        if (size[0] if isinstance(size, (tuple, list)) else size) <= 64:
            world = bench.oracle_world
            if world is None:
                from sglora_edge.world import write_world
                world = work / "world-micro"
                if not (world / "manifest.jsonl").is_file():
                    log("writing the micro world for the Oracle training comparison")
                    write_world(world, seed=0, preset="micro", progress=False)
            log(f"{name}: training one Oracle LoRA with the expert recipe")
            from runtime.bench import label_of
            from runtime.bundle import read_manifest
            out["training"][label_of(read_manifest(bundle))] = oracle_training(
                ctx, world, bench.threads)
        else:
            out["notes"].append(f"{name}: Oracle training not timed (the expert recipe on a {size}-px backbone is "
                                f"hours on a CPU; the comparison runs on the small backbones)")
    return out


def topk_bundle(library_path: str | Path, out: str | Path, backbone_spec: str | None = None) -> Path:
    """A bundle of a trained library whose generator is anchored and untrained: it returns the Top-K weighted μ*
    exactly (the decoder's last layer is zero). Recall measured with it is that of a real method on real weights,
    which is what `bench --int8 --recall-world` needs when no trained CVAE is at hand."""
    import torch

    from export.bundle import export_bundle
    from runtime.config import ExportConfig
    from sglora_edge.backbone import create_backbone
    from sglora_edge.cvae import CVAEConfig, SemanticCVAE
    from sglora_edge.generate import Generator
    from sglora_edge.library import Library, SemanticEncoder

    out = Path(out)
    lib = Library.load(library_path)
    spec_str = backbone_spec or lib.info["backbone_spec"]
    bb = create_backbone(spec_str)
    cfg = CVAEConfig(anchor=True)
    cvae = SemanticCVAE(lib.spec.size, len(lib.spec.blocks), cfg)
    mu, var = torch.from_numpy(lib.mu), torch.from_numpy(lib.var)
    cvae.fit_statistics(mu, mu, var)
    meta = {"backbone": bb.ident, "lora_spec": lib.spec.to_dict(), "semantic": lib.semantic, "config": cfg.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    Generator(cvae.eval(), lib, SemanticEncoder(lib.semantic_kind, bb), meta).save(out / "cvae_topk.safetensors")
    export_bundle(ExportConfig(library=library_path, cvae=out / "cvae_topk.safetensors", out=out / "bundle",
                               backbone=spec_str))
    return out / "bundle"
