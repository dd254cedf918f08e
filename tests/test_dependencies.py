"""open_clip internals the LoRA code relies on, and the version bound in pyproject.toml that guards them."""

import tomllib
from importlib.metadata import version
from pathlib import Path

import open_clip
import torch
from packaging.requirements import Requirement

from sglora_edge.backbone import create_backbone

ROOT = Path(__file__).resolve().parents[1]


def requirement(name: str) -> Requirement:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return next(Requirement(r) for reqs in extras.values() for r in reqs if Requirement(r).name == name)


def test_installed_open_clip_satisfies_the_bound():
    req = requirement("open_clip_torch")
    assert any(s.operator == "<" for s in req.specifier), "open_clip_torch needs an upper bound"
    assert req.specifier.contains(version("open_clip_torch")), (version("open_clip_torch"), str(req.specifier))


def test_the_private_open_clip_parts_we_use_exist():
    visual = create_backbone("open_clip:sglora-micro@random").visual
    for name in ("_embeds", "_pool"):  # lora.visual_prefix / visual_suffix
        assert callable(getattr(visual, name, None)), name
    for block in visual.transformer.resblocks:  # lora._block_forward adds ΔW to the fused q/k/v weight
        assert isinstance(block.attn, torch.nn.MultiheadAttention)
        assert block.attn.in_proj_weight.shape == (3 * visual.transformer.width, visual.transformer.width)
    assert callable(open_clip.tokenizer._clean_lower)  # export.bundle.clip_text_settings
