"""scripts/pack_cache.py: int8 transport of a latent cache, checked value by value against the original."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, MAX_LENGTH, tiny_vae

from sana_sprint.data.latents import LatentDataset, build_latent_cache
from sana_sprint.text import TextEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import pack_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quantize_is_within_half_a_step_per_slice():
    x = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32) * np.array([1, 10, 0.01])[None, :, None, None]
    x[1, 2] = 0.0  # an all-zero slice keeps scale 1 and stays zero
    q, s = pack_cache.quantize(x, axes=(2, 3))
    assert q.dtype == np.int8 and s.shape == (5, 3, 1, 1)
    err = np.abs(pack_cache.dequantize(q, s) - x)
    assert np.all(err <= s / 2 + 1e-7)
    assert np.abs(q[0, 0]).max() == 127 and np.all(q[1, 2] == 0)


def test_pack_unpack_round_trip(tmp_path, tokenizer, bert):
    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    cache = build_latent_cache("shapes", tiny_vae(seed=6), te, 10, tmp_path / "cache", batch=5, size=IMAGE_SIZE,
                               progress=False)
    assert pack_cache.main(["pack", str(cache), str(tmp_path / "p.npz")]) == 0
    assert pack_cache.main(["unpack", str(tmp_path / "p.npz"), str(tmp_path / "back")]) == 0
    a, b = LatentDataset(cache), LatentDataset(tmp_path / "back")
    assert len(a) == len(b) and a.captions == b.captions and a.latent_shape == b.latent_shape
    assert b.meta["packed_int8"] and a.scaling_factor == b.scaling_factor
    la, lb = np.asarray(a.latents, np.float32), np.asarray(b.latents, np.float32)
    step = np.abs(la).max(axis=(2, 3), keepdims=True) / 127
    assert np.all(np.abs(la - lb) <= step / 2 + 2e-3 * np.abs(la) + 1e-6)  # + the fp16 store
    assert np.abs(la - lb).max() > 0
    ba, bb = a.batch(np.arange(len(a))), b.batch(np.arange(len(b)))
    assert torch.equal(ba["mask"], bb["mask"])
    m = ba["mask"][..., None].float()
    ea, eb = ba["embeds"] * m, bb["embeds"]
    assert torch.all(bb["embeds"] * (1 - m) == 0)  # padded positions are stored as zeros
    tol = ea.abs().amax(-1, keepdim=True) / 127 / 2 + 2e-3 * ea.abs() + 1e-6
    assert torch.all((ea - eb).abs() <= tol)
    for k in ("null_embed", "null_mask"):
        assert np.array_equal(np.load(cache / f"{k}.npy"), np.load(tmp_path / "back" / f"{k}.npy"))


def test_pack_a_prefix_of_the_rows_keeps_their_captions(tmp_path, tokenizer, bert):
    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    cache = build_latent_cache("shapes", tiny_vae(seed=6), te, 10, tmp_path / "cache", batch=5, size=IMAGE_SIZE,
                               progress=False)
    assert pack_cache.main(["pack", str(cache), str(tmp_path / "p.npz"), "--rows", "6"]) == 0
    assert pack_cache.main(["unpack", str(tmp_path / "p.npz"), str(tmp_path / "back")]) == 0
    a, b = LatentDataset(cache), LatentDataset(tmp_path / "back")
    assert len(b) == 6 and b.meta["n"] == 6 and len(b.captions) == b.meta["n_unique"] <= 6
    ba, bb = a.batch(np.arange(6)), b.batch(np.arange(6))
    assert ba["caption"] == bb["caption"] and torch.equal(ba["mask"], bb["mask"])
    m = ba["mask"][..., None].float()
    assert torch.allclose(ba["embeds"] * m, bb["embeds"], atol=0.02 * float(ba["embeds"].abs().max()))
    assert torch.allclose(ba["latents"], bb["latents"], atol=0.01 * float(ba["latents"].abs().max()))
    assert pack_cache.main(["pack", str(cache), str(tmp_path / "q.npz"), "--rows", "11"]) == 2


def test_pack_errors_are_reported(tmp_path, capsys):
    assert pack_cache.main(["pack", str(tmp_path / "none"), str(tmp_path / "p.npz")]) == 2
    assert "not a latent cache" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    np.savez(tmp_path / "p.npz", meta=np.frombuffer(json.dumps({}).encode(), dtype=np.uint8))
    assert pack_cache.main(["unpack", str(tmp_path / "p.npz"), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
