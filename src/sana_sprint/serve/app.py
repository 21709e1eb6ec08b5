"""``sana-sprint serve``: a stdlib HTTP server for live scribble-to-image and text-to-image.

Routes:

- ``GET /`` (and ``/static/<file>``): the drawing page;
- ``GET /health``: ``{"status": "ok", ...model info}``;
- ``POST /generate``: JSON ``{prompt, steps 1-4, seed, scribble?: PNG data URL, guidance?,
  conditioning_scale?}`` -> ``{image: PNG data URL, latency_ms, queue_ms, ...}``.

User input never causes a 500: bodies over :data:`MAX_BODY_BYTES` get 413, unparsable JSON 400,
well-formed JSON with bad fields 422 with a message. Model calls are serialised by the engine's lock.
Binds to 127.0.0.1 unless told otherwise. This module imports only the standard library at import
time (the CLI imports it to register the command); torch is loaded when the server starts.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import math
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from ..cli import command
from ..errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_BODY_BYTES = 2 * 1024 * 1024
DRAIN_LIMIT_BYTES = 8 * MAX_BODY_BYTES  # oversize bodies up to this are read and discarded
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 4
MAX_SEED = 2**31 - 1
MAX_SCRIBBLE_SIDE = 2048
MAX_GUIDANCE = 20.0
MAX_CONDITIONING_SCALE = 4.0
FIELDS = ("prompt", "steps", "seed", "scribble", "guidance", "conditioning_scale")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}


class RequestError(Exception):
    """A client mistake: HTTP status + message."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _int_field(body: dict, name: str, default: int, lo: int, hi: int) -> int:
    v = body.get(name, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float_field(body: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    v = body.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def decode_data_url(url: Any):
    """A ``data:image/...;base64,`` URL -> PIL image (size-checked, fully decoded)."""
    from PIL import Image

    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url[:64]:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "scribble must be an image data URL (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "scribble: invalid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if max(img.size) > MAX_SCRIBBLE_SIDE:
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"scribble larger than {MAX_SCRIBBLE_SIDE} px per side")
        img.load()
    except RequestError:
        raise
    except Exception:  # PIL raises many types for corrupt data
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "scribble: not a readable image") from None
    return img


def parse_request(raw: bytes):
    """Body bytes -> engine Request; raises :class:`RequestError` (400 malformed, 422 bad fields)."""
    from .engine import Request

    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"unknown fields: {', '.join(map(str, unknown))}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "prompt must be a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"prompt longer than {MAX_PROMPT_CHARS} characters")
    scribble = body.get("scribble")
    return Request(
        prompt=prompt,
        steps=_int_field(body, "steps", 1, 1, MAX_STEPS),
        seed=_int_field(body, "seed", 0, 0, MAX_SEED),
        guidance=_float_field(body, "guidance", None, 0.0, MAX_GUIDANCE),
        conditioning_scale=_float_field(body, "conditioning_scale", None, 0.0, MAX_CONDITIONING_SCALE),
        scribble=None if scribble is None else decode_data_url(scribble),
    )


def static_file(name: str) -> tuple[bytes, str] | None:
    """Packaged file from ``serve/static`` (flat names only; no path traversal)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in STATIC_TYPES:
        return None
    f = resources.files(__package__).joinpath("static", name)
    if not f.is_file():
        return None
    return f.read_bytes(), STATIC_TYPES[suffix]


class Handler(BaseHTTPRequestHandler):
    server_version = "sana-sprint"
    protocol_version = "HTTP/1.1"
    engine = None  # set by make_server (a subclass per server)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        logger.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message, "status": int(status)})

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._json(HTTPStatus.OK, {"status": "ok", **self.engine.info})
            return
        name = "index.html" if path in ("/", "/index.html") else path[len("/static/") :] if path.startswith("/static/") else ""
        found = static_file(name)
        if found is None:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")
            return
        self._send(HTTPStatus.OK, *found)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/generate":
            self._drain_or_close()
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")
            return
        try:
            raw = self._read_body()
            req = parse_request(raw)
        except RequestError as e:
            self._error(e.status, e.message)
            return
        try:
            result = self.engine.generate(req)
        except UserError as e:  # e.g. a prompt the text encoder refuses
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(e))
            return
        except Exception:
            logger.exception("generation failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "generation failed (see server log)")
            return
        self._json(
            HTTPStatus.OK,
            {
                "image": "data:image/png;base64," + base64.b64encode(result.png).decode("ascii"),
                "latency_ms": round(result.latency_ms, 2),
                "queue_ms": round(result.queue_ms, 2),
                "steps": req.steps,
                "seed": req.seed,
                **result.meta,
            },
        )

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not supported; send Content-Length")
        text = self.headers.get("Content-Length")
        if text is None:
            return 0
        try:
            n = int(text)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        return n

    def _read_body(self) -> bytes:
        n = self._content_length()
        if n > MAX_BODY_BYTES:
            # Never buffer an oversize body. Discard a moderately large one so the client reads our 413
            # (closing with unread data makes the kernel reset the connection); close on anything bigger.
            self.close_connection = True
            if n <= DRAIN_LIMIT_BYTES:
                self._discard(n)
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
        return self.rfile.read(n) if n else b""

    def _discard(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)

    def _drain_or_close(self) -> None:
        try:
            n = self._content_length()
        except RequestError:
            return
        if n > DRAIN_LIMIT_BYTES:
            self.close_connection = True
        elif n:
            self._discard(n)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # listen backlog; socketserver's 5 resets connections when 50 clients connect at once


def make_server(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> Server:
    """A server bound to (host, port); port 0 picks a free one (``server.server_address[1]``)."""
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    return Server((host, port), handler)


def serve_in_thread(engine, host: str = DEFAULT_HOST, port: int = 0) -> tuple[Server, threading.Thread]:
    """Start a server in a daemon thread (tests, benchmarks); stop with ``server.shutdown()``."""
    server = make_server(engine, host, port)
    thread = threading.Thread(target=server.serve_forever, name="sana-sprint-serve", daemon=True)
    thread.start()
    return server, thread


@command("serve", help="web demo: draw a scribble, get an image live (localhost by default)")
def serve_command(p: argparse.ArgumentParser):
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default: %(default)s; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 = any free)")
    p.add_argument("--model", default=None, help="model folder or name in models/ (default: shapes-sprint, else random)")
    p.add_argument("--controlnet", default=None, help="ControlNet folder (default: MODEL/controlnet or the shipped MODEL-controlnet next to MODEL; else a random untrained one)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")

    def run(args: argparse.Namespace) -> int:
        if not 0 <= args.port <= 65535:
            raise UserError(f"--port must be in [0, 65535], got {args.port}")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        from .engine import load_engine

        engine = load_engine(args.model, args.controlnet, args.device)
        try:
            server = make_server(engine, args.host, args.port)
        except OSError as e:
            raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
        host, port = server.server_address[:2]
        print(f"serving {engine.info['model']} on http://{host}:{port}/  (Ctrl-C to stop)", file=sys.stderr)
        if engine.info["random_model"] or engine.info["random_controlnet"]:
            print("note: RANDOM UNTRAINED weights in use; images show the data path, not quality", file=sys.stderr)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0

    return run
