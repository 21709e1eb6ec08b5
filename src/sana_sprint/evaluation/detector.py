"""Deterministic ShapesEval detector: colour segmentation + connected components + geometry.

No learned weights. Steps:
1. Background = median colour of the image's outer frame. Each pixel is measured by the hue and
   chroma (max - min) of its difference to the background: saturated palette objects stand out,
   colourless differences (grey, black, white, brightness changes) are "other" and ignored.
2. Every pixel with enough chroma gets the palette colour with the nearest hue (circular);
   weak edge pixels inherit the colour of the nearest strong pixel, so anti-aliased or blurred
   rims belong to their object instead of forming fringes of a neighbouring hue.
3. Connected components per colour (scipy.ndimage.label); each gets a soft coverage ``alpha``
   (chroma relative to the component's core), from which we measure soft area, soft extents
   (sum over columns/rows of the max coverage: exact at sub-pixel level and preserved by blur),
   fill ratio = area / (width * height) and the vertical offset of the centroid.
4. Shape by nearest prototype in (fill, offset): square (1, 0), circle (pi/4, 0), triangle
   (1/2, 1/6); components that are too small, too hollow, or of mixed hue are rejected (noise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from sana_sprint.data.shapes import BACKGROUND, PALETTE

COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees [0, 360) and chroma (max - min) of RGB vectors (negative entries allowed)."""
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    c = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(c > 1e-6, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return (h * 60.0) % 360.0, c


# hues of (colour - background): a pixel mixing colour c with background b at any coverage has
# p - b = alpha * (c - b), so rims and cores share this hue, and a global brightness or colour cast
# (which moves the background too) hardly changes it
PALETTE_HUES = _hue_chroma((np.array([PALETTE[k] for k in COLOR_NAMES], dtype=np.float64)
                            - np.array(BACKGROUND, dtype=np.float64)) / 255.0)[0]

# prototypes in (fill ratio, centroid offset / side). Ideal values are square (1, 0), circle
# (pi/4, 0), upright triangle of base = height (1/2, 1/6); anti-aliasing, blur and JPEG pull fills
# toward the middle and offsets toward 0, so the prototypes sit at the medians measured on
# ground-truth renders under mild degradation (scripts/validate_detector.py): the circle/square
# boundary lands at fill ~0.865, between the worst circles (~0.84) and squares (~0.87) at JPEG q50.
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (0.95, 0.0),
    "circle": (0.78, 0.0),
    "triangle": (0.58, 0.13),
}
OFFSET_WEIGHT = 3.0  # offsets are ~3x smaller than fill differences and robust to blur: weight up


@dataclass
class Detection:
    cls: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, sub-pixel (pixel i spans [i, i+1))
    confidence: float
    area: float  # soft area in pixels
    fill: float
    offset: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d


@dataclass
class DetectorConfig:
    chroma_strong: float = 0.30  # core pixels of an object
    chroma_weak: float = 0.12  # rim pixels (anti-aliasing, blur) that inherit a core colour
    min_area_frac: float = 0.006  # soft area / image area: ~25 px at 64x64, smallest object ~50
    min_fill: float = 0.33  # below: scattered pixels, not a solid shape
    max_fill: float = 1.25
    max_hue_spread: float = 22.0  # degrees, circular std of core hues within one component
    min_core_frac: float = 0.35  # fraction of the component that is core (strong) pixels
    max_aspect: float = 1.8  # all world shapes have a square bounding box
    max_rim: float = 2.5  # pixels: how far from a core a rim pixel may be
    min_area_px: float = 12.0  # absolute floor for small images (32x32: smallest triangle ~13 px)
    min_ring_background: float = 0.5  # an object is surrounded by background, not by other colour


class ShapesDetector:
    def __init__(self, config: DetectorConfig | None = None):
        self.config = config or DetectorConfig()

    def __call__(self, image) -> list[Detection]:
        return self.detect(image)

    def detect(self, image) -> list[Detection]:
        """Detections sorted by descending confidence. ``image``: uint8 [H, W, 3] or float in [0, 1]."""
        cfg = self.config
        rgb = _as_float_rgb(image)
        h, w = rgb.shape[:2]
        bg = _background(rgb)
        hue, chroma = _hue_chroma(rgb - bg)
        strong = chroma >= cfg.chroma_strong
        weak = chroma >= cfg.chroma_weak
        if not strong.any():
            return []
        hue_dist = np.abs((hue[..., None] - PALETTE_HUES + 180.0) % 360.0 - 180.0)
        label = np.argmin(hue_dist, axis=-1)
        # objects = connected cores of one colour; weak rim pixels join the nearest core, so
        # blurred rims neither bridge the gap between two objects nor form fringes of another hue
        cores = np.zeros((h, w), dtype=np.int32)
        colors: list[str] = []
        for ci, cname in enumerate(COLOR_NAMES):
            comps, n = ndimage.label(strong & (label == ci), structure=np.ones((3, 3), dtype=bool))
            cores[comps > 0] = comps[comps > 0] + len(colors)
            colors.extend([cname] * n)
        dist, (iy, ix) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
        owner = np.where(weak & (dist <= cfg.max_rim), cores[iy, ix], 0)
        min_area = max(cfg.min_area_frac * h * w, cfg.min_area_px)
        out: list[Detection] = []
        n_pix = np.bincount(owner.ravel(), minlength=len(colors) + 1)
        for k, sl in enumerate(ndimage.find_objects(owner), start=1):
            if sl is None or n_pix[k] < min_area:  # soft area <= pixel count: cheap early reject
                continue
            pad = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in sl)  # room for rim and ring
            obj = owner[pad] == k
            ring = ndimage.binary_dilation(obj, iterations=2) & ~obj
            if ring.any() and (~weak[pad] | (owner[pad] == k))[ring].mean() < cfg.min_ring_background:
                continue
            det = self._measure(obj, cores[pad] == k, rgb[pad], hue[pad], bg, pad, colors[k - 1], min_area)
            if det is not None:
                out.append(det)
        out.sort(key=lambda d: -d.confidence)
        return out

    def _measure(self, mask, core, rgb, hue, bg, sl, cname, min_area) -> Detection | None:
        cfg = self.config
        n_core = int(core.sum())
        if n_core < cfg.min_core_frac * mask.sum():
            return None
        # coverage = projection of (pixel - background) on (object colour - background): uses the
        # luma contrast too, which survives chroma subsampling (JPEG) better than chroma alone
        direction = np.median(rgb[core], axis=0) - bg
        alpha = ((rgb - bg) @ direction) / max(float(direction @ direction), 1e-6)
        alpha = np.where(mask, np.clip(alpha, 0.0, 1.0), 0.0)
        area = float(alpha.sum())
        if area < min_area:
            return None
        col_cov, row_cov = alpha.max(axis=0), alpha.max(axis=1)
        width, height = float(col_cov.sum()), float(row_cov.sum())
        if max(width, height) > cfg.max_aspect * max(min(width, height), 1e-6):
            return None
        fill = area / max(width * height, 1e-6)
        if not cfg.min_fill <= fill <= cfg.max_fill:
            return None
        # centroid offset from the soft box centre, in units of the box side (triangle: 1/6 along
        # its axis, circle and square: 0 by symmetry); the larger of the two axes counts
        ys, xs = np.arange(alpha.shape[0]) + 0.5, np.arange(alpha.shape[1]) + 0.5
        off_y = ((alpha.sum(axis=1) @ ys) / area - (row_cov @ ys) / max(height, 1e-6)) / max(height, 1e-6)
        off_x = ((alpha.sum(axis=0) @ xs) / area - (col_cov @ xs) / max(width, 1e-6)) / max(width, 1e-6)
        offset = float(max(abs(off_y), abs(off_x)))
        ang = np.deg2rad(hue[core])
        r = float(np.hypot(np.cos(ang).mean(), np.sin(ang).mean()))
        spread = float(np.rad2deg(np.sqrt(max(-2.0 * np.log(max(r, 1e-9)), 0.0))))
        if spread > cfg.max_hue_spread:
            return None
        dists = {name: float(np.hypot(fill - f0, OFFSET_WEIGHT * (offset - o0)))
                 for name, (f0, o0) in SHAPE_PROTOTYPES.items()}
        ranked = sorted(dists, key=dists.get)
        best, second = ranked[0], ranked[1]
        # confidence: 1 on a prototype, 0.5 halfway between two, scaled down by hue spread
        margin = dists[second] / max(dists[best] + dists[second], 1e-9)
        confidence = margin * (1.0 - spread / 90.0)
        # sub-pixel box from the soft extents: centred on the coverage profiles
        y0, x0 = sl[0].start, sl[1].start
        bx = x0 + float(col_cov @ xs) / max(width, 1e-6)
        by = y0 + float(row_cov @ ys) / max(height, 1e-6)
        box = (round(bx - width / 2, 3), round(by - height / 2, 3), round(bx + width / 2, 3),
               round(by + height / 2, 3))
        return Detection(best, cname, box, round(confidence, 4), round(area, 2), round(fill, 4), round(offset, 4))


def _background(rgb: np.ndarray, frame: int = 2) -> np.ndarray:
    """Median colour of the outer frame: objects keep off the border, so it is background."""
    edge = np.concatenate([rgb[:frame].reshape(-1, 3), rgb[-frame:].reshape(-1, 3),
                           rgb[:, :frame].reshape(-1, 3), rgb[:, -frame:].reshape(-1, 3)])
    return np.median(edge, axis=0)


def _as_float_rgb(image) -> np.ndarray:
    """Accept uint8/float numpy, PIL images or torch tensors ([3, H, W] in [-1, 1] or [H, W, 3])."""
    if hasattr(image, "detach"):  # torch tensor
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] == 3:
            t = (t.permute(1, 2, 0) + 1.0) / 2.0
        return np.clip(t.numpy().astype(np.float64), 0.0, 1.0)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def detect(image, config: DetectorConfig | None = None) -> list[Detection]:
    return ShapesDetector(config).detect(image)
