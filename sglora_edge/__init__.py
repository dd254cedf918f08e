"""sglora-edge: semantic-guided LoRA generation (SG-LoRA) for CLIP visual encoders.

Server side (this package, torch + open_clip): backbones, LoRA, experts, library,
CVAE, generation, evaluation. Device side lives in the sibling `runtime` package.
"""

__version__ = "0.1.0"
