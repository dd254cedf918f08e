"""What the report shows beside the tables: whether samples differ (diversity) and where the LoRAs lie
(the parameter-space plot's points). Both read the run's saved artifacts."""

from __future__ import annotations

import numpy as np

from .experts import load_checkpoints
from .library import Library


def diversity(run, lib: Library, make, unseen: list[str]) -> dict:
    """Do samples mean something? Mean pairwise ΔW distance within a task vs the Top-K -> Oracle distance."""
    import torch
    from .conditions import topk_delta_weights
    from .lora import delta_weights

    def flat(dws):
        return torch.cat([dws[b].flatten() for b in sorted(dws)])
    enc = run.encoder(lib.semantic_kind)
    to_oracle = []  # Top-K (ΔW) -> Oracle, the scale the samples' spread is measured against
    for t in unseen:
        agg = lib.aggregate(enc.encode([run.ds.tasks[t].description])[0], k=run.cfg.cvae.k, tau=run.cfg.cvae.tau)
        oracle = delta_weights(lib.spec, torch.from_numpy(
            load_checkpoints(run.out / "experts", t, lib.backbone, lib.spec)[-1]))
        to_oracle.append(float((flat(topk_delta_weights(lib, agg)) - flat(oracle)).norm()))
    out = {}
    for m, gen in make(run.seeds[0]).items():
        if m == "sglora" or not hasattr(gen, "cvae"):  # the default is one of the others; merges draw nothing
            continue
        within = []
        for t in unseen:
            vecs, _ = gen.generate(run.ds.tasks[t].description, samples=max(2, run.cfg.samples), seed=run.seeds[0])
            dws = torch.stack([flat(delta_weights(lib.spec, torch.from_numpy(v))) for v in vecs])
            within.append(float(torch.pdist(dws).mean()))
        out[m] = {"within_task_sample_distance": float(np.mean(within)),
                  "topk_dw_to_oracle_distance": float(np.mean(to_oracle)),
                  "ratio": float(np.mean(within) / np.mean(to_oracle))}
    return out


def lora_points(run, lib: Library, gen, unseen: list[str]) -> dict:
    """LoRA vectors for the parameter-space plot (paper Figs. 8, 10), recomputed from the saved artifacts."""
    enc = run.encoder(lib.semantic_kind)
    groups = {"expert_ckpt": [(n, v) for n in lib.names for v in load_checkpoints(run.out / "experts", n)],
              "expert_mean": list(zip(lib.names, lib.mu)), "model_soups": [("all experts", lib.mu.mean(0))],
              "topk_weighted": [], "adapter_soup": [], "oracle_ckpt": [], "sglora_sample": []}
    for t in unseen:
        agg = lib.aggregate(enc.encode([run.ds.tasks[t].description])[0], k=run.cfg.cvae.k, tau=run.cfg.cvae.tau)
        top = [lib.names.index(n) for n in agg.experts]
        groups["topk_weighted"].append((t, agg.mu))
        groups["adapter_soup"].append((t, lib.mu[top].mean(0)))
        groups["oracle_ckpt"] += [(t, v) for v in load_checkpoints(run.out / "experts", t)]
        vecs, _ = gen.generate(run.ds.tasks[t].description, samples=run.cfg.samples, seed=run.seeds[0])
        groups["sglora_sample"] += [(t, v) for v in vecs]
    return {g: rows for g, rows in groups.items() if rows}
