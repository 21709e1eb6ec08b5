"""Web demo over plain HTTP: routes, generation, 4xx for bad input, concurrency, CLI registration."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import IMAGE_SIZE, MAX_LENGTH, tiny_bert, tiny_tokenizer, tiny_transformer, tiny_vae
from PIL import Image

from sana_sprint.serve import app


def tiny_engine():
    """Engine on a tiny random student + random ControlNet (no files, a few ms per image)."""
    from sana_sprint.pipeline import SprintPipeline
    from sana_sprint.serve.engine import Engine, random_controlnet
    from sana_sprint.text import TextEncoder

    tok = tiny_tokenizer()
    text = TextEncoder(tok, tiny_bert(len(tok)), max_length=MAX_LENGTH)
    pipe = SprintPipeline(text, tiny_transformer(), tiny_vae(), {"kind": "student", "resolution": IMAGE_SIZE})
    net = random_controlnet(pipe.transformer)
    return Engine(pipe, net, random_model=True, random_controlnet=True, model_name="tiny-test")


@pytest.fixture(scope="module")
def server():
    srv, thread = app.serve_in_thread(tiny_engine(), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _request(url, data=None, headers=None, method=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _post(server, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _request(server + "/generate", data, {"Content-Type": "application/json"})


def _png_url(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(body: bytes) -> np.ndarray:
    j = json.loads(body)
    assert j["image"].startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(j["image"].split(",", 1)[1]))))


def _scribble(col: int = 60) -> np.ndarray:
    a = np.full((128, 128, 3), 255, np.uint8)
    a[20:110, col : col + 8] = 0
    return a


def test_pages_and_health(server):
    status, headers, body = _request(server + "/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    info = json.loads(body)
    assert info["status"] == "ok" and info["random_model"] and info["controlnet"]
    status, headers, body = _request(server + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<canvas id="pad"' in body and b"/static/app.js" in body
    for name in ("app.js", "style.css"):
        assert _request(f"{server}/static/{name}")[0] == 200
    for bad in ("/static/../app.py", "/static/app.py", "/nope", "/static/"):
        assert _request(server + bad)[0] == 404


def test_generate_text_and_scribble(server):
    status, _, body = _post(server, {"prompt": "a red circle", "steps": 1, "seed": 3})
    assert status == 200
    j = json.loads(body)
    assert j["latency_ms"] > 0 and j["controlled"] is False and j["steps"] == 1
    text_only = _image(body)
    assert text_only.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and text_only.dtype == np.uint8
    # Same request, same image; a scribble changes it, and different scribbles differ.
    assert np.array_equal(_image(_post(server, {"prompt": "a red circle", "steps": 1, "seed": 3})[2]), text_only)
    s1 = _post(server, {"prompt": "a red circle", "steps": 1, "seed": 3, "scribble": _png_url(_scribble(20))})
    s2 = _post(server, {"prompt": "a red circle", "steps": 1, "seed": 3, "scribble": _png_url(_scribble(90))})
    assert s1[0] == s2[0] == 200 and json.loads(s1[2])["controlled"] is True
    a, b = _image(s1[2]), _image(s2[2])
    assert not np.array_equal(a, text_only) and not np.array_equal(a, b)
    for steps in (2, 4):
        status, _, body = _post(server, {"prompt": "x", "steps": steps, "seed": 0})
        assert status == 200 and json.loads(body)["steps"] == steps


@pytest.mark.parametrize(
    "body, status, match",
    [
        (b"{not json", 400, "JSON"),
        (b"\xff\xfe", 400, "JSON"),
        (b"[1, 2]", 400, "object"),
        (b"", 400, "JSON"),
        ({"steps": 1}, 422, "prompt"),
        ({"prompt": 3}, 422, "prompt"),
        ({"prompt": "x", "steps": 0}, 422, "steps"),
        ({"prompt": "x", "steps": 5}, 422, "steps"),
        ({"prompt": "x", "steps": "2"}, 422, "steps"),
        ({"prompt": "x", "steps": True}, 422, "steps"),
        ({"prompt": "x", "steps": 1.5}, 422, "steps"),
        ({"prompt": "x", "seed": -1}, 422, "seed"),
        ({"prompt": "x", "seed": 2**40}, 422, "seed"),
        ({"prompt": "x", "guidance": float("nan")}, 422, "guidance"),
        ({"prompt": "x" * 1001}, 422, "prompt"),
        ({"prompt": "x", "scribble": "hello"}, 422, "scribble"),
        ({"prompt": "x", "scribble": "data:image/png;base64,!!!"}, 422, "base64"),
        ({"prompt": "x", "scribble": "data:image/png;base64," + base64.b64encode(b"notapng").decode()}, 422, "image"),
        ({"prompt": "x", "stepz": 2}, 422, "unknown"),
    ],
)
def test_bad_input_is_4xx(server, body, status, match):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, raw = _post(server, data)
    assert got == status, raw
    assert match.lower() in json.loads(raw)["error"].lower()


def test_oversize_body_413_and_server_survives(server):
    big = json.dumps({"prompt": "x", "scribble": "data:image/png;base64," + "A" * (app.MAX_BODY_BYTES + 10)}).encode()
    status, _, raw = _post(server, big)
    assert status == 413 and "larger" in json.loads(raw)["error"]
    # A lying Content-Length far above the limit is refused without reading.
    status, _, _ = _request(server + "/generate", b"{}", {"Content-Length": str(10**9)}, method="POST")
    assert status == 413
    assert _post(server, {"prompt": "still alive"})[0] == 200


def test_huge_scribble_dimensions_rejected(server):
    buf = io.BytesIO()
    Image.new("1", (app.MAX_SCRIBBLE_SIDE + 1, 8)).save(buf, format="PNG")  # tiny file, too many pixels
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    status, _, raw = _post(server, {"prompt": "x", "scribble": url})
    assert status == 422 and "larger" in json.loads(raw)["error"]


def test_concurrent_requests_are_serialised(server):
    results: list = [None] * 6

    def worker(i):
        results[i] = _post(server, {"prompt": "two squares", "steps": 2, "seed": 7})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r[0] == 200 for r in results)
    images = [_image(r[2]) for r in results]
    assert all(np.array_equal(images[0], im) for im in images[1:])
    assert max(json.loads(r[2])["queue_ms"] for r in results) > 0


def test_cli_registration_and_port_check(capsys):
    from sana_sprint import cli

    assert "serve" in cli.COMMANDS
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_shipped_controlnet_lookup_prefers_the_model_folder_then_the_sibling(tmp_path):
    from sana_sprint.serve.engine import shipped_controlnet

    model = tmp_path / "shapes-sprint"
    model.mkdir()
    assert shipped_controlnet(model) is None
    sibling = tmp_path / "shapes-sprint-controlnet"
    sibling.mkdir()
    assert shipped_controlnet(model) is None  # a folder without a ControlNet config is not one
    (sibling / "controlnet_config.json").write_text("{}")
    assert shipped_controlnet(model) == sibling
    inner = model / "controlnet"
    inner.mkdir()
    (inner / "controlnet_config.json").write_text("{}")
    assert shipped_controlnet(model) == inner
