"""The embedded world generator: determinism, counts, roles, captions, the data contract."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sglora_edge import world as W
from sglora_edge.world import ATTRIBUTES, FAMILIES, PRESETS, ROLE_ORDER, write_world

MICRO = PRESETS["micro"]


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("worlds") / "micro"
    summary = write_world(out, seed=0, preset="micro", progress=False, workers=2)
    assert summary["n_images"] == len({r["image"] for r in read_manifest(out)})
    return out


def test_same_seed_is_byte_identical_and_other_seed_differs(micro, tmp_path):
    again = tmp_path / "again"
    write_world(again, seed=0, preset="micro", progress=False, workers=1)  # fixture used the default (2)
    assert file_hashes(again) == file_hashes(micro)
    other = tmp_path / "other"
    write_world(other, seed=1, preset="micro", progress=False)
    hashes, other_hashes = file_hashes(micro), file_hashes(other)
    assert hashes.keys() == other_hashes.keys()  # same layout...
    assert sum(hashes[k] != other_hashes[k] for k in hashes) > len(hashes) // 2  # ...different content


def test_counts_per_task_and_split_match_the_preset(micro):
    rows = read_manifest(micro)
    images = defaultdict(set)
    captions = defaultdict(list)
    for r in rows:
        images[r["task"], r["split"]].add(r["image"])
        captions[r["image"]].append(r["caption"])
    expected = {"pretrain": MICRO.n_pretrain, "train": MICRO.n_train, "val": MICRO.n_val, "test": MICRO.n_test}
    tasks = json.loads((micro / "tasks.json").read_text())
    assert len(tasks) == len(MICRO.families) * MICRO.classes_per_family * len(MICRO.domains)
    for task in tasks:
        for split, n in expected.items():
            assert len(images[task, split]) == n, (task, split)
    for r in rows:
        n_captions = len(captions[r["image"]])
        if r["split"] == "pretrain":
            assert 1 <= n_captions <= MICRO.pretrain_max_captions
        else:
            assert n_captions == MICRO.captions_per_image >= 2
            assert len(set(captions[r["image"]])) == n_captions  # distinct paraphrases
    counts = json.loads((micro / "world.json").read_text())["counts"]
    assert counts["n_pairs"] == len(rows)


def test_images_exist_and_are_64px_rgb(micro):
    for image in sorted({r["image"] for r in read_manifest(micro)}):
        with Image.open(micro / image) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
            assert not im.info.get("dpi") and not getattr(im, "text", {})  # no metadata


def test_tasks_json_fields(micro):
    tasks = json.loads((micro / "tasks.json").read_text())
    manifest_tasks = {r["task"] for r in read_manifest(micro)}
    assert set(tasks) == manifest_tasks
    for name, t in tasks.items():
        assert set(t) == {"description", "role", "family", "domain"}
        assert t["role"] in ROLE_ORDER and t["family"] in MICRO.families and t["domain"] in MICRO.domains
        cls = name.removesuffix(" sketch")
        assert cls in FAMILIES[t["family"]][1]
        frame = "a photo of" if t["domain"] == "photo" else "a sketch of"
        assert t["description"] in (f"{frame} a {cls}", f"{frame} an {cls}")


def test_roles_are_thirds_per_domain_and_family(micro):
    tasks = json.loads((micro / "tasks.json").read_text())
    groups = defaultdict(Counter)
    for t in tasks.values():
        groups[t["domain"], t["family"]][t["role"]] += 1
    assert len(groups) == len(MICRO.domains) * len(MICRO.families)
    assert all(c == Counter(expert=1, train=1, unseen=1) for c in groups.values())
    default = PRESETS["default"]
    roles = W.assign_roles(0, default)
    per_group = defaultdict(Counter)
    for (domain, cls), role in roles.items():
        family = next(f for f in default.families if cls in FAMILIES[f][1])
        per_group[domain, family][role] += 1
    assert all(c == Counter(expert=2, train=2, unseen=2) for c in per_group.values())
    assert sum(r == "expert" for r in roles.values()) < len(roles) / 2  # experts are a minority
    assert W.assign_roles(0, default) == roles and W.assign_roles(1, default) != roles
    assert json.loads((micro / "world.json").read_text())["role_assignment"]["seed"] == 0


def test_pretrain_captions_name_every_class_and_sometimes_an_attribute(micro):
    rows = [r for r in read_manifest(micro) if r["split"] == "pretrain"]
    tasks = json.loads((micro / "tasks.json").read_text())
    for name in tasks:
        cls = name.removesuffix(" sketch")
        task_rows = [r for r in rows if r["task"] == name]
        assert task_rows and all(re.search(rf"\b{cls}", r["caption"]) for r in task_rows)
    words = {w for ws in ATTRIBUTES.values() for _v, adj, post, pred in ws for w in (adj, post, pred) if w}
    words |= {"single", "two", "three", "four"}
    rate = np.mean([any(re.search(rf"\b{re.escape(w)}\b", r["caption"]) for w in words) for r in rows])
    assert 0.2 <= rate <= 0.45, rate


def test_fine_captions_name_the_class_and_both_attribute_values():
    for family, (attributes, classes) in FAMILIES.items():
        for values in W.balanced_combinations(attributes, 30, np.random.default_rng(0)):
            for phrase in W.fine_noun_phrases(classes[0], values):
                assert classes[0] in phrase
                for attribute, value in values.items():
                    if attribute == "count":
                        assert value in phrase or (value == "one" and "a single" in phrase)
                    else:
                        adj, post, pred = W._words(attribute, value)
                        assert any(w and w in phrase for w in (adj, post, pred)), (phrase, attribute, value)


def test_galleries_cover_every_attribute_combination_evenly():
    default = PRESETS["default"]
    for attributes, _classes in FAMILIES.values():
        combos = W.balanced_combinations(attributes, default.n_test, np.random.default_rng(3))
        n_grid = int(np.prod([len(ATTRIBUTES[a]) for a in attributes]))
        counts = Counter(tuple(sorted(c.items())) for c in combos)
        assert len(counts) == n_grid and max(counts.values()) - min(counts.values()) <= 1


def test_default_preset_meets_the_brief():
    p = PRESETS["default"]
    assert len(p.families) >= 8 and p.classes_per_family >= 6
    assert p.n_train >= 100 and p.n_test >= 50 and p.captions_per_image >= 2
    assert all(len(FAMILIES[f][1]) >= p.classes_per_family for f in p.families)
    assert all(3 <= len(ATTRIBUTES[a]) <= 5 for f in p.families for a in FAMILIES[f][0])
    uses = Counter(a for f in p.families for a in FAMILIES[f][0])
    assert all(n >= 2 for n in uses.values())  # every attribute type is shared between families
    assert len({FAMILIES[f][0] for f in p.families}) == len(p.families)  # each family its own pair


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(micro, tmp_path, monkeypatch):
    with pytest.raises(FileExistsError):
        write_world(micro, preset="micro", progress=False)
    stranger = tmp_path / "not_a_dataset"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_world(stranger, preset="micro", overwrite=True, progress=False)
    assert (stranger / "notes.txt").read_text() == "keep me"

    target = tmp_path / "w"
    write_world(target, seed=0, preset="micro", progress=False)
    before = file_hashes(target)
    write_world(target, seed=0, preset="micro", overwrite=True, progress=False)
    assert file_hashes(target) == before

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(W, "render", broken)
    with pytest.raises(RuntimeError):  # workers=1: the patch must reach the renderer
        write_world(tmp_path / "fails", preset="micro", progress=False, workers=1)
    with pytest.raises(RuntimeError):
        write_world(target, preset="micro", overwrite=True, progress=False, workers=1)
    assert file_hashes(target) == before  # the old world survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dataset", "w"]  # no temp folders left


def test_micro_world_passes_the_data_contract(micro):
    data = pytest.importorskip("sglora_edge.data")
    dataset = data.load_dataset(micro, check_images="decode")
    summary = dataset.summary()
    assert summary["role_source"] == "tasks.json"
    assert summary["domains"] == sorted(MICRO.domains)
    assert len(dataset.gallery("apple").images) == MICRO.n_test


def test_version_2_keeps_pretrain_train_val_bytes_and_renders_fresh_test_images(micro, tmp_path, monkeypatch):
    """The version bump (fresh, larger test split) leaves every other split byte-identical, so a cached
    backbone and task LoRAs stay valid; no test image of version 1 comes back."""
    from dataclasses import replace
    monkeypatch.setattr(W, "TEST_STREAM", "test")  # version 1's test stream and size
    monkeypatch.setitem(W.PRESETS, "micro", replace(MICRO, n_test=8))
    v1 = tmp_path / "v1"
    write_world(v1, seed=0, preset="micro", progress=False, workers=1)
    old, new = file_hashes(v1), file_hashes(micro)
    kept = [k for k in old if k.startswith("images/") and "/test_" not in k]
    assert kept and all(old[k] == new[k] for k in kept)
    not_test = lambda root: [r for r in read_manifest(root) if r["split"] != "test"]
    assert not_test(v1) == not_test(micro)
    tests_old = {old[k] for k in old if "/test_" in k}
    assert tests_old and not tests_old & {new[k] for k in new if "/test_" in k}


def test_test_split_is_three_disjoint_deterministic_galleries(micro):
    from sglora_edge.data import load_dataset
    ds = load_dataset(micro)
    for task in ds.task_names():
        whole = ds.gallery(task, "test")
        parts = ds.galleries(task, "test", MICRO.gallery_size)
        assert len(parts) == MICRO.n_test // MICRO.gallery_size == 3
        images = [i for g in parts for i in g.images]
        assert images == whole.images and len(set(images)) == len(images)  # disjoint, nothing left out
        assert [g.images for g in ds.galleries(task, "test", MICRO.gallery_size)] == [g.images for g in parts]
        for g in parts:
            assert g.positive.shape == (len(g.images), len(g.captions)) and g.positive.any(0).all()
    # fewer images than two galleries' worth: one gallery
    assert len(ds.galleries(ds.task_names()[0], "test", MICRO.n_test)) == 1


def test_rotations_make_every_class_unseen_exactly_once(micro):
    from sglora_edge.data import load_dataset
    ds = load_dataset(micro)
    unseen = Counter()
    for r in range(3):
        rot = ds.rotated(r)
        unseen.update(rot.task_names(role="unseen"))
        for domain in ds.domains():
            for family in MICRO.families:
                roles = lambda d: sorted(t.role for t in d.tasks.values() if t.domain == domain and t.family == family)
                assert roles(rot) == roles(ds)  # role counts kept per (domain, family)
        assert all(rot.tasks[t].description == ds.tasks[t].description for t in ds.tasks)
    assert unseen == Counter({t: 1 for t in ds.task_names()})
