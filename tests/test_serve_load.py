"""Short load test of the web server (benchmarks/serve_load.py): 8 clients x 3 s, no 5xx, bad input -> 4xx."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_short_load_has_no_server_errors(serve_load):
    report = serve_load.run_load(serve_load.tiny_engine(), clients=8, duration=3.0, max_requests=50, warmup=2, bad_rounds=1)
    assert report["ok"] >= 8 and report["requests"] == report["ok"]  # every well-formed request succeeded
    assert report["server_errors_5xx"] == 0 and report["connection_errors"] == 0 and report["stuck_clients"] == 0
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    # Every malformed / oversize request got a 4xx, and the kinds are the documented ones.
    cases = {b["case"]: b["status"] for b in report["bad_requests"]}
    assert len(cases) == len(serve_load.bad_requests(1)) and report["bad_requests_all_4xx"]
    assert cases["oversize body"] == cases["declared 1 GB"] == 413
    assert cases["not json"] == 400 and cases["unknown field"] == 422 and cases["unknown route"] == 404
    assert report["rss_mb"]["growth"] < 200  # loose: a leak per request would grow without bound


def test_report_flags_server_errors(serve_load, monkeypatch):
    """The report really counts 5xx: an engine that fails every request is caught."""
    engine = serve_load.tiny_engine()

    def broken(req):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "generate", broken)
    report = serve_load.run_load(engine, clients=2, duration=0.5, max_requests=3, warmup=0, bad_rounds=1)
    assert report["server_errors_5xx"] == report["requests"] > 0 and report["ok"] == 0
