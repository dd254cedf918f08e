"""The LoRA on the device (numpy): the flat vector's layout, ΔW = γ·B·A per block, and saving a generated LoRA.

Mirrors `sglora_edge.lora` (a parity test holds them together): block-major, targets in q,k,v order,
A (r×d, row-major) then B (d×r, row-major); ΔW of a block is [3d, d] with γ·B·A in the rows of each target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import save_artifact
from .errors import InputError

TARGETS = ("q", "k", "v")
LORA_KIND = "lora"


def blocks(spec: dict) -> list[int]:
    last = int(spec.get("last_blocks", 0))
    return list(range(spec["n_blocks"] - last if last else 0, spec["n_blocks"]))


def delta_weights(spec: dict, vector: np.ndarray) -> dict[int, np.ndarray]:
    """Flat LoRA vector -> {block: ΔW_qkv float32 [3d, d]}."""
    d, r, scale = int(spec["width"]), int(spec["rank"]), float(spec["alpha"]) / int(spec["rank"])
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    pos, out = 0, {}
    for b in blocks(spec):
        rows = []
        for t in TARGETS:
            if t not in spec["targets"]:
                rows.append(np.zeros((d, d), np.float32))
                continue
            a = vector[pos:pos + r * d].reshape(r, d)
            bm = vector[pos + r * d:pos + 2 * r * d].reshape(d, r)
            pos += 2 * r * d
            rows.append(scale * (bm @ a))
        out[b] = np.concatenate(rows, 0)
    if pos != vector.size:
        raise InputError(f"LoRA vector has {vector.size} entries, the spec needs {pos}")
    return out


def stacked_spec(spec: dict, k: int) -> dict:
    """The spec of K rank-r LoRAs written as one of rank K·r with the same γ (alpha scaled by K)."""
    return {**spec, "rank": int(spec["rank"]) * k, "alpha": float(spec["alpha"]) * k}


def stack_topk(spec: dict, mus: np.ndarray, weights, k: int) -> np.ndarray:
    """Σ_k α_k γ B_k A_k as one LoRA of rank k·r in stacked_spec(spec, k)'s layout: per block and target the k A's
    stacked ([k·r, d]) and the α-weighted B's side by side ([d, k·r]); exactly the Top-K (ΔW) merge, and a
    plain LoRA to the visual graphs. Fewer than k experts: the missing ones are zeros (weight 0)."""
    d, r = int(spec["width"]), int(spec["rank"])
    mus = np.asarray(mus, dtype=np.float32).reshape(len(mus), -1)
    weights = np.asarray(weights, dtype=np.float32)
    if len(mus) > k or len(weights) != len(mus):
        raise InputError(f"stack_topk: {len(mus)} LoRAs with {len(weights)} weights for k={k}")
    n_pairs = len(blocks(spec)) * len(spec["targets"])
    if mus.shape[1] != n_pairs * 2 * r * d:
        raise InputError(f"LoRA vector has {mus.shape[1]} entries, the spec needs {n_pairs * 2 * r * d}")
    a = mus.reshape(len(mus), n_pairs, 2, r * d)
    a_k = np.zeros((n_pairs, k * r, d), np.float32)
    b_k = np.zeros((n_pairs, d, k * r), np.float32)
    for j, (vec, w) in enumerate(zip(a, weights)):
        a_k[:, j * r:(j + 1) * r] = vec[:, 0].reshape(n_pairs, r, d)
        b_k[:, :, j * r:(j + 1) * r] = w * vec[:, 1].reshape(n_pairs, d, r)
    return np.concatenate([a_k.reshape(n_pairs, -1), b_k.reshape(n_pairs, -1)], 1).reshape(-1)


def save_lora(path: str | Path, loras: np.ndarray, backbone: str, spec: dict, meta: dict) -> None:
    """[S, P] LoRA vectors as the `lora` artifact (safetensors + JSON header, atomically): the one writer of that
    kind, used by the server's `generate` and the device's `run --save-lora` alike."""
    save_artifact(path, {"lora": np.atleast_2d(np.asarray(loras, dtype=np.float32))}, kind=LORA_KIND,
                  meta={"backbone": backbone, "lora_spec": spec, **meta})
