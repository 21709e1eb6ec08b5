"""Procedural "shapes world": a pure function of (seed, index) -> image, caption, GenEval metadata.

Every image shows 1-4 flat, anti-aliased shapes on a plain light background, and its caption
describes *everything* in the image, so the world doubles as ground truth for ShapesEval.
Scenes are described by objects in normalised coordinates (fractions of the image side), so the
same scene renders at any resolution (64x64 by default, 32x32 works too).

Metadata follows GenEval's schema (Ghosh et al. 2023, ``prompts/evaluation_metadata.jsonl``):
``{"tag", "include": [{"class", "count", "color"?, "position"?: [relation, include_index]}],
"exclude"?: [...], "prompt"}``. A clause carries ``"color"`` exactly when the caption names
the colour, so the metadata checks everything the caption claims.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}

# Saturated colours with well separated hues (red 0, orange ~30, yellow ~52, green ~125,
# blue ~228, purple ~280 degrees) so that blur or VAE artefacts cannot push one into another.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 15),
    "yellow": (240, 215, 20),
    "green": (30, 165, 50),
    "blue": (35, 70, 225),
    "purple": (140, 45, 195),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (236, 234, 230)
BACKGROUND_JITTER = 10  # +- per image, shared by all channels; +-3 extra tint per channel

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Training-only families (never in ShapesEval; weight 0 unless a data spec names them):
# "twin_position" is a position scene whose two objects share their class and differ only in their
# (always named) colours, "a red circle left of a blue circle": of the caption, only the relation says
# which of the two look-alike shapes takes which colour (the noisy image says it too once colours show,
# below t ~ 0.9; docs/results.md, "Session 8").
EXTRA_TASKS: tuple[str, ...] = ("twin_position",)
# the weight of a family a data spec does not name
DEFAULT_TASK_WEIGHTS: dict[str, float] = dict.fromkeys(TASKS, 1.0) | dict.fromkeys(EXTRA_TASKS, 0.0)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

MIN_SIZE = 0.16  # object side as a fraction of the image: ~10 px at 64x64
MAX_SIZE = {1: 0.45, 2: 0.36, 3: 0.28, 4: 0.26}  # by number of objects in the scene
EDGE_MARGIN = 0.03  # keep objects this far from the border
GAP = 0.05  # minimum gap between bounding boxes (~3 px at 64x64): objects never touch
SUPERSAMPLE = 4  # anti-aliasing factor for rendering
P_COLOR_WORD = 0.5  # chance that tasks without a colour requirement still name the colours

_PREFIXES = ("a photo of ", "a photo of ", "an image of ", "a picture of ", "")
_RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}


# Every relation phrase a caption can hold -> the opposite one (relation-swapped captions: the position
# probe and the teacher's relation contrast loss).
RELATION_SWAP = {"to the left of": "to the right of", "to the right of": "to the left of", "left of": "right of",
                 "right of": "left of", "above": "below", "below": "above", "under": "above"}
_RELATION_PATTERN = re.compile(r"\b(" + "|".join(sorted(map(re.escape, RELATION_SWAP), key=len, reverse=True)) + r")\b")


def relation_phrases(caption: str) -> list[str]:
    """The relation phrases of ``caption``, longest match first ("to the left of", not "left of")."""
    return _RELATION_PATTERN.findall(caption)


def swap_relation(caption: str) -> str:
    """The caption with its one relation phrase replaced by the opposite one (ValueError unless exactly one)."""
    found = relation_phrases(caption)
    if len(found) != 1:
        raise ValueError(f"expected exactly one relation in {caption!r}, found {found}")
    return _RELATION_PATTERN.sub(lambda m: RELATION_SWAP[m.group(1)], caption)


def parse_shapes_spec(spec: str) -> dict[str, float] | None:
    """Task weights of a shapes data spec: ``"shapes"`` -> None (uniform over TASKS, the default world);
    ``"shapes:position=3,counting=2"`` -> relative weights (unnamed tasks of :data:`TASKS` weigh 1, the
    training-only :data:`EXTRA_TASKS` 0).

    The weights change which task each world index draws (and so its scene); the same spec always
    gives the same samples. Raises ValueError for an unknown task or a bad weight.
    """
    if spec == "shapes":
        return None
    head, sep, body = spec.partition(":")
    if head != "shapes" or not sep or not body:
        raise ValueError(f"data spec {spec!r}: expected 'shapes' or 'shapes:TASK=WEIGHT,...' with TASK in {TASKS}")
    weights = dict(DEFAULT_TASK_WEIGHTS)
    for item in body.split(","):
        task, eq, value = item.partition("=")
        task = task.strip()
        if task not in weights or not eq:
            raise ValueError(f"data spec {spec!r}: {item!r} is not TASK=WEIGHT with TASK in {TASKS + EXTRA_TASKS}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"data spec {spec!r}: weight {value!r} of {task} is not a number") from None
        if not w >= 0 or w == float("inf"):
            raise ValueError(f"data spec {spec!r}: weight of {task} must be finite and >= 0, got {value}")
        weights[task] = w
    if sum(weights.values()) <= 0:
        raise ValueError(f"data spec {spec!r}: all task weights are 0")
    return weights


def is_shapes_spec(spec) -> bool:
    return isinstance(spec, str) and (spec == "shapes" or spec.startswith("shapes:"))


@dataclass
class ShapesSample:
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    meta: dict  # GenEval metadata: {"tag", "include", "exclude", "prompt"}
    objects: list[dict] = field(default_factory=list)  # scene description, see ShapesWorld.render


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(cls: str, color: str | None, count: int = 1) -> str:
    """'a red circle', 'an orange square', 'three blue triangles', 'two circles'."""
    noun = cls if count == 1 else PLURALS[cls]
    words = f"{color} {noun}" if color else noun
    head = _article(words) if count == 1 else NUMBER_WORDS[count]
    return f"{head} {words}"


def relation_holds(a: dict, b: dict, relation: str, margin: float = 0.0) -> bool:
    """Strict generator-side relation of object a to object b (normalised scene objects).

    The offset along the relation's axis must exceed ``margin + 0.3 * (size_a + size_b)`` and
    dominate the other axis by 2x, which is comfortably inside GenEval's rule (offset beyond
    0.1 * (dim_a + dim_b) and within 60 degrees of the axis), so GT scenes always score correct.
    """
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    need = margin + 0.3 * (a["size"] + b["size"])
    if relation == "left of":
        return -dx > need and abs(dy) <= 0.5 * abs(dx)
    if relation == "right of":
        return dx > need and abs(dy) <= 0.5 * abs(dx)
    if relation == "above":
        return -dy > need and abs(dx) <= 0.5 * abs(dy)
    if relation == "below":
        return dy > need and abs(dx) <= 0.5 * abs(dy)
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _separated(a: dict, b: dict) -> bool:
    """Bounding boxes (with a gap) do not intersect."""
    reach = 0.5 * (a["size"] + b["size"]) + GAP
    return abs(a["cx"] - b["cx"]) >= reach or abs(a["cy"] - b["cy"]) >= reach


class ShapesWorld:
    """Deterministic procedural world. ``sample(seed, index)`` depends on nothing else."""

    def __init__(self, size: int = 64):
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {size}")
        self.size = int(size)

    # ------------------------------------------------------------------ scenes
    def _place(self, rng: np.random.Generator, specs: list[tuple[str, str]], relation: str | None = None
               ) -> list[dict]:
        """Sizes and positions for (class, colour) specs; object 1 is placed `relation` of object 0."""
        n = len(specs)
        for attempt in range(200):
            shrink = 1.0 - 0.002 * attempt  # if crowded, slowly shrink towards MIN_SIZE
            hi = max(MIN_SIZE, MAX_SIZE[n] * shrink)
            placed: list[dict] = []
            for cls, color in specs:
                s = float(rng.uniform(MIN_SIZE, hi))
                lo_c, hi_c = EDGE_MARGIN + s / 2, 1.0 - EDGE_MARGIN - s / 2
                for _ in range(50):
                    obj = {"class": cls, "color": color, "size": s,
                           "cx": float(rng.uniform(lo_c, hi_c)), "cy": float(rng.uniform(lo_c, hi_c))}
                    if not all(_separated(obj, o) for o in placed):
                        continue
                    if relation is not None and len(placed) == 1 and not relation_holds(obj, placed[0], relation):
                        continue
                    placed.append(obj)
                    break
                else:
                    break
            if len(placed) == n:
                return placed
        raise RuntimeError(f"could not place {specs} (relation={relation})")  # pragma: no cover

    def scene(self, seed: int, index: int, task: str | None = None, task_weights: dict[str, float] | None = None
              ) -> tuple[list[dict], dict, np.ndarray]:
        """(objects, meta, background rgb) for (seed, index); `task` forces a task family, `task_weights`
        (see :func:`parse_shapes_spec`) changes how often each is drawn."""
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFFFFFF, 0x5A4E])
        if task_weights is None:
            tag = TASKS[int(rng.integers(len(TASKS)))]
        else:
            # the extra families join the draw only when weighted, so specs without them keep their scenes
            families = TASKS + tuple(t for t in EXTRA_TASKS if float(task_weights.get(t, DEFAULT_TASK_WEIGHTS[t])) > 0)
            w = np.array([float(task_weights.get(t, DEFAULT_TASK_WEIGHTS[t])) for t in families])
            tag = families[int(rng.choice(len(families), p=w / w.sum()))]
        if task is not None:
            if task not in TASKS + EXTRA_TASKS:
                raise ValueError(f"unknown task {task!r}; expected one of {TASKS + EXTRA_TASKS}")
            tag = task
        prefix = _PREFIXES[int(rng.integers(len(_PREFIXES)))]
        say_color = tag in ("colors", "color_attr", "twin_position") or bool(rng.random() < P_COLOR_WORD)
        cls_pair = [CLASSES[i] for i in rng.permutation(len(CLASSES))[:2]]
        if tag == "twin_position":
            cls_pair[1] = cls_pair[0]
        col_pair = [COLORS[i] for i in rng.permutation(len(COLORS))[:2]]

        def clause(cls: str, color: str, count: int = 1) -> dict:
            c = {"class": cls, "count": count}
            if say_color:
                c["color"] = color
            return c

        exclude: list[dict] = []
        if tag in ("single_object", "colors"):
            cls, col = cls_pair[0], col_pair[0]
            objects = self._place(rng, [(cls, col)])
            include = [clause(cls, col)]
            text = _noun_phrase(cls, col if say_color else None)
        elif tag in ("two_object", "color_attr"):
            specs = list(zip(cls_pair, col_pair))
            objects = self._place(rng, specs)
            include = [clause(c, k) for c, k in specs]
            joiner = " and " if rng.random() < 0.8 else " with "
            text = joiner.join(_noun_phrase(c, k if say_color else None) for c, k in specs)
        elif tag == "counting":
            cls, n = cls_pair[0], int(rng.integers(2, 5))
            cols = [col_pair[0]] * n if say_color else [COLORS[int(i)] for i in rng.integers(len(COLORS), size=n)]
            objects = self._place(rng, [(cls, c) for c in cols])
            include = [clause(cls, col_pair[0], n)]
            exclude = [{"class": cls, "count": n + 1}]
            text = _noun_phrase(cls, col_pair[0] if say_color else None, n)
        else:  # position, twin_position: GenEval puts the reference first and the subject second
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
            (ref_cls, sub_cls), (ref_col, sub_col) = cls_pair, col_pair
            objects = self._place(rng, [(ref_cls, ref_col), (sub_cls, sub_col)], relation)
            include = [clause(ref_cls, ref_col), {**clause(sub_cls, sub_col), "position": [relation, 0]}]
            words = _RELATION_WORDS[relation][int(rng.integers(len(_RELATION_WORDS[relation])))]
            text = (f"{_noun_phrase(sub_cls, sub_col if say_color else None)} {words} "
                    f"{_noun_phrase(ref_cls, ref_col if say_color else None)}")
        caption = prefix + text
        meta = {"tag": tag, "include": include, "exclude": exclude, "prompt": caption}
        bg = np.array(BACKGROUND, dtype=np.float64) + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1)
        bg = np.clip(bg + rng.integers(-3, 4, size=3), 0, 255)
        return objects, meta, bg

    def sample(self, seed: int, index: int, task: str | None = None, task_weights: dict[str, float] | None = None
               ) -> ShapesSample:
        objects, meta, bg = self.scene(seed, index, task, task_weights)
        image = self.render(objects, background=bg)
        return ShapesSample(image=image, caption=meta["prompt"], meta=meta, objects=objects)

    # --------------------------------------------------------------- rendering
    def render(self, objects: list[dict], size: int | None = None, background=BACKGROUND) -> np.ndarray:
        """Render objects ``{"class", "color", "cx", "cy", "size"}`` (normalised to [0, 1]).

        ``cx, cy`` is the bounding-box centre (y down), ``size`` the bounding-box side. Triangles
        point up with base = height = size, so each class has a distinct fill ratio of its box
        (square 1, circle pi/4, triangle 1/2). Colours may be palette names or RGB triples.
        Anti-aliased by supersampling; returns uint8 [size, size, 3].
        """
        n = int(size or self.size)
        ss = n * SUPERSAMPLE
        coords = (np.arange(ss) + 0.5) / ss
        y, x = coords[:, None], coords[None, :]
        img = np.empty((ss, ss, 3), dtype=np.float64)
        img[:] = np.asarray(background, dtype=np.float64)
        for obj in objects:
            cx, cy, h = obj["cx"], obj["cy"], obj["size"] / 2
            if obj["class"] == "circle":
                mask = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
            elif obj["class"] == "square":
                mask = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
            elif obj["class"] == "triangle":
                # apex (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h): |dx| <= (y - top) / 2
                mask = (y <= cy + h) & (np.abs(x - cx) <= (y - (cy - h)) / 2)
            else:
                raise ValueError(f"unknown class {obj['class']!r}")
            color = obj["color"]
            img[mask] = PALETTE[color] if isinstance(color, str) else color
        img = img.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, 3).mean(axis=(1, 3))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(torch.utils.data.IterableDataset):
    """Infinite stream of ``dict(image=float [3, H, W] in [-1, 1], caption=str)``.

    Sample k of (rank, worker) is world index ``start + k * stride + offset`` with
    ``stride = world_size * num_workers``, so workers and ranks see disjoint, deterministic
    slices of the same sequence for a given seed.
    """

    def __init__(self, size: int = 64, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1,
                 with_meta: bool = False, task_weights: dict[str, float] | None = None):
        super().__init__()
        self.world = ShapesWorld(size)
        self.size, self.seed, self.start, self.task_weights = size, seed, start, task_weights
        self.rank, self.world_size, self.with_meta = rank, world_size, with_meta

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stride = self.world_size * nw
        index = self.start + self.rank * nw + wid
        while True:
            s = self.world.sample(self.seed, index, task_weights=self.task_weights)
            item = {"image": to_tensor(s.image), "caption": s.caption}
            if self.with_meta:
                item["meta"] = s.meta
            yield item
            index += stride


def export_imagefolder(out_dir, n: int, seed: int = 0, size: int = 64, progress: bool = True) -> Path:
    """Write n world samples as a Hugging Face imagefolder: PNGs + metadata.jsonl (file_name, text)."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(size)
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"shapes -> {out}", unit="img")
    width = max(5, len(str(n - 1)))
    with open(out / "metadata.jsonl", "w") as f:
        for i in it:
            s = world.sample(seed, i)
            name = f"{i:0{width}d}.png"
            Image.fromarray(s.image).save(out / name)
            f.write(json.dumps({"file_name": name, "text": s.caption, "tag": s.meta["tag"]}) + "\n")
    return out
