"""Median server-side latency of ``sana-sprint serve`` at 1 step (target: <= 50 ms on CPU with the shipped student).

Starts the real HTTP server in-process on a free loopback port, sends ``--n`` sequential
``POST /generate`` requests (after ``--warmup`` discarded ones; each with a new seed) and reports the
server-side latency (conditioning + sampling + VAE decode + PNG, under the model lock) and the
client round trip. Prints a summary and writes JSON.

The server runs in this process, so the process CPU time spent per request (``cpu_ms``: server model
work plus both sides' HTTP/JSON/base64 handling) is also reported: on a CPU shared with other jobs it
is an estimate of the latency the request would have on an idle core (with ``--threads 1``), which the
wall-clock numbers are not.

    python benchmarks/serve_latency.py --model shapes-sprint --n 50 --out serve_latency.json
    python benchmarks/serve_latency.py --scribble            # with a scribble (ControlNet path)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path


def _scribble_url(size: int = 256) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((size * 0.2, size * 0.2, size * 0.6, size * 0.6), outline="black", width=6)
    draw.line((size * 0.5, size * 0.8, size * 0.9, size * 0.4), fill="black", width=6)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder/name (default: shapes-sprint, else a tiny random model)")
    p.add_argument("--controlnet", default=None, help="ControlNet folder (default: the model's shipped one, see serve; else random untrained)")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=1, choices=(1, 2, 3, 4))
    p.add_argument("--n", type=int, default=30, help="timed requests (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--scribble", action="store_true", help="send a scribble with every request")
    p.add_argument("--prompt", default="a red circle to the left of a blue square")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default="serve_latency.json")
    args = p.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        p.error("--n must be >= 1 and --warmup >= 0")

    import torch

    from sana_sprint.serve.app import serve_in_thread
    from sana_sprint.serve.engine import load_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = load_engine(args.model, args.controlnet, args.device)
    server, thread = serve_in_thread(engine, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/generate"
    scribble = _scribble_url() if args.scribble else None
    server_ms: list[float] = []
    client_ms: list[float] = []
    cpu_ms: list[float] = []
    try:
        for i in range(args.warmup + args.n):
            body = {"prompt": args.prompt, "steps": args.steps, "seed": i}
            if scribble:
                body["scribble"] = scribble
            req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
            c0, t0 = time.process_time(), time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                reply = json.loads(r.read())
            dt = (time.perf_counter() - t0) * 1000
            dc = (time.process_time() - c0) * 1000
            if i >= args.warmup:
                server_ms.append(float(reply["latency_ms"]))
                client_ms.append(dt)
                cpu_ms.append(dc)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

    report = {
        "model": engine.info["model"],
        "random_model": engine.info["random_model"],
        "controlnet": engine.info["controlnet"],
        "random_controlnet": engine.info["random_controlnet"],
        "resolution": engine.info["resolution"],
        "steps": args.steps,
        "scribble": bool(scribble),
        "n": args.n,
        "warmup": args.warmup,
        "server_ms": {
            "median": statistics.median(server_ms),
            "p10": _pct(server_ms, 0.1),
            "p90": _pct(server_ms, 0.9),
            "min": min(server_ms),
        },
        "round_trip_ms": {"median": statistics.median(client_ms), "p90": _pct(client_ms, 0.9)},
        "cpu_ms_per_request": {"median": statistics.median(cpu_ms), "p10": _pct(cpu_ms, 0.1), "p90": _pct(cpu_ms, 0.9)},
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "device": str(engine.pipe.device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    s = report["server_ms"]
    print(
        f"{report['model']} @ {report['resolution']}px, {args.steps} step(s), scribble={report['scribble']}: "
        f"server median {s['median']:.1f} ms (p10 {s['p10']:.1f}, p90 {s['p90']:.1f}); "
        f"round trip median {report['round_trip_ms']['median']:.1f} ms; process CPU per request median "
        f"{report['cpu_ms_per_request']['median']:.1f} ms over {args.n} requests (load avg {report['load_avg_1min']}) "
        f"-> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
