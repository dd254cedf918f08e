"""The one way to write a file, on both sides: atomic_path (a file) and atomic_dir (a folder) — a unique temp name
beside the target, renamed into place only when complete, removed on failure, permissions as a plain open() or
mkdir() would give. And safetensors + JSON metadata for every artifact, checked on load.

Each artifact carries, in its safetensors header, one JSON document under the key `sglora`: {"kind",
"format_version", "backbone", "lora_spec", ...}. Loading checks kind and version, and whatever the caller expects
(backbone, LoRA spec) and says which field does not match. Nothing is ever unpickled. numpy + safetensors only:
the server imports this module from the runtime (docs/ARCHITECTURE.md, "Rooms and doors").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .errors import SGLoRAError

META_KEY = "sglora"  # the safetensors metadata key of every file either side writes
FORMAT_VERSION = 1


class ArtifactError(SGLoRAError):
    """An artifact is missing, malformed, or does not match what the caller needs."""


def _like_any_other(path: Path) -> None:
    """Permissions as a plain open()/mkdir() would give; mkstemp and mkdtemp make 0600 and 0700."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _like_any_other(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; when the block succeeds, swap it into place.

    Whatever is at `path` (folder or file) is replaced only after the new folder is complete, and
    is put back if the swap fails; on any failure the temp folder is removed. Whether `path` may
    be replaced at all is the caller's decision, checked before (and, for slow builds, again at
    the end of the block)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            _like_any_other(p)
        if not path.exists():
            os.replace(tmp, path)
            return
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # put the previous one back
            raise
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_array(path: str | Path, array: np.ndarray) -> None:
    """np.save, atomically: a reader never sees a partial file."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; keeps this module importable without torch
        value = value.detach().cpu().contiguous().numpy()
    value = np.asarray(value)
    # np.ascontiguousarray would turn a 0-d array (e.g. logit_scale) into shape (1,)
    return value if value.flags.c_contiguous else np.ascontiguousarray(value)


def save_artifact(path: str | Path, tensors: dict[str, Any], kind: str, meta: dict[str, Any]) -> None:
    """Write tensors + metadata to `path` atomically. Refuses NaN/inf so a broken run cannot leave a poisoned file."""
    arrays = {k: _to_numpy(v) for k, v in tensors.items()}
    for k, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ArtifactError(f"refusing to write {path}: tensor {k!r} contains NaN or inf")
    header = {"kind": kind, "format_version": FORMAT_VERSION, **meta}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={META_KEY: json.dumps(header, sort_keys=True)})


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise ArtifactError(f"{path}: not a safetensors file ({e})") from e
    if raw is None:
        raise ArtifactError(f"{path}: has no '{META_KEY}' metadata; it was not written by sglora-edge")
    return json.loads(raw)


def check_meta(path: str | Path, meta: dict[str, Any], kind: str | None = None, **expect: Any) -> None:
    if kind is not None and meta.get("kind") != kind:
        raise ArtifactError(f"{path}: is a {meta.get('kind')!r} artifact, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {meta.get('format_version')} is not supported "
                            f"(this sglora-edge reads version {FORMAT_VERSION}); rebuild it with this version")
    for key, want in expect.items():
        if want is not None and meta.get(key) != want:
            raise ArtifactError(f"{path}: {key} is {meta.get(key)!r} but {want!r} is needed here; "
                                f"rebuild it with the same {key}")


def load_artifact(path: str | Path, kind: str | None = None, **expect: Any) -> tuple[dict[str, np.ndarray], dict]:
    """Load (tensors, meta); check kind, version and every `expect` field (e.g. backbone=..., lora_spec=...)."""
    meta = read_meta(path)
    check_meta(path, meta, kind, **expect)
    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, a in tensors.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ArtifactError(f"{path}: tensor {k!r} contains NaN or inf; the file is corrupt, regenerate it")
    return tensors, meta
