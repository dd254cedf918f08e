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

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .artifacts import ArtifactError, write_json
from .backbone import BACKBONE_FILE, Backbone, create_backbone
from .config import PRODUCT_GENERATOR, CVAEConfig, ExpertConfig, LoRASpec
from .data import Dataset, load_dataset
from .errors import SGLoRAError
from .evaluate import (GENERATED, METHODS, Evaluator, Setting, average_runs, method_results, summarise,
                       transfer_matrix, validity)
from .experts import Executor, load_checkpoints, train_experts, train_task
from .generate import Generator, TopKMerge, split_validation_tasks, train_cvae
from .library import Library, SemanticEncoder
from .library_build import build_library
from .metrics import compare, mean_r1
from .train_generator import CV_SPLIT, crossvalidate, train_generator



@dataclass
class ReproduceConfig:
    pretrain_config: str = field(default="sglora-tiny", metadata={"help": "tiny open_clip config to pretrain"})
    pretrain_epochs: int = field(default=20, metadata={"help": "passes over the pretrain pairs"})
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    cvae: CVAEConfig = field(default_factory=CVAEConfig, metadata={"help": "the paper's CVAE (sglora_paper)"})
    generator: CVAEConfig = field(default_factory=lambda: PRODUCT_GENERATOR,
                                  metadata={"help": "the retrieval-trained, anchored generator (sglora)"})
    multi_task: ExpertConfig = field(default_factory=lambda: ExpertConfig(epochs=10, keep_last=1),
                                     metadata={"help": "recipe of the multi-task LoRA baseline"})
    lora_rank: int = field(default=2, metadata={"help": "LoRA rank r"})
    semantic: str = field(default="auto", metadata={"help": "auto, backbone or minilm"})
    samples: int = field(default=5, metadata={"help": "generated samples per task"})
    seed: int = field(default=0, metadata={"help": "seed of the data-side stages (backbone, experts)"})
    seeds: int = field(default=1, metadata={"help": "generator seeds (seed, seed+1, ...) behind every SG-LoRA row"})
    folds: int = field(default=4, metadata={"help": "cross-validation folds over the seen tasks"})
    cv_steps: tuple = field(default=(0, 100, 200), metadata={"help": "steps at which CV scores the generator"})
    ablations: bool = field(default=True, metadata={"help": "run the ablations (on the seen tasks' val split)"})
    rotations: int = field(default=3, metadata={
        "help": "role rotations inside each (domain, family); over 3 every class of the default world is unseen once"})
    gallery_size: int = field(default=60, metadata={"help": "images per test gallery (the test split is partitioned)"})
    quick: bool = field(default=False, metadata={
        "help": "the first domain's in-dataset setting only: no cross-validation (the default generator is "
                "`default_generator`), no cross-domain or mixed settings, no transfer matrix"})
    default_generator: str = field(default="auto", metadata={
        "help": "auto (the rule: the retrieval-trained generator if its cross-validated gain over Top-K (ΔW) "
                "exceeds 2 SE, else the Top-K (ΔW) merge itself), retrieval, topk_dw or paper (the demo preset: "
                "what the full run's validation decided)"})
    k_values: tuple = (1, 2, 4, 8)
    tau_values: tuple = (0.02, 0.05, 0.1, 0.5)
    penalty_values: tuple = (1.0,)  # the full screen is benchmarks/generator_cv.py
    last_blocks_values: tuple = (0, 2, 1)  # 0 = every block; device task-switch cost falls with L

    @classmethod
    def preset(cls, name: str) -> "ReproduceConfig":
        if name == "default":
            return cls()
        if name == "micro":  # minutes on 2 cores: for tests and a first look
            return cls(pretrain_config="sglora-micro", pretrain_epochs=15, rotations=1, gallery_size=8,
                       expert=ExpertConfig(epochs=6, keep_last=3),
                       cvae=CVAEConfig(hidden=64, epochs=20, eval_every=10, k=2),
                       generator=replace(PRODUCT_GENERATOR, hidden=64, k=2, steps=30, tasks_per_step=2, images_per_task=16),
                       multi_task=ExpertConfig(epochs=2, keep_last=1), samples=2, folds=2, cv_steps=(0, 15, 30),
                       k_values=(1, 2), tau_values=(0.1, 0.5), penalty_values=(0.0, 1.0), last_blocks_values=(0, 1))
        if name == "demo":  # `make demo`: minutes on 2 cores, the default recipe on one domain
            return cls(quick=True, ablations=False, rotations=1, default_generator="topk_dw")  # what validation decided
        raise SGLoRAError(f"--preset {name!r} is unknown; choose micro, demo or default")

    def to_dict(self) -> dict:
        return asdict(self)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seen_tasks(ds: Dataset, domain: str | None) -> list[str]:
    """The tasks a generator may learn from in a domain: experts and train tasks, never unseen ones."""
    return ds.task_names(role="expert", domain=domain) + ds.task_names(role="train", domain=domain)


def pool(*blocks: dict) -> dict:
    """Per-task results of several settings as one (task names are unique across domains)."""
    return {t: r for b in blocks for t, r in b.items()}


def merge_seeds(per_seed: list[dict]) -> dict:
    """Per-task results over generator seeds: recalls averaged over seeds, 'seed_r1' the per-seed mean R@1.
    Deterministic methods (evaluated with the first seed only) are taken as they are."""
    first = per_seed[0]
    out = {}
    for t, methods in first.items():
        out[t] = dict(methods)
        for m in methods:
            runs = [s[t][m] for s in per_seed if m in s.get(t, {})]
            if m in GENERATED and len(runs) > 1:
                out[t][m] = {**runs[0], **average_runs(runs), "seed_r1": [mean_r1(r) for r in runs]}
    return out


class Run:
    def __init__(self, data: Path, out: Path, cfg: ReproduceConfig, backbone_spec: str | None, progress: bool,
                 jobs: int = 1, executor: Executor = Executor(), rotation: int = 0, first: "Run | None" = None):
        """Rotation r > 0 works in OUT/rotation<r>/ on the rotated roles and shares the first run's backbone,
        encoders and prepared galleries; the task LoRAs (OUT/experts*) are shared by every rotation."""
        self.data, self.out, self.cfg, self.progress, self.jobs = Path(data), Path(out), cfg, progress, jobs
        self.executor, self.rotation = executor, rotation
        self.work = self.out / f"rotation{rotation}" if rotation else self.out
        self.work.mkdir(parents=True, exist_ok=True)
        self.timings_path = self.work / "cache" / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        self.ds: Dataset = (first.ds if first else load_dataset(data)).rotated(rotation)
        self.backbone_spec = first.backbone_spec if first else backbone_spec
        self.bb: Backbone | None = first.bb if first else None
        self.encoders: dict[str, SemanticEncoder] = first.encoders if first else {}
        self.evaluator: Evaluator | None = first.evaluator if first else None
        self.seeds = [cfg.seed + i for i in range(cfg.seeds)]

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[reproduce{f' rotation {self.rotation}' if self.rotation else ''}] {msg}", flush=True)

    def timed(self, stage: str, fn, *args, **kwargs):
        """Run a stage and record its wall time (a cached stage keeps the time it took when it ran)."""
        t0 = time.time()
        result = fn(*args, **kwargs)
        if stage not in self.timings:
            self.timings[stage] = round(time.time() - t0, 1)
            write_json(self.timings_path, self.timings)
        return result

    def cached(self, name: str, key, build):
        """JSON result of `build()` cached under OUT/cache/<name>.json by `key`."""
        path = self.work / "cache" / f"{name.replace(':', '_').replace('>', '')}.json"
        key = _key(key)
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                return stored["value"]
        value = self.timed(name, build)
        write_json(path, {"key": key, "value": value})
        return value

    # --- stages -------------------------------------------------------------------------------------
    def backbone(self) -> Backbone:
        if self.bb is not None:
            return self.bb
        if self.backbone_spec is None:
            folder = self.out / "backbone"
            if not (folder / BACKBONE_FILE).is_file():
                from .backbone.pretrain import pretrain
                self.log(f"pretraining {self.cfg.pretrain_config} on {self.data}")
                self.timed("pretrain", pretrain, self.data, folder, config=self.cfg.pretrain_config,
                           epochs=self.cfg.pretrain_epochs, seed=self.cfg.seed, progress=self.progress)
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
        path = self.work / "models" / name / "library.safetensors"
        semantic = semantic or self.cfg.semantic
        key = _key([expert_tasks, experts_dir, semantic, self.cfg.cvae.k, self.cfg.cvae.tau])
        try:
            lib = Library.load(path, backbone=self.bb.ident)
            if lib.info.get("key") == key:
                return lib
        except ArtifactError:
            pass
        self.log(f"building library {name} ({len(expert_tasks)} experts)")
        lib = self.timed(f"library:{name}", build_library, self.ds, self.bb, self.out / experts_dir, expert_tasks,
                         semantic, self.cfg.cvae.k, self.cfg.cvae.tau)
        lib.info["key"] = key
        lib.save(path)
        return lib

    def seen_library(self, name: str, lib: Library, tasks: list[str], experts_dir: str) -> Library:
        """Experts ∪ train tasks: the LoRAs a generator saw (topk_weighted_seen, nearest_seen)."""
        train = [t for t in tasks if t not in lib.names]
        return self.library(name, lib.names + train, experts_dir, semantic=lib.semantic_kind)

    def multi_task(self, name: str, tasks: list[str], by_task: bool = False) -> np.ndarray:
        """One LoRA trained on the pooled train pairs of `tasks` (Text-to-LoRA's strongest baseline); `by_task`:
        every batch from one task (experts.epoch_batches)."""
        key = _key([tasks, asdict(self.cfg.multi_task), self.spec().to_dict(), self.bb.ident] + (["by_task"] if by_task else []))
        vec = self.cached(f"multi_task{'_by_task' if by_task else ''}:{name}", key, lambda: train_task(
            self.bb, self.spec(), self.ds, tasks, self.cfg.multi_task, by_task=by_task)[0][-1].tolist())
        return np.asarray(vec, dtype=np.float32)

    def family_pooled(self, name: str, tasks: list[str]) -> dict[str, np.ndarray]:
        """family -> one LoRA trained jointly (task-homogeneous batches) on that family's tasks among `tasks`:
        the family_pooled oracle row, the headroom of any description-routed joint adapter."""
        families = sorted({self.ds.tasks[t].family for t in tasks if self.ds.tasks[t].family is not None})
        return {f: self.multi_task(f"{name}:family_{f}", [t for t in tasks if self.ds.tasks[t].family == f], by_task=True)
                for f in families}

    def paper_generator(self, name: str, lib: Library, train_tasks: list[str], experts_dir: str, cfg: CVAEConfig,
                        seed: int) -> Generator:
        """The paper's CVAE (reconstruction + KL), early-stopped on held-out train-role tasks."""
        cfg = replace(cfg, seed=seed)
        path = self.work / "models" / name / ("cvae.safetensors" if seed == self.cfg.seed else f"cvae_s{seed}.safetensors")
        encoder = self.encoder(lib.semantic_kind)
        fit, val = split_validation_tasks(train_tasks, seed=self.cfg.seed)
        key = _key([cfg.to_dict(), fit, val, lib.names, lib.semantic, experts_dir, asdict(self.cfg.expert)])
        gen = self._load(path, lib, key)
        if gen is None:
            self.log(f"training the paper's CVAE {name} (seed {seed}) on {len(fit) + len(lib)} tasks")
            gen = self.timed(f"cvae:{name}:s{seed}", train_cvae, lib, encoder, self.out / experts_dir, self.ds,
                             fit + lib.names, val, self.bb, cfg, progress=self.progress)
            gen.meta["key"] = key
            gen.save(path)
        return gen

    def product_generator(self, name: str, lib: Library, tasks: list[str], experts_dir: str, cfg: CVAEConfig,
                          seed: int) -> Generator:
        """The retrieval-trained generator on every seen task of the library's domain(s)."""
        cfg = replace(cfg, seed=seed)
        path = self.work / "models" / name / f"generator_s{seed}.safetensors"
        key = _key([cfg.to_dict(), tasks, lib.names, lib.semantic, experts_dir, asdict(self.cfg.expert)])
        gen = self._load(path, lib, key)
        if gen is None:
            self.log(f"training generator {name} (seed {seed}) on {len(tasks)} seen tasks")
            gen = self.timed(f"generator:{name}:s{seed}", train_generator, lib, self.encoder(lib.semantic_kind),
                             self.out / experts_dir, self.ds, tasks, self.bb, cfg, progress=self.progress)
            gen.meta["key"] = key
            gen.save(path)
        return gen

    def _load(self, path: Path, lib: Library, key: str) -> Generator | None:
        if path.is_file():
            try:
                gen = Generator.load(path, lib, self.bb, self.encoder(lib.semantic_kind))
                if gen.meta.get("key") == key:
                    return gen
            except ArtifactError:
                pass
        return None

    def generators(self, name: str, lib: Library, domain) -> callable:
        """seed -> {"sglora": the default, "sglora_paper": the paper's CVAE, "sglora_retrieval": the
        retrieval-trained one}. The default (self.default) is the retrieval-trained generator only if it won on
        validation, else the Top-K (ΔW) merge as a generator (TopKMerge); every generator is reported either way."""
        def make(seed: int) -> dict[str, Generator]:
            paper = self.paper_generator(name, lib, self.ds.task_names(role="train", domain=domain), "experts",
                                         self.cfg.cvae, seed)
            retrieval = self.product_generator(name, lib, seen_tasks(self.ds, domain), "experts",
                                               self.cfg.generator, seed)
            default = {"retrieval": retrieval, "paper": paper}.get(self.default) or TopKMerge(
                lib, self.encoder(lib.semantic_kind), self.cfg.cvae.k, self.cfg.cvae.tau)
            return {"sglora": default, "sglora_paper": paper, "sglora_retrieval": retrieval}
        return make

    def evaluate(self, name: str, st: Setting, unseen: list[str], seed: int, methods=METHODS) -> dict:
        """{"per_task": ..., "explanations": ...} of `methods` on `unseen` (cached by what they depend on)."""
        key = [name, st.library.names, st.library.semantic, st.k, st.tau, unseen, self.cfg.samples, seed,
               list(methods), self.bb.ident, str(st.experts_dir),
               {m: g.meta.get("key") for m, g in st.generators.items()},
               st.seen.names if st.seen is not None else None,
               None if st.multi_task is None else _key(st.multi_task.tolist()),
               None if st.multi_task_by_task is None else _key(st.multi_task_by_task.tolist()),
               {f: _key(v.tolist()) for f, v in (st.family_pooled or {}).items()}]

        def build():
            per_task, why = {}, {}
            for t in unseen:
                per_task[t], why[t] = method_results(self.evaluator, st, t, self.cfg.samples, seed, methods)
            return {"per_task": per_task, "explanations": why}
        return self.cached(f"evaluate:{name}:s{seed}", key, build)

    # --- the experiment ---------------------------------------------------------------------------------
    def setting_results(self, name: str, lib: Library, make: dict, unseen: list[str], seen: Library | None,
                        multi_task: dict) -> dict:
        """Per-task results of every method, the generator methods over every seed; `make(seed)` -> generators."""
        runs = []
        for i, seed in enumerate(self.seeds):
            st = Setting(lib, self.encoder(lib.semantic_kind), self.out / "experts", self.cfg.cvae.k,
                         self.cfg.cvae.tau, make(seed), seen, **multi_task)
            runs.append(self.evaluate(name, st, unseen, seed, METHODS if i == 0 else GENERATED))
        return {"per_task": merge_seeds([r["per_task"] for r in runs]), "explanations": runs[0]["explanations"]}

    def block(self, name: str, res: dict, lib: Library, train: list[str], unseen: list[str]) -> dict:
        methods, comparisons = summarise(res["per_task"])
        return {"setting": name, "tasks": {"expert": lib.names, "train": sorted(train), "unseen": unseen},
                "methods": methods, "per_task": res["per_task"], "explanations": res["explanations"],
                "comparisons": comparisons, "seeds": self.seeds}

    def run(self) -> dict:
        """This rotation's report (pool_rotations combines them)."""
        t_start = time.time()
        cfg, ds = self.cfg, self.ds
        self.backbone()
        domains = (ds.domains() or [None])[:1 if cfg.quick else None]
        tasks_of = lambda role, d=None: ds.task_names(role=role, domain=d)
        all_tasks = [t for d in domains for t in tasks_of("expert", d) + tasks_of("train", d) + tasks_of("unseen", d)]
        self.experts("experts", all_tasks, cfg.expert)

        libs, seen_libs, multi = {}, {}, {}
        # later rotations rebuild only what the pooled in-dataset headline needs (their cost is the run's cost)
        full = not self.rotation
        groups = [(d or "all", d) for d in domains] + ([("mixed", None)] if len(domains) > 1 and full else [])
        for tag, d in groups:
            libs[tag] = self.library(f"library_{tag}", tasks_of("expert", d), "experts")
            seen = seen_tasks(ds, d)
            seen_libs[tag] = self.seen_library(f"library_seen_{tag}", libs[tag], seen, "experts")
            multi[tag] = {"multi_task": self.multi_task(tag, seen),
                          "multi_task_by_task": self.multi_task(tag, seen, by_task=True),
                          "family_pooled": self.family_pooled(tag, seen)}

        validation = self.validation(libs, domains) if not cfg.quick else None
        self.default = (cfg.default_generator if cfg.default_generator != "auto" else
                        "retrieval" if validation and validation["retrieval_generator_wins"] else "topk_dw")
        makers = {tag: self.generators("mixed_source" if tag == "mixed" else f"in_dataset_{tag}", libs[tag], d)
                  for tag, d in groups}
        results, settings = {}, {}
        for tag, d in groups:
            targets = [(f"in_dataset:{tag}", d)] if tag != "mixed" else [("mixed_source", None)]
            if tag != "mixed" and full:
                targets += [(f"cross_domain:{tag}->{b}", b) for b in domains if b != d]
            for name, target in targets:
                unseen = tasks_of("unseen", target)
                results[name] = self.setting_results(name, libs[tag], makers[tag], unseen, seen_libs[tag], multi[tag])
                train = [t for t in seen_tasks(ds, d) if t not in libs[tag].names]
                settings[name] = self.block(name, results[name], libs[tag], train, unseen)

        main = [f"in_dataset:{d or 'all'}" for d in domains]
        pooled = {"per_task": pool(*(results[n]["per_task"] for n in main)),
                  "explanations": pool(*(results[n]["explanations"] for n in main))}
        top = self.block("in_dataset (pooled: " + ", ".join(main) + ")", pooled, libs[domains[0] or "all"],
                         [t for n in main for t in settings[n]["tasks"]["train"]],
                         [t for n in main for t in settings[n]["tasks"]["unseen"]])
        top["tasks"]["expert"] = [t for n in main for t in settings[n]["tasks"]["expert"]]
        top["interval"] = self.intervals(pooled["per_task"])

        oracle = {t: (mean_r1(r["zero_shot"]), mean_r1(r["oracle"])) for t, r in pooled["per_task"].items()}
        mixed_lib = libs.get("mixed", libs[domains[0] or "all"])
        matrix = None if cfg.quick or not full else self.cached("transfer_matrix", [mixed_lib.names, tasks_of("train") + tasks_of("unseen"),
                                                 mixed_lib.semantic, self.bb.ident],
                             lambda: transfer_matrix(self.evaluator, mixed_lib, self.encoder(mixed_lib.semantic_kind),
                                                     tasks_of("train") + tasks_of("unseen")))
        valid = validity(oracle, matrix, ds) if matrix else None

        ablations = self.ablations(libs[domains[0] or "all"], domains[0]) if cfg.ablations and full else {}
        self.timings["total"] = round(sum(v for k, v in self.timings.items() if k != "total"), 1)
        return {"dataset": str(self.data), "backbone": self.bb.ident, "backbone_spec": self.backbone_spec,
                **top, "method_order": list(METHODS), "settings": settings, "validity": valid,
                "validation": validation, "default_generator": self.default, "ablations": ablations,
                "diversity": self.diversity(libs[domains[0] or "all"], makers[domains[0] or "all"],
                                            tasks_of("unseen", domains[0])) if full else None,
                "config": {**cfg.to_dict(), "lora_spec": self.spec().to_dict(),
                           "semantic_encoder": libs[domains[0] or "all"].semantic,
                           "semantic_choice": libs[domains[0] or "all"].info, "role_source": ds.role_source},
                "timings_s": dict(sorted(self.timings.items())),
                "wall_s_this_invocation": round(time.time() - t_start, 1)}

    def intervals(self, per_task: dict) -> dict:
        return intervals(per_task, len(self.seeds))

    # --- validation: choices made on the seen tasks only -----------------------------------------------------
    def validation(self, libs: dict, domains: list) -> dict:
        """k-fold cross-validation over each domain's seen tasks of the product generator (and its penalty),
        scored as the paired mean R@1 gain over Top-K (ΔW) on the held-out folds' images (train_generator.CV_SPLIT)."""
        cfg = self.cfg
        curves = {}
        chosen_penalty = cfg.generator.correction_penalty
        for penalty in sorted({*cfg.penalty_values, chosen_penalty}) if cfg.ablations else (chosen_penalty,):
            g = replace(cfg.generator, correction_penalty=penalty)
            per_step: dict = {}
            for d in domains:
                lib = libs[d or "all"]
                seen = seen_tasks(self.ds, d)
                res = self.cached(f"validation:{d}:penalty{penalty}",
                                  [g.to_dict(), seen, lib.names, cfg.folds, list(cfg.cv_steps), self.bb.ident],
                                  lambda: {str(s): v for s, v in crossvalidate(
                                      lib, self.encoder(lib.semantic_kind), self.out / "experts", self.ds, seen,
                                      self.bb, g, cfg.folds, tuple(cfg.cv_steps), progress=self.progress).items()})
                for s, gains in res.items():
                    per_step.setdefault(int(s), {}).update(gains)
            curves[str(penalty)] = {str(s): _mean_se(list(v.values())) for s, v in sorted(per_step.items())}
        chosen = curves[str(chosen_penalty)].get(str(cfg.generator.steps))
        wins = bool(chosen and chosen["mean"] > 2 * chosen["se"])
        return {"criterion": "paired mean R@1 gain of the prior-mean LoRA over Top-K (ΔW) on the held-out folds' "
                             f"{CV_SPLIT} split (never trained on in that fold)",
                "folds": cfg.folds, "curves_by_penalty": curves, "chosen": {"penalty": cfg.generator.correction_penalty,
                                                                            "steps": cfg.generator.steps, **(chosen or {})},
                "rule": "sglora = the retrieval-trained generator if its CV gain over Top-K (ΔW) > 2 SE, else the "
                        "Top-K (ΔW) merge itself (the paper's CVAE has no cross-validated score: not a candidate)",
                "retrieval_generator_wins": wins}

    def diversity(self, lib: Library, make, unseen: list[str]) -> dict:
        """Do samples mean something? Mean pairwise ΔW distance within a task vs the Top-K -> Oracle distance."""
        import torch
        from .evaluate import topk_delta_weights
        from .lora import delta_weights

        def flat(dws):
            return torch.cat([dws[b].flatten() for b in sorted(dws)])
        enc = self.encoder(lib.semantic_kind)
        to_oracle = []  # Top-K (ΔW) -> Oracle, the scale the samples' spread is measured against
        for t in unseen:
            agg = lib.aggregate(enc.encode([self.ds.tasks[t].description])[0], k=self.cfg.cvae.k, tau=self.cfg.cvae.tau)
            oracle = delta_weights(lib.spec, torch.from_numpy(
                load_checkpoints(self.out / "experts", t, lib.backbone, lib.spec)[-1]))
            to_oracle.append(float((flat(topk_delta_weights(lib, agg)) - flat(oracle)).norm()))
        out = {}
        for m, gen in make(self.seeds[0]).items():
            if m == "sglora":  # one of the other two
                continue
            within = []
            for t in unseen:
                vecs, _ = gen.generate(self.ds.tasks[t].description, samples=max(2, self.cfg.samples), seed=self.seeds[0])
                dws = torch.stack([flat(delta_weights(lib.spec, torch.from_numpy(v))) for v in vecs])
                within.append(float(torch.pdist(dws).mean()))
            out[m] = {"within_task_sample_distance": float(np.mean(within)),
                      "topk_dw_to_oracle_distance": float(np.mean(to_oracle)),
                      "ratio": float(np.mean(within) / np.mean(to_oracle))}
        return out

    def ablations(self, lib: Library, domain) -> dict:
        """Merge-side ablations on the seen tasks' val split (leave-one-out conditions; no generator)."""
        cfg, ds = self.cfg, self.ds
        seen = seen_tasks(ds, domain)
        val = Evaluator(self.bb, ds, split="val")
        enc = self.encoder(lib.semantic_kind)
        out = {}

        def merges(lib_, experts_dir, k, tau):
            st = Setting(lib_, enc, self.out / experts_dir, k, tau)
            res = {}
            for t in seen:
                excl = {t} if t in lib_.names else set()
                sub = lib_.subset([n for n in lib_.names if n not in excl])
                res[t] = method_results(val, replace(st, library=sub), t, 1, cfg.seed,
                                        ("zero_shot", "topk_weighted", "topk_weighted_dw", "oracle"))[0]
            return res

        def table(param, values, runs):
            methods_seen = [m for m in METHODS if all(m in r[t] for r in runs.values() for t in r)]
            col, se = {m: [] for m in methods_seen}, {m: [] for m in methods_seen}
            for v in values:
                summ, _ = summarise(runs[v])
                for m in methods_seen:
                    col[m].append(summ[m]["mean_r1"])
                    se[m].append(summ[m]["gain_se"])
            return {"param": param, "setting": f"seen tasks of {domain} (val split, leave-one-out)",
                    "values": list(values), "methods": col, "se": se, "metric": "mean_r1",
                    "se_of": "gain vs zero-shot (paired over tasks)"}

        key = lambda *a: [lib.names, seen, self.bb.ident, *a]
        ks = [k for k in cfg.k_values if k <= len(lib) - 1]
        out["k"] = table("k", ks, {k: self.cached(f"ablation:k{k}", key(k), lambda k=k: merges(
            lib, "experts", k, cfg.cvae.tau)) for k in ks})
        out["tau"] = table("tau", cfg.tau_values, {tau: self.cached(f"ablation:tau{tau}", key(tau), lambda tau=tau: merges(
            lib, "experts", cfg.cvae.k, tau)) for tau in cfg.tau_values})
        dom_tasks = ds.task_names(domain=domain)
        self.experts("experts_freeze_a", dom_tasks, replace(cfg.expert, freeze_a=True))
        lib_f = self.library("library_freeze_a", lib.names, "experts_freeze_a", semantic=lib.semantic_kind)
        out["freeze_a"] = table("freeze_a", (False, True), {
            False: self.cached("ablation:freeze_aFalse", key("fa0"), lambda: merges(lib, "experts", cfg.cvae.k, cfg.cvae.tau)),
            True: self.cached("ablation:freeze_aTrue", key("fa1"), lambda: merges(lib_f, "experts_freeze_a", cfg.cvae.k,
                                                                                   cfg.cvae.tau))})
        runs = {}
        for L in cfg.last_blocks_values:
            folder = "experts" if L == 0 else f"experts_last{L}"
            if L:
                self.experts(folder, dom_tasks, cfg.expert, last_blocks=L)
            lib_l = lib if L == 0 else self.library(f"library_last{L}", lib.names, folder, semantic=lib.semantic_kind)
            runs[L] = self.cached(f"ablation:last_blocks{L}", key("L", L), lambda lib_l=lib_l, folder=folder: merges(
                lib_l, folder, cfg.cvae.k, cfg.cvae.tau))
        out["last_blocks"] = table("last_blocks", cfg.last_blocks_values, runs)
        return out

    def lora_points(self, lib: Library, gen: Generator, unseen: list[str]) -> dict:
        """LoRA vectors for the parameter-space plot (paper Figs. 8, 10), recomputed from the saved artifacts."""
        enc = self.encoder(lib.semantic_kind)
        groups = {"expert_ckpt": [(n, v) for n in lib.names for v in load_checkpoints(self.out / "experts", n)],
                  "expert_mean": list(zip(lib.names, lib.mu)), "model_soups": [("all experts", lib.mu.mean(0))],
                  "topk_weighted": [], "adapter_soup": [], "oracle_ckpt": [], "sglora_sample": []}
        for t in unseen:
            agg = lib.aggregate(enc.encode([self.ds.tasks[t].description])[0], k=self.cfg.cvae.k, tau=self.cfg.cvae.tau)
            top = [lib.names.index(n) for n in agg.experts]
            groups["topk_weighted"].append((t, agg.mu))
            groups["adapter_soup"].append((t, lib.mu[top].mean(0)))
            groups["oracle_ckpt"] += [(t, v) for v in load_checkpoints(self.out / "experts", t)]
            vecs, _ = gen.generate(self.ds.tasks[t].description, samples=self.cfg.samples, seed=self.seeds[0])
            groups["sglora_sample"] += [(t, v) for v in vecs]
        return {g: rows for g, rows in groups.items() if rows}


HEADLINE_PAIRS = [(a, b) for a in ("sglora", "sglora_mean", "sglora_retrieval", "sglora_paper")
                  for b in ("topk_weighted_dw", "topk_weighted", "multi_task_lora", "multi_task_lora_by_task",
                            "family_pooled", "topk_weighted_seen", "sglora_paper", "zero_shot", "oracle") if a != b]


def intervals(per_task: dict, n_seeds: int) -> dict:
    """SG-LoRA vs each reference, paired over tasks (seed-averaged): metrics.compare (mean, SE, t-based 95 %
    interval, detectable effect at 80 % power, variance split), and the share of the Oracle gap recovered."""
    tasks = sorted(per_task)
    have = lambda m: all(m in per_task[t] for t in tasks)
    out = {f"{a}-{b}": {**compare([per_task[t][a] for t in tasks], [per_task[t][b] for t in tasks]),
                        "n_seeds": n_seeds}
           for a, b in HEADLINE_PAIRS if have(a) and have(b)}
    zs = np.array([mean_r1(per_task[t]["zero_shot"]) for t in tasks])
    gap = np.array([mean_r1(per_task[t]["oracle"]) for t in tasks]) - zs
    for m in ("sglora", "sglora_mean", "sglora_retrieval", "sglora_paper", "topk_weighted_dw", "multi_task_lora",
              "multi_task_lora_by_task", "family_pooled"):
        if have(m):
            gain = np.array([mean_r1(per_task[t][m]) for t in tasks]) - zs
            out[f"oracle_gap_recovered:{m}"] = float(gain.mean() / gap.mean()) if gap.mean() > 0 else None
    return out


def _mean_se(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"),
            "n": len(v)}


def pool_rotations(reports: list[dict]) -> dict:
    """One report from every rotation's: the in-dataset settings (every rotation has them) and the headline pool
    every rotation's unseen tasks (each task name once: a class is unseen in one rotation only); cross-domain,
    mixed, the transfer matrix, ablations and diversity are rotation 0's. Each rotation's own headline, default
    generator and validation are kept under `per_rotation`."""
    first = reports[0]
    if len(reports) == 1:
        out = dict(first)
    else:
        out = dict(first)
        settings = dict(first["settings"])
        for name in [n for n in first["settings"] if all(n in r["settings"] for r in reports)]:
            blocks = [r["settings"][name] for r in reports]
            settings[name] = _pooled_block(name, blocks)
        out["settings"] = settings
        out.update(_pooled_block(first["setting"], reports))
        out["interval"] = intervals(out["per_task"], len(first["seeds"]))
    out["rotations"] = len(reports)
    out["galleries_per_task"] = min(len(r["zero_shot"].get("gallery_r1", [0])) for r in out["per_task"].values())
    out["power"] = {pair: v["mde80"] for pair, v in out["interval"].items() if isinstance(v, dict) and "mde80" in v}
    out["per_rotation"] = [{"rotation": i, "default_generator": r["default_generator"], "validation": r["validation"],
                            "tasks": r["tasks"], "methods": {m: {"mean_r1": v["mean_r1"], "gain": v["gain"],
                                                                 "gain_se": v["gain_se"]} for m, v in r["methods"].items()},
                            "interval": r["interval"]} for i, r in enumerate(reports)]
    return out


def _pooled_block(name: str, blocks: list[dict]) -> dict:
    per_task = pool(*(b["per_task"] for b in blocks))
    if len(per_task) != sum(len(b["per_task"]) for b in blocks):
        raise SGLoRAError(f"{name}: a task is unseen in two rotations; use at most as many --rotations as it takes "
                          "to make every class unseen once")
    methods, comparisons = summarise(per_task)
    tasks = {role: sorted({t for b in blocks for t in b["tasks"][role]}) for role in ("expert", "train")}
    return {"setting": name, "tasks": {**tasks, "unseen": [t for b in blocks for t in b["tasks"]["unseen"]]},
            "methods": methods, "per_task": per_task, "explanations": pool(*(b["explanations"] for b in blocks)),
            "comparisons": comparisons, "seeds": blocks[0]["seeds"]}


def reproduce(data: str | Path, out: str | Path, preset: str = "default", backbone: str | None = None,
              ablations: bool | None = None, progress: bool = True, command: str | None = None, jobs: int = 1,
              executor: Executor = Executor(), seeds: int | None = None, rotations: int | None = None) -> dict:
    """The whole run over every role rotation; `ablations`, `seeds` and `rotations` override the preset's when given."""
    from .report import write_report
    cfg = ReproduceConfig.preset(preset)
    cfg = replace(cfg, ablations=cfg.ablations if ablations is None else ablations, seeds=seeds or cfg.seeds,
                  rotations=rotations or cfg.rotations)
    run = Run(Path(data), Path(out), cfg, backbone, progress, jobs, executor)
    reports = [run.run()]
    for r in range(1, cfg.rotations):
        reports.append(Run(Path(data), Path(out), cfg, backbone, progress, jobs, executor, rotation=r, first=run).run())
    report = pool_rotations(reports)
    report["command"] = command
    domain = run.ds.domains()[0] if run.ds.domains() else None
    lib = Library.load(run.out / "models" / f"library_{domain or 'all'}" / "library.safetensors")
    gens = run.generators(f"in_dataset_{domain or 'all'}", lib, domain)(cfg.seed)
    gen = gens["sglora_retrieval"] if isinstance(gens["sglora"], TopKMerge) else gens["sglora"]  # rank-r samples
    points = run.lora_points(lib, gen, run.ds.task_names(role="unseen", domain=domain))
    labels = {g: [n for n, _ in rows] for g, rows in points.items()}
    arrays = {g: np.stack([np.asarray(v, dtype=np.float32) for _, v in rows]) for g, rows in points.items()}
    write_report(report, out, arrays, labels)
    return report
