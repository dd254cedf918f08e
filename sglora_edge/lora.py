"""LoRA on the q/k/v projections of an open_clip visual transformer.

open_clip keeps q, k, v fused in `nn.MultiheadAttention.in_proj_weight` ([3d, d],
rows q | k | v). A LoRA adds, for each adapted block and target t,

    W_t += gamma * B_t @ A_t        A_t: [r, d], B_t: [d, r], gamma = alpha / r

Flat vector layout (documented, stable; `LoRASpec.layout()` lists it):
    for block in adapted blocks (ascending):
        for target in targets (q, k, v order):
            A (r*d, row-major), then B (d*r, row-major)

LoRA files (`load_lora`; runtime.lora.save_lora writes them: [S, P] vectors with their spec and backbone) and merged
checkpoints (a plain open_clip state dict with the LoRA folded into W_qkv) are written here too.

The visual forward here is functional: it takes per-block weight deltas as
arguments instead of mutating the model, so the same code trains LoRAs, runs
dense ΔW merges, caches activations before the first adapted block, and exports
to ONNX with the LoRA as an input.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.artifacts import atomic_path, load_artifact
from runtime.lora import LORA_KIND

from .backbone import Backbone, BackboneError
from .config import TARGETS, LoRASpec
from .errors import SGLoRAError



def a_mask(spec: LoRASpec) -> torch.Tensor:
    """Boolean mask over the flat vector: True where an entry belongs to an A matrix."""
    mask = torch.zeros(spec.size, dtype=torch.bool)
    for _, _, which, lo, hi in spec.layout():
        mask[lo:hi] = which == "A"
    return mask


def init_vector(spec: LoRASpec) -> torch.Tensor:
    """Shared start: A ~ kaiming-uniform (seeded by spec.a_seed, as peft does), B = 0, so ΔW starts at 0."""
    g = torch.Generator().manual_seed(spec.a_seed)
    vec = torch.zeros(spec.size)
    bound = 1.0 / math.sqrt(spec.width)  # kaiming_uniform(a=sqrt(5)) on an [r, d] matrix
    for _, _, which, lo, hi in spec.layout():
        if which == "A":
            vec[lo:hi] = (torch.rand(hi - lo, generator=g) * 2 - 1) * bound
    return vec


def factors(spec: LoRASpec, vec: torch.Tensor) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Flat vector -> {block: {target: (A [r,d], B [d,r])}} (views, differentiable)."""
    if vec.shape[-1] != spec.size:
        raise SGLoRAError(f"LoRA vector has {vec.shape[-1]} entries, the spec needs {spec.size}")
    out: dict = {}
    r, d = spec.rank, spec.width
    for b, t, which, lo, hi in spec.layout():
        m = vec[lo:hi].reshape((r, d) if which == "A" else (d, r))
        out.setdefault(b, {}).setdefault(t, [None, None])[0 if which == "A" else 1] = m
    return {b: {t: tuple(ab) for t, ab in ts.items()} for b, ts in out.items()}


def vector_from_factors(spec: LoRASpec, fac: dict) -> torch.Tensor:
    return torch.cat([fac[b][t][0 if w == "A" else 1].reshape(-1) for b, t, w, _, _ in spec.layout()])


def delta_weights(spec: LoRASpec, vec: torch.Tensor) -> dict[int, torch.Tensor]:
    """Flat vector -> {block: ΔW_qkv [3d, d]} with gamma * B @ A in the rows of each target."""
    d = spec.width
    out = {}
    for b, ts in factors(spec, vec).items():
        rows = []
        for t in TARGETS:
            if t in ts:
                a, bm = ts[t]
                rows.append(spec.scale * bm @ a)
            else:
                rows.append(vec.new_zeros(d, d))
        out[b] = torch.cat(rows, 0)
    return out


def low_rank(spec: LoRASpec, vec: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Flat vector -> {block: (A [T·r, d], B [3d, T·r])} with B @ A == delta_weights(spec, vec)[block]: the targets'
    A stacked, their γ·B block-diagonal in the q/k/v rows, so h·Aᵀ·Bᵀ adds the LoRA without forming ΔW."""
    d, r = spec.width, spec.rank
    out = {}
    for b, ts in factors(spec, vec).items():
        a = torch.cat([ts[t][0] for t in spec.targets], 0)
        cols = [torch.cat([spec.scale * ts[t][1] if u == t else vec.new_zeros(d, r) for u in TARGETS], 0)
                for t in spec.targets]
        out[b] = (a, torch.cat(cols, 1))
    return out


def average_delta_weights(spec: LoRASpec, vectors: torch.Tensor, weights: torch.Tensor) -> dict[int, torch.Tensor]:
    """Exact merge in ΔW space: Σ_k w_k γ B_k A_k (not a rank-r LoRA in general)."""
    total: dict[int, torch.Tensor] = {}
    for w, v in zip(weights.tolist(), vectors):
        for b, dw in delta_weights(spec, v).items():
            total[b] = total.get(b, 0) + w * dw
    return total


Delta = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # ΔW_qkv [3d, d], or low_rank()'s (A, B)


def _block_forward(block, x: torch.Tensor, delta: Delta | None) -> torch.Tensor:
    """open_clip ResidualAttentionBlock.forward with W_qkv + delta, batch-first [N, L, D]. A low-rank delta (A, B)
    runs as a side path, h·Wᵀ + (h·Aᵀ)·Bᵀ, leaving W constant."""
    attn = block.attn
    h = block.ln_1(x)
    if isinstance(delta, tuple):
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias) + (h @ delta[0].T) @ delta[1].T
    else:
        weight = attn.in_proj_weight if delta is None else attn.in_proj_weight + delta
        qkv = F.linear(h, weight, attn.in_proj_bias)
    n, length, width = h.shape
    heads = attn.num_heads
    q, k, v = qkv.reshape(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v)
    o = o.transpose(1, 2).reshape(n, length, width)
    x = x + block.ls_1(attn.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _check_visual(visual) -> None:
    if not hasattr(visual, "transformer") or not getattr(visual.transformer, "batch_first", False):
        raise BackboneError("LoRA injection supports open_clip VisionTransformer backbones (batch-first); "
                            f"got {type(visual).__name__}")
    if visual.attn_pool is not None or getattr(visual, "final_ln_after_pool", False):
        raise BackboneError("LoRA injection does not support attention-pooled vision towers")


def visual_prefix(visual, images: torch.Tensor, first_block: int) -> torch.Tensor:
    """Activations entering block `first_block` (cacheable: they do not depend on the LoRA)."""
    _check_visual(visual)
    x = visual._embeds(images)
    for block in visual.transformer.resblocks[:first_block]:
        x = block(x)
    return x


def visual_suffix(visual, x: torch.Tensor, first_block: int, deltas: dict[int, Delta] | None) -> torch.Tensor:
    """Blocks first_block.. with deltas, then pooling and projection: unnormalised image features."""
    for i, block in enumerate(visual.transformer.resblocks):
        if i >= first_block:
            x = _block_forward(block, x, (deltas or {}).get(i))
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def encode_images(visual, images: torch.Tensor, deltas: dict[int, torch.Tensor] | None = None,
                  normalize: bool = True) -> torch.Tensor:
    """Image features with per-block q/k/v weight deltas applied (None = the frozen backbone)."""
    first = min(deltas) if deltas else len(visual.transformer.resblocks)
    feats = visual_suffix(visual, visual_prefix(visual, images, first), first, deltas)
    return F.normalize(feats, dim=-1) if normalize else feats


@torch.no_grad()
def merge(visual, spec: LoRASpec, vec: torch.Tensor, sign: float = 1.0) -> None:
    """W_qkv += gamma * B @ A in place (sign=-1 unmerges)."""
    for b, dw in delta_weights(spec, vec).items():
        visual.transformer.resblocks[b].attn.in_proj_weight.add_(sign * dw)


def unmerge(visual, spec: LoRASpec, vec: torch.Tensor) -> None:
    merge(visual, spec, vec, sign=-1.0)


def load_lora(path: str | Path, backbone: str | None = None, spec: LoRASpec | None = None) -> tuple[np.ndarray, dict]:
    """([S, P] vectors, metadata), checked against the backbone and spec in use when given."""
    t, meta = load_artifact(path, kind=LORA_KIND, backbone=backbone, lora_spec=spec.to_dict() if spec else None)
    return t["lora"], meta


def merged_state_dict(backbone: Backbone, spec: LoRASpec, vector: np.ndarray) -> dict[str, torch.Tensor]:
    """The full open_clip state dict with the LoRA merged into W_qkv (loadable by plain open_clip)."""
    state = {k: v.detach().clone().contiguous() for k, v in backbone.model.state_dict().items()}
    for b, dw in delta_weights(spec, torch.from_numpy(np.asarray(vector, dtype=np.float32))).items():
        state[f"visual.transformer.resblocks.{b}.attn.in_proj_weight"] += dw
    return state


def save_merged_checkpoint(path: str | Path, backbone: Backbone, spec: LoRASpec, vector: np.ndarray) -> None:
    """Write `merged_state_dict` as plain safetensors (no sglora metadata): `open_clip.create_model(name,
    pretrained=path)` loads it without this package."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file(merged_state_dict(backbone, spec, vector), str(tmp))
