"""`sglora-edge bench`: run every stage on every bundle and write the results."""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ..artifacts import write_bytes
from ..bundle import Bundle, read_manifest
from ..config import BenchConfig
from ..errors import InputError
from .measure import gpu_memory_mb, machine_record, peak_rss_mb
from .report import SCHEMA, charts, check_schema, markdown
from .stages import bench_bundle, comparisons, int8_comparison, precision_comparison, scaling, tuning

# -- the run -------------------------------------------------------------------------------------------------------
def run_bench(bundles: list[Path], out: Path, cfg: BenchConfig, switch_bundles: list[Path] = (), torch_timers=None,
              training=None, notes=None, command: str = "", log=print, int8_hooks=None) -> dict:
    """Measure every bundle, compare, scale, record the machine; write results.json, results.md and charts into
    `out`. torch_timers {bundle path: fn(cfg) -> {stage: stats}} and training {label: {...}} come from the
    server side (`export.synthetic`) when torch is present."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes or [])
    log("machine record and matmul probe")
    machine = machine_record(cfg.threads)
    peak_gflops = machine["matmul_probe"]["gflops"]
    with tempfile.TemporaryDirectory(prefix="sglora-bench-") as tmp:
        work = Path(tmp)
        results, switch_images = [], {}
        for role, paths in (("main", bundles), ("switch", switch_bundles)):
            for b in paths:
                log(f"bundle {b} ({role})")
                backbone = read_manifest(b).backbone
                model = (backbone["model_name"], "@random" in backbone["ident"])
                r = bench_bundle(Path(b), cfg, work, role, switch_images.get(model, cfg.switch_gallery), log=log,
                                 peak_gflops=peak_gflops)
                switch_images.setdefault(model, r["switch_images"])
                timer = (torch_timers or {}).get(str(b))
                if timer is not None and role == "main":
                    log(f"{r['label']}: PyTorch eager")
                    r["torch"] = timer(cfg)
                results.append(r)
        int8 = {r["label"]: int8_comparison(r, int8_hooks, cfg, work, log) for r in results
                if r["role"] == "main"} if int8_hooks and cfg.int8 else {}
        precisions = {r["label"]: precision_comparison(r, int8_hooks, cfg, work, log) for r in results
                      if r["role"] == "main"} if int8_hooks and cfg.openvino else {}
        tune = [tuning(Path(b), cfg, work, log) for b in bundles] if cfg.tuning else []
        scale = None
        if cfg.library_size_list or cfg.retrieval_size_list:
            scale = scaling(Path(bundles[0]), cfg, work, log)
            notes += scale["library"]["skipped"]
    if not torch_timers:
        notes.append("PyTorch eager not measured (torch absent, or bundles given with --bundle: pass --synthetic)")
    comp = comparisons(results, cfg.batches, training or {})
    comp["int8"] = int8
    comp["precisions"] = precisions
    doc = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command, "settings": cfg.settings(),
           "machine": machine, "bundles": results,
           "comparisons": comp, "tuning": tune, "scaling": scale,
           "peak_rss_mb": peak_rss_mb(), "gpu_memory_mb": gpu_memory_mb(), "notes": notes}
    doc["charts"] = charts(doc, out)
    check_schema(doc)
    write_bytes(out / "results.json", (json.dumps(doc, indent=2) + "\n").encode())
    write_bytes(out / "results.md", markdown(doc).encode())
    return doc


def bench_command(cfg: BenchConfig, prepare=None, int8_hooks=None) -> int:
    """Body of `sglora-edge bench`. `prepare` (export.synthetic.prepare, passed in by the CLI when --synthetic is
    given) builds random-weight bundles with torch and returns the PyTorch timers and the Oracle training times;
    `int8_hooks` (export.precision.hook, with --int8 or --openvino) quantizes bundles and measures their recall;
    `int8` runs the ONNX Runtime INT8 comparison, `openvino` the table of every engine and precision."""
    from ..commands import _say, guarded

    bundles, synthetic, switch_bundles, out, as_json = cfg.bundles, cfg.synthetic, cfg.switch_bundles, cfg.out, cfg.as_json

    def body() -> int:
        if not bundles and not synthetic:
            raise InputError("nothing to measure: pass --bundle DIR (an exported bundle) or --synthetic NAME "
                             "(sglora-micro, sglora-tiny, ViT-B-16; needs torch)")
        cfg.check()
        for b in list(bundles) + list(switch_bundles):
            Bundle.load(b, verify=False)  # a missing or malformed bundle fails now, in one line
        log = (lambda s: None) if as_json else (lambda s: _say(s, "0"))
        mains, switches, timers, training, notes = list(bundles), list(switch_bundles), {}, {}, []
        with tempfile.TemporaryDirectory(prefix="sglora-bench-build-") as build:
            if synthetic:
                if prepare is None:
                    raise InputError("--synthetic needs torch and the export extra (pip install "
                                     "'sglora-edge[train,export]'); on a device pass --bundle")
                made = prepare(cfg, Path(build), log)
                mains += made["bundles"]
                switches += made["switch_bundles"]
                timers, training, notes = made["torch_timers"], made["training"], made["notes"]
            doc = run_bench(mains, out, cfg, switches, torch_timers=timers, training=training, notes=notes,
                            command=shlex.join(["sglora-edge", *sys.argv[1:]]), log=log, int8_hooks=int8_hooks)
        if as_json:
            print(json.dumps(doc, indent=2))
        else:
            print(markdown(doc))
            print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
                  + "".join(f", {out / c}" for c in doc["charts"]))
        return 0
    return guarded(body)
