"""GenEval's scoring rules (Ghosh et al. 2023, ``evaluation/evaluate_images.py``) on detections.

What is implemented, rule by rule (metadata schema: ``tag, include, exclude, prompt``):

- Detections are grouped by class and ordered by descending confidence (GenEval: detector score);
  detections under ``min_confidence`` are dropped first.
- For each include clause ``{class, count, color?, position?}`` in order: take the top ``count``
  detections of that class. Fewer than ``count`` -> wrong (so include means ">= count").
  With ``color``: every one of those ``count`` objects must have that colour (GenEval classifies
  the colour of each crop with CLIP; our detector reports the colour directly).
  With ``position = [relation, j]`` (checked only if the colour check passed): include clause j
  must itself have matched, and every object of this clause must stand in ``relation`` to every
  object matched by clause j, else wrong.
- For each exclude clause ``{class, count}``: having ``>= count`` detections of the class is
  wrong. Counting prompts carry ``exclude count = N + 1``, which makes counting exact.
- Relations follow GenEval's ``relative_position``: offset = centre_a - centre_b (y down); each
  axis is shrunk towards 0 by ``threshold * (dim_a + dim_b)`` (threshold 0.1 in GenEval, i.e. a
  margin relative to the two boxes' sizes, not to the image); if nothing is left there is no
  relation, else with (dx, dy) = shrunk offset / |offset|: "left of" if dx < -0.5, "right of" if
  dx > 0.5, "above" if dy < -0.5, "below" if dy > 0.5. Along a pure axis this means the centres
  must be more than ``2 * threshold * (dim_a + dim_b)`` apart (0.4 box sides for equal boxes); off
  axis the offset must point within ~60 degrees of it. We keep GenEval's size-relative margin
  rather than a fraction of the image so that ShapesEval numbers read like GenEval's.
- Scores (GenEval's ``summary_scores.py``): task score = mean correctness over that task's images,
  overall = unweighted mean of the task scores present.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

POSITION_THRESHOLD = 0.1  # GenEval's margin, as a fraction of the summed box dimensions


def _get(det, key: str):
    if isinstance(det, dict):
        return det[key]
    return getattr(det, "cls" if key == "class" else key)


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box a to box b, each ``(x0, y0, x1, y1)`` with y pointing down."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def evaluate_image(detections, meta: dict, min_confidence: float = 0.0,
                   position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, str]:
    """(correct, reasons) of one image's detections against one GenEval metadata record."""
    by_class: dict[str, list] = defaultdict(list)
    for d in detections:
        if float(_get(d, "confidence")) >= min_confidence:
            by_class[_get(d, "class")].append(d)
    for dets in by_class.values():
        dets.sort(key=lambda d: -float(_get(d, "confidence")))

    correct, reasons = True, []
    matched_groups: list[list | None] = []
    for req in meta.get("include", []):
        cls, count = req["class"], int(req["count"])
        found = by_class.get(cls, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [_get(d, "color") for d in found]
                if colors.count(req["color"]) < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found colours {colors}")
            if "position" in req and matched:
                relation, target = req["position"]
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    for obj in found:
                        for ref in matched_groups[target]:
                            rels = relative_position(_get(obj, "box"), _get(ref, "box"), position_threshold)
                            if relation not in rels:
                                matched = False
                                reasons.append(f"expected {cls} {relation} target, found {sorted(rels)}")
                                break
                        if not matched:
                            break
        correct &= matched
        matched_groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        n = len(by_class.get(cls, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n}")
    return correct, "\n".join(reasons)


def summarize(records) -> dict:
    """``records``: iterable of (tag, correct). Returns {"overall", "tasks", "n_images"}."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for tag, ok in records:
        per_task[tag].append(bool(ok))
    tasks = {tag: float(np.mean(v)) for tag, v in sorted(per_task.items())}
    overall = float(np.mean(list(tasks.values()))) if tasks else float("nan")
    return {"overall": overall, "tasks": tasks, "n_images": sum(len(v) for v in per_task.values())}
