"""Scribble/edge extractor and the edge-F1 control metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sana_sprint.data import conditions as c

N = 64


def _square(x0=16, y0=16, side=24, value=(30, 60, 220), background=235) -> np.ndarray:
    img = np.full((N, N, 3), background, dtype=np.uint8)
    img[y0 : y0 + side, x0 : x0 + side] = value
    return img


def _disc(cx=40, cy=40, r=12) -> np.ndarray:
    yy, xx = np.mgrid[:N, :N]
    img = np.full((N, N, 3), 235, dtype=np.uint8)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (220, 30, 30)
    return img


def test_edges_sit_on_the_square_outline():
    e = c.edge_map(_square())
    assert e.dtype == bool and e.shape == (N, N)
    ys, xs = np.nonzero(e)
    # Every edge pixel is within 1 px of the square's boundary (x or y in {15, 16, 39, 40}).
    near = (np.minimum(np.abs(xs[:, None] - [15.5, 39.5]).min(1), np.abs(ys[:, None] - [15.5, 39.5]).min(1))) <= 1
    assert near.all()
    # Edges are thin: no 2x2 block fully on.
    assert not (e[:-1, :-1] & e[1:, :-1] & e[:-1, 1:] & e[1:, 1:]).any()
    # A flat image has no edges; tiny noise stays below the fixed threshold.
    flat = np.full((N, N, 3), 128, np.uint8)
    assert not c.edge_map(flat).any()
    noisy = (flat + np.random.default_rng(0).integers(-3, 4, flat.shape)).astype(np.uint8)
    assert not c.edge_map(noisy).any()


def test_extractor_is_deterministic_and_input_format_agnostic():
    img = _disc()
    a, b = c.scribble(img), c.scribble(img.copy())
    assert a.dtype == np.uint8 and a.shape == (N, N, 3) and np.array_equal(a, b)
    assert set(np.unique(a)) == {0, 255}
    # Same edges from a PIL image and from a [-1, 1] tensor.
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    assert np.array_equal(c.edge_map(Image.fromarray(img)), c.edge_map(img))
    assert np.array_equal(c.edge_map(t), c.edge_map(img))
    # The scribble is the dilated edge map: it covers it and is thicker.
    assert (a[..., 0] > 0)[c.edge_map(img)].all()
    assert (a[..., 0] > 0).sum() > 2 * c.edge_map(img).sum()
    x = c.to_tensor(a)
    assert x.shape == (3, N, N) and x.min() == -1 and x.max() == 1


def test_user_scribble_binarises_resizes_and_inverts():
    drawing = np.full((128, 128, 3), 255, np.uint8)  # black pen on white paper
    drawing[60:68, 10:120] = 0
    out = c.user_scribble(drawing, size=64)
    assert out.shape == (64, 64, 3) and set(np.unique(out)) == {0, 255}
    on = out[..., 0] > 0
    assert on[30:34, 5:60].all() and not on[:25].any() and not on[40:].any()
    # White strokes on black are kept as they are; transparent PNG background counts as paper.
    assert np.array_equal(c.user_scribble(255 - drawing, size=64), out)
    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[60:68, 10:120] = (0, 0, 0, 255)
    assert np.array_equal(c.user_scribble(Image.fromarray(rgba, "RGBA"), size=64), out)


def test_f1_self_one_unrelated_low():
    sq, disc = _square(), _disc()
    assert c.edge_f1(c.edge_map(sq), sq) == 1.0
    # The scribble condition itself (thick strokes) is thinned back onto the edges.
    assert c.edge_f1(c.scribble(sq), sq) > 0.9
    assert c.edge_f1(c.edge_map(sq), disc) < 0.2
    blank = np.full((N, N, 3), 200, np.uint8)
    assert c.edge_f1(c.edge_map(sq), blank) == 0.0
    assert c.edge_f1(c.edge_map(blank), blank) == 1.0


def test_tolerance_behaviour():
    sq = _square()
    cond = c.edge_map(sq)
    for shift, need in ((1, 1), (2, 2), (3, 3)):
        moved = np.roll(sq, shift, axis=1)
        assert c.edge_f1(cond, moved, tolerance_px=need) == 1.0
        assert c.edge_f1(cond, moved, tolerance_px=need - 1) < 0.75
    # Tolerance is monotone.
    moved = np.roll(np.roll(sq, 2, axis=0), 1, axis=1)
    scores = [c.edge_f1(cond, moved, tolerance_px=t) for t in (0, 1, 2, 3)]
    assert scores == sorted(scores) and scores[0] < scores[-1]
    with pytest.raises(ValueError):
        c.edge_f1(cond, sq, tolerance_px=-1)
    with pytest.raises(ValueError):
        c.edge_f1(cond[:32], sq)


def test_thin_reduces_strokes_to_centre_lines():
    m = np.zeros((20, 40), bool)
    m[8:13, 3:37] = True  # 5 px thick bar
    t = c.thin(m)
    assert t.sum() > 0 and (t.sum(axis=0) <= 1).all()
    assert set(np.nonzero(t)[0]) == {10}
