"""Merged vs input LoRA mode on ONNX Runtime: the visual suffix of a backbone with random weights.

    OMP_NUM_THREADS=2 python benchmarks/lora_modes.py --backbone open_clip:ViT-B-16@random --threads 2

input        = visual_suffix.onnx, the bundle's: h·Wᵀ + (h·Aᵀ)·Bᵀ with W constant (the low-rank side path)
input_dense  = the same graph forming W + γ·B·A on every call (the input graph before the side path)
merged       = visual_suffix_merged.onnx with (W + γ·B·A)ᵀ given through SessionOptions.add_initializer; the
               one-off cost of folding a new LoRA in (building that session) is reported apart.
Prints median ms per call at each batch size. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.latency import measure  # noqa: E402 - one timing loop for both benchmarks


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    return measure(fn, repeats, warmup)["median_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="open_clip:ViT-B-16@random")
    ap.add_argument("--last-blocks", type=int, default=0, help="LoRA on the last L blocks (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from export import onnx_export as ox
    from runtime.lora import delta_weights
    from sglora_edge.backbone import create_backbone
    from sglora_edge.config import LoRASpec
    from sglora_edge.lora import init_vector

    torch.set_num_threads(args.threads)
    bb = create_backbone(args.backbone)
    spec = LoRASpec.for_visual(bb.visual, last_blocks=args.last_blocks)
    lora = (init_vector(spec) + 0.01 * torch.randn(spec.size, generator=torch.Generator().manual_seed(0))).numpy()
    tmp = Path(tempfile.mkdtemp())
    size = tuple(bb.visual.image_size) if isinstance(bb.visual.image_size, (tuple, list)) else (bb.visual.image_size,) * 2
    decls = ox.visual_exports(bb.visual, spec, size, lora)
    decls.append(dataclasses.replace(decls[1], name="visual_suffix_dense",
                                     module=ox.VisualSuffixGraph(bb.visual, spec, low_rank=False)))
    for d in decls:
        ox.export_graph(d, tmp)
    names = ox.expose_merged_initializers(tmp / "visual_suffix_merged.onnx", spec)
    base = ox.qkv_weights(bb.visual, spec)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    prefix = ort.InferenceSession(str(tmp / "visual_prefix.onnx"), options, providers=["CPUExecutionProvider"])
    fed = ort.InferenceSession(str(tmp / "visual_suffix.onnx"), options, providers=["CPUExecutionProvider"])
    dense = ort.InferenceSession(str(tmp / "visual_suffix_dense.onnx"), options, providers=["CPUExecutionProvider"])

    def merged_session():
        o = ort.SessionOptions()
        o.intra_op_num_threads = args.threads
        values = {names[str(b)]: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray((base[str(b)] + dw).T))
                  for b, dw in delta_weights(spec.to_dict(), lora).items()}
        for n, v in values.items():
            o.add_initializer(n, v)
        s = ort.InferenceSession(str(tmp / "visual_suffix_merged.onnx"), o, providers=["CPUExecutionProvider"])
        s._keep = values  # the session reads these buffers
        return s

    switch_ms = median_ms(merged_session, 3, warmup=0)
    merged = merged_session()
    out = {"backbone": args.backbone, "threads": args.threads, "lora_blocks": len(spec.blocks),
           "merged_lora_switch_ms": round(switch_ms, 1), "ort": ort.__version__, "batches": {}}
    for batch in map(int, args.batches.split(",")):
        pixels = np.random.default_rng(0).standard_normal((batch, 3, *size)).astype(np.float32)
        acts = prefix.run(None, {"pixels": pixels})[0]
        feed = {"activations": acts, "lora": lora}
        a, c = fed.run(None, feed)[0], dense.run(None, feed)[0]
        b = merged.run(None, {"activations": acts})[0]
        out["batches"][batch] = {
            "input_ms": round(median_ms(lambda: fed.run(None, feed), args.repeats), 3),
            "input_dense_ms": round(median_ms(lambda: dense.run(None, feed), args.repeats), 3),
            "merged_ms": round(median_ms(lambda: merged.run(None, {"activations": acts}), args.repeats), 3),
            "max_abs_diff": max(float(np.abs(a - b).max()), float(np.abs(a - c).max()))}
        print(json.dumps({batch: out["batches"][batch]}), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
