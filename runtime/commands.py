"""The bodies of the device commands (`run`, `build-engines`): torch-free, and they never end in a traceback.

Every failure is one line on stderr naming the bad input and the fix, and a non-zero exit code;
unusable gallery files are skipped and counted instead. Outputs (--save-lora, --html) are written
to a temp file and renamed, so a failure never leaves half a file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import signal
import sys
from pathlib import Path

from .artifacts import write_bytes
from .config import RunConfig, ServeConfig
from .errors import MissingExtra, SGLoRAError, install_line

EXIT_INPUT, EXIT_BUG = 2, 1


def _say(message: str, color: str = "31") -> None:
    line = " ".join(str(message).split())  # one line, whatever the exception text held
    sys.stderr.write(f"\033[{color}m{line}\033[0m\n" if sys.stderr.isatty() else f"{line}\n")


def guarded(body):
    """Run body() -> exit code; turn every exception into one line and an exit code."""
    try:
        return body()
    except SGLoRAError as e:  # InputError, BundleError, EngineUnavailable: the message says the fix
        _say(f"error: {e}")
        return EXIT_INPUT
    except OSError as e:
        _say(f"error: {e.filename or ''}: {e.strerror or e}; check the path and its permissions")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence of a user-facing command
        if os.environ.get("SGLORA_DEBUG"):
            raise
        _say(f"error: unexpected {type(e).__name__}: {e} (a bug: please report it; SGLORA_DEBUG=1 shows the "
             f"traceback)")
        return EXIT_BUG


def _progress(enabled: bool):
    if not enabled or not sys.stderr.isatty():  # a bar is for people at a terminal, not for logs and pipes
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=0, unit="img", desc="gallery", file=sys.stderr, leave=False, mininterval=0.5)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return update, bar.close


def run_command(cfg: RunConfig) -> int:
    from .pipeline import run_retrieval

    def body() -> int:
        update, close = _progress(not cfg.as_json)
        try:
            result = run_retrieval(cfg.bundle, cfg.desc, cfg.gallery, queries=list(cfg.queries), top_k=cfg.top_k,
                                   samples=cfg.samples, seed=cfg.seed, save_lora_to=cfg.save_lora, progress=update,
                                   zero_shot=cfg.html is not None, **cfg.engine.kwargs())
        finally:
            close()
        if cfg.html is not None:
            write_html(cfg.html, result)
        if cfg.as_json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            for w in result["warnings"]:
                _say(f"warning: {w}", "33")
            if result["explanation"]["out_of_distribution"]:
                _say(f"warning: {ood_line(result)}", "33")
            if result["skipped"]:
                _say(f"warning: {result['skipped_summary']}", "33")
            print(format_run(result))
        return 0
    return guarded(body)


def ood_line(result: dict) -> str:
    e = result["explanation"]
    return (f"best expert similarity {e['best_similarity']:.3f} < {e['ood_threshold']}: the description is far from "
            f"every expert; expect little gain over zero-shot")


def format_run(result: dict) -> str:
    e, b, t = result["explanation"], result["backend"], result["timings_ms"]
    lines = [f"backend {b['backend']} ({b['picked_because']}; providers {', '.join(b['providers'])}), "
             f"lora mode {b['lora_mode']}, {b['precision']} graphs, threads {b['threads'] or 'default'}",
             f"LoRA: {e['lora']}; experts " + ", ".join(f"{n} (weight {w:.2f}, similarity {s:.3f})" for n, w, s in
                                                     zip(e["experts"], e["weights"], e["similarities"]))
             + ("  [out of distribution]" if e["out_of_distribution"] else ""),
             f"OOD check: best expert similarity {e['best_similarity']:.3f} "
             + (f"< {e['ood_threshold']}: out of the library's distribution" if e["out_of_distribution"]
                else f">= {e['ood_threshold']}: inside the library's distribution"),
             f"{result['n_images']} images" + (f", {len(result['skipped'])} skipped" if result["skipped"] else "")]
    for q, hits in result["results"].items():
        lines.append(f"{q}:")
        lines += [f"  {h['score']:.3f}  {h['image']}" for h in hits]
    lines.append("timings ms: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in t.items()))
    return "\n".join(lines)


def thumbnail_png(path: str, side: int = 128) -> bytes:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


def _thumbnail(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(thumbnail_png(path)).decode()


def _figures(hits: list[dict], other: list[dict] | None) -> str:
    """Hits as thumbnails; with `other` (the zero-shot ranking), each adapted hit says where zero-shot put it."""
    esc, rank_in = html.escape, {h["image"]: i + 1 for i, h in enumerate(other or [])}
    out = []
    for h in hits:
        moved = ""
        if other is not None:
            where = f"zero-shot #{rank_in[h['image']]}" if h["image"] in rank_in else "new: not in zero-shot's top"
            moved = f"<br><span class='moved'>{where}</span>"
        out.append(f"<figure class='hit' title='{esc(h['image'])}'><img src='{_thumbnail(h['image'])}' "
                   f"alt='{esc(Path(h['image']).name)}'><figcaption>{h['score']:.3f}<br>"
                   f"{esc(Path(h['image']).name)}{moved}</figcaption></figure>")
    return "".join(out)


def write_html(path: Path, result: dict) -> None:
    """A self-contained page (thumbnails inlined as base64): description, experts, OOD warning, hits beside
    zero-shot CLIP's (when the result has them), timings."""
    e, esc = result["explanation"], html.escape
    zero = result.get("zero_shot_results")
    experts = "".join(f"<tr><td>{esc(n)}</td><td>{w:.3f}</td><td>{s:.3f}</td></tr>"
                      for n, w, s in zip(e["experts"], e["weights"], e["similarities"]))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sglora-edge: {esc(result['description'])}"
             "</title><style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;vertical-align:top;"
             "width:130px;margin:.5em;text-align:center}figcaption{font-size:.85em;overflow-wrap:anywhere}"
             "img{width:128px;height:128px;object-fit:contain;border:1px solid #ccc}.warn{color:#a60}"
             "table{border-collapse:collapse}td,th{padding:.2em .6em;border:1px solid #ddd}td+td{text-align:right}"
             ".cols{display:flex;gap:2em}.cols section{flex:1}.moved{color:#666}"
             f"</style></head><body><h1 id='description'>{esc(result['description'])}</h1>",
             f"<p>LoRA: {esc(e['lora'])}; backend {esc(result['backend']['backend'])}, lora mode "
             f"{esc(result['backend']['lora_mode'])}, {esc(result['backend']['precision'])} graphs; "
             f"{result['n_images']} images</p>"]
    if e["out_of_distribution"]:
        parts.append(f"<p class='warn' id='ood'>warning: {esc(ood_line(result))}</p>")
    parts += [f"<p class='warn'>warning: {esc(w)}</p>" for w in result["warnings"]]
    if result["skipped"]:
        parts.append(f"<p class='warn' id='skipped'>{esc(result['skipped_summary'])}</p>")
    parts.append("<h2>Experts behind the LoRA</h2><table id='experts'><tr><th>expert</th><th>weight</th>"
                 f"<th>similarity</th></tr>{experts}</table>")
    for q, hits in result["results"].items():
        parts.append(f"<h2 class='query'>Top {len(hits)} for “{esc(q)}”</h2>")
        if zero is None:
            parts.append(f"<div>{_figures(hits, None)}</div>")
        else:
            parts.append(f"<div class='cols'><section class='adapted'><h3>Adapted (SG-LoRA)</h3>"
                         f"{_figures(hits, zero[q])}</section><section class='zeroshot'><h3>Zero-shot CLIP (no "
                         f"LoRA)</h3>{_figures(zero[q], None)}</section></div>")
    parts.append("<h2>Timings (ms)</h2><table id='timings'>" + "".join(
        f"<tr><td>{esc(k.replace('_', ' '))}</td><td>{v:.1f}</td></tr>" for k, v in result["timings_ms"].items())
                 + "</table>")
    parts.append("</body></html>\n")
    write_bytes(path, "".join(parts).encode())


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def listen(host: str, port: int):
    """A listening TCP socket (port 0: any free one); SGLoRAError naming the option when the address is taken."""
    import socket
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections, and without it a
        # response's head and body wait on the client's delayed ACK (~40 ms a request on Linux)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections made while the gallery is indexed wait in the backlog
    except (OSError, OverflowError) as e:
        why = getattr(e, "strerror", None) or e
        raise SGLoRAError(f"--host {host} --port {port}: cannot listen there ({why}); pick another --port (or stop "
                          f"what holds it)") from e
    return sock


class _Stopped(SGLoRAError):
    """Ctrl-C or SIGTERM after the server shut down: the normal end of `serve`, exit 0 (caught where it is raised;
    under the root like every project exception, so nothing of ours can escape `guarded` as a traceback)."""


def _stopped(signum, frame):
    raise _Stopped()


def serve_command(cfg: ServeConfig) -> int:
    """Listen first (a taken port fails before the slow part), load the bundle and index the gallery once, serve."""
    def body() -> int:
        import time

        try:
            import uvicorn

            from .serve import Service, create_app
        except ImportError as e:
            raise MissingExtra(f"serve needs {e.name}, which is not installed; install it with "
                               f"{install_line('serve')}") from e
        from .pipeline import EdgeRuntime
        bundle, gallery, host, port = cfg.bundle, cfg.gallery, cfg.host, cfg.port
        if cfg.max_upload_mb <= 0 or cfg.max_image_pixels <= 0 or cfg.features_mb < 0:
            raise SGLoRAError("--max-upload-mb and --max-image-pixels must be > 0, --features-mb >= 0")
        sock = listen(host, port)
        try:
            port_bound = sock.getsockname()[1]
            clock = time.perf_counter()
            rt = EdgeRuntime.load(bundle, **cfg.engine.kwargs())
            load_ms = round((time.perf_counter() - clock) * 1000, 1)
            update, close = _progress(True)
            try:
                service = Service(rt, gallery, max_tasks=cfg.max_tasks, features_mb=cfg.features_mb,
                                  max_image_pixels=cfg.max_image_pixels, progress=update, load_ms=load_ms)
            finally:
                close()
            g = service.gallery
            _say(f"loaded {bundle} in {load_ms:.0f} ms ({rt.describe()['backend']}); indexed {len(g)} images in "
                 f"{service.startup_ms['index']:.0f} ms" + (f"; {g.skipped_summary()}" if g.skipped else ""), "0")
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port_bound}"
            if host in LOOPBACK:
                _say(f"serving {url}/ (page), {url}/docs (API) on loopback only: other machines cannot reach it "
                     f"(--host 0.0.0.0 opens it to the network, without authentication); Ctrl-C stops", "0")
            else:
                _say(f"warning: serving {url}/ to the network on {host}: anyone who reaches this port can search the "
                     f"gallery and add images (no authentication); --host 127.0.0.1 keeps it on this machine", "33")
            app = create_app(service, max_upload_mb=cfg.max_upload_mb)
            config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
            stop = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:  # uvicorn shuts down gracefully on these signals, then raises them again: here, _Stopped
                uvicorn.Server(config).run(sockets=[sock])
            except _Stopped:
                _say("stopped", "0")
            finally:
                for sig, handler in stop.items():
                    signal.signal(sig, handler)
                rt.activation_store().close()
            return 0
        finally:
            sock.close()
    return guarded(body)


def build_engines_command(bundle: Path, fp16: bool, workspace_mb: int, as_json: bool) -> int:
    from .tensorrt import build_engines

    def body() -> int:
        record = build_engines(bundle, fp16=fp16, workspace_mb=workspace_mb,
                               log=(lambda s: None) if as_json else (lambda s: _say(s, "0")))
        if as_json:
            print(json.dumps(record, indent=2, sort_keys=True))
        else:
            k = record["key"]
            print(f"built {len(record['engines'])} {record['precision']} engines for {k['gpu']} "
                  f"sm{k['compute_capability']} TensorRT {k['tensorrt']} in {bundle}")
        return 0
    return guarded(body)
