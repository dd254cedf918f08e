"""One factory for CLIP backbones, named by a spec string.

    open_clip:ViT-B-16@openai                      the real one (open_clip pretrained tag; needs the hub or its cache)
    open_clip:ViT-B-16@/path/ckpt.safetensors      local weights (any open_clip state dict)
    open_clip:sglora-tiny@runs/backbone            a folder written by `sglora-edge pretrain`
    open_clip:sglora-tiny@random                   random weights (seeded; tests and pretraining)

Tiny architectures ship as open_clip JSON configs in `model_configs/` and are
registered with open_clip on import, so every backbone goes through
`open_clip.create_model`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import open_clip
import torch
from PIL import Image

from runtime.bundle import sha256_file

from runtime.artifacts import check_meta, read_meta

from ..errors import SGLoRAError

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
BACKBONE_FILE = "backbone.safetensors"
open_clip.add_model_config(CONFIG_DIR)


class BackboneError(SGLoRAError):
    """A backbone spec that cannot be parsed, found or loaded."""


@dataclass
class Backbone:
    model: torch.nn.Module
    model_name: str
    ident: str  # stable identity recorded in every artifact built on this backbone
    spec: str

    @cached_property
    def tokenizer(self):
        return open_clip.get_tokenizer(self.model_name)

    @cached_property
    def preprocess(self):
        return open_clip.image_transform(self.model.visual.image_size, is_train=False,
                                         mean=getattr(self.model.visual, "image_mean", None),
                                         std=getattr(self.model.visual, "image_std", None))

    @property
    def visual(self):
        return self.model.visual

    def load_images(self, paths: list[Path]) -> torch.Tensor:
        """Decode and preprocess images once; callers keep the tensor."""
        out = []
        for p in paths:
            with Image.open(p) as im:
                out.append(self.preprocess(im.convert("RGB")))
        return torch.stack(out) if out else torch.empty(0)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 512) -> torch.Tensor:
        self.model.eval()
        device = self.model.logit_scale.device  # a GPU worker moves its backbone there (experts.run_task)
        feats = [self.model.encode_text(self.tokenizer(texts[i:i + batch_size]).to(device), normalize=True)
                 for i in range(0, len(texts), batch_size)]
        return torch.cat(feats) if feats else torch.empty(0)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        self.model.eval()
        feats = [self.model.encode_image(images[i:i + batch_size], normalize=True)
                 for i in range(0, len(images), batch_size)]
        return torch.cat(feats) if feats else torch.empty(0)


def file_digest(path: Path, n: int = 16) -> str:
    return sha256_file(path)[:n]


def parse_spec(spec: str) -> tuple[str, str]:
    """'open_clip:NAME@WEIGHTS' -> (NAME, WEIGHTS)."""
    head, sep, rest = spec.partition(":")
    if not sep or head != "open_clip" or "@" not in rest:
        raise BackboneError(f"backbone spec {spec!r} is not of the form 'open_clip:MODEL@WEIGHTS' "
                            f"(e.g. open_clip:ViT-B-16@openai, open_clip:ViT-B-16@/path/ckpt.safetensors, "
                            f"open_clip:sglora-tiny@runs/backbone)")
    name, _, weights = rest.partition("@")
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip model {name!r} in {spec!r}; tiny models shipped here: "
                            f"{', '.join(TINY_MODELS)}")
    return name, weights


def _is_path(weights: str) -> bool:
    return "/" in weights or weights.endswith((".safetensors", ".pt", ".bin", ".pth")) or Path(weights).exists()


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_pretrained_available(name: str, tag: str, spec: str) -> None:
    """Fail in seconds, not after a minute of hub retries, when weights cannot be had."""
    if tag not in open_clip.list_pretrained_tags_by_model(name):
        raise BackboneError(f"{spec!r}: open_clip has no pretrained tag {tag!r} for {name}; known tags: "
                            f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}")
    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        repo, filename = os.path.split(hub.rstrip("/"))[0], os.path.split(hub)[1] or "open_clip_pytorch_model.bin"
        names = [filename, filename.rsplit(".", 1)[0] + ".safetensors", "open_clip_model.safetensors"]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in names):
            return
    if not _hub_reachable():
        raise BackboneError(
            f"{spec!r}: the pretrained weights are not cached and the model hub cannot be reached from here. "
            f"Download them where the internet is reachable and pass the local file instead: "
            f"--backbone open_clip:{name}@/path/to/open_clip_model.safetensors")


def create_backbone(spec: str, seed: int = 0) -> Backbone:
    """Build the CLIP model named by `spec`, frozen and in eval mode.

    Args:
        spec: `open_clip:MODEL@WEIGHTS`, or a folder written by `sglora-edge pretrain`. WEIGHTS is
            `random` (seeded weights), a local checkpoint (`.safetensors`, or `.pt`/`.pth`/`.bin`
            loaded with weights_only), a `pretrain` output folder, or an open_clip pretrained tag
            such as `openai` (from the model hub or its local cache).
        seed: torch seed of the weights when WEIGHTS is `random`; ignored otherwise.

    Returns:
        The Backbone: model, tokenizer and preprocessing, and `ident`, the identity recorded in every
        artifact built on it (the model name with the sha256 of a local file, the tag, or the seed).

    Raises:
        BackboneError: the spec cannot be parsed, names a model open_clip does not know, names a
            weights file that is missing or does not fit the model, or a pretrained tag whose
            weights are neither cached nor downloadable from here.
        ArtifactError: a weights file written by sglora-edge is of another kind or format version.
    """
    spec = resolve_spec(str(spec))
    name, weights = parse_spec(spec)
    if weights == "random":
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
        ident = f"open_clip:{name}@random-seed{seed}"
    elif _is_path(weights):
        path = Path(weights)
        if path.is_dir():
            path = path / BACKBONE_FILE
        if not path.is_file():
            raise BackboneError(f"{spec!r}: weights file {path} not found (train one with `sglora-edge pretrain`, "
                                f"or pass a local open_clip checkpoint)")
        if path.suffix == ".safetensors":
            try:
                meta = read_meta(path)
            except ValueError:
                meta = None  # a plain open_clip safetensors checkpoint without our metadata
            if meta is not None:
                check_meta(path, meta, kind="backbone")
                if meta.get("model_name") != name:
                    raise BackboneError(f"{path} holds a {meta.get('model_name')!r} backbone, not {name!r}; "
                                        f"use --backbone open_clip:{meta.get('model_name')}@{weights}")
        elif path.suffix not in (".pt", ".pth", ".bin"):
            raise BackboneError(f"{path}: unknown checkpoint type (use .safetensors)")
        try:
            model = open_clip.create_model(name, pretrained=str(path), weights_only=True)
        except (RuntimeError, AssertionError, KeyError, ValueError) as e:  # open_clip raises all of these on a mismatch
            raise BackboneError(f"{path}: does not fit open_clip model {name!r} "
                                f"({(str(e).splitlines() or [type(e).__name__])[0]})") from e
        ident = f"open_clip:{name}@sha256:{file_digest(path)}"
    else:
        _check_pretrained_available(name, weights, spec)
        model = open_clip.create_model(name, pretrained=weights)
        ident = f"open_clip:{name}@{weights}"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(model=model, model_name=name, ident=ident, spec=spec)


def backbone_from_folder(folder: str | Path) -> str:
    """The spec of a folder written by `sglora-edge pretrain`."""
    path = Path(folder) / BACKBONE_FILE
    meta = read_meta(path)
    return f"open_clip:{meta['model_name']}@{Path(folder)}"


def resolve_spec(spec: str) -> str:
    """Accept a pretrain output folder as a spec too."""
    if not spec.startswith("open_clip:") and (Path(spec) / BACKBONE_FILE).is_file():
        return backbone_from_folder(spec)
    return spec


__all__ = ["Backbone", "BackboneError", "TINY_MODELS", "create_backbone", "parse_spec", "resolve_spec"]
