"""The user's gallery, streamed: images are read, checked, decoded and preprocessed a batch at a time, and
what the engines compute from them is kept on disk, not in RAM.

Cache layout under `cache_dir` (default: the user's cache folder, `$XDG_CACHE_HOME/sglora-edge`):

    <bundle hash>/prefix-<dtype>/<image content hash>.npy      activations entering the first adapted block
    <bundle hash>/features-<dtype>/<lora + gallery hash>.npy   LoRA-adapted image features [N, D]

Keys are content hashes, so a renamed or copied image hits the cache and an edited one does not; every
file is written to a temp name and renamed into place, so an interrupted run leaves no half-written entry.
Files are read back memory-mapped: peak memory does not grow with the gallery.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
MAX_PIXELS = 64_000_000  # larger images are refused as decompression bombs (PIL's own guard is 89M, warn-only)


class BadImage(InputError):
    """One gallery file that cannot be used; the message says why (the run skips it)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sglora-edge"


def list_gallery(folder: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files under `folder`, recursively and sorted; files skipped by name with the reason)."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"--gallery {folder}: not found; pass a folder of images")
    if not folder.is_dir():
        raise InputError(f"--gallery {folder}: not a folder; pass the folder that holds the images")
    paths, skipped = [], []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.is_dir():
            continue
        if p.name.startswith("._"):  # macOS AppleDouble metadata beside every copied file, not an image
            skipped.append((str(p), "AppleDouble metadata file (macOS), not an image"))
        else:
            paths.append(p)
    if not paths:
        raise InputError(f"--gallery {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it"
                         + (f" ({len(skipped)} AppleDouble files only)" if skipped else "")
                         + "; pass a folder that holds images")
    return paths, skipped


def read_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or e})") from e
    if not data:
        raise BadImage("empty file (0 bytes)")
    return data


def preprocess_image(source: str | Path | bytes, cfg: dict) -> np.ndarray:
    """[3, H, W] float32, equal to open_clip's eval transform: RGB, bicubic resize of the shorter side
    (torchvision's size rule), center crop (torchvision's rounding), /255, normalise. BadImage if unusable."""
    data = read_file(Path(source)) if not isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadImage(f"{w}x{h} pixels: larger than {MAX_PIXELS:,} (a decompression bomb?)")
                im = im.convert(cfg.get("mode", "RGB"))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb ({e})") from e
    except Image.UnidentifiedImageError as e:  # its message is the repr of our BytesIO: say it plainly
        raise BadImage("not a readable image (unknown or corrupt format)") from e
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error ... per format
        raise BadImage(f"not a readable image ({type(e).__name__}: {e})") from e
    w, h = im.size
    side = cfg["resize_shorter_side"]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), RESAMPLE[cfg["interpolation"]])
    crop_h, crop_w = cfg["image_size"]
    top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
    im = im.crop((left, top, left + crop_w, top + crop_h))
    x = np.asarray(im, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temp name beside `path`, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class Gallery:
    """A gallery after one streaming pass: the usable images, what was skipped, and where their activations are."""
    paths: list[Path]  # usable images, gallery order
    keys: list[str]  # content hash of each
    prefix_dir: Path | None  # <key>.npy prefix activations (None: the bundle disables the prefix cache)
    cache_dir: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.paths)

    def activations(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop-start, L, W] read from the memory-mapped cache files."""
        return np.stack([np.load(self.prefix_dir / f"{k}.npy", mmap_mode="r") for k in self.keys[start:stop]]
                        ).astype(np.float32)

    def skipped_summary(self, first: int = 3) -> str:
        names = ", ".join(f"{Path(p).name} ({why})" for p, why in self.skipped[:first])
        more = f" and {len(self.skipped) - first} more" if len(self.skipped) > first else ""
        return f"skipped {len(self.skipped)} file(s) that are not usable images: {names}{more}"
