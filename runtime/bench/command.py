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
def run_bench(bundles: list[Path], out: Path, opts: dict, switch_bundles: list[Path] = (), torch_timers=None,
              training=None, notes=None, command: str = "", log=print, int8_hooks=None) -> dict:
    """Measure every bundle, compare, scale, record the machine; write results.json, results.md and charts into
    `out`. torch_timers {bundle path: fn(opts) -> {stage: stats}} and training {label: {...}} come from the
    server side (`export.synthetic`) when torch is present."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes or [])
    log("machine record and matmul probe")
    machine = machine_record(opts["threads"])
    opts = {**opts, "peak_gflops": machine["matmul_probe"]["gflops"]}
    with tempfile.TemporaryDirectory(prefix="sglora-bench-") as tmp:
        work = Path(tmp)
        results, switch_images = [], {}
        for role, paths in (("main", bundles), ("switch", switch_bundles)):
            for b in paths:
                log(f"bundle {b} ({role})")
                backbone = read_manifest(b).backbone
                model = (backbone["model_name"], "@random" in backbone["ident"])
                r = bench_bundle(Path(b), opts, work, role, switch_images.get(model, opts["switch_gallery"]), log)
                switch_images.setdefault(model, r["switch_images"])
                timer = (torch_timers or {}).get(str(b))
                if timer is not None and role == "main":
                    log(f"{r['label']}: PyTorch eager")
                    r["torch"] = timer(opts)
                results.append(r)
        int8 = {r["label"]: int8_comparison(r, int8_hooks, opts, work, log) for r in results
                if r["role"] == "main"} if int8_hooks and opts.get("int8", True) else {}
        precisions = {r["label"]: precision_comparison(r, int8_hooks, opts, work, log) for r in results
                      if r["role"] == "main"} if int8_hooks and opts.get("openvino") else {}
        tune = [tuning(Path(b), opts, work, log) for b in bundles] if opts["tuning"] else []
        scale = None
        if opts["library_sizes"] or opts["retrieval_sizes"]:
            scale = scaling(Path(bundles[0]), opts, work, log)
            notes += scale["library"]["skipped"]
    if not torch_timers:
        notes.append("PyTorch eager not measured (torch absent, or bundles given with --bundle: pass --synthetic)")
    comp = comparisons(results, opts["batches"], training or {})
    comp["int8"] = int8
    comp["precisions"] = precisions
    doc = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command, "settings": {k: v for k, v in opts.items() if k != "peak_gflops"},
           "machine": machine, "bundles": results,
           "comparisons": comp, "tuning": tune, "scaling": scale,
           "peak_rss_mb": peak_rss_mb(), "gpu_memory_mb": gpu_memory_mb(), "notes": notes}
    doc["charts"] = charts(doc, out)
    check_schema(doc)
    write_bytes(out / "results.json", (json.dumps(doc, indent=2) + "\n").encode())
    write_bytes(out / "results.md", markdown(doc).encode())
    return doc


def _ints(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {value!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if any(v < 1 for v in out):
        raise InputError(f"{what} {value!r}: every value must be >= 1")
    return out


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
        if cfg.repeats < 2 or cfg.warmup < 0 or cfg.gallery_size < 1 or cfg.switch_gallery < 1 or not cfg.stage_budget > 0:
            raise InputError("--repeats must be >= 2, --warmup >= 0, --gallery-size and --switch-gallery >= 1, "
                             "--stage-budget > 0")
        opts = {"backend": cfg.backend, "threads": cfg.threads, "batches": _ints(cfg.batch, "--batch"),
                "gallery_size": cfg.gallery_size, "switch_gallery": cfg.switch_gallery, "repeats": cfg.repeats,
                "warmup": cfg.warmup, "stage_budget": cfg.stage_budget, "tuning": cfg.tuning, "int8": cfg.int8,
                "openvino": cfg.openvino, "calibration_images": cfg.calibration_images,
                "library_sizes": _ints(cfg.library_sizes, "--library-sizes") if cfg.library_sizes else [],
                "retrieval_sizes": _ints(cfg.retrieval_sizes, "--retrieval-sizes") if cfg.retrieval_sizes else []}
        for b in list(bundles) + list(switch_bundles):
            Bundle.load(b, verify=False)  # a missing or malformed bundle fails now, in one line
        log = (lambda s: None) if as_json else (lambda s: _say(s, "0"))
        mains, switches, timers, training, notes = list(bundles), list(switch_bundles), {}, {}, []
        with tempfile.TemporaryDirectory(prefix="sglora-bench-build-") as build:
            if synthetic:
                if prepare is None:
                    raise InputError("--synthetic needs torch and the export extra (pip install "
                                     "'sglora-edge[train,export]'); on a device pass --bundle")
                made = prepare(synthetic, Path(build), opts, cfg.oracle_world, log)
                mains += made["bundles"]
                switches += made["switch_bundles"]
                timers, training, notes = made["torch_timers"], made["training"], made["notes"]
            doc = run_bench(mains, out, opts, switches, timers, training, notes,
                            shlex.join(["sglora-edge", *sys.argv[1:]]), log, int8_hooks)
        if as_json:
            print(json.dumps(doc, indent=2))
        else:
            print(markdown(doc))
            print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
                  + "".join(f", {out / c}" for c in doc["charts"]))
        return 0
    return guarded(body)
