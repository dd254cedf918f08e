"""torch -> ONNX: one export declaration per graph (inputs, outputs, dynamic axes), optimum-style.

Every graph wraps the same functional code the server uses (`sglora_edge.lora`,
`SemanticCVAE`), so the LoRA vector is an ONNX input rather than baked-in weights.
`export_graph` writes the file, runs onnx.checker, and compares ONNX Runtime against
torch on inputs of another batch size than the example (exercising the dynamic axes);
a difference above `tolerance` raises ExportError.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sglora_edge.cvae import SemanticCVAE
from sglora_edge.errors import SGLoRAError
from sglora_edge.config import LoRASpec
from sglora_edge.lora import delta_weights, encode_images, low_rank, visual_prefix, visual_suffix

OPSET = 17  # the default ONNX opset of every exported graph
TOLERANCE = 1e-4


class ExportError(SGLoRAError):
    """An exported graph is invalid or does not reproduce its torch module."""


# ---- the graphs -------------------------------------------------------------------------------------------------

class TextEncoderGraph(nn.Module):
    """CLIP token ids int64 [N, ctx] -> unit-norm text features [N, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.encode_text(input_ids, normalize=True)


class SemanticEncoderGraph(nn.Module):
    """sentence-transformers' Transformer + mean Pooling + Normalize as one graph."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids, attention_mask):
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class GeneratorGraph(nn.Module):
    """SemanticCVAE.sample with the noise as an input: (mu [P], var [P], eps [S, Z]) -> LoRA vectors [S, P].
    eps = 0 decodes the prior mean (sample(use_mean=True))."""

    def __init__(self, cvae: SemanticCVAE):
        super().__init__()
        self.cvae = cvae

    def forward(self, mu, var, eps):
        return self.cvae.decode(mu, var, eps)


class VisualPrefixGraph(nn.Module):
    """pixels [N, 3, H, W] -> activations entering the first adapted block [N, L, W] (LoRA-independent: cacheable)."""

    def __init__(self, visual, first_block: int):
        super().__init__()
        self.visual, self.first_block = visual, first_block

    def forward(self, pixels):
        return visual_prefix(self.visual, pixels, self.first_block)


class VisualSuffixGraph(nn.Module):
    """(activations [N, L, W], lora [P]) -> unit-norm image features [N, D]: the adapted blocks, pool, projection.

    low_rank (the bundle's graph): h·Wᵀ + (h·Aᵀ)·Bᵀ with W a constant initializer that ONNX Runtime can pre-pack;
    False forms W + γ·B·A on every call (kept for the parity test)."""

    def __init__(self, visual, spec: LoRASpec, low_rank: bool = True):
        super().__init__()
        self.visual, self.spec, self.low_rank = visual, spec, low_rank

    def forward(self, activations, lora):
        deltas = (low_rank if self.low_rank else delta_weights)(self.spec, lora)
        return F.normalize(visual_suffix(self.visual, activations, self.spec.blocks[0], deltas), dim=-1)


class VisualSuffixBakedGraph(nn.Module):
    """activations [N, L, W] -> unit-norm image features [N, D] with one LoRA baked in (`export --merge-desc`):
    W_qkv + γ·B·A is constant-folded into one initializer per adapted block."""

    def __init__(self, visual, spec: LoRASpec, lora: torch.Tensor):
        super().__init__()
        self.visual, self.spec = visual, spec
        self.deltas = {b: dw.detach() for b, dw in delta_weights(spec, lora).items()}

    def forward(self, activations):
        return F.normalize(visual_suffix(self.visual, activations, self.spec.blocks[0], self.deltas), dim=-1)


class VisualSuffixMergedGraph(nn.Module):
    """activations [N, L, W] -> unit-norm image features [N, D] on the backbone's own weights. Exported without
    constant folding so the adapted blocks' W_qkv stay named initializers (`expose_merged_initializers`): the
    runtime overrides them with (W + γ·B·A)ᵀ per LoRA."""

    def __init__(self, visual, spec: LoRASpec):
        super().__init__()
        self.visual, self.spec = visual, spec

    def forward(self, activations):
        return F.normalize(visual_suffix(self.visual, activations, self.spec.blocks[0], None), dim=-1)


# ---- declarations and export ------------------------------------------------------------------------------------

@dataclass
class GraphExport:
    """What to export and how to check it: `inputs` trace the graph; each check is (inputs, expected output),
    expected None meaning the torch module's own output. Checks use other batch sizes (the dynamic axes)."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    checks: list[tuple[dict[str, torch.Tensor], np.ndarray | None]] = field(default_factory=list)
    fold_constants: bool = True  # False keeps parameters as named initializers (the merged graph overrides them)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def export_graph(decl: GraphExport, out_dir: Path, opset: int = OPSET, tolerance: float = TOLERANCE) -> float:
    """Write `decl` to out_dir/<name>.onnx, check it, and return the max abs difference ONNX Runtime vs torch."""
    import onnx
    import onnxruntime as ort

    path = Path(out_dir) / decl.file
    decl.module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused eval kernel has no ONNX export
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            # dynamo=False: the TorchScript exporter handles these graphs (and open_clip's towers) reliably
            torch.onnx.export(decl.module, tuple(decl.inputs.values()), str(path), input_names=list(decl.inputs),
                              output_names=decl.outputs, dynamic_axes=decl.dynamic_axes, opset_version=opset,
                              do_constant_folding=decl.fold_constants, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - the checker raises several types
        raise ExportError(f"{decl.file}: the exported graph does not pass onnx.checker ({e})") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feed, expected in [(decl.inputs, None), *decl.checks]:
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        if expected is None:
            with torch.no_grad():
                expected = decl.module(*feed.values()).numpy()
        if got.shape != expected.shape:
            raise ExportError(f"{decl.file}: ONNX Runtime returned shape {got.shape}, torch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst < tolerance:
        raise ExportError(f"{decl.file}: ONNX Runtime differs from torch by {worst:.2e} (tolerance {tolerance:.0e})")
    return worst


FP16_MIN_COSINE = 0.999  # an fp16 graph's outputs, row by row (flattened), against the fp32 graph's


def fp16_variant(decl: GraphExport, out_dir: Path) -> float:
    """Write <name>.fp16.onnx beside the fp32 graph: weights and arithmetic in fp16, inputs and outputs kept fp32
    (Casts at the edges), which is what TensorRT 11's strongly typed builds take their precision from. Returns the
    smallest cosine similarity of an output row to the fp32 graph's on the export checks; below FP16_MIN_COSINE
    raises ExportError."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16  # ships with every onnxruntime wheel
    from onnxruntime.transformers.onnx_model import OnnxModel

    src, dst = Path(out_dir) / decl.file, Path(out_dir) / f"{decl.name}.fp16.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values clipped to the fp16 range are reported by the check below
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    OnnxModel(model).topological_sort()  # the converter appends the input Casts last; TensorRT parses in order
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    sessions = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in (src, dst)]
    worst = 1.0
    for feed, _ in [(decl.inputs, None), *decl.checks]:
        want, got = (s.run(None, {k: v.numpy() for k, v in feed.items()})[0].reshape(len(feed[next(iter(feed))]), -1)
                     for s in sessions)
        cos = (want * got).sum(1) / np.maximum(np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1), 1e-12)
        worst = min(worst, float(cos.min()))
    if not worst > FP16_MIN_COSINE:
        raise ExportError(f"{dst.name}: fp16 outputs have cosine {worst:.5f} to fp32 (needs > {FP16_MIN_COSINE}); "
                          f"export without --fp16")
    return worst


BATCH = {0: "batch"}


def text_encoder_export(model, tokenizer) -> GraphExport:
    example = tokenizer(["a photo of a cat", "x"])
    check = tokenizer(["a sketch of an apple", "two dogs, 3 cats and a bird's nest", "a" * 200])
    return GraphExport("text_encoder", TextEncoderGraph(model), {"input_ids": example}, ["features"],
                       {"input_ids": BATCH, "features": BATCH}, [({"input_ids": check}, None)])


def semantic_encoder_export(st_model, tokenizer_file: Path, max_length: int) -> GraphExport:
    """MiniLM from a SentenceTransformer, checked against sentence-transformers' own encode() after tokenizing
    the way the runtime does (`tokenizers` with the bundle's tokenizer.json)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")

    def feed(texts):
        enc = tok.encode_batch(texts)
        return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.int64),
                "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)}

    texts = ["a photo of a persian", "x", "Sunflowers, tulips & 3 roses: a sketch!", "lemon " * 300]
    expected = st_model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    dyn = {0: "batch", 1: "sequence"}
    return GraphExport("semantic_encoder", SemanticEncoderGraph(st_model[0].auto_model),
                       feed(["a photo of a cat", "a sketch of an owl"]), ["embeddings"],
                       {"input_ids": dyn, "attention_mask": dyn, "embeddings": BATCH}, [(feed(texts), expected)])


def generator_export(cvae: SemanticCVAE, mu: np.ndarray, var: np.ndarray) -> GraphExport:
    """Checked against SemanticCVAE.sample itself: the prior mean, and noise drawn the way sample() draws it."""
    z = cvae.cfg.latent
    mu_t, var_t = torch.from_numpy(mu), torch.from_numpy(var)
    noise = torch.randn((3, z), generator=torch.Generator().manual_seed(7))  # what sample(n=3, seed 7) draws
    cvae.eval()
    return GraphExport("generator", GeneratorGraph(cvae), {"mu": mu_t, "var": var_t, "eps": torch.zeros(2, z)},
                       ["lora"], {"eps": {0: "samples"}, "lora": {0: "samples"}},
                       [({"mu": mu_t, "var": var_t, "eps": torch.zeros(1, z)},
                         cvae.sample(mu_t, var_t, 1, use_mean=True).numpy()),
                        ({"mu": mu_t, "var": var_t, "eps": noise},
                         cvae.sample(mu_t, var_t, 3, torch.Generator().manual_seed(7)).numpy())])


def visual_exports(visual, spec: LoRASpec, image_size: tuple[int, int], lora: np.ndarray,
                   bake: np.ndarray | None = None) -> list[GraphExport]:
    """The prefix, then the input and merged suffixes, or (bake: a LoRA vector) only the suffix with that LoRA
    baked in. Every suffix is also checked end to end against encode_images (the server's path)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, *image_size, generator=g)
    check_pixels = torch.randn(3, 3, *image_size, generator=g)
    first = spec.blocks[0]
    prefix = VisualPrefixGraph(visual, first)
    lora_t = torch.from_numpy(np.asarray(lora, dtype=np.float32))
    strong = lora_t + 0.05 * torch.randn(spec.size, generator=g)  # far from any expert, so the deltas matter
    with torch.no_grad():
        acts, check_acts = prefix(pixels), prefix(check_pixels)
    io = {"activations": BATCH, "features": BATCH}
    decls = [GraphExport("visual_prefix", prefix, {"pixels": pixels}, ["activations"],
                         {"pixels": BATCH, "activations": BATCH}, [({"pixels": check_pixels}, None)])]
    if bake is not None:
        baked = torch.from_numpy(np.asarray(bake, dtype=np.float32))
        with torch.no_grad():
            full = encode_images(visual, check_pixels, delta_weights(spec, baked)).numpy()
        return decls + [GraphExport("visual_suffix_baked", VisualSuffixBakedGraph(visual, spec, baked),
                                    {"activations": acts}, ["features"], io, [({"activations": check_acts}, full)])]
    with torch.no_grad():
        full = encode_images(visual, check_pixels, delta_weights(spec, strong)).numpy()
    return decls + [
        GraphExport("visual_suffix", VisualSuffixGraph(visual, spec), {"activations": acts, "lora": lora_t},
                    ["features"], io, [({"activations": check_acts, "lora": strong}, full),
                                       ({"activations": check_acts[:1], "lora": lora_t}, None)]),
        GraphExport("visual_suffix_merged", VisualSuffixMergedGraph(visual, spec), {"activations": acts},
                    ["features"], io, [({"activations": check_acts}, None)], fold_constants=False),
    ]


def expose_merged_initializers(path: Path, spec: LoRASpec) -> dict[str, str]:
    """Rewrite the merged graph so each adapted block's W_qkv is an initializer `qkv_t.<block>` holding Wᵀ [d, 3d]
    that feeds its MatMul directly; returns {block: name}. ONNX Runtime constant-folds Transpose(W) before it
    applies SessionOptions.add_initializer, so an override of W itself would be silently ignored."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(path))
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inits = {t.name: t for t in model.graph.initializer}
    names = {}
    for b in spec.blocks:
        weight = f"visual.transformer.resblocks.{b}.attn.in_proj_weight"
        users = [n for n in model.graph.node if weight in n.input]
        if weight not in inits or len(users) != 1 or users[0].op_type != "Transpose":
            raise ExportError(f"{path.name}: W_qkv of block {b} is not one Transpose'd initializer "
                              f"({[n.op_type for n in users]}); the merged graph cannot take a LoRA")
        new = f"qkv_t.{b}"
        model.graph.initializer.remove(inits[weight])
        model.graph.initializer.append(numpy_helper.from_array(
            np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), new))
        for node in model.graph.node:
            node.input[:] = [new if i == users[0].output[0] else i for i in node.input]
        model.graph.node.remove(users[0])
        names[str(b)] = new
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = [dim.dim_value or 2 for dim in model.graph.input[0].type.tensor_type.shape.dim]  # batch 2
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feed = {model.graph.input[0].name: x}
    if not np.abs(before.run(None, feed)[0] - after.run(None, feed)[0]).max() < 1e-6:
        raise ExportError(f"{path.name}: rewriting the W_qkv initializers changed the graph's output")
    onnx.save(model, str(path))
    return names


def qkv_weights(visual, spec: LoRASpec) -> dict[str, np.ndarray]:
    """{block: W_qkv} of the adapted blocks: what the runtime adds γ·B·A to in merged mode."""
    return {str(b): visual.transformer.resblocks[b].attn.in_proj_weight.detach().numpy().astype(np.float32).copy()
            for b in spec.blocks}
