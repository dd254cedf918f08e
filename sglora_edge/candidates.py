"""The generators every setting evaluates — the paper's CVAE, the retrieval-trained generator, the cluster-routed
joint LoRAs and the routed atoms, each built (or loaded) through the run's cache — and the default among them
(Run.default: what validation.choose_default picked, else the Top-K (ΔW) merge as a generator)."""

from __future__ import annotations

from dataclasses import asdict, replace

from .atoms import train_atoms
from .clusters import cluster_library, description_clusters
from .config import CVAEConfig
from .generate import Generator, TopKMerge, split_validation_tasks, train_cvae
from .library import Library
from .train_generator import train_generator


def paper_generator(run, name: str, lib: Library, train_tasks: list[str], experts_dir: str, cfg: CVAEConfig,
                    seed: int) -> Generator:
    """The paper's CVAE (reconstruction + KL), early-stopped on held-out train-role tasks."""
    cfg = replace(cfg, seed=seed)
    fit, val = split_validation_tasks(train_tasks, seed=run.cfg.seed)
    path = run.work / "models" / name / ("cvae.safetensors" if seed == run.cfg.seed else f"cvae_s{seed}.safetensors")
    return run.model(f"cvae:{name}:s{seed}", path,
                     [cfg.to_dict(), fit, val, lib.names, lib.semantic, experts_dir, asdict(run.cfg.expert)],
                     lambda: run.log(f"training the paper's CVAE {name} (seed {seed})") or train_cvae(
                         lib, run.encoder(lib.semantic_kind), run.out / experts_dir, run.ds, fit + lib.names,
                         val, run.bb, cfg, progress=run.progress), lib)


def product_generator(run, name: str, lib: Library, tasks: list[str], experts_dir: str, cfg: CVAEConfig,
                      seed: int) -> Generator:
    """The retrieval-trained generator on every seen task of the library's domain(s)."""
    cfg = replace(cfg, seed=seed)
    return run.model(f"generator:{name}:s{seed}", run.work / "models" / name / f"generator_s{seed}.safetensors",
                     [cfg.to_dict(), tasks, lib.names, lib.semantic, experts_dir, asdict(run.cfg.expert)],
                     lambda: run.log(f"training generator {name} (seed {seed}) on {len(tasks)} seen tasks") or
                     train_generator(lib, run.encoder(lib.semantic_kind), run.out / experts_dir, run.ds, tasks,
                                     run.bb, cfg, progress=run.progress), lib)


def cluster_routed_library(run, name: str, lib: Library, seen: list[str]) -> Library:
    """The seen tasks clustered by description, one LoRA trained jointly per cluster (clusters.py)."""
    enc = run.encoder(lib.semantic_kind)
    clusters = description_clusters(seen, enc.encode([run.ds.tasks[t].description for t in seen]),
                                    run.cfg.cluster_size, run.cfg.seed)
    return run.model(f"clusters:{name}", run.work / "models" / f"clusters_{name}" / "library.safetensors",
                     [clusters, asdict(run.cfg.multi_task), run.spec().to_dict(), run.bb.ident],
                     lambda: run.log(f"training {len(clusters)} cluster LoRAs for {name}") or cluster_library(
                         run.bb, run.spec(), run.ds, enc, clusters, run.cfg.multi_task))


def atoms_library(run, name: str, lib: Library, seen: list[str]) -> Library:
    """The seen tasks' LoRAs trained as routed atoms (atoms.py), over the library of every seen task."""
    cfg = run.cfg
    tag = "mixed" if name == "mixed_source" else name.removeprefix("in_dataset_")  # as settings() names it
    start = run.seen_library(f"library_seen_{tag}", lib, seen, "experts")
    return run.model(f"atoms:{name}", run.work / "models" / f"atoms_{name}" / "library.safetensors",
                     [start.names, start.info.get("key"), asdict(cfg.atoms), cfg.atoms_drift, cfg.cvae.k, cfg.cvae.tau,
                      run.bb.ident],
                     lambda: run.log(f"training {len(start)} routed atoms for {name}") or train_atoms(
                         run.bb, start, run.ds, cfg.atoms, k=cfg.cvae.k, tau=cfg.cvae.tau, drift=cfg.atoms_drift,
                         progress=run.progress))


def generators(run, name: str, lib: Library, domain) -> callable:
    """seed -> {"sglora": the default, "sglora_paper": the paper's CVAE, "sglora_retrieval": the
    retrieval-trained one, "cluster_routed": Top-K over the cluster library, "routed_atoms": Top-K over the
    routed atoms}. The default (run.default) is the candidate validation chose (validation.default_generator),
    else the Top-K (ΔW) merge as a generator (TopKMerge); every generator is reported either way."""
    def make(seed: int) -> dict[str, Generator]:
        cfg, enc = run.cfg, run.encoder(lib.semantic_kind)
        paper = paper_generator(run, name, lib, run.ds.task_names(role="train", domain=domain), "experts", cfg.cvae,
                                seed)
        retrieval = product_generator(run, name, lib, run.ds.seen_tasks(domain), "experts", cfg.generator, seed)
        clib = cluster_routed_library(run, name, lib, run.ds.seen_tasks(domain))
        cluster = TopKMerge(clib, enc, min(cfg.cvae.k, len(clib)), cfg.cvae.tau)
        atoms = TopKMerge(atoms_library(run, name, lib, run.ds.seen_tasks(domain)), enc, cfg.cvae.k, cfg.cvae.tau)
        default = {"retrieval": retrieval, "paper": paper, "cluster": cluster, "atoms": atoms}.get(
            run.default) or TopKMerge(lib, enc, cfg.cvae.k, cfg.cvae.tau)
        return {"sglora": default, "sglora_paper": paper, "sglora_retrieval": retrieval, "cluster_routed": cluster,
                "routed_atoms": atoms}
    return make
