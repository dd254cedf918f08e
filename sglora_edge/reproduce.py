"""`sglora-edge reproduce`: the whole server pipeline with every stage cached, and the report.

    OUT/backbone/           tiny backbone pretrained on the dataset (when --backbone is not given)
    OUT/experts/            LoRA checkpoints of every task (experts, train tasks, Oracles of unseen tasks)
    OUT/models/<name>/      library.safetensors, cvae.safetensors (the paper's), generator_s<seed>.safetensors
    OUT/cache/<name>.json   evaluation results per setting, seed and ablation (resume after interruption)
    OUT/rotation<r>/        models/ and cache/ of role rotation r >= 1 (Dataset.rotated): what depends on roles is
                            rebuilt, the task LoRAs in OUT/experts/ are shared (their recipe does not depend on roles)
    OUT/report.json, report.md, plots/

The experiment design (docs/ARCHITECTURE.md, "Selection"): every choice — the generator's default,
its steps and penalty, and every ablation — is made on the *seen* tasks (cross-validation folds,
val split); the unseen tasks' test split is evaluated once, for the configuration fixed before.
A stage whose output exists with matching settings is skipped, so an interrupted run resumes and
a finished one re-writes the same report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, is_dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
from tqdm import tqdm


from .backbone import BACKBONE_FILE, Backbone, create_backbone
from .candidates import generators
from .config import ExpertConfig, LoRASpec, ReproduceConfig
from .data import Dataset, load_dataset
from .ablations import ablations
from .diagnostics import diversity, lora_points
from .evaluate import Evaluator, Setting, method_results, transfer_matrix, validity
from .experts import Executor, train_experts, train_task
from .generate import Generator, TopKMerge
from .library import Library, SemanticEncoder
from .library_build import build_library
from .methods import BY_NAME, GENERATED, METHODS
from .metrics import mean_r1
from .results import block, intervals, merge_seeds, pool, pool_rotations
from .stage_cache import StageCache, key_of
from .validation import choose_default


class Run:
    def __init__(self, data: Path, out: Path, cfg: ReproduceConfig, backbone_spec: str | None, progress: bool,
                 jobs: int = 1, executor: Executor = Executor(), rotation: int = 0, first: "Run | None" = None):
        """Rotation r > 0 works in OUT/rotation<r>/ on the rotated roles and shares the first run's backbone,
        encoders and prepared galleries; the task LoRAs (OUT/experts*) are shared by every rotation."""
        self.data, self.out, self.cfg, self.progress, self.jobs = Path(data), Path(out), cfg, progress, jobs
        self.executor, self.rotation = executor, rotation
        self.work = self.out / f"rotation{rotation}" if rotation else self.out
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(self.work / "cache")
        self.ds: Dataset = (first.ds if first else load_dataset(data)).rotated(rotation)
        self.backbone_spec = first.backbone_spec if first else backbone_spec
        self.bb: Backbone | None = first.bb if first else None
        self.encoders: dict[str, SemanticEncoder] = first.encoders if first else {}
        self.evaluator: Evaluator | None = first.evaluator if first else None
        self.seeds = [cfg.seed + i for i in range(cfg.seeds)]
        self.libs: dict[str, Library] = {}  # the expert libraries of run(), by tag
        self._makes: dict = {}  # setting name -> seed -> its generators (built or loaded once)

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[reproduce{f' rotation {self.rotation}' if self.rotation else ''}] {msg}", flush=True)

    def timed(self, stage: str, fn, *args, **kwargs):
        return self.cache.timed(stage, fn, *args, **kwargs)

    def cached(self, name: str, key, build):
        """A JSON-able result under WORK/cache/<name>.json."""
        return self.cache.json(name, key, build)

    def model(self, stage: str, path: Path, key, build, lib: Library | None = None):
        """A library (lib None) or a generator over `lib`, with its key in its metadata."""
        def load(p):
            obj = Library.load(p, backbone=self.bb.ident) if lib is None else \
                Generator.load(p, lib, self.bb, self.encoder(lib.semantic_kind))
            return obj, (obj.info if lib is None else obj.meta).get("key")

        def save(p, obj, k):
            (obj.info if lib is None else obj.meta)["key"] = k
            obj.save(p)
        return self.cache.stored(stage, path, key, build, load, save)

    # --- stages -------------------------------------------------------------------------------------
    def backbone(self) -> Backbone:
        if self.bb is not None:
            return self.bb
        if self.backbone_spec is None:
            folder = self.out / "backbone"
            if not (folder / BACKBONE_FILE).is_file():
                from .backbone.pretrain import pretrain
                self.log(f"pretraining {self.cfg.pretrain.config} on {self.data}")
                self.timed("pretrain", pretrain, self.data, folder, **asdict(self.cfg.pretrain), progress=self.progress)
            self.backbone_spec = str(folder)
        self.bb = create_backbone(self.backbone_spec)
        self.evaluator = Evaluator(self.bb, self.ds, gallery_size=self.cfg.gallery_size)
        return self.bb

    def spec(self, last_blocks: int = 0) -> LoRASpec:
        return LoRASpec.for_visual(self.bb.visual, rank=self.cfg.lora_rank, last_blocks=last_blocks)

    def experts(self, folder: str, tasks: list[str], cfg: ExpertConfig, last_blocks: int = 0) -> None:
        self.log(f"training {len(tasks)} task LoRAs into {folder}/")
        self.timed(f"experts:{folder}", train_experts, self.bb, self.spec(last_blocks), self.ds, tasks,
                   self.out / folder, cfg, progress=self.progress, jobs=self.jobs, executor=self.executor)

    def encoder(self, kind: str) -> SemanticEncoder:
        if kind not in self.encoders:
            self.encoders[kind] = SemanticEncoder(kind, self.bb)
        return self.encoders[kind]

    def library(self, name: str, expert_tasks: list[str], experts_dir: str, semantic: str | None = None) -> Library:
        semantic = semantic or self.cfg.semantic
        return self.model(f"library:{name}", self.work / "models" / name / "library.safetensors",
                          [expert_tasks, experts_dir, semantic, self.cfg.cvae.k, self.cfg.cvae.tau],
                          lambda: self.log(f"building library {name} ({len(expert_tasks)} experts)") or build_library(
                              self.ds, self.bb, self.out / experts_dir, expert_tasks, semantic, self.cfg.cvae.k,
                              self.cfg.cvae.tau))

    def seen_library(self, name: str, lib: Library, tasks: list[str], experts_dir: str) -> Library:
        """Experts ∪ train tasks: the LoRAs a generator saw (topk_weighted_seen, nearest_seen)."""
        train = [t for t in tasks if t not in lib.names]
        return self.library(name, lib.names + train, experts_dir, semantic=lib.semantic_kind)

    def multi_task(self, name: str, tasks: list[str], by_task: bool = False) -> np.ndarray:
        """One LoRA trained on the pooled train pairs of `tasks` (Text-to-LoRA's strongest baseline); `by_task`:
        every batch from one task (experts.epoch_batches)."""
        key = key_of([tasks, asdict(self.cfg.multi_task), self.spec().to_dict(), self.bb.ident] + (["by_task"] if by_task else []))
        vec = self.cached(f"multi_task{'_by_task' if by_task else ''}:{name}", key, lambda: train_task(
            self.bb, self.spec(), self.ds, tasks, self.cfg.multi_task, by_task=by_task)[0][-1].tolist())
        return np.asarray(vec, dtype=np.float32)

    def family_pooled(self, name: str, tasks: list[str]) -> dict[str, np.ndarray]:
        """family -> one LoRA trained jointly (task-homogeneous batches) on that family's tasks among `tasks`:
        the family_pooled oracle row, the headroom of any description-routed joint adapter."""
        families = sorted({self.ds.tasks[t].family for t in tasks if self.ds.tasks[t].family is not None})
        return {f: self.multi_task(f"{name}:family_{f}", [t for t in tasks if self.ds.tasks[t].family == f], by_task=True)
                for f in families}

    def generators(self, name: str, lib: Library, domain) -> callable:
        """seed -> every generator a setting evaluates, the default among them (candidates.generators); built or
        loaded once per setting and seed (the settings, the diversity and the report's points share them)."""
        if name not in self._makes:
            self._makes[name] = cache(generators(self, name, lib, domain))
        return self._makes[name]

    def evaluate(self, name: str, st: Setting, unseen: list[str], seed: int, methods=METHODS) -> dict:
        """{"per_task": ..., "explanations": ...} of `methods` on `unseen`. Cached per method by what that method
        depends on (the setting's library and tasks, and the input it reads: methods.Method.reads), so a new or
        changed method is evaluated alone."""
        base = [name, st.library.names, st.library.semantic, st.k, st.tau, unseen, self.cfg.samples, seed,
                self.bb.ident, str(st.experts_dir)]

        def build(todo: list[str], record: dict) -> None:
            for t in unseen:
                res, record["explanations"][t] = method_results(self.evaluator, st, t, self.cfg.samples, seed, todo)
                record["per_task"][t] = {**{m: r for m, r in record["per_task"].get(t, {}).items() if m not in todo},
                                         **res}
        stored = self.cache.by_method(f"evaluate:{name}:s{seed}",
                                      {m: key_of(base + [input_key(st, BY_NAME[m].reads)]) for m in methods}, build)
        keep = set(methods)
        return {"per_task": {t: {m: r for m, r in stored["per_task"][t].items() if m in keep} for t in unseen},
                "explanations": {t: stored["explanations"][t] for t in unseen}}

    # --- the experiment ---------------------------------------------------------------------------------
    def setting_results(self, name: str, lib: Library, make: dict, unseen: list[str], seen: Library | None,
                        multi_task: dict) -> dict:
        """Per-task results of every method, the generator methods over every seed; `make(seed)` -> generators."""
        runs = []
        for i, seed in enumerate(self.seeds):
            st = Setting(lib, self.encoder(lib.semantic_kind), self.out / "experts", self.cfg.cvae.k,
                         self.cfg.cvae.tau, make(seed), seen, **multi_task, merge_ceiling=self.cfg.merge_ceiling)
            runs.append(self.evaluate(name, st, unseen, seed, METHODS if i == 0 else GENERATED))
        return {"per_task": merge_seeds([r["per_task"] for r in runs]), "explanations": runs[0]["explanations"]}

    def run(self) -> dict:
        """This rotation's report (results.pool_rotations combines them). Later rotations rebuild only what the
        pooled in-dataset headline needs: their cost is the run's cost."""
        t_start = time.time()
        cfg, ds = self.cfg, self.ds
        self.backbone()
        full = not self.rotation
        domains = (ds.domains() or [None])[:1 if cfg.quick else None]
        self.experts("experts", [t for d in domains for t in ds.task_names(domain=d)], cfg.expert)
        groups = [(d or "all", d) for d in domains] + ([("mixed", None)] if len(domains) > 1 and full else [])
        self.libs = libs = {tag: self.library(f"library_{tag}", ds.task_names(role="expert", domain=d), "experts")
                for tag, d in groups}
        validation, self.default = choose_default(self, libs, domains)
        settings, results = self.settings(groups, libs, domains, full)
        first = libs[domains[0] or "all"]
        main = [f"in_dataset:{d or 'all'}" for d in domains]
        pooled = {"per_task": pool(*(results[n]["per_task"] for n in main)),
                  "explanations": pool(*(results[n]["explanations"] for n in main))}
        top = block("in_dataset (pooled: " + ", ".join(main) + ")", pooled,
                    [t for n in main for t in settings[n]["tasks"]["expert"]],
                    [t for n in main for t in settings[n]["tasks"]["train"]],
                    [t for n in main for t in settings[n]["tasks"]["unseen"]], self.seeds)
        top["interval"] = intervals(pooled["per_task"], len(self.seeds))
        timings = self.cache.timings
        timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 1)
        return {"dataset": str(self.data), "backbone": self.bb.ident, "backbone_spec": self.backbone_spec,
                **top, "method_order": list(METHODS), "settings": settings,
                "validity": self.validity(pooled["per_task"], libs.get("mixed", first)) if full and not cfg.quick else None,
                "validation": validation, "default_generator": self.default,
                "ablations": ablations(self, first, domains[0]) if cfg.ablations and full else {},
                "diversity": diversity(self, first, self.generators(f"in_dataset_{domains[0] or 'all'}", first, domains[0]),
                                       ds.task_names(role="unseen", domain=domains[0])) if full else None,
                "config": {**cfg.to_dict(), "lora_spec": self.spec().to_dict(), "semantic_encoder": first.semantic,
                           "semantic_choice": first.info, "role_source": ds.role_source},
                "timings_s": dict(sorted(timings.items())),
                "wall_s_this_invocation": round(time.time() - t_start, 1)}

    def settings(self, groups: list, libs: dict, domains: list, full: bool) -> tuple[dict, dict]:
        """Every setting's report block and per-task results: in-dataset per domain, and (rotation 0) each domain's
        library on the other domains' unseen tasks and the mixed-source library on all of them."""
        ds = self.ds
        settings, results = {}, {}
        for tag, d in groups:
            seen = ds.seen_tasks(d)
            seen_lib = self.seen_library(f"library_seen_{tag}", libs[tag], seen, "experts")
            baselines = {"multi_task": self.multi_task(tag, seen), "multi_task_by_task": self.multi_task(tag, seen, True),
                         "family_pooled": self.family_pooled(tag, seen)}
            make = self.generators("mixed_source" if tag == "mixed" else f"in_dataset_{tag}", libs[tag], d)
            targets = [(f"in_dataset:{tag}", d)] if tag != "mixed" else [("mixed_source", None)]
            if tag != "mixed" and full:
                targets += [(f"cross_domain:{tag}->{b}", b) for b in domains if b != d]
            for name, target in targets:
                unseen = ds.task_names(role="unseen", domain=target)
                results[name] = self.setting_results(name, libs[tag], make, unseen, seen_lib, baselines)
                train = [t for t in seen if t not in libs[tag].names]
                settings[name] = block(name, results[name], libs[tag].names, train, unseen, self.seeds)
        return settings, results

    def validity(self, per_task: dict, lib: Library) -> dict:
        """Can this testbed rank methods (evaluate.validity), from the transfer matrix of `lib`'s experts."""
        tasks = self.ds.task_names(role="train") + self.ds.task_names(role="unseen")
        matrix = self.cached("transfer_matrix", [lib.names, tasks, lib.semantic, self.bb.ident],
                             lambda: transfer_matrix(self.evaluator, lib, self.encoder(lib.semantic_kind), tasks))
        oracle = {t: (mean_r1(r["zero_shot"]), mean_r1(r["oracle"])) for t, r in per_task.items()}
        return validity(oracle, matrix, self.ds)


def input_key(st: Setting, reads: str | None):
    """What a method's result depends on beyond the setting's library: the key of the input it reads."""
    if reads is None:
        return None
    if reads.startswith("generators."):
        gen = st.generators.get(reads.split(".", 1)[1])
        return None if gen is None else gen.meta.get("key")
    value = getattr(st, reads)
    if value is None or isinstance(value, Library):
        return None if value is None else value.names
    if is_dataclass(value):  # a recipe (the merge ceiling's)
        return asdict(value)
    if isinstance(value, dict):
        return {f: key_of(v.tolist()) for f, v in value.items()}
    return key_of(value.tolist())


def reproduce(data: str | Path, out: str | Path, preset: str = "default", backbone: str | None = None,
              ablations: bool | None = None, progress: bool = True, command: str | None = None, jobs: int = 1,
              executor: Executor = Executor(), seeds: int | None = None, rotations: int | None = None) -> dict:
    """The whole run over every role rotation; `ablations`, `seeds` and `rotations` override the preset's when given."""
    from .report import write_report
    cfg = ReproduceConfig.preset(preset)
    cfg = replace(cfg, ablations=cfg.ablations if ablations is None else ablations, seeds=seeds or cfg.seeds,
                  rotations=rotations or cfg.rotations)
    run = Run(Path(data), Path(out), cfg, backbone, progress, jobs, executor)
    reports = []
    with tqdm(total=cfg.rotations, desc="rotations", unit="rotation", disable=not progress or cfg.rotations == 1) as bar:
        for r in range(cfg.rotations):  # the bar's ETA: rotation 0 also runs what later rotations skip
            reports.append((run if r == 0 else Run(Path(data), Path(out), cfg, backbone, progress, jobs, executor,
                                                   rotation=r, first=run)).run())
            bar.update(1)
    report = pool_rotations(reports)
    report["command"] = command
    domain = run.ds.domains()[0] if run.ds.domains() else None
    lib = run.libs[domain or "all"]
    gens = run.generators(f"in_dataset_{domain or 'all'}", lib, domain)(cfg.seed)
    gen = gens["sglora_retrieval"] if isinstance(gens["sglora"], TopKMerge) else gens["sglora"]  # rank-r samples
    points = lora_points(run, lib, gen, run.ds.task_names(role="unseen", domain=domain))
    labels = {g: [n for n, _ in rows] for g, rows in points.items()}
    arrays = {g: np.stack([np.asarray(v, dtype=np.float32) for _, v in rows]) for g, rows in points.items()}
    write_report(report, out, arrays, labels)
    return report
