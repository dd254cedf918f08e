"""`sglora-edge serve`: the device runtime as a local HTTP service, with a page to try it in.

The bundle's sessions, tokenizers and library load once; the gallery is indexed once at start (streamed, through
the same activation store as `run`) and grows while serving (uploads, rescans). A task is a description's LoRA(s),
generated once and kept under an id; its gallery features are computed at its first search, kept in RAM (within
a budget, least recently used first out) and extended when the gallery grows. Zero-shot CLIP is the all-zero
LoRA (B = 0: the frozen encoder), searched beside the task's LoRA to show what the LoRA changed.

FastAPI on uvicorn: FastAPI validates the JSON bodies with the same models it publishes as the OpenAPI schema
(/openapi.json, the /docs page), and both are maintained, ASGI, and pure Python apart from pydantic-core, which
ships wheels for aarch64 (Jetson) too. Every bad request is answered 4xx with {"error": "<one line>"}.
"""

import hashlib
import io
import json
import logging
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .errors import InputError, SGLoRAError
from .artifacts import write_bytes
from .config import RunConfig
from .gallery import BadImage, Gallery, content_key, list_gallery, preprocess_image
from .pipeline import EdgeRuntime, Generation, check_top_k, rank
from .sessions import package_version
from .text import check_description, check_queries

API_VERSION = "1"
MAX_QUERIES, MAX_TOP_K, MAX_SAMPLES, MAX_TEXT = 16, 100, 16, 10_000
UPLOAD_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}  # what list_gallery indexes
PAGE = Path(__file__).with_name("static") / "serve.html"
log = logging.getLogger("sglora_edge.serve")


class NotFound(InputError):
    status = 404


class UnknownTask(NotFound):
    """A task id never created, or evicted."""


class TooLarge(InputError):
    status = 413


class UnsupportedImage(InputError):
    status = 415


def status_of(error: SGLoRAError) -> int:
    return getattr(error, "status", 422 if isinstance(error, BadImage) else 400)


API_NAMES = {"--desc": "description", "--query": "query", "--top-k": "top_k", "--samples": "samples"}


def api_message(error: SGLoRAError) -> str:
    """The runtime's checks name the CLI's options; over HTTP the JSON fields are meant."""
    message = str(error)
    for option, name in API_NAMES.items():
        message = message.replace(option, name)
    return message


@dataclass
class Task:
    """A description's LoRA(s) and, once searched, its features over the first len(features) gallery images."""
    id: str
    loras: np.ndarray  # [S, P]
    generation: Generation | None  # None: zero-shot
    features: np.ndarray | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one computation of its features at a time

    def describe(self, cached: bool = False) -> dict:
        g = self.generation
        e = g.explain()
        return {"task_id": self.id, "description": g.description, "experts": e["experts"], "weights": e["weights"],
                "similarities": e["similarities"], "best_similarity": e["best_similarity"],
                "out_of_distribution": e["out_of_distribution"], "ood_threshold": e["ood_threshold"],
                "lora": e["lora"], "warnings": g.warnings, "cached": cached}


class Service:
    """What the HTTP layer calls; thread-safe (the endpoints run in a thread pool)."""

    def __init__(self, rt: EdgeRuntime, gallery_dir: str | Path, max_tasks: int = 64, features_mb: float = 256,
                 max_image_pixels: int = 40_000_000, progress=None, load_ms: float | None = None):
        if max_tasks < 1:
            raise InputError(f"--max-tasks must be >= 1, got {max_tasks}")
        self.rt, self.gallery_dir = rt, Path(gallery_dir)
        self.max_tasks, self.features_bytes, self.max_image_pixels = max_tasks, int(features_mb * 2 ** 20), \
            max_image_pixels
        clock = time.perf_counter()
        self.gallery = rt.encode_gallery(self.gallery_dir, progress=progress)
        self.startup_ms = {"load": load_ms, "index": round((time.perf_counter() - clock) * 1000, 1)}
        self.started = time.time()
        self._grow = threading.Lock()  # the gallery's lists only grow, under this lock
        self._key_of = dict(zip(map(str, self.gallery.paths), self.gallery.keys))
        self._path_of = {k: p for p, k in zip(self.gallery.paths, self.gallery.keys)}
        self._tasks: OrderedDict[str, Task] = OrderedDict()  # least recently used first
        self._lru = threading.Lock()
        self.zero_shot = None if rt.baked else Task("zero-shot", np.zeros((1, rt.bundle.lora_size), np.float32), None)

    # -- tasks -----------------------------------------------------------------------------------------------
    def set_task(self, description: str, samples: int = 1, seed: int | None = None) -> dict:
        """The task for a description: generated once, then answered from the cache (cached: true)."""
        text, _ = check_description(description)
        seed = seed if seed is not None or samples == 1 else 0  # as `run`: several draws need a seed
        task_id = hashlib.sha256(json.dumps([" ".join(text.split()), samples, seed]).encode()).hexdigest()[:16]
        with self._lru:
            if task_id in self._tasks:
                self._tasks.move_to_end(task_id)
                return self._tasks[task_id].describe(cached=True)
        gen = self.rt.generate(description, samples=samples, seed=seed)  # outside the lock: other tasks go on
        with self._lru:
            task = self._tasks.setdefault(task_id, Task(task_id, gen.loras, gen))
            self._tasks.move_to_end(task_id)
            while len(self._tasks) > self.max_tasks:
                self._tasks.popitem(last=False)
        return task.describe()

    def task(self, task_id: str) -> Task:
        with self._lru:
            task = self._tasks.get(task_id)
            if task is None:
                raise UnknownTask(f"task_id {task_id!r} is unknown (never created, or one of the least recently "
                                  f"used beyond the {self.max_tasks} kept); POST /api/tasks with its description")
            self._tasks.move_to_end(task_id)
            return task

    # -- features and search ---------------------------------------------------------------------------------
    def _snapshot(self) -> Gallery:
        with self._grow:
            return replace(self.gallery, paths=list(self.gallery.paths), keys=list(self.gallery.keys), skipped=[])

    def features(self, task: Task) -> tuple[np.ndarray, Gallery]:
        """(features [N, D], the gallery they cover): computed at a task's first search (from the disk cache when
        a run or an earlier serve computed them), then only for the images added since."""
        gallery = self._snapshot()
        with task.lock:
            have = 0 if task.features is None else len(task.features)
            if have == 0:
                task.features = np.array(self.rt.image_features(gallery, task.loras))
            elif have < len(gallery):
                new = replace(gallery, paths=gallery.paths[have:], keys=gallery.keys[have:])
                task.features = np.concatenate([task.features, self.rt.features_into(
                    new, task.loras, lambda shape: np.zeros(shape, self.rt.cache_dtype))])
            feats = task.features[:len(gallery)]
        self._trim(keep=task)
        return feats, gallery

    def _trim(self, keep: Task) -> None:
        """Drop the features of the least recently used tasks beyond the memory budget (recomputed if searched)."""
        with self._lru:
            held = [t for t in self._tasks.values() if t.features is not None]
            total = sum(t.features.nbytes for t in held)
            for t in held:
                if total <= self.features_bytes:
                    break
                if t is not keep and t.lock.acquire(blocking=False):  # never under a search that is using them
                    try:
                        total -= t.features.nbytes
                        t.features = None
                    finally:
                        t.lock.release()

    def search(self, task_id: str, queries: list[str], top_k: int = RunConfig.top_k, zero_shot: bool = False) -> dict:
        queries = check_queries(queries)
        check_top_k(top_k)
        if len(queries) > MAX_QUERIES:
            raise InputError(f"queries: {len(queries)} given, at most {MAX_QUERIES} a request; split the request")
        if top_k > MAX_TOP_K:
            raise InputError(f"top_k {top_k} is above {MAX_TOP_K}; ask for fewer")
        task = self.task(task_id)
        if zero_shot and self.zero_shot is None:
            raise InputError(f"zero_shot: {self.rt.bundle.root} has one LoRA baked in (export --merge-desc), "
                             f"there is no zero-shot encoder to compare with; leave zero_shot out")
        text = self.rt.text_features(queries)
        out = {"task_id": task.id, "results": self._rank(text, task, queries, top_k)}
        out["zero_shot"] = self._rank(text, self.zero_shot, queries, top_k) if zero_shot else None
        out["n_images"] = len(self.gallery.paths)
        return out

    def _rank(self, text: np.ndarray, task: Task, queries: list[str], top_k: int) -> dict:
        feats, gallery = self.features(task)
        ranked = rank(text, feats, queries, gallery.paths, top_k)
        with self._grow:
            keys = {h["image"]: self._key_of[h["image"]] for hits in ranked.values() for h in hits}
        return {q: [{**h, "key": keys[h["image"]], "url": f"/api/images/{keys[h['image']]}"} for h in hits]
                for q, hits in ranked.items()}

    # -- the gallery -----------------------------------------------------------------------------------------
    def _append(self, part: Gallery) -> list[str]:
        added = []
        with self._grow:
            for p, k in zip(part.paths, part.keys):
                if str(p) not in self._key_of:
                    self.gallery.paths.append(p)
                    self.gallery.keys.append(k)
                    self._key_of[str(p)] = k
                    self._path_of.setdefault(k, p)
                    added.append(str(p))
            self.gallery.skipped += part.skipped
        return added

    def add_image(self, data: bytes, name: str | None = None) -> dict:
        """Check an uploaded image, write it under <gallery>/uploads/ (atomically), index it."""
        if not data:
            raise InputError("the request body is empty; send the image file's bytes as the body")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is lower
                with Image.open(io.BytesIO(data)) as im:
                    fmt, (w, h) = im.format, im.size
        except Image.DecompressionBombError as e:
            raise TooLarge(f"the image has more than {Image.MAX_IMAGE_PIXELS * 2:,} pixels, above the limit of "
                           f"{self.max_image_pixels:,} (--max-image-pixels); send a smaller image") from e
        except Exception as e:  # noqa: BLE001 - whatever PIL raises for bytes that are no image
            raise BadImage(f"the upload is not a readable image ({type(e).__name__}); send a PNG, JPEG, WebP or "
                           f"BMP file") from e
        if w * h > self.max_image_pixels:
            raise TooLarge(f"the image is {w}x{h} = {w * h:,} pixels, above the limit of {self.max_image_pixels:,} "
                           f"(--max-image-pixels); send a smaller image")
        if fmt not in UPLOAD_FORMATS:
            raise UnsupportedImage(f"{fmt} images are not indexed by the gallery; send "
                                   f"{', '.join(UPLOAD_FORMATS)}")
        preprocess_image(data, self.rt.bundle.manifest.image)  # decodes all of it: BadImage when truncated
        key = content_key(data)
        with self._grow:
            if key in self._path_of:
                return {"added": False, "key": key, "image": str(self._path_of[key]), "images": len(self.gallery),
                        "reason": "the gallery holds this image already"}
        stem = "".join(c for c in Path(name or "").stem if c.isalnum() or c in "-_")[:60] or "upload"
        folder = self.gallery_dir / "uploads"
        path = folder / f"{stem}-{key[:8]}{UPLOAD_FORMATS[fmt]}"
        try:
            folder.mkdir(exist_ok=True)
            write_bytes(path, data)
        except OSError as e:
            raise InputError(f"cannot write {path} ({e.strerror or e}): the gallery folder is read-only; serve a "
                             f"writable --gallery to take uploads") from e
        self._append(self.rt.encode_gallery([path]))
        return {"added": True, "key": key, "image": str(path), "images": len(self.gallery)}

    def rescan(self) -> dict:
        """Index the gallery folder's files that are new since the start (or the last rescan)."""
        paths, _ = list_gallery(self.gallery_dir)
        with self._grow:
            new = [p for p in paths if str(p) not in self._key_of]
        if not new:
            return {"added": [], "skipped": [], "images": len(self.gallery)}
        try:
            part = self.rt.encode_gallery(new)
        except InputError:  # none of them usable: say which, add nothing
            part = Gallery([], [], None, self.gallery.cache_dir, [(str(p), "not a usable image") for p in new])
        return {"added": self._append(part), "skipped": [{"path": p, "reason": r} for p, r in part.skipped],
                "images": len(self.gallery)}

    def thumbnail(self, key: str) -> bytes:
        with self._grow:
            path = self._path_of.get(key)
        if path is None:
            raise NotFound(f"image {key!r} is not in the gallery; use a key from a search result")
        return _thumbnail(str(path))

    # -- about -----------------------------------------------------------------------------------------------
    def health(self) -> dict:
        with self._lru:
            tasks = len(self._tasks)
        return {"status": "ok", "images": len(self.gallery), "skipped": len(self.gallery.skipped), "tasks": tasks,
                "uptime_s": round(time.time() - self.started, 1), "startup_ms": self.startup_ms}

    def version(self) -> dict:
        m = self.rt.bundle.manifest
        try:
            ours = metadata.version("sglora-edge")
        except metadata.PackageNotFoundError:
            ours = None
        return {"sglora_edge": ours, "api": API_VERSION, "onnxruntime": package_version("onnxruntime"),
                "bundle": {"path": str(self.rt.bundle.root), "hash": self.rt.bundle.hash,
                           "backbone": m.backbone, "baked": bool(self.rt.baked)},
                "backend": self.rt.describe(), "zero_shot": self.zero_shot is not None}


@lru_cache(maxsize=512)
def _thumbnail(path: str) -> bytes:
    from .commands import thumbnail_png
    return thumbnail_png(path)


# -- HTTP ------------------------------------------------------------------------------------------------------
class TaskRequest(BaseModel):
    description: str = Field(..., max_length=MAX_TEXT, description="The task, in a few words.",
                             examples=["a photo of a lemon"])
    samples: int = Field(1, ge=1, le=MAX_SAMPLES, description="LoRAs to draw; scores average over them.")
    seed: int | None = Field(None, description="Seed of the draws; none with samples 1: the CVAE's prior mean.")


class TaskResponse(BaseModel):
    task_id: str
    description: str
    experts: list[str]
    weights: list[float]
    similarities: list[float]
    best_similarity: float
    out_of_distribution: bool
    ood_threshold: float
    lora: str
    warnings: list[str]
    cached: bool = Field(description="true: the LoRA(s) came from the cache of descriptions already generated")


class SearchRequest(BaseModel):
    task_id: str = Field(..., max_length=64, description="From POST /api/tasks.")
    queries: list[str] = Field(..., min_length=1, max_length=MAX_QUERIES, examples=[["a lemon on a table"]])
    top_k: int = Field(RunConfig.top_k, ge=1, le=MAX_TOP_K)
    zero_shot: bool = Field(False, description="Also rank with zero-shot CLIP (no LoRA), for comparison.")


class Hit(BaseModel):
    image: str
    score: float
    key: str
    url: str


class SearchResponse(BaseModel):
    task_id: str
    results: dict[str, list[Hit]]
    zero_shot: dict[str, list[Hit]] | None
    n_images: int


class ImageAdded(BaseModel):
    added: bool
    key: str
    image: str
    images: int
    reason: str | None = None


class Error(BaseModel):
    error: str


ERRORS = {c: {"model": Error} for c in (400, 404, 413, 415, 422)}


class BodyLimit:
    """413 for a body over the limit: at once from Content-Length, or once a streamed body passes it."""

    def __init__(self, app, max_json: int, max_upload: int):
        self.app, self.max_json, self.max_upload = app, max_json, max_upload

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"] == "/api/images"
        limit = self.max_upload if upload else self.max_json
        what = f"{limit:,} bytes ({'--max-upload-mb' if upload else 'JSON requests'})"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _error(413, f"the request body is {int(length):,} bytes, above the limit of {what}")(
                scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"the request body passed the limit of {what}")
            return message
        return await self.app(scope, counted, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])} at {where})"
    if e.get("type") == "string_unicode":  # bytes that are no UTF-8 in a JSON string
        return f"{where}: not valid UTF-8 text; send the JSON body in UTF-8"
    if e.get("type") == "missing":
        return f"{where}: missing; see /docs for the fields"
    return f"{where}: {e['msg']}" + (f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else "")


def create_app(service: Service, max_upload_mb: float = 20, max_json_kb: float = 64) -> FastAPI:
    app = FastAPI(title="sglora-edge serve", version=API_VERSION,
                  description="SG-LoRA on the device: a task description becomes a LoRA for the CLIP image encoder "
                              "(the experts behind it, an out-of-distribution flag); text queries search the gallery "
                              "with it, beside zero-shot CLIP. Errors: 4xx with {\"error\": \"one line\"}.")
    app.add_middleware(BodyLimit, max_json=int(max_json_kb * 1024), max_upload=int(max_upload_mb * 2 ** 20))
    html = PAGE.read_text(encoding="utf-8")  # read once, not per request

    @app.exception_handler(SGLoRAError)
    async def project_error(request: Request, exc: SGLoRAError):
        return _error(status_of(exc), api_message(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"{request.method} {request.url.path}: no such endpoint; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path}; see /docs"}.get(exc.status_code)
        if exc.detail == "There was an error parsing the body":  # FastAPI's words for bytes json.loads refused
            message = "the request body is not valid UTF-8 JSON; send a JSON object in UTF-8"
        return _error(exc.status_code, message or str(exc.detail))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):  # a bug: one line to the client, the traceback in the log
        log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return _error(500, f"unexpected {type(exc).__name__}: {exc} (a bug: please report it)")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(html)

    @app.get("/api/health")
    def health() -> dict:
        """Up; images indexed (and skipped), tasks cached, uptime, start-up times."""
        return service.health()

    @app.get("/api/version")
    def version() -> dict:
        """Versions of the package, API and ONNX Runtime; the bundle and the backend serving it."""
        return service.version()

    @app.post("/api/tasks", response_model=TaskResponse, responses=ERRORS)
    def set_task(body: TaskRequest) -> dict:
        """Generate (or fetch from the cache) the LoRA for a task description: the experts and weights behind it,
        and the out-of-distribution flag."""
        return service.set_task(body.description, body.samples, body.seed)

    @app.get("/api/tasks/{task_id}", response_model=TaskResponse, responses=ERRORS)
    def get_task(task_id: str) -> dict:
        """A task set before."""
        return service.task(task_id).describe(cached=True)

    @app.post("/api/search", response_model=SearchResponse, responses=ERRORS)
    def search(body: SearchRequest) -> dict:
        """Top-k gallery images per text query with the task's LoRA (and with zero-shot CLIP if asked)."""
        return service.search(body.task_id, body.queries, body.top_k, body.zero_shot)

    @app.post("/api/images", response_model=ImageAdded, responses=ERRORS)
    async def add_image(request: Request, name: str | None = Query(None, max_length=200,
                                                                   description="File name to keep (optional).")):
        """Add one image to the gallery: the file's bytes as the body (PNG, JPEG, WebP, BMP)."""
        data = await request.body()
        return await run_in_threadpool(service.add_image, data, name)

    @app.post("/api/gallery/rescan", responses=ERRORS)
    def rescan() -> dict:
        """Index the files put into the gallery folder since the start."""
        return service.rescan()

    @app.get("/api/images/{key}", responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    def image(key: str):
        """A 128-pixel PNG thumbnail of a gallery image (by the key a search returned)."""
        return Response(service.thumbnail(key), media_type="image/png",
                        headers={"Cache-Control": "max-age=86400"})

    return app
