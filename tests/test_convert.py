import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from sglora_edge.data import load_dataset
from sglora_edge.data.convert import ConvertError, convert

COLORS = ["red", "green", "blue", "white", "black", "yellow"]


def img(path, i=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), COLORS[i % len(COLORS)]).save(path)


def rows(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def split_counts(out):
    """task -> Counter(split -> number of distinct images)."""
    seen = defaultdict(set)
    for r in rows(out):
        seen[(r["task"], r["split"])].add(r["image"])
    counts = defaultdict(Counter)
    for (task, split), images in seen.items():
        counts[task][split] = len(images)
    return counts


def make_pets(root, per_breed=5, captions=None):
    breeds = [("Abyssinian", 1), ("Egyptian_Mau", 1), ("american_bulldog", 2)]
    lines = ["#Image CLASS-ID SPECIES BREED-ID", "#ID: 1:37 Class ids"]
    for b, (breed, species) in enumerate(breeds):
        for n in range(1, per_breed + 1):
            img(root / "images" / f"{breed}_{n}.jpg", n)
            lines.append(f"{breed}_{n} {b + 1} {species} {b + 1}")
    (root / "annotations").mkdir()
    (root / "annotations" / "list.txt").write_text("\n".join(lines) + "\n")
    if captions:
        (root / "captions.jsonl").write_text("".join(json.dumps({"image": k, "caption": c}) + "\n"
                                                     for k, c in captions))
    return root


def make_flowers(root, names=True):
    labels = np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]], dtype=np.uint8)
    for i in range(1, labels.size + 1):
        img(root / "jpg" / f"image_{i:05d}.jpg", i)
    from scipy.io import savemat
    savemat(root / "imagelabels.mat", {"labels": labels})
    if names:
        (root / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid",
                                                           "3": "canterbury bells"}))
    return root


def make_coco(root):
    cats = [{"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 17, "name": "cat", "supercategory": "animal"},
            {"id": 3, "name": "car", "supercategory": "vehicle"}]
    for part, first in (("train2017", 1), ("val2017", 100)):
        images, caps, inst = [], [], []
        for k in range(6):
            image_id = first + k
            name = f"{image_id:012d}.jpg"
            img(root / part / name, k)
            images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
            caps += [{"id": image_id * 10 + c, "image_id": image_id, "caption": f"caption {c} of\nimage {image_id} "}
                     for c in range(5)]
            main = cats[k % 3]["id"]
            inst.append({"image_id": image_id, "category_id": main, "area": 50.0})
            inst.append({"image_id": image_id, "category_id": 3 if main != 3 else 17, "area": 10.0})
        images.append({"id": first + 50, "file_name": "unlabelled.jpg"})  # no instances: skipped
        img(root / part / "unlabelled.jpg")
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{part}.json").write_text(json.dumps({"images": images, "annotations": caps}))
        (root / "annotations" / f"instances_{part}.json").write_text(
            json.dumps({"images": images, "annotations": inst, "categories": cats}))
    return root


def make_folder(root):
    for c, cls in enumerate(["red_fox", "tabby", "sparrow"]):
        for n in range(4):
            img(root / cls / f"{n}.{'png' if n % 2 else 'jpg'}", c)
    (root / "tabby" / "notes.txt").write_text("not an image")
    (root / "tabby" / "captions.txt").write_text("0.jpg\ta tabby on a mat\n0.jpg\ta striped cat\n")
    (root / "captions.jsonl").write_text(json.dumps({"image": "red_fox/1.png", "caption": "a fox in snow"}) + "\n")
    return root


def test_pets_tasks_families_roles_and_template_captions(tmp_path):
    summary = convert("pets", make_pets(tmp_path / "pets"), tmp_path / "out", progress=False)
    ds = load_dataset(tmp_path / "out")
    assert sorted(ds.tasks) == ["abyssinian", "american bulldog", "egyptian mau"]
    assert ds.tasks["egyptian mau"].family == "cat" and ds.tasks["american bulldog"].family == "dog"
    assert ds.tasks["egyptian mau"].description == "a photo of a egyptian mau"
    assert {t.domain for t in ds.tasks.values()} == {"pets"} and ds.role_source == "tasks.json"
    assert sorted(t.role for t in ds.tasks.values()) == ["expert", "train", "unseen"]
    caps = {r["caption"] for r in rows(tmp_path / "out") if r["image"].endswith("Egyptian_Mau_1.jpg")}
    assert caps == {"a photo of a egyptian mau, a type of pet.", "a photo of my egyptian mau."}
    assert summary["tasks"] == 3 and summary["pairs"] == 30 and summary["template_caption_images"] == 15
    assert all(r["image"].startswith(str(tmp_path)) for r in rows(tmp_path / "out"))  # absolute to the source


def test_splits_are_stratified_per_class(tmp_path):
    summary = convert("pets", make_pets(tmp_path / "pets", per_breed=6), tmp_path / "out", progress=False)
    for task, counts in split_counts(tmp_path / "out").items():
        assert counts == {"test": 2, "val": 1, "train": 3}, task  # round(6*.3)=2, round(6*.1)=1
    assert summary["images"] == {"train": 9, "val": 3, "test": 6}
    # every image sits in exactly one split
    image_splits = defaultdict(set)
    for r in rows(tmp_path / "out"):
        image_splits[r["image"]].add(r["split"])
    assert all(len(s) == 1 for s in image_splits.values())


def test_missing_images_are_skipped_and_counted(tmp_path):
    src = make_pets(tmp_path / "pets")
    (src / "images" / "Abyssinian_2.jpg").unlink()
    summary = convert("pets", src, tmp_path / "out", progress=True)  # progress bars must not break anything
    assert summary["skipped"] == {"missing_images": 1} and summary["pairs"] == 28
    load_dataset(tmp_path / "out")


def test_small_classes_keep_a_test_image_and_singletons_are_skipped(tmp_path):
    src = tmp_path / "src"
    for cls, n in (("two", 2), ("one", 1), ("three", 3), ("four", 4)):
        for i in range(n):
            img(src / cls / f"{i}.png", i)
    summary = convert("folder", src, tmp_path / "out", val_fraction=0.5, progress=False)
    counts = split_counts(tmp_path / "out")
    assert sorted(counts) == ["four", "three", "two"]
    assert all(c["test"] >= 1 and c["train"] >= 1 for c in counts.values())
    assert counts["two"] == {"test": 1, "train": 1}
    assert summary["skipped"] == {"classes_with_fewer_than_2_images": 1}
    load_dataset(tmp_path / "out")


def test_pets_captions_file_used_when_present(tmp_path):
    src = make_pets(tmp_path / "pets", captions=[("Abyssinian_1.jpg", "a sleepy ginger cat"),
                                                  ("Abyssinian_1.jpg", "a cat on a sofa")])
    summary = convert("pets", src, tmp_path / "out", progress=False)
    caps = [r["caption"] for r in rows(tmp_path / "out") if r["image"].endswith("/Abyssinian_1.jpg")]
    assert caps == ["a sleepy ginger cat", "a cat on a sofa"]
    assert summary["template_caption_images"] == 14  # the rest fall back to templates


def test_flowers_names_family_and_captions(tmp_path):
    convert("flowers", make_flowers(tmp_path / "fl"), tmp_path / "out", progress=False)
    ds = load_dataset(tmp_path / "out")
    assert sorted(ds.tasks) == ["canterbury bells", "hard-leaved pocket orchid", "pink primrose"]
    assert {t.family for t in ds.tasks.values()} == {"flower"}
    first = [r for r in rows(tmp_path / "out") if r["image"].endswith("image_00001.jpg")]
    assert {r["task"] for r in first} == {"pink primrose"}
    assert {r["caption"] for r in first} == {"a photo of a pink primrose, a type of flower.",
                                             "a photo of my pink primrose."}


def test_flowers_without_names_file(tmp_path):
    convert("flowers", make_flowers(tmp_path / "fl", names=False), tmp_path / "out", progress=False)
    assert sorted(load_dataset(tmp_path / "out").tasks) == ["flower class 1", "flower class 2", "flower class 3"]


def test_coco_largest_area_category_captions_and_supercategory(tmp_path):
    summary = convert("coco", make_coco(tmp_path / "coco"), tmp_path / "out", progress=False)
    ds = load_dataset(tmp_path / "out")
    assert sorted(ds.tasks) == ["car", "cat", "dog"]
    assert ds.tasks["dog"].family == "animal" and ds.tasks["car"].family == "vehicle"
    by_image = defaultdict(list)
    for r in rows(tmp_path / "out"):
        by_image[r["image"]].append(r)
    assert len(by_image) == 12 and all(len(v) == 5 for v in by_image.values())
    first = by_image[str(tmp_path / "coco" / "train2017" / "000000000001.jpg")]
    assert {r["task"] for r in first} == {"dog"}  # dog (area 50) beats car (area 10)
    assert first[0]["caption"] == "caption 0 of image 1"
    assert summary["skipped"] == {"images_without_category": 2}
    provenance = json.loads((tmp_path / "out" / "convert.json").read_text())
    assert "largest summed instance area" in provenance["category_rule"]


def test_folder_extensions_names_and_both_caption_sources(tmp_path):
    convert("folder", make_folder(tmp_path / "f"), tmp_path / "out", progress=False)
    ds = load_dataset(tmp_path / "out")
    assert sorted(ds.tasks) == ["red fox", "sparrow", "tabby"]
    assert ds.tasks["red fox"].family is None and ds.tasks["red fox"].domain == "folder"
    by_image = defaultdict(list)
    for r in rows(tmp_path / "out"):
        by_image[r["image"].split("/f/")[1]].append(r["caption"])
    assert len(by_image) == 12 and "tabby/notes.txt" not in by_image
    assert by_image["tabby/0.jpg"] == ["a tabby on a mat", "a striped cat"]
    assert by_image["red_fox/1.png"] == ["a fox in snow"]
    assert by_image["sparrow/2.jpg"] == ["a photo of a sparrow.", "a photo of my sparrow."]


def test_deterministic_output_and_provenance(tmp_path):
    src = make_pets(tmp_path / "pets")
    for out in ("a", "b"):
        convert("pets", src, tmp_path / out, seed=3, progress=False)
    for name in ("manifest.jsonl", "tasks.json", "convert.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    prov = json.loads((tmp_path / "a" / "convert.json").read_text())
    assert prov["seed"] == 3 and prov["format"] == "pets" and prov["source"] == str(src.resolve())
    assert "default_rng(seed)" in prov["role_rule"] and "test_fraction" in prov["split_rule"]
    others = set()
    for seed in range(6):
        convert("pets", src, tmp_path / "c", seed=seed, overwrite=True, progress=False)
        others.add((tmp_path / "c" / "manifest.jsonl").read_bytes())
    assert len(others) > 1  # the seed matters


def test_copy_images_makes_a_self_contained_folder(tmp_path):
    src = make_folder(tmp_path / "f")
    convert("folder", src, tmp_path / "out", copy_images=True, progress=False)
    images = {r["image"] for r in rows(tmp_path / "out")}
    assert all(i.startswith("images/") for i in images) and len(images) == 12
    (tmp_path / "f").rename(tmp_path / "gone")  # the copy no longer needs the source
    load_dataset(tmp_path / "out", check_images="decode")


def test_refuses_non_empty_out_unless_overwrite_and_leaves_no_temp(tmp_path):
    src = make_pets(tmp_path / "pets")
    out = tmp_path / "out"
    out.mkdir()
    convert("pets", src, out, progress=False)  # an empty folder is fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="exists and is not empty"):
        convert("pets", src, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert("pets", src, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pets"]  # no temp or old dirs left
    with pytest.raises(ConvertError, match="contains the source"):
        convert("pets", src, tmp_path, overwrite=True, progress=False)


def test_missing_annotation_files_name_the_file_and_layout(tmp_path):
    src = make_pets(tmp_path / "pets")
    (src / "annotations" / "list.txt").unlink()
    with pytest.raises(ConvertError, match=r"annotations/list.txt not found: expected the Oxford-IIIT Pet layout"):
        convert("pets", src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets"]  # nothing written on failure
    coco = make_coco(tmp_path / "coco")
    (coco / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(ConvertError, match=r"instances_val2017.json not found: expected the COCO layout"):
        convert("coco", coco, tmp_path / "out", progress=False)
    with pytest.raises(ConvertError, match=r"imagelabels.mat not found: expected the Flowers102 layout"):
        convert("flowers", tmp_path / "pets", tmp_path / "out", progress=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConvertError, match="unknown format"):
        convert("imagenet", tmp_path, tmp_path / "out")
    with pytest.raises(ConvertError, match="test_fraction"):
        convert("pets", tmp_path, tmp_path / "out", test_fraction=0.8, val_fraction=0.3)
