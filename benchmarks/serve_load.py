"""A bounded load test of `sglora-edge serve` on loopback: N client threads mixing task switches and searches.

    python benchmarks/serve_load.py --bundle B --gallery G --cache-dir C --clients 8 --duration 180 \
        --out benchmarks/results/MACHINE/serve.md

Starts `sglora-edge serve` on 127.0.0.1 (a free port) in a child process, waits until it answers, then each client
loops: with probability --switch a task switch (POST /api/tasks with a description drawn from a pool: the first
time each is new, generated and its gallery features computed at its first search; later ones come from the
cache), then a search (POST /api/search, one query from a pool, zero-shot beside it half the time), then the
thumbnail of the top hit half the time. It stops by itself after --duration seconds or --max-requests requests,
whichever comes first. Measured: requests/s, p50/p99 per endpoint, errors (non-2xx or failed), the server's RSS
every second (start = after indexing, before the first request); before the load, --idle-rounds rounds of one
client alone (a cached task switch, then a search: what one request costs without queueing); after it, one
`sglora-edge run` of the same bundle and gallery (a process per request: its cold start is paid every time).
Torch-free: it only talks HTTP and starts the two commands. Inputs: benchmarks/serve_load_inputs.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

DESCRIPTIONS = ["a photo of a lemon", "a photo of a pear", "a photo of a red apple", "a sketch of a fish",
                "a photo of a small dog", "a photo of a persian cat", "a watercolour of a boat", "a photo of a car",
                "a photo of a yellow flower", "a photo of a bird on a branch", "a sketch of a house",
                "a photo of a cup of coffee", "a photo of a green leaf", "a photo of a banana", "a drawing of a tree",
                "a photo of a bicycle"]
QUERIES = ["a lemon", "a pear on a table", "something round and yellow", "a small animal", "a dark object",
           "a green thing", "a bright photo", "a sketch"]


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def start_server(args, cli: list[str]) -> tuple[subprocess.Popen, str, float]:
    cmd = [*cli, "serve", "--bundle", str(args.bundle), "--gallery", str(args.gallery), "--port", "0",
           "--backend", args.backend, "--cache-dir", str(args.cache_dir)]
    clock = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = None
    while url is None:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"serve exited before it listened: {proc.wait()}")
        print(f"serve: {line.rstrip()}", file=sys.stderr)
        if line.startswith("serving "):
            url = line.split()[1].rstrip("/")
    threading.Thread(target=lambda: [print(f"serve: {x.rstrip()}", file=sys.stderr) for x in proc.stderr],
                     daemon=True).start()
    return proc, url, (time.perf_counter() - clock) * 1000


def run_once(args, cli: list[str]) -> dict:
    """One `sglora-edge run` on the same bundle and (already cached) gallery: what a process per request costs."""
    cmd = [*cli, "run", "--bundle", str(args.bundle), "--gallery", str(args.gallery), "--desc", DESCRIPTIONS[0],
           "-q", QUERIES[0], "--backend", args.backend, "--cache-dir", str(args.cache_dir), "--json"]
    clock = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = (time.perf_counter() - clock) * 1000
    if r.returncode != 0:
        raise SystemExit(f"run failed: {r.stderr}")
    return {"wall_ms": wall, "timings_ms": json.loads(r.stdout)["timings_ms"]}


def client(url: str, seed: int, stop_at: float, budget: list, lock: threading.Lock, out: list, searched: set):
    rng = random.Random(seed)
    task_id, records = None, []  # this client's (label, ms, ok); merged into `out` at the end
    with httpx.Client(base_url=url, timeout=300) as http:
        def call(label: str, method: str, path: str, **kw):
            with lock:
                if budget[0] <= 0:
                    return None
                budget[0] -= 1
            clock = time.perf_counter()
            try:
                r = http.request(method, path, **kw)
                ok, body = r.is_success, (r.json() if r.headers.get("content-type", "").startswith(
                    "application/json") else None)
                if not ok:
                    print(f"error: {method} {path}: {r.status_code} {r.text[:200]}", file=sys.stderr)
            except httpx.HTTPError as e:
                ok, body = False, None
                print(f"error: {method} {path}: {e}", file=sys.stderr)
            records.append((label, (time.perf_counter() - clock) * 1000, ok))
            return body if ok else None

        while time.time() < stop_at and budget[0] > 0:
            if task_id is None or rng.random() < 0.2:
                task = call("POST /api/tasks", "POST", "/api/tasks", json={"description": rng.choice(DESCRIPTIONS)})
                if task is None:
                    continue
                records[-1] = (f"POST /api/tasks ({'cached' if task['cached'] else 'new'})", *records[-1][1:])
                task_id = task["task_id"]
            with lock:
                first = task_id not in searched
                searched.add(task_id)
            zero = rng.random() < 0.5
            found = call("POST /api/search", "POST", "/api/search",
                         json={"task_id": task_id, "queries": [rng.choice(QUERIES)], "top_k": 5, "zero_shot": zero})
            if found is None:
                continue
            if first:  # its features over the whole gallery are computed by this call
                records[-1] = ("POST /api/search (first of a task)", *records[-1][1:])
            elif zero:
                records[-1] = ("POST /api/search (+ zero-shot)", *records[-1][1:])
            if rng.random() < 0.5:
                call("GET /api/images/{key}", "GET", next(iter(found["results"].values()))[0]["url"])
    with lock:
        out.extend(records)


def idle(url: str, rounds: int) -> dict:
    """One client alone: a cached task switch, then a search (zero-shot beside it every other round)."""
    times = defaultdict(list)
    with httpx.Client(base_url=url, timeout=300) as http:
        for d in DESCRIPTIONS[:2]:  # generated, and their features computed, before the clock
            http.post("/api/search", json={"task_id": http.post("/api/tasks", json={"description": d}).json()[
                "task_id"], "queries": [QUERIES[0]], "zero_shot": True}).raise_for_status()
        for i in range(rounds):
            clock = time.perf_counter()
            task = http.post("/api/tasks", json={"description": DESCRIPTIONS[i % 2]})
            task.raise_for_status()
            times["switch"].append((time.perf_counter() - clock) * 1000)
            clock = time.perf_counter()
            http.post("/api/search", json={"task_id": task.json()["task_id"], "queries": [QUERIES[i % len(QUERIES)]],
                                           "zero_shot": i % 2 == 0}).raise_for_status()
            times["search"].append((time.perf_counter() - clock) * 1000)
    return {k: float(np.percentile(v, 50)) for k, v in times.items()}


def render(args, *, version, health, end_health, started, elapsed, rows, total, errors, alone, rss_start, warm,
           rss_end, rss_max, searched, ready_ms, ran, command) -> str:
    """serve.md from the measurements."""
    return f"""# `sglora-edge serve` under load

Machine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, onnxruntime
{version['onnxruntime']}; backend {version['backend']['backend']} ({', '.join(version['backend']['providers'])}),
threads {version['backend']['threads'] or 'default'}. Client and server on the same machine (loopback).

Command (from the repository root, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}):

```bash
{command}
```

Bundle `{args.bundle}` ({version['bundle']['backbone']['ident']}, hash {version['bundle']['hash'][:12]}); gallery
`{args.gallery}`: {health['images']} images indexed at start ({health['skipped']} skipped); {args.clients} clients
for {elapsed:.0f} s (limit {args.duration:.0f} s or {args.max_requests} requests), {len(DESCRIPTIONS)} task
descriptions, {len(QUERIES)} queries.

**{total} requests in {elapsed:.0f} s: {total / elapsed:.1f} requests/s, {errors} errors.**

| endpoint | requests | per s | p50 ms | p99 ms | max ms | errors |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

`POST /api/tasks (new)`: a description seen for the first time (semantic encoder, aggregation, generator; two
clients asking for the same new description at once both count here); `(cached)`: its LoRA from the cache.
`POST /api/search (first of a task)`: the call that computes the task's features over the whole gallery (from the
cached prefix activations); later searches rank cached features (`+ zero-shot`: the zero-shot ranking beside it).
Under load the latencies are mostly queueing: {args.clients} synchronous clients on {os.cpu_count()} cores.

**One client alone** ({args.idle_rounds} rounds before the load): a cached task switch {alone['switch']:.1f} ms,
a search {alone['search']:.1f} ms (p50).

**Memory** (server RSS, sampled every second): {rss_start:.1f} MiB at the start (after indexing, before the
first request), {warm:.1f} MiB a quarter into the load, {rss_end:.1f} MiB at the end, {rss_max:.1f} MiB at most;
{len(searched)} tasks searched, {end_health['tasks']} kept (each task's features, {health['images']} x D in the
cache dtype, stay in RAM within --features-mb; thumbnails: an LRU of 512).

**Start-up, and the cold start a request no longer pays**: the server was ready {ready_ms:.0f} ms after it was
started (bundle load {health['startup_ms']['load']:.0f} ms, indexing {health['startup_ms']['index']:.0f} ms with a
cold cache). One `sglora-edge run` of the same bundle on the same (now cached) gallery took {ran['wall_ms']:.0f} ms
as a process, {ran['timings_ms']['cold_start']:.0f} ms of it cold start (bundle verification, sessions); through
`serve` a task switch + a search take {alone['switch'] + alone['search']:.1f} ms (one client alone).

Inputs: `bash benchmarks/serve_load_inputs.sh OUT WORLD` builds the bundle (`OUT/sglora-tiny_L1/bundle`) and the
gallery (`OUT/gallery`). Heavy jobs on this shared machine wait on one lock (`flock /tmp/sglora-heavy.lock`), which
this run held; lighter work of other sessions may have run beside it.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--gallery", type=Path, required=True)
    ap.add_argument("--cache-dir", type=Path, required=True, help="The server's cache (start it cold: a new folder).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=180, help="Seconds of load (it stops by itself).")
    ap.add_argument("--max-requests", type=int, default=200_000, help="Requests in all, at most.")
    ap.add_argument("--idle-rounds", type=int, default=100, help="Rounds of one client alone, before the load.")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--out", type=Path, required=True, help="serve.md to write")
    ap.add_argument("--cli", default=f"{sys.executable} -m sglora_edge.cli", help="How to call sglora-edge.")
    args = ap.parse_args()
    cli = shlex.split(args.cli)

    proc, url, ready_ms = start_server(args, cli)
    rss, stop_rss = [], threading.Event()
    try:
        health = httpx.get(f"{url}/api/health", timeout=30).json()
        version = httpx.get(f"{url}/api/version", timeout=30).json()

        def watch():
            while not stop_rss.is_set():
                rss.append((time.time(), rss_mib(proc.pid)))
                stop_rss.wait(1.0)
        threading.Thread(target=watch, daemon=True).start()
        time.sleep(1.5)
        alone = idle(url, args.idle_rounds)
        records, searched, lock, budget = [], set(), threading.Lock(), [args.max_requests]
        started = time.time()
        stop_at = started + args.duration
        threads = [threading.Thread(target=client, args=(url, i, stop_at, budget, lock, records, searched))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - started
        time.sleep(1.5)
        end_health = httpx.get(f"{url}/api/health", timeout=30).json()
    finally:
        stop_rss.set()
        proc.terminate()
        proc.wait(60)
    ran = run_once(args, cli)

    by = defaultdict(list)
    for label, ms, ok in records:
        by[label].append((ms, ok))
    rows = []
    for label in sorted(by):
        ms = np.array([m for m, _ in by[label]])
        errors = sum(not ok for _, ok in by[label])
        rows.append(f"| {label} | {len(ms)} | {len(ms) / elapsed:.1f} | {np.percentile(ms, 50):.1f} | "
                    f"{np.percentile(ms, 99):.1f} | {ms.max():.1f} | {errors} |")
    total, errors = len(records), sum(not ok for *_, ok in records)
    before = [m for t, m in rss if t < started]
    rss_start, rss_end, rss_max = before[-1], rss[-1][1], max(m for _, m in rss)
    warm = [m for t, m in rss if t <= started + elapsed / 4][-1]  # every description has been seen by then
    command = " ".join(shlex.quote(a) for a in sys.argv)
    doc = render(args, version=version, health=health, end_health=end_health, started=started, elapsed=elapsed,
                 rows=rows, total=total, errors=errors, alone=alone, rss_start=rss_start, warm=warm, rss_end=rss_end,
                 rss_max=rss_max, searched=searched, ready_ms=ready_ms, ran=ran, command=command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(doc)
    print(doc)


if __name__ == "__main__":
    main()
