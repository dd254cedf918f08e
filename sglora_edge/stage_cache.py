"""The one cache of `reproduce`'s stages: a stage's result is kept with a key naming what it depends on, reused
while the key matches, rebuilt (and its wall time recorded) when it does not or when the file does not load."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from runtime.artifacts import ArtifactError, write_json


def key_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    def __init__(self, folder: Path):
        self.folder = folder  # JSON results and timings.json live here
        self.timings_path = folder / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}

    def timed(self, stage: str, fn, *args, **kwargs):
        """Run a stage and record its wall time (a cached stage keeps the time it took when it ran)."""
        t0 = time.time()
        result = fn(*args, **kwargs)
        if stage not in self.timings:
            self.timings[stage] = round(time.time() - t0, 1)
            write_json(self.timings_path, self.timings)
        return result

    def stored(self, stage: str, path: Path, key, build, load, save):
        """The artifact at `path` if it loads and records `key` (hashed), else build() it (timed as `stage`) and
        save it with the key. load(path) -> (artifact, recorded key); save(path, artifact, key)."""
        key = key_of(key)
        if path.is_file():
            try:
                value, recorded = load(path)
                if recorded == key:
                    return value
            except (ArtifactError, ValueError, KeyError):  # truncated, another format: rebuilt
                pass
        value = self.timed(stage, build)
        save(path, value, key)
        return value

    def path(self, name: str) -> Path:
        return self.folder / f"{name.replace(':', '_').replace('>', '')}.json"

    def json(self, name: str, key, build):
        """A JSON-able result under FOLDER/<name>.json."""
        path = self.path(name)
        return self.stored(name, path, key, build, lambda p: (lambda d: (d["value"], d.get("key")))(
            json.loads(p.read_text())), lambda p, v, k: write_json(p, {"key": k, "value": v}))

    def by_method(self, name: str, deps: dict[str, str], build) -> dict:
        """A record {"methods": {method: key}, "per_task": ..., "explanations": ...} under FOLDER/<name>.json in which
        every method is cached by its own key: build(todo, record) fills in only the methods whose key changed
        (timed as `name`), so a new or changed method is evaluated alone."""
        path = self.path(name)
        record = json.loads(path.read_text()) if path.is_file() else {}
        if "methods" not in record:  # none yet, or another layout: start afresh
            record = {"methods": {}, "per_task": {}, "explanations": {}}
        todo = [m for m in deps if record["methods"].get(m) != deps[m]]
        if todo:
            self.timed(name + (f":{len(todo)}" if len(todo) < len(deps) else ""), build, todo, record)
            record["methods"].update({m: deps[m] for m in todo})
            write_json(path, record)
        return record
