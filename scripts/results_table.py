"""Collect `sana-sprint eval` JSON files into a markdown table (teacher vs student on ShapesEval).

    python scripts/results_table.py runs/eval/teacher20_fd.json runs/eval/sprint1_fd.json ... > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def row(path: Path) -> str:
    d = json.loads(path.read_text())
    fd = d.get("fd_shapes")
    cells = [
        Path(str(d.get("model"))).name,
        d.get("kind", "?"),
        str(d.get("steps")),
        f"{d['overall']:.3f}",
        *(f"{d['tasks'].get(t, float('nan')):.2f}" for t in TASKS),
        "-" if fd is None else f"{fd:.1f}",
        str(d["n_images"]),
    ]
    return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    head = ["model", "kind", "steps", "overall", *TASKS, "FD_shapes", "images"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in paths:
        print(row(Path(p)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
