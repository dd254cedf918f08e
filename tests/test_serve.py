"""`sglora-edge serve`: the API's answers equal `run`'s, every bad request is a 4xx with one message, concurrent
requests answer as sequential ones do, the gallery store survives kill -9 and damage, and the page works in a real
browser (headless Chromium, slow)."""

import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from runtime.commands import listen
from runtime.errors import SGLoRAError
from runtime.gallery import ActivationStore, list_gallery
from runtime.pipeline import EdgeRuntime, run_retrieval
from runtime.serve import Service, create_app
from test_device import bomb_png
from test_export_runtime import DESC, build_world
from test_no_torch import BLOCK

ROOT = Path(__file__).resolve().parents[1]
DESCS = [DESC, "a photo of a pear", "a sketch of a fish", "a red apple on a plate"]


@pytest.fixture(scope="module")
def world(micro_world, tmp_path_factory):
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = build_world(micro_world, tmp_path_factory)
    finally:
        torch.set_num_threads(threads)
    w["others"] = sorted(p for p in (micro_world / "images" / "photo").rglob("*.png") if "lemon" not in p.parts)
    return w


def copy_gallery(world, folder: Path) -> Path:
    shutil.copytree(world["gallery"], folder)  # uploads write into the gallery folder: never the shared one
    return folder


def make_service(world, tmp_path, name="g", **kwargs) -> Service:
    rt = EdgeRuntime.load(world["minilm"]["bundle"], backend="ort-cpu", cache_dir=tmp_path / f"cache-{name}",
                          batch_size=4)
    return Service(rt, copy_gallery(world, tmp_path / name), **kwargs)


@pytest.fixture()
def client(world, tmp_path):
    service = make_service(world, tmp_path, max_tasks=3)
    with TestClient(create_app(service, max_upload_mb=0.05, max_json_kb=8), raise_server_exceptions=False) as c:
        c.service = service
        yield c


def test_api_answers_like_run(world, client, tmp_path):
    """Health, version, a task (cached the second time), a search with zero-shot beside it == `run`'s answer."""
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] == len(list_gallery(world["gallery"])[0])
    version = client.get("/api/version").json()
    assert version["api"] == "1" and version["bundle"]["hash"] == client.service.rt.bundle.hash
    assert version["zero_shot"] is True

    task = client.post("/api/tasks", json={"description": DESC})
    assert task.status_code == 200, task.text
    task = task.json()
    want = client.service.rt.generate(DESC).explain()
    assert task["experts"] == want["experts"] and task["weights"] == pytest.approx(want["weights"])
    assert task["out_of_distribution"] == want["out_of_distribution"] and task["cached"] is False
    again = client.post("/api/tasks", json={"description": f"  {DESC} "}).json()
    assert again["task_id"] == task["task_id"] and again["cached"] is True
    assert client.get(f"/api/tasks/{task['task_id']}").json()["experts"] == task["experts"]

    found = client.post("/api/search", json={"task_id": task["task_id"], "queries": ["a lemon", DESC], "top_k": 3,
                                             "zero_shot": True})
    assert found.status_code == 200, found.text
    found = found.json()
    ran = run_retrieval(world["minilm"]["bundle"], DESC, client.service.gallery_dir, queries=["a lemon", DESC],
                        top_k=3, backend="ort-cpu", cache_dir=tmp_path / "run-cache", zero_shot=True)
    for ours, theirs in ((found["results"], ran["results"]), (found["zero_shot"], ran["zero_shot_results"])):
        for q in ("a lemon", DESC):
            assert [(h["image"], h["score"]) for h in ours[q]] == \
                [(h["image"], pytest.approx(h["score"], abs=1e-6)) for h in theirs[q]]
    assert found["results"] != found["zero_shot"]  # the LoRA changed the ranking's scores

    # zero-shot is the frozen encoder: the all-zero LoRA == open_clip without a LoRA (fp16 cache)
    from sglora_edge.lora import encode_images
    zero, gallery = client.service.features(client.service.zero_shot)
    plain = encode_images(world["bb"].visual, world["bb"].load_images(gallery.paths)).numpy()
    assert np.abs(np.asarray(zero, np.float32) - plain).max() < 5e-3

    thumb = client.get(found["results"]["a lemon"][0]["url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 128
    assert {"/api/tasks", "/api/search", "/api/images", "/api/health", "/api/version"} <= \
        set(client.get("/openapi.json").json()["paths"])
    assert 'id="desc"' in client.get("/").text


def _png(rng, side=32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_bad_request_is_a_4xx_with_one_message(client, tmp_path):
    rng = np.random.default_rng(0)
    task_id = client.post("/api/tasks", json={"description": DESC}).json()["task_id"]
    png = _png(rng)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    bomb_png(tmp_path / "bomb.png", side=20_000)  # 400 M pixels claimed in a few hundred bytes
    bomb_png(tmp_path / "big.png", side=7_000)  # 49 M: PIL would open it, the service's limit is 40 M
    search = {"task_id": task_id, "queries": ["a lemon"]}

    def chunked(data: bytes):  # a streamed body: no Content-Length to refuse it by
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    cases = [  # (request, status, words of the message)
        (("post", "/api/tasks", {"json": {"description": "   "}}), 400, "description is empty"),
        (("post", "/api/tasks", {"json": {"description": ""}}), 400, "description is empty"),
        (("post", "/api/tasks", {"content": b'{"description": "caf\xe9"}',
                                 "headers": {"content-type": "application/json"}}), (400, 422), "not valid UTF-8"),
        (("post", "/api/tasks", {"content": b'{"description": "\\udc80"}',
                                 "headers": {"content-type": "application/json"}}), (400, 422), "not valid UTF-8"),
        (("post", "/api/tasks", {"content": b'{"description": ', "headers": {"content-type": "application/json"}}),
         422, "not valid JSON"),
        (("post", "/api/tasks", {"json": {}}), 422, "description: missing"),
        (("post", "/api/tasks", {"json": {"description": 3}}), 422, "description: Input should be a valid string"),
        (("post", "/api/tasks", {"json": {"description": DESC, "samples": 0}}), 422, "samples"),
        (("post", "/api/tasks", {"json": {"description": "x" * 9000}}), 413, "above the limit of 8,192 bytes"),
        (("post", "/api/tasks", {"content": chunked(json.dumps({"description": "x" * 9000}).encode()),
                                 "headers": {"content-type": "application/json"}}), 413, "passed the limit"),
        (("post", "/api/search", {"json": {**search, "task_id": "0123abcd"}}), 404, "task_id '0123abcd' is unknown"),
        (("get", "/api/tasks/0123abcd", {}), 404, "is unknown"),
        (("post", "/api/search", {"json": {**search, "queries": []}}), 422, "queries"),
        (("post", "/api/search", {"json": {**search, "queries": [" "]}}), 400, "query ' ' is empty"),
        (("post", "/api/search", {"json": {**search, "top_k": 0}}), 422, "top_k"),
        (("post", "/api/images", {"content": b""}), 400, "the request body is empty"),
        (("post", "/api/images", {"content": os.urandom(3000)}), 422, "not a readable image"),
        (("post", "/api/images", {"content": png[:len(png) // 2]}), 422, "not a readable image"),
        (("post", "/api/images", {"content": gif.getvalue()}), 415, "GIF images are not indexed"),
        (("post", "/api/images", {"content": (tmp_path / "bomb.png").read_bytes()}), 413, "pixels, above the limit"),
        (("post", "/api/images", {"content": (tmp_path / "big.png").read_bytes()}), 413, "pixels, above the limit"),
        (("post", "/api/images", {"content": b"\0" * 60_000}), 413, "--max-upload-mb"),
        (("post", "/api/images", {"content": chunked(b"\0" * 60_000)}), 413, "passed the limit"),
        (("get", "/api/images/nope", {}), 404, "not in the gallery"),
        (("get", "/api/nothing", {}), 404, "no such endpoint"),
        (("delete", "/api/tasks", {}), 405, "not allowed"),
    ]
    for (method, path, kwargs), status, words in cases:
        r = client.request(method.upper(), path, **kwargs)
        assert r.status_code in (status if isinstance(status, tuple) else (status,)), (path, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and words in body["error"], (path, body)
        assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert client.get("/api/health").json()["images"] == len(client.service.gallery)  # nothing was added


def test_the_gallery_grows_while_serving(world, client, tmp_path):
    """Uploads and rescans add images; a task's features are extended, and equal a fresh service's."""
    task_id = client.post("/api/tasks", json={"description": DESC}).json()["task_id"]
    before = client.post("/api/search", json={"task_id": task_id, "queries": ["a lemon"]}).json()
    n = before["n_images"]
    new = world["others"][0]
    r = client.post("/api/images", params={"name": "../../evil name.png"}, content=new.read_bytes()).json()
    assert r["added"] is True and r["images"] == n + 1
    assert Path(r["image"]).parent == client.service.gallery_dir / "uploads" and "evilname" in Path(r["image"]).name
    dup = client.post("/api/images", content=new.read_bytes()).json()
    assert dup["added"] is False and dup["image"] == r["image"]
    shutil.copy(world["others"][1], client.service.gallery_dir / "dropped.png")
    (client.service.gallery_dir / "broken.png").write_bytes(b"not a png")
    rescan = client.post("/api/gallery/rescan").json()
    assert rescan["added"] == [str(client.service.gallery_dir / "dropped.png")] and rescan["images"] == n + 2
    assert [s["path"] for s in rescan["skipped"]] == [str(client.service.gallery_dir / "broken.png")]
    assert client.post("/api/gallery/rescan").json()["added"] == []
    query = {"task_id": task_id, "queries": ["a lemon", "a pear"], "top_k": n + 2, "zero_shot": True}
    grown = client.post("/api/search", json=query).json()
    assert grown["n_images"] == n + 2

    fresh = Service(EdgeRuntime.load(world["minilm"]["bundle"], backend="ort-cpu", cache_dir=tmp_path / "fresh",
                                     batch_size=4), client.service.gallery_dir)  # indexes the same files at start
    fresh.set_task(DESC)
    want = fresh.search(task_id, query["queries"], query["top_k"], zero_shot=True)
    for key in ("results", "zero_shot"):
        for q, hits in want[key].items():
            got = {h["image"]: h["score"] for h in grown[key][q]}
            assert got == pytest.approx({h["image"]: h["score"] for h in hits}, abs=2e-3)  # fp16 sums in another order


def test_tasks_beyond_the_limit_are_forgotten(client):
    ids = [client.post("/api/tasks", json={"description": d}).json()["task_id"] for d in DESCS]  # max_tasks=3
    assert client.get(f"/api/tasks/{ids[0]}").status_code == 404
    assert all(client.get(f"/api/tasks/{i}").status_code == 200 for i in ids[1:])


class Server:
    """uvicorn in a thread on a free loopback port: the real HTTP stack, as `serve` runs it."""

    def __init__(self, service):
        import uvicorn
        self.sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def test_concurrent_requests_answer_as_sequential_ones(world, tmp_path):
    """The same task switches and searches, one at a time, then from 8 threads at once in shuffled order against
    a fresh service (its own cache: every LoRA and its features computed under contention)."""
    requests = [(d, q) for d in DESCS for q in ("a lemon", "a pear", "a small fish")] * 2

    def ask(http, desc, query):
        task = http.post("/api/tasks", json={"description": desc}).json()
        found = http.post("/api/search", json={"task_id": task["task_id"], "queries": [query], "top_k": 4,
                                               "zero_shot": True})
        assert found.status_code == 200, found.text
        found = found.json()
        return task["experts"], task["weights"], found["results"], found["zero_shot"]

    with Server(make_service(world, tmp_path, "seq")) as s, httpx.Client(base_url=s.url, timeout=120) as http:
        sequential = {(d, q): ask(http, d, q) for d, q in requests}
    order = random.Random(0).sample(requests, len(requests))
    pool_limits = httpx.Limits(max_connections=8)
    with Server(make_service(world, tmp_path, "par")) as s, \
            httpx.Client(base_url=s.url, timeout=120, limits=pool_limits) as http:
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda r: ask(http, *r), order))
    for (d, q), got in zip(order, concurrent):
        want = sequential[(d, q)]
        assert got[:2] == want[:2]
        for ours, theirs in zip(got[2:], want[2:]):
            assert [{**h, "image": Path(h["image"]).name} for h in ours[q]] == \
                [{**h, "image": Path(h["image"]).name} for h in theirs[q]]  # the two galleries are copies


def test_listening_socket_is_tcp_so_connections_get_nodelay():
    """asyncio sets TCP_NODELAY only on connections of a socket made with proto IPPROTO_TCP; on one made with
    proto 0 every response waited ~40 ms on the client's delayed ACK (measured: 44 ms -> 1 ms a request)."""
    import socket
    sock = listen("127.0.0.1", 0)
    try:
        client = socket.create_connection(sock.getsockname())
        conn, _ = sock.accept()
        assert sock.proto == socket.IPPROTO_TCP and conn.proto == socket.IPPROTO_TCP
        conn.close()
        client.close()
    finally:
        sock.close()
    taken = listen("127.0.0.1", 0)
    try:
        with pytest.raises(SGLoRAError, match=r"--port \d+: cannot listen there \(Address already in use\)"):
            listen("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_serve_command_without_torch(world, tmp_path):
    """The real command, torch blocked: listens on loopback and says so, answers, stops on SIGINT with exit 0."""
    args = ["serve", "--bundle", str(world["minilm"]["bundle"]), "--gallery", str(copy_gallery(world, tmp_path / "g")),
            "--port", "0", "--cache-dir", str(tmp_path / "cache"), "--backend", "ort-cpu"]
    code = f"import sys; sys.argv=['sglora-edge', *{args!r}]\nfrom sglora_edge.cli import app\napp()"
    p = subprocess.Popen([sys.executable, "-c", BLOCK.format(blocked={"torch", "torchvision", "open_clip", "export"})
                          + code], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = [p.stderr.readline(), p.stderr.readline()]
        assert lines[0].startswith("loaded ") and "indexed" in lines[0], lines
        assert "on loopback only" in lines[1], lines
        url = lines[1].split()[1].rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/api/health", timeout=30).json()["status"] == "ok"
        assert httpx.post(f"{url}/api/tasks", json={"description": ""}, timeout=30).status_code == 400
    finally:
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=30)[1]
    assert p.returncode == 0 and "Traceback" not in rest, rest


# -- the gallery store ------------------------------------------------------------------------------------------
def fresh_activations(world, paths, tmp_path):
    rt = EdgeRuntime(world["backbone"]["bundle"], backend="ort-cpu", cache_dir=tmp_path / "fresh", batch_size=4)
    g = rt.encode_gallery(paths)
    return g.activations(0, len(g))


KILL_MID_WRITE = """
import sys, time
from runtime.pipeline import EdgeRuntime
bundle, cache, *paths = sys.argv[1:]
rt = EdgeRuntime(bundle, backend="ort-cpu", cache_dir=cache, batch_size=4)
rt.encode_gallery(paths[:8])  # two batches, committed
acts = rt.prefix(rt.preprocess(paths[8:12]))
from runtime.gallery import content_key


def rows():
    for i, (p, a) in enumerate(zip(paths[8:12], acts)):
        if i == 2:  # two rows written into the open transaction: killed here
            print("mid-write", flush=True)
            time.sleep(120)
        yield content_key(open(p, "rb").read()), a
rt.activation_store().put(rows())
"""


def test_store_survives_kill_9_mid_write(world, tmp_path):
    paths = [str(p) for p in list_gallery(world["gallery"])[0][:12]]
    cache = tmp_path / "cache"
    p = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, str(world["backbone"]["bundle"]), str(cache), *paths],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        assert p.stdout.readline().strip() == "mid-write"
    finally:
        p.kill()  # SIGKILL: no handler, no cleanup
        p.wait()
    rt = EdgeRuntime(world["backbone"]["bundle"], backend="ort-cpu", cache_dir=cache, batch_size=4)
    store = rt.activation_store()
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(store) == 8  # the committed batches, none of the killed transaction's rows
    g = rt.encode_gallery(paths)
    assert len(store) == 12 and not store.rebuilt
    assert np.array_equal(g.activations(0, 12), fresh_activations(world, paths, tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-size row", "deleted under a live gallery"])
def test_damaged_store_is_recomputed(world, tmp_path, damage):
    paths = list_gallery(world["gallery"])[0][:10]
    rt = EdgeRuntime(world["backbone"]["bundle"], backend="ort-cpu", cache_dir=tmp_path / "cache", batch_size=4)
    g = rt.encode_gallery(paths)
    store = rt.activation_store()
    path = store.path
    if damage == "deleted under a live gallery":  # another process found it damaged and started afresh
        store.close()
        for f in path.parent.iterdir():
            f.unlink()
        got = g.activations(0, len(g))
    else:
        store.close()
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if damage == "wrong-size row":
                db.execute("UPDATE activations SET data = x'00' WHERE key = ?", (g.keys[3],))
        if damage == "garbage":
            path.write_bytes(os.urandom(path.stat().st_size))
        elif damage == "truncated":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
        rt = EdgeRuntime(world["backbone"]["bundle"], backend="ort-cpu", cache_dir=tmp_path / "cache", batch_size=4)
        g = rt.encode_gallery(paths)
        got = g.activations(0, len(g))
        if damage != "wrong-size row":
            assert rt.activation_store().rebuilt, damage
    assert np.array_equal(got, fresh_activations(world, paths, tmp_path))
    assert len(ActivationStore(path, rt.cache_dtype)) == len(paths)


# -- the page in a real browser ---------------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fds 3 and 4)."""

    def __init__(self, browser: str, profile: Path):
        import fcntl
        pipes = [os.pipe(), os.pipe()]  # (browser reads, we write), (we read, browser writes)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for pair in pipes for fd in pair]  # clear of 3 and 4
        for pair in pipes:
            for fd in pair:
                os.close(fd)
        to_browser, self._write, self._read, from_browser = high

        def fds():  # in the child: the protocol's fds 3 and 4 (dup2 leaves them open across exec)
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)
        self.proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu",
                                     "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
                                     f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1300,1000",
                                     "about:blank"], close_fds=False, preexec_fn=fds,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._id, self._buf, self.session = 0, b"", None

    def send(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._read, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.wait(f"location.href === {json.dumps(url)} && document.readyState === 'complete' && "
                  f"(document.getElementById('info') || {{}}).textContent > ''")  # health and version answered

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, condition: str, timeout: float = 120):
        end = time.time() + timeout
        while time.time() < end:
            if self.js(condition):
                return
            time.sleep(0.1)
        raise TimeoutError(condition)

    def type_into(self, element_id: str, text: str) -> None:
        self.js(f"document.getElementById('{element_id}').focus(); document.getElementById('{element_id}').select()")
        self.send("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("rawKeyDown", "char", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "char" else {}))

    def screenshot(self, path: Path) -> None:
        import base64
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.proc.kill()
        self.proc.wait()


PAGE_STATE = """(() => {
  const hits = (id) => [...document.querySelectorAll(`#${id} figure`)].map((f) => ({
    image: f.title, score: f.querySelector('figcaption').firstChild.textContent,
    loaded: f.querySelector('img').complete && f.querySelector('img').naturalWidth > 0,
    note: (f.querySelector('span') || {}).textContent || null}));
  return {state: document.getElementById('status').dataset.state, adapted: hits('adapted'), zeroshot: hits('zeroshot'),
          experts: [...document.querySelectorAll('#experts tbody tr')].map(
            (tr) => [...tr.cells].map((c) => c.textContent)),
          ood: document.getElementById('ood').hidden ? null : document.getElementById('ood').textContent,
          error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent};
})()"""


@pytest.mark.slow
def test_page_in_headless_chromium(world, tmp_path):
    """Type a description and a query, press Enter, read what the page shows: the adapted hits beside zero-shot's,
    the experts, the OOD warning; each equals the API's answer, and every thumbnail loaded. Then a bad description
    shows the API's message. SGLORA_SCREENSHOT=path keeps the screenshot."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    service = make_service(world, tmp_path)
    with Server(service) as s:
        chrome = Chromium(browser, tmp_path / "profile")
        try:
            chrome.open(s.url + "/")
            chrome.type_into("desc", DESC)
            chrome.type_into("query", "a lemon")
            chrome.press_enter()
            chrome.wait("['done', 'error'].includes(document.getElementById('status').dataset.state)")
            chrome.wait("[...document.images].every((img) => img.complete)")  # loaded, or failed to
            page = chrome.js(PAGE_STATE)
            chrome.screenshot(Path(os.environ.get("SGLORA_SCREENSHOT") or tmp_path / "page.png"))
            chrome.type_into("desc", "   ")
            chrome.press_enter()
            chrome.wait("document.getElementById('status').dataset.state === 'error'")
            bad = chrome.js(PAGE_STATE)
        finally:
            chrome.close()
    assert page["state"] == "done", page
    task = service.set_task(DESC)
    want = service.search(task["task_id"], ["a lemon"], 5, zero_shot=True)
    for shown, hits in ((page["adapted"], want["results"]["a lemon"]),
                        (page["zeroshot"], want["zero_shot"]["a lemon"])):
        assert [(h["image"], h["score"]) for h in shown] == [(h["image"], f"{h['score']:.3f}") for h in hits]
        assert all(h["loaded"] for h in shown)
    zero_rank = {h["image"]: i + 1 for i, h in enumerate(want["zero_shot"]["a lemon"])}
    assert [h["note"] for h in page["adapted"]] == [f"zero-shot #{zero_rank[h['image']]}" if h["image"] in zero_rank
                                                    else "new: not in zero-shot's top" for h in page["adapted"]]
    assert page["experts"] == [[n, f"{w:.3f}", f"{s:.3f}"] for n, w, s in
                               zip(task["experts"], task["weights"], task["similarities"])]
    assert (page["ood"] is not None) == task["out_of_distribution"]
    assert page["error"] is None
    assert bad["error"] == "description is empty: describe the task in a few words, e.g. \"a photo of a persian\""


def test_features_over_the_budget_are_dropped_and_recomputed(world, tmp_path):
    service = make_service(world, tmp_path, features_mb=0)  # every search drops the other tasks' features
    ids = [service.set_task(d)["task_id"] for d in DESCS[:2]]
    first = service.search(ids[0], ["a lemon"], 5)
    service.search(ids[1], ["a lemon"], 5)
    assert service.task(ids[0]).features is None and service.task(ids[1]).features is not None
    assert service.search(ids[0], ["a lemon"], 5) == first
