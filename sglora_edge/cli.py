"""`sglora-edge` command line. Every command body imports its heavy modules lazily, so
`sglora-edge --help` and `sglora-edge run --help` work where torch is not installed.

Errors are handled once, in `Commands.invoke`: any `SGLoRAError` a command raises prints one
line `error: ...` and exits 2. The device commands (`run`, `serve`, `build-engines`) run their bodies in
`runtime.commands.guarded`, which does the same torch-free (and reports anything else as a bug)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from runtime.config import BenchConfig, EngineConfig, ExportConfig, RunConfig, ServeConfig

from .config import (PRODUCT_GENERATOR, CVAEConfig, Executor, ExecutorKind, ExpertConfig, LoRASpec, Objective,
                     PretrainConfig, Recon, SemanticChoice)
from .errors import SGLoRAError, missing_extra


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


class Commands(TyperGroup):
    """The one place the CLI turns an error into `error: <message>` and exit code 2: a project error,
    or a server dependency missing from a device-only install. Sub-commands (data, eval) run inside
    this invoke, so their errors arrive here too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SGLoRAError as e:
            fail(str(e))
        except ModuleNotFoundError as e:
            if (missing := missing_extra(e)) is None:
                raise
            fail(str(missing))


app = typer.Typer(help="SG-LoRA: generate CLIP LoRA weights from a one-line task description.", cls=Commands,
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Dataset contract: check and convert dataset folders.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate backbones and methods.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
BackboneOpt = typer.Option(..., "--backbone", "-b",
                           help="open_clip:MODEL@WEIGHTS (tag, local .safetensors, or a `pretrain` output folder), "
                                "or a pretrain output folder.")


def option(config: type, name: str, *flags: str):
    """A typer option whose default and help are those of field `name` of a config dataclass: every
    default is written once, in the dataclass. A tuple default is shown comma-separated, as it is typed."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
    return typer.Option(default, *flags, help=f.metadata["help"])


# Where task LoRAs train (train-experts, reproduce); see README "Training a large library".
ExecutorOpt = option(Executor, "kind", "--executor")
RayAddressOpt = option(Executor, "address", "--ray-address")
GpusPerTaskOpt = option(Executor, "gpus_per_task", "--gpus-per-task")
CpusPerTaskOpt = option(Executor, "cpus_per_task", "--cpus-per-task")


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
    from .world import write_world
    summary = write_world(out, seed=seed, preset=preset, overwrite=overwrite, progress=not as_json)
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


@data_app.command("convert")
def data_convert(fmt: str = typer.Argument(..., help="coco, pets, flowers or folder."),
                 src: Path = typer.Argument(..., help="The dataset in its public layout."),
                 out: Path = typer.Option(..., "--out", "-o"), seed: int = typer.Option(0),
                 test_fraction: float = typer.Option(0.3), val_fraction: float = typer.Option(0.1),
                 copy_images: bool = typer.Option(False, help="Copy images under OUT/images (default: link by path)."),
                 overwrite: bool = typer.Option(False), as_json: bool = JsonOpt):
    """Convert a public dataset layout (COCO, Oxford-IIIT Pet, Flowers102, folder per class) to the contract."""
    from .data.convert import convert
    summary = convert(fmt, src, out, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction,
                      copy_images=copy_images, overwrite=overwrite, progress=not as_json)
    emit(summary, as_json, "\n".join(f"{k}: {v}" for k, v in summary.items()))


@app.command()
def pretrain(data: Path = typer.Option(..., "--data", help="Dataset folder with a 'pretrain' split."),
             out: Path = typer.Option(..., "--out", "-o", help="Output folder (backbone.safetensors)."),
             config: str = option(PretrainConfig, "config"),
             epochs: int = option(PretrainConfig, "epochs"),
             batch_size: int = option(PretrainConfig, "batch_size"),
             lr: float = option(PretrainConfig, "lr"),
             seed: int = option(PretrainConfig, "seed"),
             checkpoint_every: int = option(PretrainConfig, "checkpoint_every"),
             resume: bool = typer.Option(True, help="Continue from OUT/checkpoint.safetensors if present."),
             as_json: bool = JsonOpt):
    """Pretrain a tiny CLIP from scratch on the pretrain split (contrastive loss)."""
    from .backbone.pretrain import pretrain as run_pretrain
    report = run_pretrain(data, out, config=config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          checkpoint_every=checkpoint_every, resume=resume, progress=not as_json)
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
    from .metrics import mean_recalls
    from .retrieval import evaluate_gallery, prepare_gallery
    ds, bb = _load(data, backbone)
    tasks = [t for t in ds.task_names(role=role, domain=domain) if ds.split_pairs(split, t)]
    if not tasks:
        fail(f"no task with {split!r} pairs matches role={role} domain={domain} in {data}")
    per_task = {t: evaluate_gallery(bb, prepare_gallery(bb, ds, t, split)) for t in tasks}
    mean = mean_recalls(per_task)
    emit({"backbone": bb.ident, "split": split, "per_task": per_task, "mean": mean}, as_json,
         f"zero-shot {bb.ident} on {data} ({split})\n" + format_table(RECALL_HEADERS, recall_rows(per_task, mean)))


def _split_csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _load(data: Path, backbone: str):
    from .backbone import create_backbone
    from .data import load_dataset
    return load_dataset(data), create_backbone(backbone)


@app.command("train-experts")
def train_experts_cmd(
        data: Path = typer.Option(..., "--data"), backbone: str = BackboneOpt,
        out: Path = typer.Option(..., "--out", "-o", help="Folder of per-task checkpoint files."),
        tasks: Optional[str] = typer.Option(None, help="Comma-separated task names (default: every task of --role)."),
        role: Optional[str] = typer.Option(None, help="expert, train or unseen (unseen = Oracle LoRAs); default: all."),
        epochs: int = option(ExpertConfig, "epochs"), keep_last: int = option(ExpertConfig, "keep_last"),
        lr: float = option(ExpertConfig, "lr"), batch_size: int = option(ExpertConfig, "batch_size"),
        freeze_a: bool = option(ExpertConfig, "freeze_a"),
        rank: int = option(LoRASpec, "rank"), alpha: float = option(LoRASpec, "alpha"),
        targets: str = option(LoRASpec, "targets"), last_blocks: int = option(LoRASpec, "last_blocks"),
        seed: int = option(ExpertConfig, "seed"),
        jobs: int = typer.Option(1, help="Train tasks in this many processes (cores are split between them)."),
        executor: ExecutorKind = ExecutorOpt, ray_address: Optional[str] = RayAddressOpt,
        gpus_per_task: Optional[float] = GpusPerTaskOpt, cpus_per_task: float = CpusPerTaskOpt,
        as_json: bool = JsonOpt):
    """Train a LoRA per task with the CLIP contrastive loss; keep the last M epochs. Resumable."""
    from .experts import train_experts
    ex = Executor(executor, ray_address, gpus_per_task, cpus_per_task)
    ds, bb = _load(data, backbone)
    names = _split_csv(tasks) or ds.task_names(role=role)
    spec = LoRASpec.for_visual(bb.visual, rank=rank, alpha=alpha, targets=tuple(_split_csv(targets)),
                               last_blocks=last_blocks)
    cfg = ExpertConfig(epochs=epochs, keep_last=keep_last, lr=lr, batch_size=batch_size, freeze_a=freeze_a,
                       seed=seed)
    done = train_experts(bb, spec, ds, names, out, cfg, progress=not as_json, jobs=jobs, executor=ex)
    rows = [[t, i["n_images"], i["loss_first"], i["loss_last"], i["seconds"], i.get("node", "")]
            for t, i in done.items()]
    emit(done, as_json, format_table(["task", "images", "loss first", "loss last", "s", "node"], rows))


@app.command("build-library")
def build_library_cmd(
        data: Path = typer.Option(..., "--data"), backbone: str = BackboneOpt,
        experts: Path = typer.Option(..., "--experts", help="Folder written by train-experts."),
        out: Path = typer.Option(..., "--out", "-o", help="library.safetensors to write."),
        tasks: Optional[str] = typer.Option(None, help="Expert tasks (default: the expert-role tasks)."),
        semantic: SemanticChoice = typer.Option(
            "auto", help="backbone (CLIP text tower), minilm, or auto: measured on tiny backbones, the text tower "
                         "on real ones."),
        add: Optional[str] = typer.Option(None, help="Add these tasks to the existing library at --out."),
        remove: Optional[str] = typer.Option(None, help="Remove these experts from the existing library at --out."),
        as_json: bool = JsonOpt):
    """Build the expert library (μ_e, σ²_e, description embeddings), or add/remove experts in one."""
    from .library_build import build_library, update_library
    ds, bb = _load(data, backbone)
    if add or remove:
        lib = update_library(out, ds, bb, experts, _split_csv(add) or [], _split_csv(remove) or [])
    else:
        lib = build_library(ds, bb, experts, _split_csv(tasks), semantic)
    lib.save(out)
    summary = {"library": str(out), "experts": lib.names, "semantic": lib.semantic, "info": lib.info}
    emit(summary, as_json, f"wrote {out}: {len(lib)} experts, semantic encoder {lib.semantic}\n"
                           + json.dumps(lib.info, indent=2))


@app.command()
def explain(library: Path = typer.Option(..., "--library", "-l"), desc: str = typer.Option(..., "--desc"),
            k: int = option(CVAEConfig, "k"), tau: float = option(CVAEConfig, "tau"),
            backbone: Optional[str] = typer.Option(None, help="Needed when the library embeds with the backbone."),
            as_json: bool = JsonOpt):
    """Which experts a description routes to, with similarities and weights (paper Table 4)."""
    from .library import Library, SemanticEncoder
    lib = Library.load(library)
    minilm = lib.semantic_kind == "minilm"
    enc = SemanticEncoder(lib.semantic_kind, None if minilm else lib.load_backbone(backbone))
    agg = lib.aggregate(enc.encode([desc])[0], k=k, tau=tau)
    rows = [[n, lib.descriptions[lib.names.index(n)], s, w] for n, s, w in zip(agg.experts, agg.similarities,
                                                                          agg.weights)]
    text = format_table(["expert", "description", "similarity", "weight"],
                        [[a, b, f"{c:.3f}", f"{d:.3f}"] for a, b, c, d in rows])
    emit({"description": desc, **agg.explain()}, as_json, f'"{desc}" -> top-{k} experts\n{text}')


@app.command("train-cvae")
def train_cvae_cmd(
        data: Path = typer.Option(..., "--data"), backbone: str = BackboneOpt,
        experts: Path = typer.Option(..., "--experts"), library: Path = typer.Option(..., "--library", "-l"),
        out: Path = typer.Option(..., "--out", "-o", help="cvae.safetensors to write."),
        latent: int = option(CVAEConfig, "latent"), hidden: int = option(CVAEConfig, "hidden"),
        kl_weight: float = option(CVAEConfig, "kl_weight"), recon: Recon = option(CVAEConfig, "recon"),
        residual: bool = option(CVAEConfig, "residual"),
        k: int = option(CVAEConfig, "k"), tau: float = option(CVAEConfig, "tau"),
        cond_aug: float = option(CVAEConfig, "cond_aug"),
        epochs: int = option(CVAEConfig, "epochs"), lr: float = option(CVAEConfig, "lr"),
        seed: int = option(CVAEConfig, "seed"),
        objective: Objective = option(CVAEConfig, "objective"),
        as_json: bool = JsonOpt):
    """Train the generator: the paper's CVAE on the train-role tasks' checkpoints (+ experts, leave-one-out),
    or (--objective retrieval) the anchored, retrieval-trained one on every seen task with the recipe chosen on
    validation (config.PRODUCT_GENERATOR; --k, --tau and --seed apply)."""
    from .generate import split_validation_tasks, train_cvae
    from .library import Library, SemanticEncoder
    ds, bb = _load(data, backbone)
    lib = Library.load(library, backbone=bb.ident)
    enc = SemanticEncoder(lib.semantic_kind, bb)
    if objective == "retrieval":
        from .train_generator import train_generator
        cfg = dataclasses.replace(PRODUCT_GENERATOR, k=k, tau=tau, seed=seed)
        gen = train_generator(lib, enc, experts, ds, lib.names + ds.task_names(role="train"), bb, cfg,
                              progress=not as_json)
        gen.save(out)
        emit({k_: v for k_, v in gen.meta.items() if k_ != "loss_curve"}, as_json,
             f"wrote {out}: {cfg.steps} steps on {len(gen.meta['train_tasks'])} seen tasks, {gen.meta['seconds']} s")
        return
    cfg = CVAEConfig(latent=latent, hidden=hidden, kl_weight=kl_weight, recon=recon, residual=residual, k=k,
                     tau=tau, cond_aug=cond_aug, epochs=epochs, lr=lr, seed=seed)
    train, val = split_validation_tasks(ds.task_names(role="train"), seed=seed)
    gen = train_cvae(lib, enc, experts, ds, train + lib.names, val, bb, cfg, progress=not as_json)
    gen.save(out)
    m = {k_: v for k_, v in gen.meta.items() if k_ != "history"}
    emit(m, as_json, f"wrote {out}: best epoch {m['best_epoch']}, val R@1 {m['best_val_r1']}, "
                     f"{m['active_latent_dims']}/{latent} active latent dims, {m['seconds']} s")


@app.command()
def generate(desc: str = typer.Option(..., "--desc"), library: Path = typer.Option(..., "--library", "-l"),
             cvae: Optional[Path] = typer.Option(
                 None, "--cvae", help="A trained generator; without it the Top-K (ΔW) merge (--k, --tau) as one "
                                      "rank-K·r LoRA, exactly what a bundle exported without --cvae runs."),
             k: int = option(CVAEConfig, "k", "--k"), tau: float = option(CVAEConfig, "tau", "--tau"),
             out: Path = typer.Option(..., "--out", "-o"), samples: int = typer.Option(1), seed: int = typer.Option(0),
             mean: bool = typer.Option(False, "--mean", help="Decode the prior mean instead of sampling."),
             merged_checkpoint: Optional[Path] = typer.Option(
                 None, help="Also write a full open_clip state dict with the (first) LoRA merged."),
             backbone: Optional[str] = typer.Option(None, help="Default: the one the library was built with."),
             as_json: bool = JsonOpt):
    """Generate LoRA weights for a task description; no data, no training."""
    from .conditions import OOD_SIMILARITY
    from .generate import Generator, TopKMerge
    from .library import Library, SemanticEncoder
    from runtime.lora import save_lora

    from .lora import save_merged_checkpoint
    lib = Library.load(library)
    bb = lib.load_backbone(backbone)
    gen = TopKMerge(lib, SemanticEncoder(lib.semantic_kind, bb), k, tau) if cvae is None else Generator.load(cvae, lib, bb)
    vectors, agg = gen.generate(desc, samples=samples, seed=seed, use_mean=mean)
    save_lora(out, vectors, lib.backbone, gen.spec.to_dict(),
              {"description": desc, "explanation": agg.explain(), "seed": seed, "mean": mean,
               "cvae": str(cvae) if cvae else "none: the Top-K (ΔW) merge", "library": str(library)})
    if merged_checkpoint:
        if bb is None:
            fail("--merged-checkpoint needs the backbone weights: pass --backbone")
        save_merged_checkpoint(merged_checkpoint, bb, gen.spec, vectors[0])
    warn = agg.best_similarity < OOD_SIMILARITY
    if warn and not as_json:
        typer.secho(f"warning: best expert similarity {agg.best_similarity:.3f} < {OOD_SIMILARITY}: the description "
                    f"is far from every expert; expect little gain over zero-shot", fg=typer.colors.YELLOW, err=True)
    emit({"out": str(out), "samples": len(vectors), "out_of_distribution": warn, **agg.explain()}, as_json,
         f"wrote {out} ({len(vectors)} LoRA(s), {gen.spec.size} parameters each); experts "
         + ", ".join(f"{n} ({w:.2f})" for n, w in zip(agg.experts, agg.weights)))


@app.command()
def reproduce(data: Path = typer.Option(..., "--data", help="Dataset folder (the world, or a converted dataset)."),
              out: Path = typer.Option(..., "--out", "-o", help="Run folder: stages are cached here."),
              preset: str = typer.Option("default", help="micro (tests), demo (one domain, minutes) or default (the paper run)."),
              backbone: Optional[str] = typer.Option(
                  None, "--backbone", "-b", help="Default: a tiny CLIP pretrained on the dataset's pretrain split."),
              ablations: Optional[bool] = typer.Option(
                  None, "--ablations/--no-ablations",
                  help="Run the ablations (K, tau, freeze-A, last-L) on the seen tasks (default: the preset's)."),
              jobs: int = typer.Option(1, help="Processes for task LoRA training (cores are split between them)."),
              seeds: Optional[int] = typer.Option(None, help="Generator seeds behind every SG-LoRA row (default: the preset's)."),
              rotations: Optional[int] = typer.Option(
                  None, min=1, help="Role rotations inside each (domain, family); the headline pools every rotation's "
                                    "unseen tasks (default: the preset's; 3 makes every class of the world unseen once)."),
              executor: ExecutorKind = ExecutorOpt, ray_address: Optional[str] = RayAddressOpt,
              gpus_per_task: Optional[float] = GpusPerTaskOpt, cpus_per_task: float = CpusPerTaskOpt,
              as_json: bool = JsonOpt):
    """The whole server pipeline with the paper's baselines; writes report.json, report.md and plots/."""
    from .reproduce import reproduce as run_reproduce
    command = "sglora-edge " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
    ex = Executor(executor, ray_address, gpus_per_task, cpus_per_task)
    report = run_reproduce(data, out, preset=preset, backbone=backbone, ablations=ablations,
                           progress=not as_json, command=command, jobs=jobs, executor=ex, seeds=seeds,
                           rotations=rotations)
    summary = {m: {"mean_r1": v["mean_r1"], "gain": v["gain"], "gain_se": v["gain_se"]}
               for m, v in report["methods"].items()}
    verdict = (report["validity"] or {}).get("verdict", "Validity not measured (--preset demo).")
    gap = report["interval"].get("oracle_gap_recovered:sglora")
    vs = report["interval"].get("sglora-topk_weighted_dw")
    text = [verdict, f"setting {report['setting']} ({len(report['tasks']['unseen'])} unseen tasks, "
                     f"seeds {report['seeds']}, default generator: {report['default_generator']})",
            format_table(["method", "i2t R@1", "t2i R@1", "mean R@1", "gain", "± SE"],
                         [[m, v["i2t"]["r1"], v["t2i"]["r1"], v["mean_r1"], v["gain"], v["gain_se"]]
                          for m, v in report["methods"].items()]),
            *([f"SG-LoRA − Top-K (ΔW): {vs['diff']:+.1f} ± {vs['se']:.1f} R@1 "
               f"(95 % interval [{vs['ci95'][0]:+.1f}, {vs['ci95'][1]:+.1f}])"] if vs else []),
            *([f"Oracle gap recovered by SG-LoRA: {100 * gap:.0f} %"] if gap is not None else []),
            f"wrote {out / 'report.md'}"]
    emit({"validity": {k: v for k, v in (report["validity"] or {}).items() if k != "transfer_matrix"},
          "methods": summary, "interval": report["interval"], "default_generator": report["default_generator"],
          "out": str(out)}, as_json, "\n".join(text))


@app.command("export")
def export_cmd(library: Path = typer.Option(..., "--library", "-l", help="library.safetensors (build-library)."),
               cvae: Optional[Path] = option(ExportConfig, "cvae", "--cvae"),
               k: int = option(CVAEConfig, "k", "--k"),
               tau: float = option(CVAEConfig, "tau", "--tau"),
               out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write (replaced atomically)."),
               backbone: Optional[str] = option(ExportConfig, "backbone", "--backbone", "-b"),
               tensorrt: bool = option(ExportConfig, "tensorrt", "--tensorrt"),
               opset: Optional[int] = option(ExportConfig, "opset"),
               fp16: bool = option(ExportConfig, "fp16", "--fp16"),
               merge_desc: Optional[str] = option(ExportConfig, "merge_desc", "--merge-desc"),
               as_json: bool = JsonOpt):
    """Export library + generator + backbone as a device bundle (ONNX graphs, manifest with sha256s) for `run`."""
    cfg = ExportConfig(library=library, out=out, cvae=cvae, k=k, tau=tau, backbone=backbone, opset=opset, fp16=fp16,
                       merge_desc=merge_desc, tensorrt=tensorrt, as_json=as_json)
    export_command(cfg)


def export_command(cfg: ExportConfig) -> None:
    """Body of `sglora-edge export`."""
    from export.bundle import export_bundle
    for path, what in ((cfg.library, "--library"), (cfg.cvae, "--cvae")):
        if path is not None and not path.is_file():
            fail(f"{what} {path}: not found")
    summary = export_bundle(cfg)
    out, fp16, tensorrt, as_json = cfg.out, cfg.fp16, cfg.tensorrt, cfg.as_json
    if tensorrt:
        from runtime.tensorrt import build_engines
        try:
            summary["tensorrt"] = build_engines(out, fp16=fp16, log=lambda s: None)
        except SGLoRAError as e:  # the bundle itself is fine: say so
            fail(f"wrote the ONNX bundle {out}, but no TensorRT engines: {e}")
    emit(summary, as_json, f"wrote {out}: {len(summary['files'])} files, backbone {summary['backbone']}, "
                           f"semantic {summary['semantic']}, {summary['experts']} experts, generator "
                           f"{summary['generator']}, LoRA size "
                           f"{summary['lora_size']}; ONNX Runtime vs torch max |diff| "
                           f"{max(summary['max_abs_diff'].values()):.1e}"
                           + (f"; baked in: the LoRA for \"{summary['baked']['description']}\" (experts "
                              f"{', '.join(summary['baked']['explanation']['experts'])}"
                              + (", out of distribution" if summary["baked"]["explanation"]["out_of_distribution"]
                                 else "") + ")" if summary["baked"] else "")
                           + (f"; TensorRT engines: {', '.join(summary['tensorrt']['engines'])}" if tensorrt else ""))


@app.command()
def run(desc: str = typer.Option(..., "--desc", help='Task description, e.g. "a photo of a persian".'),
        bundle: Path = typer.Option(..., "--bundle", help="Exported bundle folder (manifest.json, ONNX files)."),
        gallery: Path = typer.Option(..., "--gallery", help="Folder of images to retrieve from (recursive)."),
        query: list[str] = typer.Option([], "--query", "-q", help="Text query (repeatable); default: the description."),
        top_k: int = option(RunConfig, "top_k"), samples: int = option(RunConfig, "samples"),
        seed: Optional[int] = option(RunConfig, "seed"), save_lora: Optional[Path] = option(RunConfig, "save_lora"),
        html: Optional[Path] = option(RunConfig, "html"), backend: str = option(EngineConfig, "backend"),
        lora_mode: str = option(EngineConfig, "lora_mode"), threads: int = option(EngineConfig, "threads"),
        batch_size: int = option(EngineConfig, "batch_size"), cache_dir: Optional[Path] = option(EngineConfig, "cache_dir"),
        precision: Optional[str] = option(EngineConfig, "precision"), as_json: bool = JsonOpt):
    """On-device: description -> LoRA -> retrieval over a local gallery (numpy + ONNX Runtime/TensorRT only)."""
    from runtime.commands import run_command
    engine = EngineConfig(backend=backend, lora_mode=lora_mode, threads=threads, batch_size=batch_size,
                          cache_dir=cache_dir, precision=precision)
    raise typer.Exit(run_command(RunConfig(bundle=bundle, desc=desc, gallery=gallery, queries=tuple(query), top_k=top_k,
                                           samples=samples, seed=seed, save_lora=save_lora, html=html,
                                           as_json=as_json, engine=engine)))


@app.command()
def quantize(bundle: Path = typer.Option(..., "--bundle", help="Exported bundle folder (updated in place, atomically)."),
             images: Optional[Path] = typer.Option(None, "--images", help="Calibrate on these images (a folder, "
                                                   "recursive): pictures like those the device will search."),
             world: Optional[Path] = typer.Option(None, "--world", help="Or: calibrate on a dataset's train images "
                                                  "(expert and train tasks; never val or test)."),
             calibration_images: int = typer.Option(300, help="At most this many images (a seeded sample)."),
             seed: int = typer.Option(0, help="Seed of the sample."),
             out: Optional[Path] = typer.Option(None, "--out", help="Write the quantized bundle here instead of "
                                                "updating --bundle."),
             as_json: bool = JsonOpt):
    """Add INT8 variants of the visual graphs to a bundle (NNCF post-training quantisation) for `run --precision
    int8` on ONNX Runtime or OpenVINO; the calibration is recorded in the manifest (torch-free; needs nncf)."""
    try:
        from export.precision import add_int8_graphs
    except ImportError as e:
        fail(f"quantize needs onnx and nncf ({e}); pip install 'sglora-edge[openvino,export]'")
    from runtime.bundle import Bundle
    Bundle.load(bundle, verify=False)  # a missing bundle fails before the imports of nncf
    try:
        import nncf  # noqa: F401
    except ImportError as e:
        fail(f"quantize needs nncf ({e}); pip install 'sglora-edge[openvino]'")
    record = add_int8_graphs(bundle, out, images=images, world=world, n=calibration_images, seed=seed,
                             log=(lambda s: None) if as_json else (lambda s: typer.echo(s, err=True)))
    c = record["calibration"]
    emit(record, as_json, f"wrote INT8 graphs ({', '.join(record['graphs'])}) into {out or bundle}: calibrated on "
                          f"{c['images']} {'train images of ' + c['world'] if c['source'] == 'dataset' else 'images of ' + c['folder']}; "
                          f"cosine to fp32 >= {min(record['min_cosine_to_fp32'].values()):.4f}; run it with "
                          f"`sglora-edge run --precision int8 ...`")


@app.command()
def serve(bundle: Path = typer.Option(..., "--bundle", help="Exported bundle folder (manifest.json, ONNX files)."),
          gallery: Path = typer.Option(..., "--gallery", help="Folder of images to search (recursive); uploads go "
                                                              "into its uploads/ folder."),
          host: str = option(ServeConfig, "host"), port: int = option(ServeConfig, "port"),
          max_tasks: int = option(ServeConfig, "max_tasks"), features_mb: float = option(ServeConfig, "features_mb"),
          max_upload_mb: float = option(ServeConfig, "max_upload_mb"),
          max_image_pixels: int = option(ServeConfig, "max_image_pixels"),
          backend: str = option(EngineConfig, "backend"), lora_mode: str = option(EngineConfig, "lora_mode"),
          threads: int = option(EngineConfig, "threads"), batch_size: int = option(EngineConfig, "batch_size"),
          cache_dir: Optional[Path] = option(EngineConfig, "cache_dir"),
          precision: Optional[str] = option(EngineConfig, "precision")):
    """On-device: serve the runtime over HTTP (JSON API, OpenAPI page at /docs, a page at /) with the bundle loaded
    and the gallery indexed once (numpy + ONNX Runtime/TensorRT + the serve extra; no torch)."""
    from runtime.commands import serve_command
    engine = EngineConfig(backend=backend, lora_mode=lora_mode, threads=threads, batch_size=batch_size,
                          cache_dir=cache_dir, precision=precision)
    raise typer.Exit(serve_command(ServeConfig(bundle=bundle, gallery=gallery, host=host, port=port, max_tasks=max_tasks,
                                               features_mb=features_mb, max_upload_mb=max_upload_mb,
                                               max_image_pixels=max_image_pixels, engine=engine)))


@app.command("build-engines")
def build_engines_cmd(bundle: Path = typer.Option(..., "--bundle", help="Exported bundle folder."),
                      fp16: bool = typer.Option(False, "--fp16", help="Build fp16 engines (TensorRT 11: needs a "
                                                                      "bundle exported with fp16 graphs)."),
                      workspace: int = typer.Option(2048, "--workspace", help="Builder workspace in MB."),
                      as_json: bool = JsonOpt):
    """On the device: verify the bundle, then build TensorRT engines for this GPU into it (torch-free)."""
    from runtime.commands import build_engines_command
    raise typer.Exit(build_engines_command(bundle, fp16, workspace, as_json))


@app.command()
def bench(bundle: list[Path] = typer.Option([], "--bundle", help="Exported bundle to measure (repeatable)."),
          synthetic: list[str] = typer.Option([], "--synthetic", help="Also build and measure a random-weight bundle: "
                                              "sglora-micro, sglora-tiny or ViT-B-16 (repeatable; needs torch)."),
          out: Path = typer.Option(..., "--out", "-o", help="Folder for results.json, results.md and the charts."),
          backend: str = option(BenchConfig, "backend"), threads: int = option(BenchConfig, "threads"),
          batch: str = option(BenchConfig, "batch"), gallery_size: int = option(BenchConfig, "gallery_size"),
          switch_gallery: int = option(BenchConfig, "switch_gallery"),
          switch_bundle: list[Path] = typer.Option([], "--switch-bundle", help="A bundle of the same backbone "
                                                   "exported with last_blocks=L: task switch only (repeatable)."),
          repeats: int = option(BenchConfig, "repeats"), warmup: int = option(BenchConfig, "warmup"),
          stage_budget: float = option(BenchConfig, "stage_budget"),
          library_sizes: str = option(BenchConfig, "library_sizes"),
          retrieval_sizes: str = option(BenchConfig, "retrieval_sizes"),
          oracle_world: Optional[Path] = option(BenchConfig, "oracle_world"),
          tune: bool = typer.Option(True, "--tuning/--no-tuning", help="Also time the suffix under each thread "
                                                                       "count and graph optimisation level."),
          int8: bool = typer.Option(False, "--int8", help="Also measure an INT8 copy of each bundle (ONNX Runtime "
                                                         "dynamic quantization of the visual graphs; needs onnx)."),
          recall_world: Optional[Path] = typer.Option(None, help="With --int8/--openvino: a dataset whose unseen "
                                                                 "photo tasks' test galleries measure the recall "
                                                                 "change (and whose train images calibrate INT8)."),
          openvino: bool = typer.Option(False, "--openvino", help="Also measure every engine and precision in one "
                                                                 "table: ONNX Runtime fp32/INT8, OpenVINO fp32/bf16/"
                                                                 "INT8 (NNCF), PyTorch eager (needs nncf, openvino)."),
          calibration_images: int = option(BenchConfig, "calibration_images"),
          as_json: bool = JsonOpt):
    """Latency of every runtime stage, cold start, memory, comparisons and scaling (torch-free with --bundle)."""
    from runtime.bench import bench_command
    prepare = None
    if synthetic:
        try:
            from export.synthetic import prepare
        except ImportError as e:
            fail(f"--synthetic needs torch and the export extra ({e}); pip install 'sglora-edge[train,export]', "
                 f"or pass --bundle")
    int8_hooks = None
    if int8 or openvino:
        try:
            from export.precision import hook
            if openvino:
                import nncf  # noqa: F401
        except ImportError as e:
            fail(f"--int8/--openvino need onnx, nncf and the server package ({e}); pip install "
                 f"'sglora-edge[train,export,openvino]'")
        int8_hooks = hook(recall_world)
    cfg = BenchConfig(out=out, bundles=tuple(bundle), synthetic=tuple(synthetic), switch_bundles=tuple(switch_bundle),
                      backend=backend, threads=threads, batch=batch, gallery_size=gallery_size,
                      switch_gallery=switch_gallery, repeats=repeats, warmup=warmup, stage_budget=stage_budget,
                      library_sizes=library_sizes, retrieval_sizes=retrieval_sizes, oracle_world=oracle_world,
                      tuning=tune, int8=int8, openvino=openvino, calibration_images=calibration_images, as_json=as_json)
    raise typer.Exit(bench_command(cfg, prepare, int8_hooks))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
