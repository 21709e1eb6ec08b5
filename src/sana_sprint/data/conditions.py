"""ControlNet conditions: a deterministic scribble/edge extractor and the edge-F1 control-fidelity metric.

The official SANA ControlNet is trained on HED soft-edge scribbles. HED is a CNN whose weights must
be downloaded, which we cannot do offline, so conditions here come from a Canny-style extractor with
fixed thresholds (no learned weights, identical output on every machine):

    RGB -> Gaussian blur (sigma 1) -> Sobel gradient per channel, the strongest channel per pixel
        -> non-maximum suppression -> hysteresis thresholds (fixed, on [0, 1] intensities)
                                                                            = thin edges  (:func:`edge_map`)
    thin edges -> dilation by a disk of radius 1                            = scribble    (:func:`scribble`)

Scribbles are white lines on black (the ControlNet scribble convention), ``uint8 [H, W, 3]``;
:func:`to_tensor` maps them to ``[-1, 1]`` for the VAE. User-drawn scribbles are taken as they are:
:func:`user_scribble` only resizes and binarises them (dark-on-light drawings are inverted).

Control fidelity (:func:`edge_f1`): edges of the generated image against the condition's edges,
counting a pixel as matched when the other map has an edge within ``tolerance_px`` (precision,
recall and F1 as in the BSDS boundary benchmark, with a distance transform instead of bipartite
matching).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

BLUR_SIGMA = 1.0
HIGH_THRESHOLD = 0.10  # gradient magnitude (Sobel / 8, intensities in [0, 1]) that starts an edge
LOW_THRESHOLD = 0.05  # ... and that continues one (hysteresis)
SCRIBBLE_RADIUS = 1  # dilation of thin edges into scribble strokes (3 px wide)
BINARY_THRESHOLD = 0.5  # user scribbles: stroke where the (inverted if needed) intensity exceeds this


def _to_float(image, caller: str) -> np.ndarray:
    """Any image (as :func:`to_gray` accepts) -> float64 array in [0, 1], ``[H, W]`` or ``[H, W, C]``."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"{caller} takes one image, not a batch")
            t = t[0]
        t = (t.clamp(-1, 1) + 1) / 2
        image = t.permute(1, 2, 0).numpy() if t.ndim == 3 else t.numpy()
    a = np.asarray(image)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def to_gray(image: np.ndarray | Image.Image | torch.Tensor) -> np.ndarray:
    """Any image -> float64 [H, W] in [0, 1].

    Accepts uint8 ``[H, W]`` / ``[H, W, 3|4]``, float ``[H, W(, 3)]`` in [0, 1], a PIL image, or a torch
    tensor ``[3, H, W]`` in [-1, 1] (the project's image convention).
    """
    a = _to_float(image, "to_gray")
    if a.ndim == 3:
        a = a[..., :3]
        if a.shape[-1] == 1:
            return a[..., 0]
        return a @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma
    if a.ndim != 2:
        raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {a.shape}")
    return a


def to_channels(image) -> np.ndarray:
    """Any image (as :func:`to_gray` accepts) -> float64 [H, W, C] in [0, 1]: C = 3 for colour, 1 for grey."""
    a = _to_float(image, "to_channels")
    if a.ndim == 2:
        return a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {a.shape}")
    return a[..., :3]


def _nms(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep pixels that are maxima along the (4-way quantised) gradient direction."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(mag, 1)
    h, w = mag.shape

    def shift(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # Neighbour offsets across the edge (array rows grow downwards, so "dy" follows gy).
    keep = np.zeros_like(mag, dtype=bool)
    for lo, hi, (dy, dx) in (
        (0.0, 22.5, (0, 1)),
        (157.5, 180.1, (0, 1)),
        (22.5, 67.5, (1, 1)),
        (67.5, 112.5, (1, 0)),
        (112.5, 157.5, (1, -1)),
    ):
        sel = (angle >= lo) & (angle < hi)
        # ">=" on one side and ">" on the other breaks ties on plateaus deterministically.
        keep |= sel & (mag >= shift(dy, dx)) & (mag > shift(-dy, -dx))
    return keep


def edge_map(
    image,
    low: float = LOW_THRESHOLD,
    high: float = HIGH_THRESHOLD,
    sigma: float = BLUR_SIGMA,
) -> np.ndarray:
    """Thin (about 1 px) Canny-style edges, bool [H, W]. Deterministic, fixed thresholds.

    Colour images use, per pixel, the gradient of the channel where it is strongest: a luma-only
    detector misses iso-luminant boundaries (a yellow shape on the light shapes-world background
    differs from it by ~0.13 in luma but ~0.8 in blue).
    """
    chans = to_channels(image)
    gxs, gys = [], []
    for k in range(chans.shape[-1]):
        c = ndimage.gaussian_filter(chans[..., k], sigma, mode="nearest") if sigma > 0 else chans[..., k]
        gxs.append(ndimage.sobel(c, axis=1, mode="nearest") / 8.0)
        gys.append(ndimage.sobel(c, axis=0, mode="nearest") / 8.0)
    gx_all, gy_all = np.stack(gxs), np.stack(gys)
    best = np.hypot(gx_all, gy_all).argmax(axis=0)[None]
    gx = np.take_along_axis(gx_all, best, 0)[0]
    gy = np.take_along_axis(gy_all, best, 0)[0]
    mag = np.hypot(gx, gy)
    thin = _nms(mag, gx, gy) & (mag >= low)
    # Hysteresis: keep weak-edge components that touch a strong pixel (8-connectivity).
    labels, n = ndimage.label(thin, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return thin
    strong = np.zeros(n + 1, dtype=bool)
    strong[np.unique(labels[thin & (mag >= high)])] = True
    strong[0] = False
    return strong[labels]


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= r * r


def _rgb(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)


def scribble(image, radius: int = SCRIBBLE_RADIUS) -> np.ndarray:
    """Scribble condition of an image: dilated edges, white on black, uint8 [H, W, 3]."""
    edges = edge_map(image)
    if radius > 0:
        edges = ndimage.binary_dilation(edges, structure=_disk(radius))
    return _rgb(edges)


def user_scribble(image, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """A user drawing as a condition: resized (area filter) and binarised, white strokes on black, uint8 [H, W, 3].

    Transparent pixels count as background; a drawing whose background is light (dark strokes on
    white, like a pen on paper) is inverted. No edge extraction: the strokes are the condition.
    """
    if isinstance(image, Image.Image):
        pil = image
        if pil.mode in ("RGBA", "LA", "P"):
            pil = pil.convert("RGBA")
            back = Image.new("RGBA", pil.size, (255, 255, 255, 255))
            pil = Image.alpha_composite(back, pil)
        pil = pil.convert("L")
    else:
        pil = Image.fromarray(np.round(to_gray(image) * 255).astype(np.uint8), mode="L")
    if size is not None:
        wh = (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))  # (H, W) -> PIL (W, H)
        pil = pil.resize(wh, Image.Resampling.BOX if wh[0] <= pil.width else Image.Resampling.BILINEAR)
    gray = np.asarray(pil, dtype=np.float64) / 255.0
    if np.median(gray) > 0.5:  # light background: strokes are the dark pixels
        gray = 1.0 - gray
    return _rgb(gray > BINARY_THRESHOLD)


def to_tensor(condition: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] (or [H, W]) condition -> float tensor [3, H, W] in [-1, 1] (VAE input)."""
    a = np.asarray(condition)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    t = torch.from_numpy(a[..., :3].astype(np.float32) / 127.5 - 1.0)
    return t.permute(2, 0, 1).contiguous()


def thin(mask: np.ndarray, max_iter: int = 64) -> np.ndarray:
    """Zhang-Suen thinning (1984) of a bool mask to 1-px-wide centre lines (vectorised)."""
    img = np.pad(np.asarray(mask, dtype=bool), 1)
    for _ in range(max_iter):
        changed = False
        for step in (0, 1):
            p = img
            # Neighbours P2..P9 clockwise from north.
            n = [
                p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:],
                p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2],
            ]  # fmt: skip
            centre = p[1:-1, 1:-1]
            b = sum(x.astype(np.int8) for x in n)
            a = sum(((~n[i]) & n[(i + 1) % 8]).astype(np.int8) for i in range(8))
            if step == 0:
                c1 = ~(n[0] & n[2] & n[4])
                c2 = ~(n[2] & n[4] & n[6])
            else:
                c1 = ~(n[0] & n[2] & n[6])
                c2 = ~(n[0] & n[4] & n[6])
            remove = centre & (b >= 2) & (b <= 6) & (a == 1) & c1 & c2
            if remove.any():
                changed = True
                img = img.copy()
                img[1:-1, 1:-1] &= ~remove
        if not changed:
            break
    return img[1:-1, 1:-1]


def condition_edges(condition) -> np.ndarray:
    """Thin bool edges of a condition: a bool edge map is kept, a scribble image is binarised and thinned."""
    a = np.asarray(condition)
    if a.dtype == bool:
        return a if a.ndim == 2 else a.any(axis=-1)
    return thin(to_gray(a) > BINARY_THRESHOLD)


def edge_prf(cond_edges, generated_image, tolerance_px: float = 1.0) -> tuple[float, float, float]:
    """(precision, recall, F1) of the generated image's edges against the condition's edges.

    A generated edge pixel is correct when a condition edge lies within ``tolerance_px`` (Euclidean),
    and a condition edge pixel is recalled when a generated edge lies within ``tolerance_px``.
    ``cond_edges`` is a bool edge map (e.g. :func:`edge_map` of the source image) or a scribble image.
    Two empty maps agree perfectly (1.0); exactly one empty map scores 0.
    """
    cond = condition_edges(cond_edges)
    gen = edge_map(generated_image)
    if cond.shape != gen.shape:
        raise ValueError(f"condition {cond.shape} and generated image {gen.shape} differ in size")
    if tolerance_px < 0:
        raise ValueError("tolerance_px must be >= 0")
    n_cond, n_gen = int(cond.sum()), int(gen.sum())
    if n_cond == 0 and n_gen == 0:
        return 1.0, 1.0, 1.0
    if n_cond == 0 or n_gen == 0:
        return 0.0, 0.0, 0.0
    # Distance from every pixel to the nearest edge pixel of each map.
    d_cond = ndimage.distance_transform_edt(~cond)
    d_gen = ndimage.distance_transform_edt(~gen)
    precision = float((d_cond[gen] <= tolerance_px).mean())
    recall = float((d_gen[cond] <= tolerance_px).mean())
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def edge_f1(cond_edges, generated_image, tolerance_px: float = 1.0) -> float:
    """Control fidelity: F1 between the condition's edges and the generated image's edges (see :func:`edge_prf`)."""
    return edge_prf(cond_edges, generated_image, tolerance_px)[2]
