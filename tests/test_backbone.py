import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sglora_edge.backbone import BackboneError, create_backbone, parse_spec


def test_vit_b16_random_weights_round_trip_through_a_local_file(tmp_path):
    src = create_backbone("open_clip:ViT-B-16@random", seed=3)
    path = tmp_path / "vit_b16.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = create_backbone(f"open_clip:ViT-B-16@{path}")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = loaded.tokenizer(["a photo of a persian", "a dog"])
    with torch.no_grad():
        assert torch.equal(src.model.encode_image(x), loaded.model.encode_image(x))
        assert torch.equal(src.model.encode_text(tokens), loaded.model.encode_text(tokens))
    assert loaded.ident.startswith("open_clip:ViT-B-16@sha256:")
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_bad_specs_fail_fast_with_the_fix(tmp_path):
    with pytest.raises(BackboneError, match="open_clip:MODEL@WEIGHTS"):
        parse_spec("ViT-B-16")
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        parse_spec("open_clip:ViT-Q-99@openai")
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(f"open_clip:sglora-tiny@{tmp_path}/nothing.safetensors")
    # HF_HUB_OFFLINE=1 in the tests: no cache, no hub -> a message naming the local-file fix, at once
    with pytest.raises(BackboneError, match="pass the local file"):
        create_backbone("open_clip:ViT-B-16@openai")


def test_wrong_architecture_for_weights(tmp_path):
    src = create_backbone("open_clip:sglora-micro@random")
    path = tmp_path / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="does not fit"):
        create_backbone(f"open_clip:sglora-tiny@{path}")


def test_pretrain_loss_falls_and_backbone_loads(micro_world, tmp_path):
    from sglora_edge.backbone.pretrain import pretrain
    out = tmp_path / "bb"
    report = pretrain(micro_world, out, config="sglora-micro", epochs=40, batch_size=64, lr=2e-3, progress=False)
    losses = [loss for _, loss in report["history"]]
    assert losses[-1] < 0.7 * losses[0]
    bb = create_backbone(str(out))  # a pretrain folder is a spec too
    assert bb.model_name == "sglora-micro" and bb.ident.startswith("open_clip:sglora-micro@sha256:")
    assert not (out / "checkpoint.safetensors").exists()  # a finished run leaves no checkpoint


def test_interrupted_pretrain_resumes_to_the_same_weights(micro_world, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from sglora_edge.backbone import pretrain as module
    settings = dict(config="sglora-micro", epochs=6, batch_size=64, lr=2e-3, progress=False, checkpoint_every=4)
    module.pretrain(micro_world, tmp_path / "full", **settings)
    real_save = module.save_artifact

    def save_then_crash(path, tensors, kind, meta):
        real_save(path, tensors, kind, meta)
        if kind == "pretrain-checkpoint":
            raise KeyboardInterrupt("simulated interruption after the first checkpoint")

    monkeypatch.setattr(module, "save_artifact", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        module.pretrain(micro_world, tmp_path / "resumed", **settings)
    assert (tmp_path / "resumed" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "resumed" / "backbone.safetensors").exists()
    monkeypatch.setattr(module, "save_artifact", real_save)
    module.pretrain(micro_world, tmp_path / "resumed", **settings)
    full = load_file(str(tmp_path / "full" / "backbone.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "backbone.safetensors"))
    assert full.keys() == resumed.keys()
    assert all(np.array_equal(full[k], resumed[k]) for k in full)
