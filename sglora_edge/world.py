"""The embedded world: a procedurally rendered image-caption dataset in our data contract.

Each class of a family is a task whose images vary in exactly the two attributes its
family cares about; fine captions describe those two attributes, coarse `pretrain`
captions name the class and only now and then one attribute word. Two rendering
domains ("photo", "sketch") give every class one task per domain. See docs/WORLD.md
for the design and its reasons. numpy + Pillow only, no torch.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from runtime.artifacts import atomic_dir

from .errors import OutputExists, SGLoRAError

# 2: 180 test images per task (3 galleries of 60) from a fresh random stream, so no decision made on version 1's
# test images has seen them; pretrain/train/val are byte-identical to version 1 (docs/WORLD.md, "Version 2").
GENERATOR_VERSION = "2"
TEST_STREAM = "test:v2"  # the rng key of the test split (version 1 used "test")
SPLITS = ("pretrain", "train", "val", "test")
ROLE_ORDER = ("expert", "train", "unseen")


@dataclass(frozen=True)
class WorldPreset:
    families: tuple[str, ...]  # family names (keys of FAMILIES); each family = 2 described attributes + classes
    classes_per_family: int  # the first N classes of each family's catalogue list
    n_train: int  # train images per task (task = class x domain)
    n_val: int  # val images per task
    n_test: int  # test images per task, evaluated as disjoint galleries of `gallery_size`
    n_pretrain: int  # pretrain images per class per domain
    captions_per_image: int = 2  # distinct fine captions per train/val/test image
    pretrain_max_captions: int = 2  # pretrain images get 1..this many coarse captions
    pretrain_attribute_rate: float = 0.3  # share of pretrain captions naming one attribute word
    image_size: int = 64  # square RGB renders; geometry is defined at 64 and scaled
    domains: tuple[str, ...] = ("photo", "sketch")  # rendering domains; each class is a task in each
    gallery_size: int = 60  # images per test gallery (retrieval within one class, as in the paper)


# --- the catalogue (fixed by design; never tuned per method) ------------------------------

# Attribute type -> values, each (value, pre-nominal adjective or None, post-nominal phrase, predicate).
ATTRIBUTES: dict[str, list[tuple[str, str | None, str, str]]] = {
    "colour": [(c, c, f"in {c}", c) for c in ("red", "yellow", "green", "blue", "purple")],
    "size": [("small", "small", "of small size", "small"),
             ("medium", "medium-sized", "of medium size", "medium-sized"),
             ("large", "large", "of large size", "large"),
             ("huge", "huge", "of huge size", "huge")],
    "position": [(p, None, ph, ph) for p, ph in (("left", "on the left"), ("right", "on the right"),
                                                 ("top", "at the top"), ("bottom", "at the bottom"),
                                                 ("centre", "in the centre"))],
    "orientation": [("upright", "upright", "standing upright", "upright"),
                    ("upside down", "upside-down", "turned upside down", "upside down"),
                    ("tilted left", "left-tilted", "tilted to the left", "tilted to the left"),
                    ("tilted right", "right-tilted", "tilted to the right", "tilted to the right"),
                    ("sideways", "sideways", "turned sideways", "sideways")],
    "pattern": [("plain", "plain", "with no pattern", "plain"),
                ("striped", "striped", "with stripes", "striped"),
                ("dotted", "dotted", "with dots", "dotted"),
                ("checked", "checked", "with a checked pattern", "checked")],
    "count": [(n, None, "", "") for n in ("one", "two", "three", "four")],  # expressed as the determiner
    "background": [(b, None, f"on a {b} background", f"against a {b} background")
                   for b in ("black", "dark grey", "grey", "light grey", "white")],
}
ADJECTIVE_ORDER = ("size", "orientation", "colour", "pattern")  # English order in "a small red apple"

# family -> (described attribute pair, classes). Every attribute type is shared by 2-3 families.
FAMILIES: dict[str, tuple[tuple[str, str], tuple[str, ...]]] = {
    "fruit": (("colour", "size"), ("apple", "pear", "lemon", "cherry", "banana", "plum")),
    "vehicle": (("pattern", "background"), ("car", "bus", "truck", "tractor", "van", "bicycle")),
    "animal": (("position", "orientation"), ("cat", "dog", "horse", "rabbit", "fox", "cow")),
    "flower": (("count", "colour"), ("rose", "tulip", "daisy", "lily", "sunflower", "poppy")),
    "tool": (("count", "orientation"), ("hammer", "wrench", "saw", "shovel", "axe", "screwdriver")),
    "furniture": (("position", "background"), ("chair", "table", "sofa", "bed", "desk", "stool")),
    "bird": (("size", "background"), ("owl", "duck", "parrot", "penguin", "eagle", "swan")),
    "clothing": (("pattern", "colour"), ("shirt", "hat", "dress", "sock", "glove", "boot")),
}

PRESETS: dict[str, WorldPreset] = {
    "micro": WorldPreset(families=("fruit", "vehicle", "tool"), classes_per_family=3,
                         n_train=12, n_val=4, n_test=24, n_pretrain=8, gallery_size=8),
    "default": WorldPreset(families=tuple(FAMILIES), classes_per_family=6,
                           n_train=100, n_val=20, n_test=180, n_pretrain=60),
}

COLOURS = {"red": (210, 40, 40), "yellow": (235, 200, 40), "green": (40, 160, 60),
           "blue": (40, 80, 215), "purple": (140, 60, 180)}
BACKGROUND_LEVELS = {"black": 20, "dark grey": 75, "grey": 130, "light grey": 185, "white": 240}
SIZE_RADII = {"small": 9, "medium": 14, "large": 19, "huge": 24}  # glyph radius in pixels at 64x64
DEFAULT_RADIUS, POSITION_RADIUS, COUNT_RADIUS = 19.0, 14.0, 10.5  # when size is not described
POSITION_OFFSETS = {"left": (-16, 0), "right": (16, 0), "top": (0, -16), "bottom": (0, 16), "centre": (0, 0)}
ROTATIONS = {"upright": 0.0, "upside down": 180.0, "tilted left": 45.0, "tilted right": -45.0, "sideways": 90.0}
COUNT_LAYOUTS = {"one": [(0, 0)], "two": [(-14, 0), (14, 0)], "three": [(-15, 9), (15, 9), (0, -14)],
                 "four": [(-13, -13), (13, -13), (-13, 13), (13, 13)]}
CAPTION_FRAMES = {"photo": ("{}", "a photo of {}", "a picture of {}"),
                  "sketch": ("a sketch of {}", "a drawing of {}")}
PRETRAIN_FRAMES = {"photo": ("a photo of {}", "{}", "a picture of {}"),
                   "sketch": ("a sketch of {}", "a drawing of {}", "a simple sketch of {}")}
DESCRIPTION_FRAME = {"photo": "a photo of {}", "sketch": "a sketch of {}"}


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def task_name(cls: str, domain: str) -> str:
    return cls if domain == "photo" else f"{cls} {domain}"  # "apple", "apple sketch"


def stable_int(*parts: object) -> int:
    """A process-independent hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng([seed, stable_int(*parts)])


# --- glyphs: class identity = a family base shape + class-specific darker parts --------------

def _ellipse(cx, cy, rx, ry, rot=0.0, n=20):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return _turn(np.stack([rx * np.cos(t), ry * np.sin(t)], 1), rot) + (cx, cy)


def _rect(x0, y0, x1, y1):
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], float)


def _ngon(cx, cy, r, n, rot):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rot
    return np.stack([cx + r * np.sin(t), cy - r * np.cos(t)], 1)


def _turn(points, degrees):
    a = np.deg2rad(degrees)  # positive = counter-clockwise on screen (y points down)
    c, s = np.cos(a), np.sin(a)
    return points @ np.array([[c, -s], [s, c]])


# Unit coordinates: the glyph lives in [-1, 1]^2, y down. Siblings share the base; bases are
# bulky so a pattern has room to show.
FAMILY_BASES = {
    "fruit": [_ellipse(0, 0.1, 0.7, 0.65)],
    "vehicle": [_rect(-0.9, -0.45, 0.9, 0.35), _ellipse(-0.55, 0.45, 0.22, 0.22), _ellipse(0.55, 0.45, 0.22, 0.22)],
    "animal": [_ellipse(0, 0.1, 0.65, 0.4), _rect(-0.45, 0.3, -0.25, 0.9), _rect(0.25, 0.3, 0.45, 0.9)],
    "flower": [_rect(-0.1, -0.1, 0.1, 1.0), _ellipse(0, -0.35, 0.45, 0.45)],
    "tool": [_rect(-0.13, -0.3, 0.13, 1.0)],
    "furniture": [_rect(-0.75, -0.1, 0.75, 0.2), _rect(-0.75, 0.2, -0.52, 0.9), _rect(0.52, 0.2, 0.75, 0.9)],
    "bird": [_ellipse(0, 0.15, 0.6, 0.48)],
    "clothing": [np.array([(-0.45, -0.75), (0.45, -0.75), (0.7, 0.85), (-0.7, 0.85)], float)],
}


def _random_part(rng: np.random.Generator) -> np.ndarray:
    """A part near the rim (ear, handle, cabin...), so it changes the silhouette and leaves
    the middle of the base free for patterns."""
    size = rng.uniform(0.2, 0.4)
    angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.8)
    cx, cy = np.clip(distance * np.array([np.cos(angle), np.sin(angle)]), size - 1, 1 - size)
    kind = rng.integers(4)
    if kind == 0:
        return _ellipse(cx, cy, size, size * rng.uniform(0.5, 1.0), rng.uniform(0, 180))
    if kind == 1:
        return _turn(_rect(-size, -size * 0.45, size, size * 0.45), rng.uniform(0, 180)) + (cx, cy)
    return _ngon(cx, cy, size, int(3 + kind), rng.uniform(0, np.pi))  # triangle or pentagon


def _shade_map(glyph, px=24) -> np.ndarray:
    img = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(img)
    for polygon, is_part in glyph:
        draw.polygon([tuple(p) for p in (polygon + 1) * px / 2], fill=150 if is_part else 255)
    return np.asarray(img, np.float32) / 255


@functools.lru_cache(maxsize=None)
def class_glyphs(family: str) -> dict[str, list[tuple[np.ndarray, bool]]]:
    """Glyphs for every class of a family: base + 2-3 random parts, redrawn until it differs
    from its earlier siblings. Fixed by the class names, not by the world seed, so a class
    looks the same in every world and in every preset."""
    glyphs: dict[str, list[tuple[np.ndarray, bool]]] = {}
    maps: list[np.ndarray] = []
    for cls in FAMILIES[family][1]:
        rng = np.random.default_rng(stable_int("glyph", family, cls))
        for _attempt in range(200):
            parts = [_random_part(rng) for _ in range(rng.integers(2, 4))]
            glyph = [(p, False) for p in FAMILY_BASES[family]] + [(p, True) for p in parts]
            shade = _shade_map(glyph)
            if all(np.abs(shade - m).mean() > 0.12 for m in maps):
                break
        glyphs[cls] = glyph
        maps.append(shade)
    return glyphs


# --- rendering -------------------------------------------------------------------------

@dataclass
class Scene:
    """Everything that decides one image (after jitter)."""
    colour: tuple[float, float, float]
    centres: list[tuple[float, float]]
    radius: float
    rotation: float
    pattern: str
    background: str | None  # None = the domain's default background


def make_scene(family: str, cls_colour: str, values: dict[str, str], rng: np.random.Generator, s: float) -> Scene:
    """Described attributes come from `values`; the others are held at family defaults,
    jittered slightly (never across a value boundary) but never described."""
    colour = np.array(COLOURS[values.get("colour", cls_colour)], float) + rng.normal(0, 6, 3)
    if "count" in values:
        radius, offsets = COUNT_RADIUS, COUNT_LAYOUTS[values["count"]]
    elif "position" in values:
        radius, offsets = POSITION_RADIUS, [POSITION_OFFSETS[values["position"]]]
    elif "size" in values:
        radius, offsets = float(SIZE_RADII[values["size"]]), [(0, 0)]
    else:
        radius, offsets = DEFAULT_RADIUS, [(0, 0)]
    radius *= rng.uniform(0.95, 1.05)
    shift = rng.uniform(-2, 2, 2)
    return Scene(colour=tuple(np.clip(colour, 0, 255)),
                 centres=[((32 + dx + shift[0]) * s, (32 + dy + shift[1]) * s) for dx, dy in offsets],
                 radius=radius * s,
                 rotation=ROTATIONS[values.get("orientation", "upright")] + rng.uniform(-6, 6),
                 pattern=values.get("pattern", "plain"),
                 background=values.get("background"))


def pattern_mask(pattern: str, size: int, s: float, rng: np.random.Generator) -> np.ndarray | None:
    """Pattern cells of 4-6 px at 64x64, so they are still 2-3 px after a 2x downsample."""
    if pattern == "plain":
        return None
    y, x = np.mgrid[0:size, 0:size] + rng.integers(0, 12, 2)[:, None, None]
    if pattern == "striped":
        return (y // round(4 * s)) % 2 == 0
    if pattern == "checked":
        return (x // round(6 * s) + y // round(6 * s)) % 2 == 0
    period = round(8 * s)  # dotted: discs of radius 2.5 px on an 8 px grid
    return (x % period - period / 2) ** 2 + (y % period - period / 2) ** 2 <= (2.5 * s) ** 2


def _glyph_polygons(glyph, scene: Scene):
    for cx, cy in scene.centres:
        for polygon, is_part in glyph:
            yield [tuple(p) for p in _turn(polygon, scene.rotation) * scene.radius + (cx, cy)], is_part


def render(domain: str, glyph, scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    s = size / 64
    mask_img, parts_img = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    mask_draw, parts_draw = ImageDraw.Draw(mask_img), ImageDraw.Draw(parts_img)
    polygons = list(_glyph_polygons(glyph, scene))
    for points, is_part in polygons:
        mask_draw.polygon(points, fill=255)
        if is_part:
            parts_draw.polygon(points, fill=255)
    mask = np.asarray(mask_img) > 0
    pattern = pattern_mask(scene.pattern, size, s, rng)
    colour = np.array(scene.colour, np.float32)
    if domain == "photo":
        # Filled glyph on a noisy textured background; parts darker so inner structure shows.
        level = BACKGROUND_LEVELS[scene.background] if scene.background else rng.uniform(120, 170)
        amplitude = 10 if scene.background else 22  # keep described brightness levels apart
        low = np.asarray(Image.fromarray(rng.standard_normal((5, 5)).astype(np.float32))
                         .resize((size, size), Image.BILINEAR))
        grain = np.repeat(np.repeat(rng.standard_normal((size // 2, size // 2)), 2, 0), 2, 1)
        canvas = level + rng.normal(0, 8, 3) + (low * amplitude + grain * 6)[..., None]
        fill = np.broadcast_to(colour, canvas.shape).copy()
        fill[np.asarray(parts_img) > 0] *= 0.62
        if pattern is not None:
            fill[pattern] = fill[pattern] * 0.45 + 255 * 0.55
        canvas[mask] = fill[mask]
        return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    # sketch: plain paper, glyph outlines in coloured ink, pattern drawn in ink inside the glyph.
    level = BACKGROUND_LEVELS[scene.background] if scene.background else 236
    paper = level + rng.uniform(-6, 6) + np.array([2, 0, -6])
    luminance = float(colour @ [0.299, 0.587, 0.114])
    if level >= 128:  # ink at least 70 grey levels darker than the paper...
        ink = colour * min(0.75, (level - 70) / luminance)
    else:  # ...or, on dark paper, at least 90 lighter
        mix = float(np.clip((level + 90 - luminance) / (255 - luminance), 0.35, 1))
        ink = colour * (1 - mix) + 255 * mix
    canvas = np.broadcast_to(paper, (size, size, 3)).astype(np.float32).copy()
    if pattern is not None:
        inked = pattern & mask
        canvas[inked] = canvas[inked] * 0.3 + ink * 0.7
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    ink_rgb = tuple(int(v) for v in np.clip(ink, 0, 255))
    for points, _is_part in polygons:
        draw.polygon(points, outline=ink_rgb, width=max(2, round(3 * s)))
    return image


# --- captions --------------------------------------------------------------------------

def _words(attribute: str, value: str) -> tuple[str | None, str, str]:
    return next(w[1:] for w in ATTRIBUTES[attribute] if w[0] == value)


def fine_noun_phrases(cls: str, values: dict[str, str]) -> list[str]:
    """All paraphrases naming the class and both described attribute values."""
    count = values.get("count")
    described = [(a, values[a]) for a in values if a != "count"]
    noun, be = (cls, "is") if count in (None, "one") else (plural(cls), "are")
    determiners = {None: [None], "one": ["one", "a single"]}.get(count, [count])
    bodies: list[str] = []
    if len(described) == 2:
        (a, va), (b, vb) = sorted(described, key=lambda av: ADJECTIVE_ORDER.index(av[0])
                                  if av[0] in ADJECTIVE_ORDER else 99)
        (adj_a, post_a, pred_a), (adj_b, post_b, pred_b) = _words(a, va), _words(b, vb)
        if adj_a and adj_b:
            bodies += [f"{adj_a} {adj_b} {noun}", f"{noun}, {pred_a} and {pred_b}"]
        bodies += [f"{adj_x} {noun} {post_y}" for adj_x, post_y in ((adj_a, post_b), (adj_b, post_a)) if adj_x]
        # Two post-nominal phrases: adjective-like ones first ("a car with stripes on a black
        # background", not "... on a black background with stripes"), both orders when alike.
        post_1, post_2 = (post_a, post_b) if adj_a or not adj_b else (post_b, post_a)
        bodies += [f"{noun} {post_1} {post_2}"] + ([f"{noun} {post_2} {post_1}"] if bool(adj_a) == bool(adj_b) else [])
        bodies += [f"{noun} that {be} {pred_a} and {pred_b}", f"{noun} that {be} {pred_b} and {pred_a}"]
    else:  # a count family: the count is the determiner, one other attribute is described
        adj, post, pred = _words(*described[0])
        bodies += ([f"{adj} {noun}"] if adj else []) + [f"{noun} {post}", f"{noun} that {be} {pred}"]
    phrases = [f"{d} {b}" if d else with_article(b) for d in determiners for b in bodies]
    if count not in (None, "one"):
        phrases += [f"a group of {count} {b}" for b in bodies[:1]]
    return phrases


def fine_captions(cls: str, domain: str, values: dict[str, str], n: int, rng: np.random.Generator) -> list[str]:
    phrases = fine_noun_phrases(cls, values)
    chosen = rng.choice(len(phrases), size=min(n, len(phrases)), replace=False)
    frames = CAPTION_FRAMES[domain]
    return [frames[rng.integers(len(frames))].format(phrases[i]) for i in chosen]


def pretrain_caption(cls: str, domain: str, values: dict[str, str], rate: float, rng: np.random.Generator) -> str:
    """Names the class; with probability `rate` also one of the family's attribute words."""
    count = values.get("count", "one")
    noun = cls if count == "one" else plural(cls)
    if rng.random() < rate:
        attribute = list(values)[rng.integers(len(values))]
        if attribute == "count":
            phrase = f"{'a single' if count == 'one' else count} {noun}"
        else:
            adj, post, _pred = _words(attribute, values[attribute])
            phrase = f"{adj} {noun}" if adj and rng.random() < 0.5 else f"{noun} {post}"
            phrase = with_article(phrase) if count == "one" else f"some {phrase}"
    else:
        phrase = with_article(noun) if count == "one" else f"some {noun}"
    frames = PRETRAIN_FRAMES[domain]
    return frames[rng.integers(len(frames))].format(phrase)


# --- the world -------------------------------------------------------------------------

def assign_roles(seed: int, preset: WorldPreset) -> dict[tuple[str, str], str]:
    """Per (domain, family): a seeded permutation of the classes, split in thirds
    expert / train / unseen (remainders go to unseen, keeping experts a minority)."""
    roles = {}
    for domain in preset.domains:
        for family in preset.families:
            classes = FAMILIES[family][1][:preset.classes_per_family]
            order = rng_for(seed, "roles", domain, family).permutation(len(classes))
            third = len(classes) // 3
            for rank, i in enumerate(order):
                roles[domain, classes[i]] = ROLE_ORDER[min(rank // third, 2)] if third else "unseen"
    return roles


def balanced_combinations(attributes: tuple[str, str], n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """n attribute combinations cycling through all of them in fresh random orders, so every
    combination appears (when n allows) and none appears more than once above the others."""
    grid = list(itertools.product(*[[w[0] for w in ATTRIBUTES[a]] for a in attributes]))
    order = np.concatenate([rng.permutation(len(grid)) for _ in range(-(-n // len(grid)))])[:n]
    return [dict(zip(attributes, grid[i])) for i in order]


def _dump_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def class_colour(family: str, cls: str) -> str:
    """The fixed colour of a class in families where colour is not described."""
    return list(COLOURS)[stable_int("colour", family, cls) % len(COLOURS)]


def _render_task(job: tuple[Path, int, WorldPreset, str, str, str]) -> list[str]:
    """Render every image of one (family, domain, class) and return its manifest lines.
    Seeded per (domain, family, class, split), so the result is the same in any process/order."""
    out, seed, preset, family, domain, cls = job
    attributes = FAMILIES[family][0]
    glyph = class_glyphs(family)[cls]
    size, s = preset.image_size, preset.image_size / 64
    per_split = {"pretrain": preset.n_pretrain, "train": preset.n_train, "val": preset.n_val, "test": preset.n_test}
    task, folder = task_name(cls, domain), f"images/{domain}/{cls.replace(' ', '_')}"
    (out / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for split in SPLITS:
        rng = rng_for(seed, domain, family, cls, TEST_STREAM if split == "test" else split)
        for i, values in enumerate(balanced_combinations(attributes, per_split[split], rng)):
            scene = make_scene(family, class_colour(family, cls), values, rng, s)
            relative = f"{folder}/{split}_{i:04d}.png"
            render(domain, glyph, scene, size, rng).save(out / relative, format="PNG")
            if split == "pretrain":
                k = int(rng.integers(1, preset.pretrain_max_captions + 1))
                captions = list(dict.fromkeys(
                    pretrain_caption(cls, domain, values, preset.pretrain_attribute_rate, rng) for _ in range(k)))
            else:
                captions = fine_captions(cls, domain, values, preset.captions_per_image, rng)
            lines += [_dump_json({"image": relative, "caption": c, "task": task, "split": split}) for c in captions]
    return lines


def _generate(out: Path, seed: int, preset_name: str, preset: WorldPreset, progress: bool, workers: int) -> dict:
    roles = assign_roles(seed, preset)
    per_task = preset.n_pretrain + preset.n_train + preset.n_val + preset.n_test
    total = len(roles) * per_task
    tasks, families, jobs = {}, {}, []
    for family in preset.families:
        attributes, catalogue = FAMILIES[family]
        classes = catalogue[:preset.classes_per_family]
        n_combinations = int(np.prod([len(ATTRIBUTES[a]) for a in attributes]))
        families[family] = {"attributes": list(attributes), "classes": list(classes),
                            "class_colours": {c: class_colour(family, c) for c in classes},
                            "n_combinations": n_combinations,
                            # images sharing a combination share their descriptions, so a
                            # text->image R@1 above this is luck, not understanding
                            "test_r_at_1_ceiling": round(min(n_combinations, preset.gallery_size) / preset.gallery_size, 4)}
        for domain in preset.domains:
            for cls in classes:
                tasks[task_name(cls, domain)] = {"description": DESCRIPTION_FRAME[domain].format(with_article(cls)),
                                                 "role": roles[domain, cls], "family": family, "domain": domain}
                jobs.append((out, seed, preset, family, domain, cls))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="img", desc="world")
    lines: list[str] = []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for job_lines in (pool.map(_render_task, jobs) if pool else map(_render_task, jobs)):  # in job order
            lines += job_lines
            if bar is not None:
                bar.update(per_task)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if bar is not None:
        bar.close()
    pairs_by_split = {sp: sum(f'"split":"{sp}"' in line for line in lines) for sp in SPLITS}
    tasks_by_role = {r: sum(t["role"] == r for t in tasks.values()) for r in ROLE_ORDER}
    world = {
        "generator": "sglora_edge.world", "generator_version": GENERATOR_VERSION,
        "seed": seed, "preset": preset_name, "preset_fields": asdict(preset),
        "role_assignment": {"seed": seed, "method": "per (domain, family): rng_for(seed, 'roles', domain, family)"
                            ".permutation(classes); first third expert, next third train, rest unseen"},
        "families": families,
        "attributes": {a: [{"value": w[0], "adjective": w[1], "phrase": w[2], "predicate": w[3]} for w in ws]
                       for a, ws in ATTRIBUTES.items()},
        "domains": {"photo": "filled glyph, darker parts, on a noisy textured background",
                    "sketch": "glyph outlines in coloured ink on plain paper, patterns inked inside"},
        "glyphs": "fixed by class names (family base + 2-3 parts), independent of the seed",
        "rendering": {"colours": COLOURS, "background_levels": BACKGROUND_LEVELS, "size_radii": SIZE_RADII,
                      "default_radius": DEFAULT_RADIUS, "position_radius": POSITION_RADIUS,
                      "count_radius": COUNT_RADIUS, "position_offsets": POSITION_OFFSETS,
                      "rotations": ROTATIONS, "count_layouts": COUNT_LAYOUTS},
        "counts": {"n_images": total, "n_pairs": len(lines), "pairs_by_split": pairs_by_split,
                   "n_tasks": len(tasks), "tasks_by_role": tasks_by_role},
    }
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "tasks.json").write_text(_dump_json(tasks) + "\n", encoding="utf-8")
    (out / "world.json").write_text(json.dumps(world, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    return world["counts"]


def write_world(out: str | Path, seed: int = 0, preset: str = "default", overwrite: bool = False,
                progress: bool = True, workers: int | None = None) -> dict:
    """Render the world into `out` (built in a temp folder beside it, then renamed into place).

    Refuses a non-empty `out` unless overwrite=True, and even then only replaces a folder that
    holds a manifest.jsonl (a dataset), never an arbitrary directory. `workers` processes
    render in parallel (default: up to 2); the output does not depend on it."""
    if preset not in PRESETS:
        raise SGLoRAError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(PRESETS[preset].domains) - set(DESCRIPTION_FRAME)
    if unknown:
        raise SGLoRAError(f"preset {preset!r} names unknown domains {sorted(unknown)}; known: {sorted(DESCRIPTION_FRAME)}")
    out = Path(out)
    existing = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if existing and not overwrite:
        raise OutputExists(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if existing and not (out / "manifest.jsonl").is_file():
        raise OutputExists(f"{out} is not a dataset folder (no manifest.jsonl); refusing to replace it")
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        counts = _generate(tmp, seed, preset, PRESETS[preset], progress, workers or min(2, os.cpu_count() or 1))
    seconds = time.perf_counter() - start
    return {"out": str(out), **counts, "seconds": round(seconds, 3),
            "images_per_s": round(counts["n_images"] / seconds, 1)}
