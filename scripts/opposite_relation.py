"""Copy a GenEval-layout image folder with every position clause's relation replaced by the opposite one.

Scoring the copy (``sana-sprint eval --images OUT``) tells how often the generated layouts satisfy the
opposite relation: a model that ignores relation words scores the same on both; one that uses them
scores higher on the original. Other tasks' metadata is copied unchanged.

    sana-sprint eval --model models/shapes-teacher --prompts runs/position90.jsonl --images-per-prompt 2 \\
        --save-images runs/img_v4 --out runs/eval/v4_pos90.json
    python scripts/opposite_relation.py runs/img_v4 runs/img_v4_opposite
    sana-sprint eval --images runs/img_v4_opposite --out runs/eval/v4_pos90_opposite.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def swap_folder(src: Path, dst: Path) -> int:
    """Write the swapped copy; returns how many prompt folders had a position clause."""
    metas = sorted(src.glob("*/metadata.jsonl"))
    if not metas:
        raise ValueError(f"{src} has no <index>/metadata.jsonl: not a GenEval-layout folder")
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new folder")
    shutil.copytree(src, dst)
    swapped = 0
    for m in sorted(dst.glob("*/metadata.jsonl")):
        meta = json.loads(m.read_text())
        for clause in meta.get("include", []):
            if "position" in clause:
                clause["position"][0] = OPPOSITE[clause["position"][0]]
                swapped += 1
        m.write_text(json.dumps(meta) + "\n")
    return swapped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="a folder written by `sana-sprint eval --save-images`")
    p.add_argument("dst", type=Path, help="the new folder")
    args = p.parse_args(argv)
    try:
        n = swap_folder(args.src, args.dst)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {n} position clauses swapped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
