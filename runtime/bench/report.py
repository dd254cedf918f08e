"""results.json as the schema says (check_schema), results.md and the charts."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .measure import STATS

SCHEMA = "sglora-edge-bench/1"


def check_schema(doc: dict) -> None:
    """Raise InputError naming the first key results.json lacks (the schema in this module's docstring)."""
    def need(obj, keys, where):
        for k in keys:
            if not isinstance(obj, dict) or k not in obj:
                raise InputError(f"results.json: {where} lacks {k!r}")
    need(doc, ("schema", "created", "command", "settings", "machine", "bundles", "comparisons", "tuning", "scaling",
               "peak_rss_mb", "gpu_memory_mb", "notes", "charts"), "the top level")
    if doc["schema"] != SCHEMA:
        raise InputError(f"results.json: schema {doc['schema']!r}, expected {SCHEMA!r}")
    need(doc["machine"], ("cpu_model", "cpu_flags", "kernel", "openvino_capabilities", "logical_cpus", "usable_cpus", "memory_gb", "gpu", "jetson_power_mode",
                          "versions", "ort_available_providers", "matmul_probe"), "machine")
    need(doc["machine"]["versions"], ("python", "numpy", "onnxruntime", "tensorrt", "torch"), "machine.versions")
    for r in doc["bundles"]:
        need(r, ("label", "path", "role", "backbone", "lora", "backend", "stages", "cold_start", "throughput",
                 "torch", "switch_images"), "a bundle")
        need(r["backend"], ("backend", "providers", "threads", "graph_optimization"), "bundle.backend")
        for name, st in list(r["stages"].items()) + list((r["torch"] or {}).items()):
            need(st, STATS, f"stage {name}")
        if r["role"] == "main":
            need(r["cold_start"], ("process_start", "imports", "bundle_verified", "sessions_ready", "first_result",
                                   "total", "peak_rss_mb"), "cold_start")
            need(r["throughput"], ("macs_per_image", "images_per_s", "gflops", "fraction_of_peak"), "throughput")
    need(doc["comparisons"], ("torch_vs_ort", "lora_modes", "generation_vs_training", "task_switch", "int8",
                              "precisions"), "comparisons")
    for label, pc in doc["comparisons"]["precisions"].items():
        need(pc, ("batches", "calibration", "rows"), f"precisions {label}")
        for row in pc["rows"]:
            need(row, ("engine", "backend", "precision", "graphs", "ms", "speedup", "cold_start_ms", "peak_rss_mb",
                       "min_cosine", "mean_r1", "r1_change", "refused"), f"precisions {label} row")
    for t in doc["tuning"]:
        need(t, ("bundle", "batch", "rows", "best"), "tuning")
        for r in t["rows"]:
            need(r, ("threads", "graph_optimization", "suffix_ms_per_image", "load_ms", "n"), "tuning row")
    if doc["scaling"] is not None:
        need(doc["scaling"]["library"], ("sizes", "generate_ms", "state_mb", "peak_mb", "slope_time", "growth"),
             "scaling.library")
        need(doc["scaling"]["retrieval"], ("sizes", "ms", "slope_time", "growth"), "scaling.retrieval")


# -- the run -------------------------------------------------------------------------------------------------------


def _ms(v) -> str:
    return "—" if v is None else f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"


def _table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def markdown(doc: dict) -> str:
    lines = _header(doc)
    for r in doc["bundles"]:
        if r["role"] == "main":
            lines += _bundle_section(r)
    c = doc["comparisons"]
    lines += _comparisons(c)
    for label, pc in c["precisions"].items():
        lines += _precision_table(label, pc)
    for t in doc["tuning"]:
        lines += _tuning(t)
    if doc["scaling"]:
        lines += _scaling(doc["scaling"])
    lines += [f"Peak RSS of the harness: {doc['peak_rss_mb']} MB"
              + (f"; GPU memory held {doc['gpu_memory_mb']} MB" if doc["gpu_memory_mb"] is not None else "") + ".", ""]
    if doc["notes"]:
        lines += ["Notes:", "", *(f"- {n}" for n in doc["notes"]), ""]
    return "\n".join(lines)


def _header(doc: dict) -> list[str]:
    """Title, command and the machine."""
    m = doc["machine"]
    b0 = doc["bundles"][0]["backend"] if doc["bundles"] else {}
    lines = [f"# sglora-edge bench: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, {b0.get('backend')}", "",
             f"`{doc['command']}`  ({doc['created']})", "",
             f"Machine: {m['cpu_model']} ({m['machine']}, kernel {m.get('kernel')}; flags "
             f"{' '.join(m.get('cpu_flags') or []) or 'unknown'}"
             + (f"; OpenVINO CPU capabilities {', '.join(m['openvino_capabilities'])}"
                if m.get("openvino_capabilities") else "") + f"), {m['logical_cpus']} logical / {m['usable_cpus']} usable "
             f"CPUs, {m['memory_gb']} GB, load average at start {m['load_average']}; GPU {m['gpu'] or 'none'}; "
             f"Jetson power mode {m['jetson_power_mode'] or 'n/a'}; versions "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
             + f"; ORT providers used {', '.join(b0.get('providers', []))}, threads {b0.get('threads') or 'default'}"
             f", graph optimisation {b0.get('graph_optimization')}; matmul probe {m['matmul_probe']['gflops']} "
             f"GFLOP/s (float32 {m['matmul_probe']['n']}², {m['matmul_probe']['engine']}).", "",
             "All times in ms per call (per-item: divided by the items of one call); p50/p90/p99/mean/std after "
             f"{doc['settings']['warmup']} warm-up calls.", ""]
    return lines


def _bundle_section(r: dict) -> list[str]:
    """One bundle's stages, cold start and throughput."""
    lines = [f"## {r['label']} ({r['backbone']['ident']}, LoRA {r['lora']['size']:,} numbers on "
             f"{r['lora']['blocks']} blocks)", ""]
    rows = [[k, st["per"], *(_ms(st[q]) for q in ("p50", "p90", "p99", "mean", "std")),
             _ms(st["p50"] / st["per"]), st["n"]] for k, st in r["stages"].items()]
    lines += _table(["stage", "items", "p50", "p90", "p99", "mean", "std", "p50 / item", "n"], rows)
    cs, tp = r["cold_start"], r["throughput"]
    lines += [f"Cold start (fresh process, median of {cs['repeats']}): process start {_ms(cs['process_start'])}, "
              f"imports {_ms(cs['imports'])}, bundle verified {_ms(cs['bundle_verified'])}, sessions ready "
              f"{_ms(cs['sessions_ready'])}, first result ({cs['images']} images, cold cache) "
              f"{_ms(cs['first_result'])}; total {_ms(cs['total'])} ms; peak RSS {cs['peak_rss_mb']} MB.", "",
              f"Image encoding at batch {tp['batch']}: {tp['images_per_s']} images/s, "
              f"{tp['macs_per_image']['total'] / 1e9:.3g} G multiply-adds per image, {tp['gflops']} GFLOP/s"
              + (f" = {100 * tp['fraction_of_peak']:.0f} % of the matmul probe" if tp["fraction_of_peak"] else "")
              + ".", ""]
    return lines


def _comparisons(c: dict) -> list[str]:
    """PyTorch vs ONNX Runtime, LoRA modes, generation vs training, task switch, INT8."""
    lines = ["## Comparisons (ratios from this run)", ""]
    for label, stages in c["torch_vs_ort"].items():
        lines += [f"PyTorch eager vs ONNX Runtime, {label} (speed-up = torch / ORT):", ""]
        lines += _table(["stage", "torch p50", "ORT p50", "speed-up"],
                        [[k, _ms(v["torch_ms"]), _ms(v["ort_ms"]), f"{v['speedup']:.2f}×"] for k, v in stages.items()])
    for label, modes in c["lora_modes"].items():
        rows = [[k, _ms(v["input_ms"]), _ms(v["merged_ms"]), f"{v['merged_over_input']:.2f}×"]
                for k, v in modes.items() if k[1:].isdigit()]
        lines += [f"LoRA as input vs merged, {label} (suffix per call; hand-over: input "
                  f"{modes['handover_input_ms']} ms, merge {_ms(modes['handover_merged_ms'])} ms):", ""]
        lines += _table(["batch", "input", "merged", "merged / input"], rows)
    for label, g in c["generation_vs_training"].items():
        lines += [f"Generation vs training, {label}: generating a LoRA from a description {_ms(g['generate_ms'])} ms; "
                  f"training the Oracle LoRA for one task with the expert recipe ({g['epochs']} epochs, "
                  f"{g['images']} images, task {g['task']}) {g['train_s']:.1f} s: **{g['ratio']:,.0f}×**.", ""]
    for name, ts in c["task_switch"].items():
        rows = [[f"prefix cached, {'all' if k == 'all' else 'last ' + k} block(s) re-run", _ms(v),
                 f"{ts['speedup'].get(k, 0):.1f}×"] for k, v in ts["cached_ms"].items()]
        lines += [f"Task switch, {name}, {ts['images']} images (new LoRA -> every image's "
                  f"features; cached: fp16 activations read from the on-disk cache and the features written back, "
                  f"as `run` does; re-encode: decoded pixels in memory, whole visual tower):", ""]
        lines += _table(["path", "ms", "speed-up"],
                        [["re-encode everything", _ms(ts["reencode_all_ms"]), "1×"], *rows])
    for label, q in c["int8"].items():
        rec = q["recall"]
        lines += [f"INT8 (dynamic quantization of the visual graphs) vs fp32, {label}: "
                  + (f"mean R@1 {rec['fp32_mean_r1']} -> {rec['int8_mean_r1']} ({rec['change']:+.2f}) on "
                     f"{rec['tasks']} galleries ({rec['galleries']})" if rec else
                     "recall not measured (random weights, or no --recall-world)") + ":", ""]
        lines += _table(["batch", "fp32 visual ms", "int8 visual ms", "speed-up"],
                        [[k, _ms(v["fp32_ms"]), _ms(v["int8_ms"]), f"{v['speedup']:.2f}×"]
                         for k, v in q.items() if k[1:].isdigit()])
    return lines


def _precision_table(label: str, pc: dict) -> list[str]:
    """Every engine and precision on one bundle."""
    cal = pc["calibration"]
    lines = [f"Engines and precisions, {label}: visual tower (prefix + suffix, LoRA as input) p50 ms per call; "
             f"speed-up over ONNX Runtime fp32; cold start and peak RSS of a fresh process (OpenVINO: compile "
             f"included); cosine of the image features to ONNX Runtime fp32 (min over 8 images); mean R@1 on "
             + (pc["recall_galleries"] or "no galleries (random weights, or no --recall-world)")
             + f". INT8 (NNCF) calibrated on {cal['images']} "
             + (f"train images of {cal['world']}" if cal["source"] == "dataset" else f"images of {cal['folder']}")
             + ".", ""]
    bs = [f"b{b}" for b in pc["batches"]]
    rows = []
    for row in pc["rows"]:
        if row["refused"]:
            rows.append([row["engine"], row["precision"], row["graphs"], *["—"] * (len(bs) * 2 + 4),
                         f"refused: {row['refused']}"])
            continue
        rows.append([row["engine"], row["precision"], row["graphs"], *(_ms(row["ms"].get(b)) for b in bs),
                     *(f"{row['speedup'][b]:.2f}×" if b in row["speedup"] else "—" for b in bs),
                     _ms(row["cold_start_ms"]), row["peak_rss_mb"] or "—",
                     "—" if row["min_cosine"] is None else f"{row['min_cosine']:.4f}",
                     "—" if row["mean_r1"] is None else f"{row['mean_r1']}"
                     + ("" if row["r1_change"] is None else f" ({row['r1_change']:+.2f})"), ""])
    lines += _table(["engine", "precision", "graphs", *(f"{b} ms" for b in bs), *(f"{b} ×" for b in bs),
                     "cold start ms", "peak RSS MB", "cosine", "mean R@1", "note"], rows)
    return lines


def _tuning(t: dict) -> list[str]:
    """Thread counts and graph optimisation levels."""
    lines = [f"Session settings, {t['bundle']} (suffix at batch {t['batch']}, ms per image; threads 0 = ONNX "
             f"Runtime's default; {t['usable_cpus']} usable CPUs):", ""]
    lines += _table(["threads", "graph optimisation", "ms / image", "session load ms"],
                    [[r["threads"] or "default", r["graph_optimization"], _ms(r["suffix_ms_per_image"]),
                      _ms(r["load_ms"])] for r in t["rows"]])
    b = t["best"]
    lines += [f"Fastest: threads {b['threads'] or 'default'}, optimisation {b['graph_optimization']}: "
              f"{b['speedup_over_default']:.2f}× ONNX Runtime's defaults.", ""]
    return lines


def _scaling(s: dict) -> list[str]:
    """Generation against library size, ranking against gallery size."""
    lib, ret = s["library"], s["retrieval"]
    lines = [f"## Scaling ({lib['bundle']})", "",
             f"Generation (description -> LoRA) against library size, LoRA {lib['lora_size']:,} numbers: "
             f"{lib['growth']} in time (log-log slope {lib['slope_time'] and round(lib['slope_time'], 2)}), "
             f"memory slope {lib['slope_memory'] and round(lib['slope_memory'], 2)}.", ""]
    lines += _table(["experts", "generate p50 ms", "library state MB", "peak MB"],
                    [[e, _ms(t), m_, p] for e, t, m_, p in zip(lib["sizes"], lib["generate_ms"], lib["state_mb"],
                                                                lib["peak_mb"])])
    lines += [f"Retrieval (one query, top-5) against cached gallery size: {ret['growth']} "
              f"(log-log slope {ret['slope_time'] and round(ret['slope_time'], 2)}).", ""]
    lines += _table(["images", "rank p50 ms", "features MB"],
                    [[n, _ms(t), mb] for n, t, mb in zip(ret["sizes"], ret["ms"], ret["state_mb"])])
    return lines


def charts(doc: dict, out: Path) -> list[str]:
    """stages.png (p50 per stage and bundle) and scaling.png, when matplotlib is installed; else none."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        doc["notes"].append("charts skipped: matplotlib is not installed")
        return []
    written = []
    mains = [r for r in doc["bundles"] if r["role"] == "main"]
    if mains:
        fig, axes = plt.subplots(1, len(mains), figsize=(6 * len(mains), 7), squeeze=False)
        for ax, r in zip(axes[0], mains):
            names = list(r["stages"])
            ax.barh(names, [r["stages"][k]["p50"] for k in names], label="ONNX Runtime")
            if r["torch"]:
                ax.barh(names, [r["torch"].get(k, {}).get("p50", 0) for k in names], height=0.35,
                        label="PyTorch eager")
            ax.set_xscale("log")
            ax.invert_yaxis()
            ax.set_xlabel("p50 ms per call")
            ax.set_title(r["label"])
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "stages.png", dpi=90)
        plt.close(fig)
        written.append("stages.png")
    s = doc["scaling"]
    if s:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.loglog(s["library"]["sizes"], s["library"]["generate_ms"], "o-", label="generate ms")
        a.loglog(s["library"]["sizes"], s["library"]["peak_mb"], "s--", label="peak MB")
        a.set_xlabel("experts in the library")
        a.set_title(f"generation: {s['library']['growth']}")
        a.legend()
        b.loglog(s["retrieval"]["sizes"], s["retrieval"]["ms"], "o-")
        b.set_xlabel("cached gallery images")
        b.set_ylabel("rank ms (one query)")
        b.set_title(f"retrieval: {s['retrieval']['growth']}")
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=90)
        plt.close(fig)
        written.append("scaling.png")
    return written
