"""Micro end-to-end through the CLI: world -> backbone -> experts -> library -> CVAE -> generate."""

import json
import shutil

import numpy as np
import open_clip
import torch
from typer.testing import CliRunner

from sglora_edge.cli import app


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r.stdout


def test_micro_pipeline(micro_world, tmp_path):
    bb, ex = tmp_path / "backbone", tmp_path / "experts"
    cli("pretrain", "--data", micro_world, "--out", bb, "--config", "sglora-micro", "--epochs", 15,
        "--batch-size", 64, "--json")
    zs = json.loads(cli("eval", "zeroshot", "--data", micro_world, "--backbone", bb, "--role", "unseen", "--json"))
    assert set(zs["per_task"]) and 0 <= zs["mean"]["i2t"]["r1"] <= 100
    cli("train-experts", "--data", micro_world, "--backbone", bb, "--out", ex, "--epochs", 6, "--keep-last", 3, "--json")
    again = json.loads(cli("train-experts", "--data", micro_world, "--backbone", bb, "--out", ex, "--epochs", 6,
                           "--keep-last", 3, "--json"))  # resumes: every task already done
    assert len(again) == 18
    # two processes give the same LoRAs as one (each task is seeded on its own)
    par = tmp_path / "experts_parallel"
    cli("train-experts", "--data", micro_world, "--backbone", bb, "--out", par, "--epochs", 6, "--keep-last", 3,
        "--tasks", "apple,bus,saw sketch", "--jobs", 2, "--json")
    from sglora_edge.experts import load_checkpoints
    for task in ("apple", "bus", "saw sketch"):
        assert np.allclose(load_checkpoints(par, task), load_checkpoints(ex, task), atol=1e-5)
    lib = tmp_path / "library.safetensors"
    built = json.loads(cli("build-library", "--data", micro_world, "--backbone", bb, "--experts", ex, "--out", lib,
                           "--json"))
    assert built["info"]["semantic_reason"].startswith("tiny backbone")
    # remove an expert from a copy and add it back: the same statistics, now last
    edited, first = tmp_path / "edited.safetensors", built["experts"][0]
    shutil.copyfile(lib, edited)
    edit = ("build-library", "--data", micro_world, "--backbone", bb, "--experts", ex, "--out", edited, "--json")
    assert json.loads(cli(*edit, "--remove", first))["experts"] == built["experts"][1:]
    assert json.loads(cli(*edit, "--add", first))["experts"] == built["experts"][1:] + [first]
    from sglora_edge.library import Library
    before, after = Library.load(lib), Library.load(edited)
    assert np.array_equal(before.mu[0], after.mu[-1]) and np.allclose(before.embeddings[0], after.embeddings[-1])
    r = CliRunner().invoke(app, [str(a) for a in edit] + ["--add", "unicorn"])
    assert r.exit_code == 2 and "unknown task 'unicorn'" in r.output
    why = json.loads(cli("explain", "--library", lib, "--desc", "a photo of a lemon", "--k", 2, "--json"))
    assert len(why["experts"]) == 2 and abs(sum(why["weights"]) - 1) < 1e-6
    cvae = tmp_path / "cvae.safetensors"
    cli("train-cvae", "--data", micro_world, "--backbone", bb, "--experts", ex, "--library", lib, "--out", cvae,
        "--k", 2, "--epochs", 20, "--hidden", 64, "--json")
    out, merged = tmp_path / "lora.safetensors", tmp_path / "merged.safetensors"
    gen = json.loads(cli("generate", "--desc", "a photo of a lemon", "--library", lib, "--cvae", cvae, "--out", out,
                         "--samples", 3, "--merged-checkpoint", merged, "--json"))
    assert gen["samples"] == 3 and gen["experts"]
    # the retrieval-trained generator: same artifact kind, so generate/export take it the same way
    retrieval = tmp_path / "generator.safetensors"
    trained = json.loads(cli("train-cvae", "--data", micro_world, "--backbone", bb, "--experts", ex, "--library", lib,
                             "--out", retrieval, "--k", 2, "--objective", "retrieval", "--json"))
    assert trained["config"]["anchor"] and set(trained["train_tasks"]) >= set(built["experts"])
    anchored = json.loads(cli("generate", "--desc", "a photo of a lemon", "--library", lib, "--cvae", retrieval,
                              "--out", tmp_path / "lora2.safetensors", "--json"))
    assert anchored["experts"] == gen["experts"]
    # no --cvae: the Top-K (ΔW) merge as one rank-K·r LoRA, what a bundle exported without --cvae runs
    merge = json.loads(cli("generate", "--desc", "a photo of a lemon", "--library", lib, "--k", 2,
                           "--out", tmp_path / "merge.safetensors", "--json"))
    assert merge["experts"] == gen["experts"]

    from sglora_edge.backbone import create_backbone
    from sglora_edge.lora import delta_weights, encode_images, load_lora
    library = Library.load(lib)
    loras, meta = load_lora(out, backbone=library.backbone, spec=library.spec)
    assert loras.shape == (3, library.spec.size) and meta["description"] == "a photo of a lemon"
    merged_lora, merged_meta = load_lora(tmp_path / "merge.safetensors", backbone=library.backbone)
    assert merged_lora.shape == (1, 2 * library.spec.size) and merged_meta["lora_spec"]["rank"] == 2 * library.spec.rank
    assert not torch.allclose(torch.from_numpy(loras[0]), torch.from_numpy(loras[1]))  # samples differ
    backbone = create_backbone(str(bb))
    plain = open_clip.create_model("sglora-micro", pretrained=str(merged)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(x, normalize=True),
                              encode_images(backbone.visual, x, delta_weights(library.spec, torch.from_numpy(loras[0]))),
                              atol=1e-5)


def test_bad_inputs_stop_with_the_cause(micro_world, tmp_path):
    r = CliRunner().invoke(app, ["train-experts", "--data", str(micro_world), "--backbone",
                                 "open_clip:sglora-micro@random", "--out", str(tmp_path), "--tasks", "unicorn"])
    assert r.exit_code == 2 and "unknown task(s) 'unicorn'" in r.output
    assert not list(tmp_path.iterdir())  # nothing half-written
    r = CliRunner().invoke(app, ["eval", "zeroshot", "--data", str(tmp_path), "--backbone", "open_clip:sglora-micro@random"])
    assert r.exit_code == 2 and "manifest.jsonl: not found" in r.output
