"""`sglora-edge reproduce`: the whole server pipeline with every stage cached, and the report.

    OUT/backbone/           tiny backbone pretrained on the dataset (when --backbone is not given)
    OUT/experts/            LoRA checkpoints of every task (experts, train tasks, Oracles of unseen tasks)
    OUT/experts_freeze_a/   the same recipe with A frozen (ablation, main domain only)
    OUT/models/<name>/      library.safetensors + cvae.safetensors per setting and ablation
    OUT/cache/<name>.json   evaluation results per setting/ablation (resume after interruption)
    OUT/report.json, report.md, plots/

A stage whose output exists with matching settings is skipped, so an interrupted run
resumes and a finished one re-writes the same report.
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
from .config import CVAEConfig, ExpertConfig, LoRASpec
from .data import Dataset, load_dataset
from .errors import SGLoRAError
from .evaluate import (METHODS, Evaluator, method_results, summarise, transfer_matrix, validity)
from .experts import load_checkpoints, train_experts
from .generate import Generator, split_validation_tasks, train_cvae
from .library import Library, SemanticEncoder, VisualTaskEncoder
from .library_build import build_library
from .metrics import mean_r1


@dataclass
class ReproduceConfig:
    pretrain_config: str = "sglora-tiny"
    pretrain_epochs: int = 20
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    cvae: CVAEConfig = field(default_factory=CVAEConfig)
    lora_rank: int = 2
    semantic: str = "auto"
    samples: int = 5
    seed: int = 0
    ablations: bool = True
    k_values: tuple = (1, 2, 4, 8)
    tau_values: tuple = (0.02, 0.05, 0.1, 0.5)
    kl_values: tuple = (0.1, 1.0, 10.0)
    last_blocks_values: tuple = (0, 2, 1)  # 0 = every block; device task-switch cost falls with L

    @classmethod
    def preset(cls, name: str) -> "ReproduceConfig":
        if name == "default":
            return cls()
        if name == "micro":  # minutes on 2 cores: for tests and a first look
            return cls(pretrain_config="sglora-micro", pretrain_epochs=15,
                       expert=ExpertConfig(epochs=6, keep_last=3),
                       cvae=CVAEConfig(hidden=64, epochs=20, eval_every=10, k=2), samples=2,
                       k_values=(1, 2), tau_values=(0.1, 0.5), kl_values=(1.0, 10.0), last_blocks_values=(0, 1))
        raise SGLoRAError(f"--preset {name!r} is unknown; choose micro or default")

    def to_dict(self) -> dict:
        return asdict(self)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Run:
    def __init__(self, data: Path, out: Path, cfg: ReproduceConfig, backbone_spec: str | None, progress: bool,
                 jobs: int = 1):
        self.data, self.out, self.cfg, self.progress, self.jobs = Path(data), Path(out), cfg, progress, jobs
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings_path = self.out / "cache" / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        self.ds: Dataset = load_dataset(data)
        self.backbone_spec = backbone_spec
        self.bb: Backbone | None = None
        self.encoders: dict[str, SemanticEncoder] = {}
        self.evaluator: Evaluator | None = None

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[reproduce] {msg}", flush=True)

    def timed(self, stage: str, fn, *args, **kwargs):
        """Run a stage and record its wall time (a cached stage keeps the time it took when it ran)."""
        t0 = time.time()
        result = fn(*args, **kwargs)
        if stage not in self.timings:
            self.timings[stage] = round(time.time() - t0, 1)
            write_json(self.timings_path, self.timings)
        return result

    # --- stages -------------------------------------------------------------------------------------
    def backbone(self) -> Backbone:
        if self.backbone_spec is None:
            folder = self.out / "backbone"
            if not (folder / BACKBONE_FILE).is_file():
                from .backbone.pretrain import pretrain
                self.log(f"pretraining {self.cfg.pretrain_config} on {self.data}")
                self.timed("pretrain", pretrain, self.data, folder, config=self.cfg.pretrain_config,
                           epochs=self.cfg.pretrain_epochs, seed=self.cfg.seed, progress=self.progress)
            self.backbone_spec = str(folder)
        self.bb = create_backbone(self.backbone_spec)
        self.evaluator = Evaluator(self.bb, self.ds)
        return self.bb

    def spec(self, last_blocks: int = 0) -> LoRASpec:
        return LoRASpec.for_visual(self.bb.visual, rank=self.cfg.lora_rank, last_blocks=last_blocks)

    def experts(self, folder: str, tasks: list[str], cfg: ExpertConfig, last_blocks: int = 0) -> None:
        self.log(f"training {len(tasks)} task LoRAs into {folder}/")
        self.timed(f"experts:{folder}", train_experts, self.bb, self.spec(last_blocks), self.ds, tasks,
                   self.out / folder, cfg, progress=self.progress, jobs=self.jobs)

    def encoder(self, kind: str) -> SemanticEncoder:
        if kind not in self.encoders:
            self.encoders[kind] = SemanticEncoder(kind, self.bb)
        return self.encoders[kind]

    def library(self, name: str, expert_tasks: list[str], experts_dir: str, semantic: str | None = None) -> Library:
        path = self.out / "models" / name / "library.safetensors"
        try:
            lib = Library.load(path, backbone=self.bb.ident)
            if lib.names == expert_tasks:
                return lib
        except ArtifactError:
            pass
        self.log(f"building library {name} ({len(expert_tasks)} experts)")
        lib = self.timed(f"library:{name}", build_library, self.ds, self.bb, self.out / experts_dir, expert_tasks,
                         semantic or self.cfg.semantic, self.cfg.cvae.k, self.cfg.cvae.tau)
        lib.save(path)
        return lib

    def generator(self, name: str, lib: Library, train_tasks: list[str], experts_dir: str, cfg: CVAEConfig,
                  encoder: SemanticEncoder | None = None) -> Generator:
        path = self.out / "models" / name / "cvae.safetensors"
        encoder = encoder or self.encoder(lib.semantic_kind)
        fit, val = split_validation_tasks(train_tasks, seed=self.cfg.seed)
        key = _key([cfg.to_dict(), fit, val, lib.names, lib.semantic])
        if path.is_file() and encoder.name == lib.semantic:
            try:
                gen = Generator.load(path, lib, self.bb, encoder)
                if gen.meta.get("key") == key:
                    return gen
            except ArtifactError:
                pass
        self.log(f"training CVAE {name} on {len(fit) + len(lib)} tasks (validation: {len(val)})")
        gen = self.timed(f"cvae:{name}", train_cvae, lib, encoder, self.out / experts_dir, self.ds,
                         fit + lib.names, val, self.bb, cfg, progress=self.progress)
        gen.meta["key"] = key
        gen.save(path)
        return gen

    def evaluate(self, name: str, lib: Library, gen: Generator | None, unseen: list[str], experts_dir: str,
                 k: int, tau: float, methods=METHODS, encoder: SemanticEncoder | None = None,
                 points: dict | None = None) -> dict:
        """Per-task results of `methods` on `unseen` (cached by everything they depend on)."""
        encoder = encoder or self.encoder(lib.semantic_kind)
        key = _key([name, lib.names, lib.semantic, gen.meta.get("key") if gen else None, unseen, k, tau,
                    self.cfg.samples, self.cfg.seed, list(methods), self.bb.ident])
        path = self.out / "cache" / f"{name.replace(':', '_').replace('>', '')}.json"
        if points is None and path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["per_task"]
        t0 = time.time()
        per_task = {t: method_results(self.evaluator, lib, gen, encoder, t, self.out / experts_dir, k, tau,
                                      self.cfg.samples, self.cfg.seed, methods, points) for t in unseen}
        self.timings.setdefault(f"evaluate:{name}", round(time.time() - t0, 1))
        write_json(self.timings_path, self.timings)
        write_json(path, {"key": key, "per_task": per_task})
        return per_task

    # --- the whole run ------------------------------------------------------------------------------------
    def setting(self, name: str, lib: Library, gen: Generator, unseen: list[str], points=None) -> dict:
        per_task = self.evaluate(name, lib, gen, unseen, "experts", self.cfg.cvae.k, self.cfg.cvae.tau,
                                 points=points)
        methods, comparisons = summarise(per_task)
        cvae_tasks = [t for t in gen.meta["train_tasks"] if t not in lib.names]  # experts also train it (LOO)
        return {"setting": name, "tasks": {"expert": lib.names, "train": sorted(cvae_tasks + gen.meta["val_tasks"]),
                                           "unseen": unseen},
                "methods": methods, "per_task": {t: {m: v for m, v in r.items() if not m.startswith("_")}
                                                 for t, r in per_task.items()},
                "explanations": {t: r["_explanation"] for t, r in per_task.items()},
                "comparisons": comparisons}

    def run(self) -> dict:
        t_start = time.time()
        cfg, ds = self.cfg, self.ds
        self.backbone()
        domains = ds.domains() or [None]
        tasks_of = lambda role, d=None: ds.task_names(role=role, domain=d)
        all_tasks = tasks_of("expert") + tasks_of("train") + tasks_of("unseen")
        self.experts("experts", all_tasks, cfg.expert)

        libs, gens = {}, {}
        for d in domains:
            tag = d or "all"
            libs[tag] = self.library(f"library_{tag}", tasks_of("expert", d), "experts")
            gens[tag] = self.generator(f"in_dataset_{tag}", libs[tag], tasks_of("train", d), "experts", cfg.cvae)
        main = domains[0] or "all"
        points: dict = {}
        top = self.setting(f"in_dataset:{main}", libs[main], gens[main], tasks_of("unseen", domains[0]), points)
        settings = {}
        for d in domains[1:]:
            settings[f"in_dataset:{d}"] = self.setting(f"in_dataset:{d}", libs[d], gens[d], tasks_of("unseen", d))
        for a in domains:
            for b in domains:
                if a != b:
                    settings[f"cross_domain:{a}->{b}"] = self.setting(f"cross_domain:{a}->{b}", libs[a], gens[a],
                                                                      tasks_of("unseen", b))
        if len(domains) > 1:
            mixed_lib = self.library("library_mixed", tasks_of("expert"), "experts")
            mixed_gen = self.generator("mixed_source", mixed_lib, tasks_of("train"), "experts", cfg.cvae)
            settings["mixed_source"] = self.setting("mixed_source", mixed_lib, mixed_gen, tasks_of("unseen"))
        else:
            mixed_lib = libs[main]

        # validity: Oracle room on the main setting; transfer of every expert to every train/unseen task
        oracle = {t: (mean_r1(r["zero_shot"]), mean_r1(r["oracle"])) for t, r in top["per_task"].items()}
        matrix = self.cached_matrix(mixed_lib, tasks_of("train") + tasks_of("unseen"))
        valid = validity(oracle, matrix, ds)

        ablations = self.ablations(libs[main], gens[main], domains[0]) if cfg.ablations else {}
        self.timings["total"] = round(sum(v for k, v in self.timings.items() if k != "total"), 1)
        report = {"dataset": str(self.data), "backbone": self.bb.ident, "backbone_spec": self.backbone_spec,
                  **top, "method_order": list(METHODS), "settings": settings, "validity": valid,
                  "ablations": ablations, "config": {**cfg.to_dict(), "lora_spec": self.spec().to_dict(),
                                                     "semantic_encoder": libs[main].semantic,
                                                     "semantic_choice": libs[main].info,
                                                     "role_source": ds.role_source},
                  "timings_s": dict(sorted(self.timings.items())),
                  "wall_s_this_invocation": round(time.time() - t_start, 1)}
        report["points"] = self.lora_points(libs[main], points, gens[main])
        return report

    def cached_matrix(self, lib: Library, tasks: list[str]) -> dict:
        path = self.out / "cache" / "transfer_matrix.json"
        key = _key([lib.names, tasks, lib.semantic, self.bb.ident])
        if path.is_file() and json.loads(path.read_text()).get("key") == key:
            return json.loads(path.read_text())["matrix"]
        self.log(f"transfer matrix: {len(lib)} experts x {len(tasks)} tasks")
        m = self.timed("transfer_matrix", transfer_matrix, self.evaluator, lib,
                       self.encoder(lib.semantic_kind), tasks)
        write_json(path, {"key": key, "matrix": m})
        return m

    def ablations(self, lib: Library, gen: Generator, domain) -> dict:
        cfg, ds = self.cfg, self.ds
        unseen = ds.task_names(role="unseen", domain=domain)
        train = ds.task_names(role="train", domain=domain)
        out = {}

        def table(param, values, runs):
            """runs: value -> per_task results; summarise the methods present into metric columns."""
            methods_seen = [m for m in METHODS if all(m in r[t] for r in runs.values() for t in r)]
            col, se = {m: [] for m in methods_seen}, {m: [] for m in methods_seen}
            for v in values:
                summ, _ = summarise(runs[v])
                for m in methods_seen:
                    col[m].append(summ[m]["mean_r1"])
                    se[m].append(summ[m]["gain_se"])
            return {"param": param, "setting": f"in_dataset:{domain}", "values": list(values), "methods": col,
                    "se": se, "metric": "mean_r1", "se_of": "gain vs zero-shot (paired over tasks)"}

        gen_methods = ("zero_shot", "topk_weighted", "sglora", "sglora_mean")
        k_values = [k for k in cfg.k_values if k <= len(lib) - 1]
        runs = {}
        for k in k_values:
            g = gen if k == cfg.cvae.k else self.generator(f"ablation_k{k}", lib, train, "experts",
                                                           replace(cfg.cvae, k=k))
            runs[k] = self.evaluate(f"ablation_k{k}", lib, g, unseen, "experts", k, cfg.cvae.tau, gen_methods)
        out["k"] = table("k", k_values, runs)
        runs = {tau: self.evaluate(f"ablation_tau{tau}", lib, None, unseen, "experts", cfg.cvae.k, tau,
                                   ("zero_shot", "topk_weighted", "topk_weighted_dw")) for tau in cfg.tau_values}
        out["tau"] = table("tau", cfg.tau_values, runs)
        runs = {}
        for lam in cfg.kl_values:
            g = gen if lam == cfg.cvae.kl_weight else self.generator(f"ablation_kl{lam}", lib, train, "experts",
                                                                     replace(cfg.cvae, kl_weight=lam))
            runs[lam] = self.evaluate(f"ablation_kl{lam}", lib, g, unseen, "experts", cfg.cvae.k, cfg.cvae.tau,
                                      ("zero_shot", "sglora", "sglora_mean"))
        out["kl_weight"] = table("kl_weight", cfg.kl_values, runs)
        for param, values in (("residual", (False, True)), ("cond_aug", (0.0, 0.5))):
            runs = {}
            for v in values:
                c = replace(cfg.cvae, **{param: v})
                g = gen if c == cfg.cvae else self.generator(f"ablation_{param}{v}", lib, train, "experts", c)
                runs[v] = self.evaluate(f"ablation_{param}{v}", lib, g, unseen, "experts", cfg.cvae.k, cfg.cvae.tau,
                                        ("zero_shot", "topk_weighted", "sglora", "sglora_mean"))
            out[param] = table(param, values, runs)
        # shared seeded A, trained (default) vs frozen: every task of the main domain retrained with A frozen
        dom_tasks = ds.task_names(domain=domain)
        self.experts("experts_freeze_a", dom_tasks, replace(cfg.expert, freeze_a=True))
        lib_f = self.library("library_freeze_a", lib.names, "experts_freeze_a", semantic=lib.semantic_kind)
        gen_f = self.generator("ablation_freeze_a", lib_f, train, "experts_freeze_a", cfg.cvae)
        fa_methods = ("zero_shot", "model_soups", "model_soups_dw", "topk_weighted", "topk_weighted_dw", "sglora",
                      "sglora_mean", "oracle")
        runs = {False: self.evaluate("ablation_freeze_aFalse", lib, gen, unseen, "experts", cfg.cvae.k,
                                     cfg.cvae.tau, fa_methods),
                True: self.evaluate("ablation_freeze_aTrue", lib_f, gen_f, unseen, "experts_freeze_a", cfg.cvae.k,
                                    cfg.cvae.tau, fa_methods)}
        out["freeze_a"] = table("freeze_a", (False, True), runs)
        # adapt only the last L blocks: what a device pays per task switch vs what retrieval keeps
        lb_methods = ("zero_shot", "topk_weighted", "topk_weighted_dw", "sglora", "sglora_mean", "oracle")
        runs = {}
        for L in cfg.last_blocks_values:
            if L == 0:
                runs[L] = self.evaluate("ablation_last_blocks0", lib, gen, unseen, "experts", cfg.cvae.k,
                                        cfg.cvae.tau, lb_methods)
                continue
            folder = f"experts_last{L}"
            self.experts(folder, dom_tasks, cfg.expert, last_blocks=L)
            lib_l = self.library(f"library_last{L}", lib.names, folder, semantic=lib.semantic_kind)
            gen_l = self.generator(f"ablation_last_blocks{L}", lib_l, train, folder, cfg.cvae)
            runs[L] = self.evaluate(f"ablation_last_blocks{L}", lib_l, gen_l, unseen, folder, cfg.cvae.k,
                                    cfg.cvae.tau, lb_methods)
        out["last_blocks"] = table("last_blocks", cfg.last_blocks_values, runs)
        # task condition from the text (default) vs from the mean image embedding of the task's train images
        visual = VisualTaskEncoder(self.bb, ds)
        lib_v = Library.build(lib.names, lib.descriptions, [load_checkpoints(self.out / "experts", n) for n in lib.names],
                              visual, lib.spec, lib.backbone, lib.families, lib.domains)
        gen_v = self.generator("ablation_visual", lib_v, train, "experts", cfg.cvae, encoder=visual)
        runs = {"text": self.evaluate("ablation_conditiontext", lib, gen, unseen, "experts", cfg.cvae.k, cfg.cvae.tau,
                                      ("zero_shot", "topk_weighted", "sglora", "sglora_mean")),
                "visual": self.evaluate("ablation_conditionvisual", lib_v, gen_v, unseen, "experts", cfg.cvae.k,
                                        cfg.cvae.tau, ("zero_shot", "topk_weighted", "sglora", "sglora_mean"),
                                        encoder=visual)}
        out["condition"] = table("condition", ("text", "visual"), runs)
        return out

    def lora_points(self, lib: Library, points: dict, gen: Generator) -> dict:
        """LoRA vectors for the parameter-space plot (paper Figs. 8, 10): experts, oracles, samples, merges."""
        groups = {"expert_ckpt": [(n, v) for n in lib.names for v in load_checkpoints(self.out / "experts", n)],
                  "expert_mean": list(zip(lib.names, lib.mu)),
                  "model_soups": [("all experts", lib.mu.mean(0))], **points}
        return {g: rows for g, rows in groups.items() if rows}


def reproduce(data: str | Path, out: str | Path, preset: str = "default", backbone: str | None = None,
              ablations: bool = True, progress: bool = True, command: str | None = None, jobs: int = 1) -> dict:
    from .report import write_report
    cfg = replace(ReproduceConfig.preset(preset), ablations=ablations)
    run = Run(Path(data), Path(out), cfg, backbone, progress, jobs)
    report = run.run()
    points = report.pop("points")
    report["command"] = command
    labels = {g: [n for n, _ in rows] for g, rows in points.items()}
    arrays = {g: np.stack([np.asarray(v, dtype=np.float32) for _, v in rows]) for g, rows in points.items()}
    write_report(report, out, arrays, labels)
    return report
