"""The device half of `make demo`: export the demo run's bundle, then `sglora-edge run` on an unseen task.

    python -m sglora_edge.demo --run runs/demo --data runs/world

Picks the first unseen task of the run's domain, links its test images into OUT/gallery_<task>/,
takes two of its test captions as attribute queries, exports the bundle once (library + the default
generator: a trained one, or the Top-K (ΔW) merge when none beat it on validation), and runs the device command exactly as a user would type it — printed first — in a
process where torch cannot be imported, ending with the path of the HTML contact sheet.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from runtime.bundle import BundleError, read_library, read_manifest

from .data import load_dataset

# `run` must work without torch: the demo proves it by hiding torch from the device process.
BLOCK_TORCH = ("import sys; sys.modules.update({m: None for m in ('torch', 'torchvision', 'open_clip')}); "
               "from sglora_edge.cli import app; sys.argv[0] = 'sglora-edge'; app()")


def gallery_for(ds, task: str, folder: Path) -> tuple[Path, list[str]]:
    """Link the task's test images into `folder`; return it and two attribute captions to query."""
    g = ds.gallery(task, "test")
    folder.mkdir(parents=True, exist_ok=True)
    for image in g.images:
        link = folder / Path(image).name
        if not link.exists():
            os.symlink(Path(image).resolve(), link)
    counts = collections.Counter(p.caption for p in ds.split_pairs("test", task))
    plain = ds.tasks[task].description
    queries = [c for c, _ in counts.most_common() if c != plain][:2]
    return folder, queries


def current_export(bundle: Path) -> dict | None:
    """What generator the bundle at `bundle` holds, in the terms main() asks for; None when there is no readable
    bundle there (none yet, an old or a broken one: main() exports afresh)."""
    try:
        manifest = read_manifest(bundle)
    except BundleError:
        return None
    kind = manifest.generator_kind
    if kind == "cvae":
        return {"kind": kind, "source": manifest.cvae["source"]}
    return {"kind": kind, **manifest.aggregation, "experts": manifest.library["experts"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a `reproduce` output folder")
    ap.add_argument("--data", type=Path, required=True, help="the dataset it was run on")
    args = ap.parse_args(argv)
    report = json.loads((args.run / "report.json").read_text())
    ds = load_dataset(args.data, check_images="none")
    domain = (ds.domains() or [None])[0]
    tag = domain or "all"
    task = report["settings"][f"in_dataset:{tag}"]["tasks"]["unseen"][0]
    bundle = args.run / "bundle"
    exe = [sys.executable, "-m", "sglora_edge.cli"]
    # the default as validation decided it: a trained generator, or a Top-K (ΔW) merge (no --cvae) over the expert
    # library, the cluster library or the routed atoms
    default = report["default_generator"]
    source = {"retrieval": "generator_s0.safetensors", "paper": "cvae.safetensors"}.get(default)
    folder = {"cluster": f"clusters_in_dataset_{tag}", "atoms": f"atoms_in_dataset_{tag}"}.get(default, f"library_{tag}")
    library = args.run / "models" / folder / "library.safetensors"
    experts = len(read_library(library)[0])
    k, tau = min(report["config"]["cvae"]["k"], experts), report["config"]["cvae"]["tau"]
    want = {"kind": "cvae", "source": source} if source else {"kind": "topk_dw", "k": k, "tau": tau, "experts": experts}
    if current_export(bundle) != want:
        cmd = ["export", "--library", str(library),
               *(["--cvae", str(args.run / "models" / f"in_dataset_{tag}" / source)] if source else
                 ["--k", str(k), "--tau", str(tau)]), "--out", str(bundle)]
        print("$ sglora-edge " + shlex.join(cmd), flush=True)
        subprocess.run(exe + cmd, check=True)
    gallery, queries = gallery_for(ds, task, args.run / f"gallery_{task.replace(' ', '_')}")
    html = args.run / f"{task.replace(' ', '_')}.html"
    cmd = ["run", "--bundle", str(bundle), "--desc", ds.tasks[task].description, "--gallery", str(gallery),
           *[a for q in queries for a in ("-q", q)], "--html", str(html), "--cache-dir", str(args.run / "cache_device")]
    print(f"\nOn the device (torch blocked), unseen task {task!r}:\n$ sglora-edge " + shlex.join(cmd), flush=True)
    subprocess.run([sys.executable, "-c", BLOCK_TORCH, *cmd], check=True)
    print(f"\nContact sheet: {html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
