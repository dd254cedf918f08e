"""Load and validate a dataset folder (DESIGN.md, "Data contract").

A dataset is `manifest.jsonl` (one image-caption pair a line) plus an optional
`tasks.json` (descriptions, roles, families, domains). Every problem found is
collected and reported together, each naming its file, line and field.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import SGLoRAError

SPLITS = ("pretrain", "train", "val", "test")
ROLES = ("expert", "train", "unseen")
MANIFEST = "manifest.jsonl"
TASKS = "tasks.json"
_MAX_LISTED = 20  # problems shown in one error message; the rest are counted
ROLE_SPLIT_SEED = 0


class DatasetError(SGLoRAError):
    """The dataset folder breaks the contract; `problems` lists every violation found."""

    def __init__(self, root: Path, problems: list[str]):
        self.problems = problems
        shown = "\n  - ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        super().__init__(f"dataset {root} is invalid ({len(problems)} problem(s)):\n  - {shown}{more}")


@dataclass(frozen=True)
class Pair:
    image: Path  # resolved path
    caption: str
    task: str
    split: str


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str
    role: str
    family: str | None = None
    domain: str | None = None


@dataclass
class Gallery:
    """One task's split as a retrieval gallery: unique images, unique caption texts, and which go together.

    Identical caption texts are merged into one query whose positives are every image carrying it."""

    images: list[Path]
    captions: list[str]
    positive: np.ndarray  # bool [n_images, n_captions]

    def partition(self, size: int | None) -> list["Gallery"]:
        """Disjoint galleries of about `size` images (contiguous in manifest order: deterministic): n // size
        of them, the remainder spread over them; fewer images than `size` (or no size) make one gallery.
        Each keeps the caption texts of its own images; a text shared by two images stays one query."""
        n = len(self.images)
        if not size or n < 2 * size:
            return [self]
        out = []
        for idx in np.array_split(np.arange(n), n // size):
            pos = self.positive[idx]
            keep = np.flatnonzero(pos.any(0))
            out.append(Gallery([self.images[i] for i in idx], [self.captions[j] for j in keep], pos[:, keep]))
        return out


@dataclass
class Dataset:
    root: Path
    pairs: list[Pair]
    tasks: dict[str, TaskInfo]
    role_source: str  # "tasks.json" or how the seeded split was made
    _index: dict = field(default_factory=dict, repr=False)

    def task_names(self, role: str | None = None, domain: str | None = None) -> list[str]:
        return sorted(
            t.name for t in self.tasks.values()
            if (role is None or t.role == role) and (domain is None or t.domain == domain)
        )

    def seen_tasks(self, domain: str | None = None) -> list[str]:
        """The tasks a generator may learn from (in a domain): experts and train tasks, never unseen ones."""
        return self.task_names(role="expert", domain=domain) + self.task_names(role="train", domain=domain)

    def rotated(self, rotation: int) -> "Dataset":
        """The same data with roles rotated inside each (domain, family): the group's tasks are ordered by role
        (expert, train, unseen; then name) and shifted by `rotation` x the group's unseen count, keeping the
        role counts, so over ceil(n / unseen) rotations every task of the group is unseen once (exactly once
        when the unseen count divides the group). A task's data and description never change."""
        if rotation == 0:
            return self
        groups: dict = defaultdict(list)
        for t in self.tasks.values():
            groups[t.domain, t.family].append(t)
        tasks = {}
        for members in groups.values():
            ordered = sorted(members, key=lambda t: (ROLES.index(t.role), t.name))
            roles = [t.role for t in ordered]
            shift = rotation * roles.count("unseen")
            for i, t in enumerate(ordered):
                tasks[t.name] = replace(t, role=roles[(i + shift) % len(ordered)])
        for name, t in tasks.items():
            needed = "test" if t.role == "unseen" else "train"
            if not self.split_pairs(needed, name):
                raise SGLoRAError(f"rotation {rotation} makes task {name!r} {t.role}, but it has no {needed!r} "
                                  f"pairs in {self.root}; use --rotations 1 for this dataset")
        return Dataset(self.root, self.pairs, dict(sorted(tasks.items())), self.role_source +
                       f" (rotation {rotation}: roles shifted by {rotation} x the unseen count per (domain, family))",
                       self._index)

    def domains(self) -> list[str]:
        return sorted({t.domain for t in self.tasks.values() if t.domain is not None})

    def split_pairs(self, split: str, task: str | None = None) -> list[Pair]:
        if not self._index:
            for p in self.pairs:
                self._index.setdefault((p.split, p.task), []).append(p)
                self._index.setdefault((p.split, None), []).append(p)
        return self._index.get((split, task), [])

    def galleries(self, task: str, split: str = "test", size: int | None = None) -> list[Gallery]:
        """The task's split as disjoint galleries of about `size` images (Gallery.partition)."""
        return self.gallery(task, split).partition(size)

    def gallery(self, task: str, split: str = "test") -> Gallery:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known tasks: {', '.join(sorted(self.tasks)[:10])}...")
        images: list[Path] = []
        image_id: dict[Path, int] = {}
        captions: list[str] = []
        caption_id: dict[str, int] = {}
        links = []
        for p in self.split_pairs(split, task):
            image_id.setdefault(p.image, len(image_id))
            if image_id[p.image] == len(images):
                images.append(p.image)
            caption_id.setdefault(p.caption, len(caption_id))
            if caption_id[p.caption] == len(captions):
                captions.append(p.caption)
            links.append((image_id[p.image], caption_id[p.caption]))
        positive = np.zeros((len(images), len(captions)), dtype=bool)
        for i, c in links:
            positive[i, c] = True
        return Gallery(images, captions, positive)

    def summary(self) -> dict:
        per_split = {}
        for split in SPLITS:
            pairs = self.split_pairs(split)
            per_split[split] = {"images": len({p.image for p in pairs}), "captions": len(pairs),
                                "tasks": len({p.task for p in pairs})}
        roles = Counter(t.role for t in self.tasks.values())
        return {
            "root": str(self.root),
            "tasks": len(self.tasks),
            "roles": {r: roles.get(r, 0) for r in ROLES},
            "role_source": self.role_source,
            "domains": self.domains(),
            "families": sorted({t.family for t in self.tasks.values() if t.family}),
            "splits": per_split,
        }


def _seeded_roles(task_names: list[str], seed: int = ROLE_SPLIT_SEED) -> dict[str, str]:
    """Roles when there is no tasks.json: a seeded 1/3 expert, 1/3 train, 1/3 unseen split."""
    order = np.random.default_rng(seed).permutation(len(task_names))
    roles = {}
    for rank, i in enumerate(order):
        roles[task_names[i]] = ROLES[rank * 3 // len(task_names)]
    return roles


def _read_tasks_json(path: Path, problems: list[str]) -> dict[str, dict]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path}: cannot be read as JSON ({e})")
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a JSON object mapping task name -> {{description, role, ...}}")
        return {}
    out = {}
    for name, entry in raw.items():
        where = f"{path}: task {name!r}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object, got {type(entry).__name__}")
            continue
        desc = entry.get("description", f"a photo of a {name}")
        if not isinstance(desc, str) or not desc.strip():
            problems.append(f"{where}: field 'description' must be a non-empty string")
        role = entry.get("role")
        if role is not None and role not in ROLES:
            problems.append(f"{where}: field 'role' is {role!r}; expected one of {', '.join(ROLES)}")
        for key in ("family", "domain"):
            if key in entry and not isinstance(entry[key], str):
                problems.append(f"{where}: field {key!r} must be a string")
        out[name] = entry
    return out


def load_dataset(root: str | Path, check_images: str = "exists") -> Dataset:
    """Load a dataset folder; raise DatasetError listing every violation.

    check_images: "none", "exists" (stat every image) or "decode" (open every image with Pillow).
    """
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise DatasetError(root, [f"{manifest}: not found (a dataset folder needs {MANIFEST}; "
                                  f"make one with `sglora-edge world --out DIR` or `sglora-edge data convert`)"])
    problems: list[str] = []
    pairs = _read_pairs(root, manifest, problems)
    tasks, role_source, seeded = _read_tasks(root, {p.task for p in pairs if p.split != "pretrain"}, problems)
    if check_images != "none":
        _check_images(pairs, check_images == "decode", problems)
    _check_roles(manifest, pairs, tasks, role_source, seeded, problems)
    if problems:
        raise DatasetError(root, problems)
    return Dataset(root, pairs, tasks, role_source)


def _read_pairs(root: Path, manifest: Path, problems: list[str]) -> list[Pair]:
    """The image-caption pairs of manifest.jsonl; what is wrong with a line goes to problems."""
    pairs: list[Pair] = []
    with manifest.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: must be a JSON object")
                continue
            bad = False
            for key in ("image", "caption", "task", "split"):
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    problems.append(f"{where}: field {key!r} is {'missing' if key not in row else repr(value)}; "
                                    "expected a non-empty string")
                    bad = True
            if bad:
                continue
            if row["split"] not in SPLITS:
                problems.append(f"{where}: field 'split' is {row['split']!r}; expected one of {', '.join(SPLITS)}")
                continue
            image = Path(row["image"])
            pairs.append(Pair((image if image.is_absolute() else root / image), row["caption"].strip(),
                              row["task"], row["split"]))
    if not pairs and not problems:
        problems.append(f"{manifest}: has no image-caption pairs")
    return pairs


def _read_tasks(root: Path, task_pairs: set[str], problems: list[str]) -> tuple[dict, str, dict]:
    """(tasks, where their roles come from, the roles that were seeded) from tasks.json, or seeded without it."""
    tasks_path = root / TASKS
    if not tasks_path.is_file():
        names = sorted(task_pairs)
        seeded = _seeded_roles(names) if names else {}
        tasks = {n: TaskInfo(n, f"a photo of a {n}", seeded[n]) for n in names}
        return tasks, f"seeded split (seed={ROLE_SPLIT_SEED}; no {TASKS})", seeded
    entries = _read_tasks_json(tasks_path, problems)
    for name in sorted(task_pairs - set(entries)):
        problems.append(f"{tasks_path}: task {name!r} appears in {MANIFEST} but has no entry")
    for name in sorted(set(entries) - task_pairs):
        problems.append(f"{tasks_path}: task {name!r} has no train/val/test pairs in {MANIFEST}")
    missing_role = sorted(n for n, e in entries.items() if e.get("role") is None)
    seeded = _seeded_roles(missing_role) if missing_role else {}
    tasks = {
        name: TaskInfo(name, str(e.get("description", f"a photo of a {name}")).strip(),
                       e.get("role") or seeded[name], e.get("family"), e.get("domain"))
        for name, e in entries.items() if name in task_pairs
    }
    role_source = "tasks.json" + (f" (+ seeded split, seed={ROLE_SPLIT_SEED}, for "
                                  f"{len(missing_role)} task(s) without a role)" if missing_role else "")
    return tasks, role_source, seeded


def _check_images(pairs: list[Pair], decode: bool, problems: list[str]) -> None:
    """Every image exists (decode: and opens with Pillow)."""
    unique = sorted({p.image for p in pairs})
    bad_images = []
    for path in unique:
        if decode:
            try:
                from PIL import Image
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 - any decoder failure means unreadable
                bad_images.append(f"{path} ({type(e).__name__})")
        elif not path.is_file():
            bad_images.append(f"{path} (missing)")
    if bad_images:
        problems.append(f"{len(bad_images)} of {len(unique)} image(s) are missing or unreadable, first: "
                        + "; ".join(bad_images[:5]))


def _check_roles(manifest: Path, pairs: list[Pair], tasks: dict, role_source: str, seeded: dict,
                 problems: list[str]) -> None:
    """A role given in tasks.json is a promise: unseen tasks are evaluated (test gallery), expert and train tasks
    are learnt from (train split)."""
    per_task_split = defaultdict(set)
    for p in pairs:
        per_task_split[p.task].add(p.split)
    explicit = {n for n, t in tasks.items() if "seeded" not in role_source or n not in seeded}
    for name, info in sorted(tasks.items()):
        needed = "test" if info.role == "unseen" else "train"
        if name in explicit and needed not in per_task_split[name]:
            problems.append(f"{manifest}: task {name!r} (role {info.role}) has no {needed!r} pairs")
