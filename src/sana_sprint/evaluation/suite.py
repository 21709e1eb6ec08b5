"""The fixed ShapesEval prompt suite and GenEval's image-folder layout.

Suite: ``suites/shapes_eval.jsonl``, made by ``scripts/make_suite.py`` from world scenes. Each line
is GenEval metadata (``tag, include, exclude, prompt``) plus what is needed to render its ground
truth at any resolution: ``seed``, ``index`` and the scene (``objects`` in normalised units,
``background`` RGB). GenEval's own tools ignore the extra keys.

Folder layout (GenEval's ``generation/diffusers_generate.py``)::

    DIR/00000/metadata.jsonl        one JSON line: the prompt's metadata
    DIR/00000/samples/0000.png      the images generated for it
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from sana_sprint.data.shapes import TASKS, ShapesWorld
from sana_sprint.evaluation.geneval import evaluate_image, summarize

SUITE_PATH = Path(__file__).parent / "suites" / "shapes_eval.jsonl"
SUITE_SEED = 20250311  # disjoint from the default training seed 0
PER_TASK = 90  # 6 x 90 = 540 prompts


def build_suite(per_task: int = PER_TASK, seed: int = SUITE_SEED) -> list[dict]:
    """Deterministic, task-balanced list of records (tasks interleaved: index = k * 6 + task)."""
    world = ShapesWorld(64)  # scenes are resolution-free; 64 only sets the render default
    records = []
    for k in range(per_task):
        for t, task in enumerate(TASKS):
            index = k * len(TASKS) + t
            objects, meta, bg = world.scene(seed, index, task=task)
            objects = [{**o, **{key: round(o[key], 5) for key in ("cx", "cy", "size")}} for o in objects]
            records.append({**meta, "seed": seed, "index": index, "objects": objects,
                            "background": [int(v) for v in bg]})
    return records


def save_suite(records: Iterable[dict], path=SUITE_PATH) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def load_suite(path=SUITE_PATH) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def render_ground_truth(record: dict, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3] image that the record's prompt describes exactly."""
    return ShapesWorld(size).render(record["objects"], size=size, background=record["background"])


def write_prompt_folder(out_dir, i: int, meta: dict, images: Iterable) -> Path:
    """Write one prompt in GenEval's layout: DIR/{i:05d}/metadata.jsonl + samples/{j:04d}.png."""
    from PIL import Image

    folder = Path(out_dir) / f"{i:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        f.write(json.dumps(meta) + "\n")
    for j, img in enumerate(images):
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(folder / "samples" / f"{j:04d}.png")
    return folder


def iter_folder(out_dir) -> Iterator[tuple[dict, Path]]:
    """(metadata, image path) for every sample in a GenEval-layout folder, in order."""
    root = Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no GenEval folder at {str(root)!r}")
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "metadata.jsonl").is_file()):
        meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        for img in sorted((folder / "samples").glob("*.png")):
            yield meta, img


def score_images(pairs: Iterable[tuple[dict, np.ndarray]], detector=None, min_confidence: float = 0.0,
                 results: list | None = None) -> dict:
    """Score (metadata, image) pairs; ``results`` (if a list) receives one row per image."""
    from sana_sprint.evaluation.detector import ShapesDetector

    detector = detector or ShapesDetector()
    records = []
    for meta, image in pairs:
        dets = detector.detect(image)
        ok, reason = evaluate_image(dets, meta, min_confidence=min_confidence)
        records.append((meta["tag"], ok))
        if results is not None:
            results.append({"tag": meta["tag"], "prompt": meta["prompt"], "correct": ok, "reason": reason,
                            "detections": [d.to_dict() for d in dets]})
    return summarize(records)


def score_folder(out_dir, detector=None, min_confidence: float = 0.0, results_path=None) -> dict:
    """GenEval score of a folder: ``{"overall", "tasks", "n_images"}``; optional per-image JSONL."""
    from PIL import Image

    def pairs():
        for meta, path in iter_folder(out_dir):
            with Image.open(path) as im:
                yield meta, np.asarray(im.convert("RGB"))

    rows: list | None = [] if results_path else None
    summary = score_images(pairs(), detector, min_confidence, rows)
    if results_path:
        with open(results_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return summary
