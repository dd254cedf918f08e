import numpy as np
import open_clip
import pytest
import torch

from sglora_edge import lora as L
from sglora_edge.backbone import create_backbone
from sglora_edge.config import LoRASpec


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("open_clip:sglora-tiny@random", seed=1)


def random_vector(spec, seed=0, scale=0.05):
    return L.init_vector(spec) + scale * torch.randn(spec.size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs", [{}, {"targets": ("q", "v")}, {"last_blocks": 2, "rank": 4}])
def test_merged_forward_equals_lora_forward_tiny(tiny, kwargs):
    spec = LoRASpec.for_visual(tiny.visual, **kwargs)
    vec = random_vector(spec)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = L.encode_images(tiny.visual, x, L.delta_weights(spec, vec))
        L.merge(tiny.visual, spec, vec)
        try:
            merged = tiny.model.encode_image(x, normalize=True)
        finally:
            L.unmerge(tiny.visual, spec, vec)
        restored = tiny.model.encode_image(x, normalize=True)
        plain = L.encode_images(tiny.visual, x)
    assert torch.allclose(ours, merged, atol=1e-5)
    assert torch.allclose(restored, plain, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the LoRA does change the features


def test_merged_forward_equals_lora_forward_vit_b16():
    bb = create_backbone("open_clip:ViT-B-16@random", seed=0)
    spec = LoRASpec.for_visual(bb.visual)
    assert spec.size == 110_592  # 12 blocks x 3 targets x 2 x (2 x 768), as in DESIGN.md
    vec = random_vector(spec, scale=0.02)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = L.encode_images(bb.visual, x, L.delta_weights(spec, vec))
        L.merge(bb.visual, spec, vec)
        merged = bb.model.encode_image(x, normalize=True)
    assert torch.allclose(ours, merged, atol=1e-4)


def test_vector_round_trip_and_layout(tiny):
    spec = LoRASpec.for_visual(tiny.visual, targets=("k", "v"), last_blocks=3)
    vec = torch.randn(spec.size)
    fac = L.factors(spec, vec)
    assert sorted(fac) == [1, 2, 3] and sorted(fac[1]) == ["k", "v"]
    a, b = fac[1]["k"]
    assert a.shape == (spec.rank, spec.width) and b.shape == (spec.width, spec.rank)
    assert torch.equal(L.vector_from_factors(spec, fac), vec)
    # block-major, then targets, then A before B
    assert torch.equal(a.reshape(-1), vec[:spec.rank * spec.width])
    assert spec.layout()[0][:3] == (1, "k", "A") and spec.layout()[1][:3] == (1, "k", "B")
    assert L.a_mask(spec).sum().item() == spec.size // 2


def test_delta_weights_place_gamma_BA_in_target_rows(tiny):
    spec = LoRASpec.for_visual(tiny.visual, targets=("v",), alpha=4.0)
    vec = torch.randn(spec.size)
    d = spec.width
    for blk, dw in L.delta_weights(spec, vec).items():
        a, b = L.factors(spec, vec)[blk]["v"]
        assert torch.equal(dw[:2 * d], torch.zeros(2 * d, d))
        assert torch.allclose(dw[2 * d:], 2.0 * b @ a)


def test_init_is_shared_and_starts_at_zero_delta(tiny):
    spec = LoRASpec.for_visual(tiny.visual)
    v1, v2 = L.init_vector(spec), L.init_vector(spec)
    assert torch.equal(v1, v2)
    assert all(torch.count_nonzero(dw) == 0 for dw in L.delta_weights(spec, v1).values())
    assert not torch.equal(v1, L.init_vector(LoRASpec.for_visual(tiny.visual, a_seed=1)))


def test_spec_validation(tiny):
    with pytest.raises(ValueError, match="subset of q, k, v"):
        LoRASpec.for_visual(tiny.visual, targets=("v", "q"))
    with pytest.raises(ValueError, match="last_blocks"):
        LoRASpec.for_visual(tiny.visual, last_blocks=99)
    spec = LoRASpec.for_visual(tiny.visual, last_blocks=2)
    assert LoRASpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="entries"):
        L.delta_weights(spec, torch.zeros(spec.size + 1))


def test_merged_checkpoint_loads_in_plain_open_clip(tiny, tmp_path):
    spec = LoRASpec.for_visual(tiny.visual)
    vec = random_vector(spec)
    path = tmp_path / "merged.safetensors"
    L.save_merged_checkpoint(path, tiny, spec, vec.numpy())
    plain = open_clip.create_model("sglora-tiny", pretrained=str(path)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = L.encode_images(tiny.visual, x, L.delta_weights(spec, vec))
        theirs = plain.encode_image(x, normalize=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_stacked_topk_lora_is_the_server_delta_w_merge():
    """The device's rank-K·r LoRA (runtime.lora.stack_topk) equals Σ α_k γ B_k A_k, the Top-K (ΔW) merge."""
    from runtime.lora import delta_weights as np_delta_weights, stack_topk, stacked_spec
    from sglora_edge.lora import average_delta_weights
    spec = LoRASpec(n_blocks=3, width=8, rank=2, targets=("q", "v"), last_blocks=2)
    rng = np.random.default_rng(0)
    mus = rng.normal(size=(3, spec.size)).astype(np.float32)
    weights = np.array([0.5, 0.3, 0.2], dtype=np.float32)
    merged = average_delta_weights(spec, torch.from_numpy(mus), torch.from_numpy(weights))
    for k, used in ((3, 3), (4, 3)):  # k above the experts used: zero-padded
        sspec = stacked_spec(spec.to_dict(), k)
        vec = stack_topk(spec.to_dict(), mus[:used], weights[:used], k)
        assert vec.size == LoRASpec.from_dict(sspec).size == k * spec.size
        dw = np_delta_weights(sspec, vec)
        assert set(dw) == set(merged)
        for b in merged:
            np.testing.assert_allclose(dw[b], merged[b].numpy(), atol=1e-5)
