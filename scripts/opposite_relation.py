"""Copy a GenEval-layout image folder with every position clause's relation replaced by the opposite one.

Scoring the copy (``sana-sprint eval --images OUT``) tells how often the generated layouts satisfy the
opposite relation: a model that ignores relation words scores the same on both; one that uses them
scores higher on the original. Other tasks' metadata is copied unchanged.

    sana-sprint eval --model models/shapes-teacher --prompts runs/position90.jsonl --images-per-prompt 2 \\
        --save-images runs/img_v4 --out runs/eval/v4_pos90.json
    python scripts/opposite_relation.py runs/img_v4 runs/img_v4_opposite
    sana-sprint eval --images runs/img_v4_opposite --out runs/eval/v4_pos90_opposite.json

``--sides SRC`` instead prints, per relation word, how the images of SRC's position prompts fall: both
objects found and the relation holds ("true"), the opposite relation holds instead ("opposite"), the
objects are found but neither holds ("neither", e.g. diagonal), or the objects themselves are not
found as asked ("objects"). Each image is judged by the ShapesEval rule itself (`evaluate_image` on the
record, on its swapped copy, and on the record without the clause).

    python scripts/opposite_relation.py --sides runs/img_v4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def metadata_files(src: Path) -> list[Path]:
    """The ``<index>/metadata.jsonl`` files of a GenEval-layout folder (ValueError if it has none)."""
    metas = sorted(src.glob("*/metadata.jsonl"))
    if not metas:
        raise ValueError(f"{src} has no <index>/metadata.jsonl: not a GenEval-layout folder")
    return metas


def swap_folder(src: Path, dst: Path) -> int:
    """Write the swapped copy; returns how many prompt folders had a position clause."""
    metadata_files(src)
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new folder")
    shutil.copytree(src, dst)
    n_swapped = 0
    for m in sorted(dst.glob("*/metadata.jsonl")):
        meta = json.loads(m.read_text())
        n_swapped += sum("position" in c for c in meta.get("include", []))
        m.write_text(json.dumps(swapped(meta)) + "\n")
    return n_swapped


def swapped(meta: dict) -> dict:
    """A copy of a GenEval record with every position clause's relation replaced by the opposite one."""
    out = json.loads(json.dumps(meta))
    for clause in out.get("include", []):
        if "position" in clause:
            clause["position"][0] = OPPOSITE[clause["position"][0]]
    return out


SIDE_OUTCOMES = ("true", "opposite", "neither", "objects")


def side_report(src: Path) -> dict[str, dict[str, int]]:
    """relation word -> outcome -> image count over the position records of a GenEval-layout folder."""
    import numpy as np
    from PIL import Image

    from sana_sprint.evaluation.detector import detect
    from sana_sprint.evaluation.geneval import evaluate_image

    report: dict[str, dict[str, int]] = {}
    for m in metadata_files(src):
        meta = json.loads(m.read_text().splitlines()[0])
        clauses = [c for c in meta.get("include", []) if "position" in c]
        if not clauses:
            continue
        plain = {**meta, "include": [{k: v for k, v in c.items() if k != "position"} for c in meta["include"]]}
        counts = report.setdefault(clauses[0]["position"][0], dict.fromkeys(SIDE_OUTCOMES, 0))
        for image in sorted((m.parent / "samples").glob("*.png")):
            dets = detect(np.asarray(Image.open(image).convert("RGB")))
            if evaluate_image(dets, meta)[0]:
                counts["true"] += 1
            elif evaluate_image(dets, swapped(meta))[0]:
                counts["opposite"] += 1
            elif evaluate_image(dets, plain)[0]:
                counts["neither"] += 1
            else:
                counts["objects"] += 1
    return report


def print_side_report(report: dict[str, dict[str, int]]) -> None:
    print("| relation | images | " + " | ".join(SIDE_OUTCOMES) + " |")
    print("|---|---|" + "---|" * len(SIDE_OUTCOMES))
    for rel in sorted(report):
        n = sum(report[rel].values())
        print(f"| {rel} | {n} | " + " | ".join(f"{report[rel][k] / max(n, 1):.2f}" for k in SIDE_OUTCOMES) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="a folder written by `sana-sprint eval --save-images`")
    p.add_argument("dst", type=Path, nargs="?", help="the new folder (not with --sides)")
    p.add_argument("--sides", action="store_true", help="print the per-relation outcome table of SRC instead")
    args = p.parse_args(argv)
    if args.sides == (args.dst is not None):
        p.error("give either DST (write the swapped copy) or --sides (report on SRC)")
    try:
        if args.sides:
            print_side_report(side_report(args.src))
            return 0
        n = swap_folder(args.src, args.dst)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {n} position clauses swapped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
