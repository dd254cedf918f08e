"""The user's gallery, streamed: images are read, checked, decoded and preprocessed a batch at a time, and
what the engines compute from them is kept on disk, not in RAM.

Cache layout under `cache_dir` (default: the user's cache folder, `$XDG_CACHE_HOME/sglora-edge`):

    <bundle hash>/prefix-<dtype>/activations.sqlite           activations entering the first adapted block, one
                                                              row per image content hash (ActivationStore)
    <bundle hash>/features-<dtype>/<lora + gallery hash>.npy   LoRA-adapted image features [N, D]

Keys are content hashes, so a renamed or copied image hits the cache and an edited one does not. The
activations of every image a bundle has seen live in one SQLite file (not one file per image): each batch is
one transaction, so an interrupted or killed run leaves whole rows only, and two processes share the file
through SQLite's locking. A store that is not a database or is damaged is deleted and recomputed; a row of the
wrong size is dropped and recomputed. Feature files are written to a temp name and renamed into place, and
read back memory-mapped: peak memory does not grow with the gallery.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import sqlite3
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from .errors import InputError, SGLoRAError

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


STORE_FORMAT = "1"
CORRUPT = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}  # a damaged or foreign file: rebuilt, never trusted


class ForeignStore(sqlite3.DatabaseError, SGLoRAError):
    """A database, but not one this version wrote (another format or dtype): rebuilt like a damaged one."""


class ActivationStore:
    """Prefix activations keyed by image content hash: one SQLite file per bundle, dtype and graph precision.

    Thread-safe (one connection behind a lock); several processes may share the file (WAL journal, a busy
    timeout). A damaged file (SQLite says corrupt or not a database) is deleted and started afresh: every
    entry is a cache of what the images give, so the cost of losing it is recomputing it."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.rebuilt: list[str] = []  # why the file was thrown away, each time it was
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._shape: tuple[int, ...] | None = None

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        except (OSError, sqlite3.OperationalError) as e:
            raise InputError(f"--cache-dir {self.path.parent.parent.parent}: cannot write the gallery cache there "
                             f"({e}); pass a writable folder") from e
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers go on while another process writes
            conn.execute("PRAGMA synchronous=NORMAL")  # a commit survives a killed process (WAL), not power loss
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
                conn.execute("CREATE TABLE IF NOT EXISTS activations (key TEXT PRIMARY KEY, data BLOB NOT NULL)")
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?), ('dtype', ?)",
                             (STORE_FORMAT, self.dtype.name))
            meta = dict(conn.execute("SELECT name, value FROM meta"))
            if meta.get("format") != STORE_FORMAT or meta.get("dtype") != self.dtype.name:
                raise ForeignStore(f"written as format {meta.get('format')} {meta.get('dtype')}, "
                                            f"not format {STORE_FORMAT} {self.dtype.name}")
            self._shape = tuple(int(n) for n in meta["shape"].split(",")) if "shape" in meta else None
        except BaseException:
            conn.close()
            raise
        return conn

    def _rebuild(self, why: Exception) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self._shape = None
        self.rebuilt.append(f"{self.path}: {why}")

    def _run(self, op: Callable[[sqlite3.Connection], object]):
        """op(connection), with the file rebuilt and op retried once when SQLite finds it damaged."""
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._conn is None:
                        self._conn = self._open()
                    return op(self._conn)
                except sqlite3.DatabaseError as e:
                    damaged = isinstance(e, ForeignStore) or getattr(e, "sqlite_errorcode", None) in CORRUPT
                    if not damaged or attempt:
                        raise InputError(f"gallery cache {self.path}: {e}; delete it (it is only a cache) or pass "
                                         f"another --cache-dir") from e
                    self._rebuild(e)

    def has(self, keys: list[str]) -> set[str]:
        def op(conn):
            marks = ",".join("?" * len(keys))
            return {k for (k,) in conn.execute(f"SELECT key FROM activations WHERE key IN ({marks})", keys)}
        return self._run(op) if keys else set()

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        """{key: activations} for the keys present with rows of the right size; a wrong-size row is dropped."""
        def op(conn):
            marks = ",".join("?" * len(keys))
            rows = conn.execute(f"SELECT key, data FROM activations WHERE key IN ({marks})", keys).fetchall()
            size = None if self._shape is None else int(np.prod(self._shape)) * self.dtype.itemsize
            found, bad = {}, []
            for key, data in rows:
                if len(data) == size:
                    found[key] = np.frombuffer(data, self.dtype).reshape(self._shape)
                else:
                    bad.append(key)
            if bad:
                with conn:
                    conn.executemany("DELETE FROM activations WHERE key = ?", [(k,) for k in bad])
            return found
        return self._run(op) if keys else {}

    def put(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Add (key, activations) rows in one transaction: all of them are stored, or (killed midway) none."""
        items = iter(items)
        first = next(items, None)
        if first is None:
            return
        shape = first[1].shape

        def op(conn):
            with conn:
                if self._shape is None:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('shape', ?)", (",".join(map(str, shape)),))
                    self._shape = shape
                if shape != self._shape:
                    raise InputError(f"gallery cache {self.path}: activations of shape {shape}, the store holds "
                                     f"{self._shape}; delete it (it is only a cache)")
                conn.executemany("INSERT OR REPLACE INTO activations VALUES (?, ?)",
                                 ((k, np.ascontiguousarray(a, self.dtype).tobytes())
                                  for k, a in itertools.chain([first], items)))
        self._run(op)

    def __len__(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM activations").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@dataclass
class Gallery:
    """A gallery after one streaming pass: the usable images, what was skipped, and where their activations are."""
    paths: list[Path]  # usable images, gallery order
    keys: list[str]  # content hash of each
    store: ActivationStore | None  # prefix activations by key (None: the bundle disables the prefix cache)
    cache_dir: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # computes the activations of images the store lost since the pass (a damaged store another process rebuilt)
    recompute: Callable[[list[Path]], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def activations(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop-start, L, W] from the cache store (what it lost is computed again and put back)."""
        keys = self.keys[start:stop]
        found = self.store.get(keys)
        lost = [i for i, k in enumerate(keys) if k not in found]
        if lost and self.recompute is not None:
            fresh = self.recompute([self.paths[start + i] for i in lost])
            self.store.put((keys[i], a) for i, a in zip(lost, fresh))
            found.update((keys[i], a.astype(self.store.dtype)) for i, a in zip(lost, fresh))
        elif lost:
            raise InputError(f"gallery cache {self.store.path}: activations of {len(lost)} image(s) are gone; "
                             f"index the gallery again")
        return np.stack([found[k] for k in keys]).astype(np.float32)

    def skipped_summary(self, first: int = 3) -> str:
        names = ", ".join(f"{Path(p).name} ({why})" for p, why in self.skipped[:first])
        more = f" and {len(self.skipped) - first} more" if len(self.skipped) > first else ""
        return f"skipped {len(self.skipped)} file(s) that are not usable images: {names}{more}"
