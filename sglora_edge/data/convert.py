"""Convert public datasets (COCO, Oxford-IIIT Pets, Flowers102, a class-per-folder tree) into our contract.

Output (DESIGN.md, "Data contract"): `OUT/manifest.jsonl`, `OUT/tasks.json` and `OUT/convert.json` (provenance:
source, format, seed and the role/split rules). One task per class; roles are a seeded 1/3 expert, 1/3 train,
1/3 unseen split of the classes; every class gets its own seeded, stratified train/val/test split of its images.
Output is deterministic (same input + seed -> identical bytes) and written atomically (temp dir beside OUT, renamed).
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from runtime.artifacts import atomic_dir

from ..errors import SGLoRAError
from .contract import MANIFEST, ROLES, TASKS, _seeded_roles  # same role rule as the contract's default

FORMATS = ("coco", "pets", "flowers", "folder")
PROVENANCE = "convert.json"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
LAYOUTS = {
    "coco": "the COCO layout annotations/captions_{train,val}2017.json + annotations/instances_{train,val}2017.json "
            "+ train2017/*.jpg, val2017/*.jpg (or the same with 2014)",
    "pets": "the Oxford-IIIT Pet layout images/*.jpg + annotations/list.txt",
    "flowers": "the Flowers102 layout jpg/image_00001.jpg... + imagelabels.mat (+ optional cat_to_name.json)",
    "folder": "one folder per class: <class_name>/*.{jpg,jpeg,png,webp,bmp}",
}
TEMPLATES = {  # used when no captions ship with an image
    "coco": ("a photo of a {}.", "a photo of my {}."),
    "pets": ("a photo of a {}, a type of pet.", "a photo of my {}."),
    "flowers": ("a photo of a {}, a type of flower.", "a photo of my {}."),
    "folder": ("a photo of a {}.", "a photo of my {}."),
}
ROLE_RULE = ("classes sorted by name, permuted by numpy.random.default_rng(seed); the class at rank r of n gets "
             "('expert', 'train', 'unseen')[3*r//n]")
SPLIT_RULE = ("per class: images sorted by path, permuted by numpy.random.default_rng([seed, crc32(class name)]); "
              "n_test = max(1, round(n*test_fraction)), n_val = round(n*val_fraction), capped so >= 1 image stays "
              "in train; classes with < 2 images are skipped; all captions of an image share its split")
COCO_RULE = ("an image belongs to the one category with the largest summed instance area on it (ties: lower "
             "category id), so every test gallery image has a single owner, as in per-class retrieval; "
             "images without instance annotations are skipped")


class ConvertError(SGLoRAError):
    """The source does not have the expected layout, or OUT cannot be written."""


@dataclass
class _Item:
    image: Path
    task: str
    captions: list[str] | None  # None -> template captions


def _need(path: Path, fmt: str) -> Path:
    if not path.exists():
        raise ConvertError(f"{path} not found: expected {LAYOUTS[fmt]}")
    return path


def _clean(caption: str) -> str:
    return " ".join(caption.split())  # COCO captions carry stray newlines and double spaces


def _read_captions_jsonl(path: Path) -> dict[str, list[str]]:
    """Optional `captions.jsonl`: lines {"image": <key>, "caption": ...}; several lines may share an image."""
    captions: dict[str, list[str]] = defaultdict(list)
    if not path.is_file():
        return captions
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("image"), str) and isinstance(row.get("caption"), str)):
            raise ConvertError(f"{path}:{lineno}: expected a JSON object {{\"image\": ..., \"caption\": ...}}")
        if _clean(row["caption"]):
            captions[row["image"]].append(_clean(row["caption"]))
    return captions


def _read_coco(src: Path):
    ann = src / "annotations"
    parts: list[str] = []
    for year in ("2017", "2014"):
        parts = [f"{s}{year}" for s in ("train", "val") if (ann / f"captions_{s}{year}.json").is_file()]
        if parts:
            break
    if not parts:
        _need(ann / "captions_train2017.json", "coco")
    items, families, skipped = [], {}, Counter()
    for part in parts:
        instances_path = _need(ann / f"instances_{part}.json", "coco")
        if not (src / part).is_dir():  # e.g. only val2017.zip downloaded: use what is there
            skipped[f"{part}_image_folder_missing"] += 1
            continue
        instances = json.loads(instances_path.read_text(encoding="utf-8"))
        categories = {c["id"]: c for c in instances["categories"]}
        area: dict[tuple[int, int], float] = defaultdict(float)
        for a in instances["annotations"]:
            area[(a["image_id"], a["category_id"])] += float(a.get("area", 0.0))
        owner: dict[int, tuple[float, int]] = {}
        for (image_id, cat_id), total in area.items():
            best = owner.get(image_id)
            if best is None or (total, -cat_id) > (best[0], -best[1]):
                owner[image_id] = (total, cat_id)
        captions_json = json.loads((ann / f"captions_{part}.json").read_text(encoding="utf-8"))
        captions: dict[int, list[str]] = defaultdict(list)
        for a in captions_json["annotations"]:
            if _clean(a["caption"]):
                captions[a["image_id"]].append(_clean(a["caption"]))
        for image in sorted(captions_json["images"], key=lambda im: im["id"]):
            if image["id"] not in owner:
                skipped["images_without_category"] += 1
                continue
            category = categories[owner[image["id"]][1]]
            families[category["name"]] = category.get("supercategory")
            items.append(_Item(src / part / image["file_name"], category["name"], captions.get(image["id"])))
    return items, families, skipped


def _read_pets(src: Path):
    listing = _need(src / "annotations" / "list.txt", "pets")
    _need(src / "images", "pets")
    captions = _read_captions_jsonl(src / "captions.jsonl")
    items, families = [], {}
    for lineno, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split()
        if len(cols) < 4 or cols[2] not in ("1", "2"):
            raise ConvertError(f"{listing}:{lineno}: expected 'Image CLASS-ID SPECIES BREED-ID' with SPECIES "
                               f"1 (cat) or 2 (dog), got {line.strip()!r}")
        task = cols[0].rsplit("_", 1)[0].replace("_", " ").lower()  # "Egyptian_Mau_12" -> "egyptian mau"
        families[task] = "cat" if cols[2] == "1" else "dog"
        name = f"{cols[0]}.jpg"
        items.append(_Item(src / "images" / name, task, captions.get(name)))
    return items, families, Counter()


def _read_flowers(src: Path):
    labels_path = _need(src / "imagelabels.mat", "flowers")
    _need(src / "jpg", "flowers")
    try:
        from scipy.io import loadmat  # only this converter needs scipy
    except ImportError as e:
        raise ConvertError(f"reading {labels_path} needs scipy: pip install scipy") from e
    mat = loadmat(labels_path)
    if "labels" not in mat:
        raise ConvertError(f"{labels_path}: has no 'labels' array; expected {LAYOUTS['flowers']}")
    names_path = src / "cat_to_name.json"
    names = json.loads(names_path.read_text(encoding="utf-8")) if names_path.is_file() else {}
    captions = _read_captions_jsonl(src / "captions.jsonl")
    items = []
    for index, label in enumerate(np.asarray(mat["labels"]).ravel(), 1):  # labels are 1-based, image i -> index i
        task = str(names.get(str(int(label)), f"flower class {int(label)}")).strip()
        name = f"image_{index:05d}.jpg"
        items.append(_Item(src / "jpg" / name, task, captions.get(name)))
    return items, {it.task: "flower" for it in items}, Counter()


def _read_folder(src: Path):
    captions = _read_captions_jsonl(src / "captions.jsonl")
    items = []
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        per_class: dict[str, list[str]] = defaultdict(list)
        txt = class_dir / "captions.txt"
        if txt.is_file():
            for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise ConvertError(f"{txt}:{lineno}: expected '<file name><TAB><caption>'")
                name, caption = line.split("\t", 1)
                if _clean(caption):
                    per_class[name.strip()].append(_clean(caption))
        for f in sorted(class_dir.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                found = captions.get(f"{class_dir.name}/{f.name}") or per_class.get(f.name)
                items.append(_Item(f, class_dir.name.replace("_", " ").strip(), found))
    if not items:
        raise ConvertError(f"no images found in {src}: expected {LAYOUTS['folder']}")
    return items, {}, Counter()


READERS = {"coco": _read_coco, "pets": _read_pets, "flowers": _read_flowers, "folder": _read_folder}


def _split_class(task: str, n: int, seed: int, test_fraction: float, val_fraction: float) -> list[str]:
    n_test = min(max(1, int(n * test_fraction + 0.5)), n - 1)
    n_val = min(int(n * val_fraction + 0.5), n - 1 - n_test)
    labels = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    # a per-class stream: adding or removing one class leaves every other class's split unchanged
    order = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))]).permutation(n)
    splits = [""] * n
    for rank, i in enumerate(order):
        splits[i] = labels[rank]
    return splits


def _checked_paths(fmt: str, src: str | Path, out: str | Path, test_fraction: float, val_fraction: float,
                   overwrite: bool) -> tuple[Path, Path]:
    """convert's arguments checked (one line naming the bad one and the fix); the resolved (src, out)."""
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ConvertError(f"need 0 < test_fraction < 1, 0 <= val_fraction and test + val < 1; "
                           f"got test_fraction={test_fraction}, val_fraction={val_fraction}")
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.is_dir():
        raise ConvertError(f"{src} not found: expected {LAYOUTS[fmt]}")
    if out == src or out in src.parents:
        raise ConvertError(f"{out} contains the source {src}; choose another output folder")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    return src, out


def convert(fmt: str, src: str | Path, out: str | Path, *, seed: int = 0, test_fraction: float = 0.3,
            val_fraction: float = 0.1, copy_images: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Convert SRC (in layout `fmt`) into a contract dataset at OUT; return a summary of what was written."""
    src, out = _checked_paths(fmt, src, out, test_fraction, val_fraction, overwrite)
    items, families, skipped = READERS[fmt](src)
    by_task: dict[str, list[_Item]] = defaultdict(list)
    missing: list[Path] = []
    for item in tqdm(items, desc=f"{fmt}: checking images", unit="img", disable=not progress):
        if item.image.is_file():
            by_task[item.task].append(item)
        else:
            missing.append(item.image)
    if missing:
        skipped["missing_images"] = len(missing)
    for task in [t for t, its in by_task.items() if len(its) < 2]:  # a class needs a train and a test image
        skipped["classes_with_fewer_than_2_images"] += 1
        del by_task[task]
    if not by_task:
        hint = f" (first missing image: {missing[0]})" if missing else ""
        raise ConvertError(f"no class with >= 2 usable images under {src}{hint}; expected {LAYOUTS[fmt]}")

    names = sorted(by_task)
    roles = _seeded_roles(names, seed)
    rows, used, template_images = [], set(), 0
    split_images: Counter = Counter()
    with atomic_dir(out) as tmp:
        todo = []
        for task in names:
            class_items = sorted(by_task[task], key=lambda it: str(it.image))
            splits = _split_class(task, len(class_items), seed, test_fraction, val_fraction)
            todo += [(task, item, split) for item, split in zip(class_items, splits)]
        for task, item, split in tqdm(todo, desc=f"{fmt}: writing", unit="img", disable=not progress):
            image = str(item.image)
            if copy_images:
                slug = re.sub(r"[^A-Za-z0-9._-]+", "_", task)
                rel, k = f"images/{slug}/{item.image.name}", 1
                while rel in used:  # two source files with one name in one class
                    rel, k = f"images/{slug}/{item.image.stem}_{k}{item.image.suffix}", k + 1
                used.add(rel)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(item.image, tmp / rel)
                image = rel
            captions = item.captions or [t.format(task) for t in TEMPLATES[fmt]]
            template_images += not item.captions
            split_images[split] += 1
            rows += [{"image": image, "caption": c, "task": task, "split": split} for c in captions]

        tasks = {}
        for task in names:
            tasks[task] = {"description": f"a photo of a {task}", "role": roles[task], "domain": fmt}
            if families.get(task):
                tasks[task]["family"] = families[task]
        summary = {
            "format": fmt, "source": str(src), "tasks": len(names), "pairs": len(rows),
            "roles": {r: sum(v == r for v in roles.values()) for r in ROLES},
            "images": {s: split_images.get(s, 0) for s in ("train", "val", "test")},
            "template_caption_images": template_images, "skipped": dict(sorted(skipped.items())),
        }
        provenance = {"format": fmt, "source": str(src), "seed": seed, "test_fraction": test_fraction,
                      "val_fraction": val_fraction, "copy_images": copy_images, "role_rule": ROLE_RULE,
                      "split_rule": SPLIT_RULE, "summary": summary}
        if fmt == "coco":
            provenance["category_rule"] = COCO_RULE
        with (tmp / MANIFEST).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
        (tmp / TASKS).write_text(json.dumps(tasks, sort_keys=True, indent=1, ensure_ascii=False) + "\n", "utf-8")
        (tmp / PROVENANCE).write_text(json.dumps(provenance, sort_keys=True, indent=1) + "\n", "utf-8")
    return {**summary, "out": str(out)}

