"""OpenVINO called directly vs through ONNX Runtime's OpenVINO execution provider, on the same bundle's visual
tower (prefix + suffix, LoRA as input): how `--backend openvino` was chosen (runtime/sessions.py).

The provider ships as its own ONNX Runtime wheel (onnxruntime-openvino, with its own OpenVINO build) that
shadows `onnxruntime`, so it is measured from a separate virtual environment:

    python -m venv /tmp/ep && /tmp/ep/bin/pip install onnxruntime-openvino numpy
    for hint in f32 bf16; do
        /tmp/ep/bin/python benchmarks/openvino_ep.py ep BUNDLE $hint     # ONNX Runtime + OpenVINO provider
        .venv/bin/python benchmarks/openvino_ep.py ov BUNDLE $hint       # OpenVINO directly (the [openvino] extra)
    done

BUNDLE: e.g. a `bench --synthetic ViT-B-16` bundle (export.synthetic.build_bundle). Prints one JSON line per run:
the time to load both graphs and run the first image, and the median of 5 calls at batch 1 and 8 (ms).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

mode, bundle, hint = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
m = json.loads((bundle / "manifest.json").read_text())
rng = np.random.default_rng(0)
pix = rng.standard_normal((8, 3, *m["image"]["image_size"]), np.float32)
lora = (0.01 * rng.standard_normal(m["lora_size"])).astype(np.float32)
t = time.perf_counter()
if mode == "ep":
    import onnxruntime as ort
    opts = {"device_type": "CPU", "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}})}
    pre, suf = (ort.InferenceSession(str(bundle / f), providers=[("OpenVINOExecutionProvider", opts)])
                for f in ("visual_prefix.onnx", "visual_suffix.onnx"))

    def run(b):
        return suf.run(None, {"activations": pre.run(None, {"pixels": pix[:b]})[0], "lora": lora})[0]
    version = f"onnxruntime-openvino {ort.__version__}, providers {pre.get_providers()}"
else:
    import openvino as ov
    core = ov.Core()
    pre, suf = (core.compile_model(str(bundle / f), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                             "PERFORMANCE_HINT": "LATENCY"})
                for f in ("visual_prefix.onnx", "visual_suffix.onnx"))
    rp, rs = pre.create_infer_request(), suf.create_infer_request()

    def run(b):
        acts = rp.infer({"pixels": pix[:b]})[pre.outputs[0]]
        return rs.infer({"activations": acts, "lora": lora})[suf.outputs[0]]
    version = f"openvino {ov.__version__}"
run(1)
out = {"mode": mode, "hint": hint, "version": version, "load_and_first_s": round(time.perf_counter() - t, 2)}
for b in (1, 8):
    run(b)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        run(b)
        times.append((time.perf_counter() - t) * 1000)
    out[f"b{b}_ms"] = round(float(np.median(times)), 1)
print(json.dumps(out), flush=True)
