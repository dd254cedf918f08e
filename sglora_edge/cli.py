"""`sglora-edge` command line. Every command body imports its heavy modules lazily, so
`sglora-edge --help` and `sglora-edge run --help` work where torch is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="SG-LoRA: generate CLIP LoRA weights from a one-line task description.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Dataset contract: check and convert dataset folders.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate backbones and methods.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
BackboneOpt = typer.Option(..., "--backbone", "-b",
                           help="open_clip:MODEL@WEIGHTS (tag, local .safetensors, or a `pretrain` output folder), "
                                "or a pretrain output folder.")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def emit(obj, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True) if as_json else text)


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, cells)])


def recall_rows(per_task: dict[str, dict], mean: dict) -> list[list]:
    row = lambda name, r: [name, *(r[d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10"))]
    return [row(t, r) for t, r in per_task.items()] + [row("mean", mean)]


RECALL_HEADERS = ["task", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10"]


@app.command()
def world(out: Path = typer.Option(..., "--out", "-o", help="Folder to write the dataset into."),
          seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files."),
          preset: str = typer.Option("default", help="micro (tests, seconds) or default (the testbed)."),
          overwrite: bool = typer.Option(False, help="Replace an existing non-empty folder."),
          as_json: bool = JsonOpt):
    """Write the embedded synthetic image-caption world (docs/WORLD.md) in the dataset contract."""
    from .world import PRESETS, write_world
    if preset not in PRESETS:
        fail(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    try:
        summary = write_world(out, seed=seed, preset=preset, overwrite=overwrite, progress=not as_json)
    except FileExistsError as e:
        fail(f"{e} (pass --overwrite to replace it)")
    emit(summary, as_json, "\n".join(f"{k}: {v}" for k, v in summary.items()))


@data_app.command("check")
def data_check(folder: Path = typer.Argument(..., help="Dataset folder with manifest.jsonl (+ tasks.json)."),
               decode: bool = typer.Option(False, help="Open every image (slower) instead of checking it exists."),
               as_json: bool = JsonOpt):
    """Validate a dataset folder against the contract; exit non-zero on any violation."""
    from .data import DatasetError, load_dataset
    try:
        ds = load_dataset(folder, check_images="decode" if decode else "exists")
    except DatasetError as e:
        if as_json:
            typer.echo(json.dumps({"ok": False, "problems": e.problems}, indent=2))
            raise typer.Exit(1)
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    s = ds.summary()
    text = [f"dataset {s['root']}: OK", f"tasks: {s['tasks']} ({', '.join(f'{r} {n}' for r, n in s['roles'].items())};"
            f" roles from {s['role_source']})"]
    if s["domains"]:
        text.append(f"domains: {', '.join(s['domains'])}")
    if s["families"]:
        text.append(f"families: {len(s['families'])}")
    text.append(format_table(["split", "tasks", "images", "captions"],
                             [[k, v["tasks"], v["images"], v["captions"]] for k, v in s["splits"].items()]))
    emit({"ok": True, **s}, as_json, "\n".join(text))


@app.command()
def pretrain(data: Path = typer.Option(..., "--data", help="Dataset folder with a 'pretrain' split."),
             out: Path = typer.Option(..., "--out", "-o", help="Output folder (backbone.safetensors)."),
             config: str = typer.Option("sglora-tiny", help="Tiny open_clip config shipped with the package."),
             epochs: int = typer.Option(20, help="Passes over the pretrain pairs."),
             batch_size: int = typer.Option(256),
             lr: float = typer.Option(1e-3),
             seed: int = typer.Option(0),
             checkpoint_every: int = typer.Option(100, help="Steps between resumable checkpoints."),
             resume: bool = typer.Option(True, help="Continue from OUT/checkpoint.safetensors if present."),
             as_json: bool = JsonOpt):
    """Pretrain a tiny CLIP from scratch on the pretrain split (contrastive loss)."""
    from .backbone.pretrain import pretrain as run_pretrain
    try:
        report = run_pretrain(data, out, config=config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                              checkpoint_every=checkpoint_every, resume=resume, progress=not as_json)
    except ValueError as e:
        fail(str(e))
    report.pop("history")
    emit(report, as_json, f"wrote {out / 'backbone.safetensors'}: loss {report['first_loss']:.3f} -> "
                          f"{report['final_loss']:.3f} in {report['seconds_train']:.0f} s "
                          f"(backbone spec: open_clip:{config}@{out})")


@eval_app.command("zeroshot")
def eval_zeroshot(data: Path = typer.Option(..., "--data"), backbone: str = BackboneOpt,
                  role: Optional[str] = typer.Option(None, help="Only tasks of this role (expert/train/unseen)."),
                  domain: Optional[str] = typer.Option(None, help="Only tasks of this domain."),
                  split: str = typer.Option("test"), as_json: bool = JsonOpt):
    """Recall@1/5/10 (image->text, text->image) of the frozen backbone per task, and the mean."""
    from .backbone import BackboneError, create_backbone
    from .data import DatasetError, load_dataset
    from .metrics import mean_recalls
    from .retrieval import evaluate_gallery, prepare_gallery
    try:
        ds = load_dataset(data)
        bb = create_backbone(backbone)
    except (DatasetError, BackboneError, ValueError) as e:
        fail(str(e))
    tasks = [t for t in ds.task_names(role=role, domain=domain) if ds.split_pairs(split, t)]
    if not tasks:
        fail(f"no task with {split!r} pairs matches role={role} domain={domain} in {data}")
    per_task = {t: evaluate_gallery(bb, prepare_gallery(bb, ds, t, split)) for t in tasks}
    mean = mean_recalls(per_task)
    emit({"backbone": bb.ident, "split": split, "per_task": per_task, "mean": mean}, as_json,
         f"zero-shot {bb.ident} on {data} ({split})\n" + format_table(RECALL_HEADERS, recall_rows(per_task, mean)))


@app.command()
def run(desc: str = typer.Option(..., "--desc", help='Task description, e.g. "a photo of a persian".'),
        bundle: Path = typer.Option(..., "--bundle", help="Exported bundle folder (manifest.json, ONNX files)."),
        gallery: Path = typer.Option(..., "--gallery", help="Folder of images to retrieve from."),
        query: list[str] = typer.Option([], "--query", "-q", help="Text query (repeatable); default: the description."),
        top_k: int = typer.Option(5, help="Results per query."),
        engine: str = typer.Option("onnxruntime", help="onnxruntime or tensorrt."),
        as_json: bool = JsonOpt):
    """On-device: description -> LoRA -> retrieval over a local gallery (numpy + ONNX Runtime/TensorRT only)."""
    from runtime.pipeline import run_retrieval
    try:
        result = run_retrieval(bundle, desc, gallery, queries=query or [desc], top_k=top_k, engine=engine)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e))
    lines = [f"best expert similarity {result['explanation']['best_similarity']:.3f}"]
    for q, hits in result["results"].items():
        lines.append(f"{q}:")
        lines += [f"  {h['score']:.3f}  {h['image']}" for h in hits]
    emit(result, as_json, "\n".join(lines))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
