"""Regenerate the fixed ShapesEval suite (src/sana_sprint/evaluation/suites/shapes_eval.jsonl).

Deterministic: running it twice gives byte-identical files; `--check` fails if the committed file
differs from what the current world code generates.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from sana_sprint.evaluation.suite import PER_TASK, SUITE_PATH, SUITE_SEED, build_suite, load_suite, save_suite


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-task", type=int, default=PER_TASK)
    p.add_argument("--seed", type=int, default=SUITE_SEED)
    p.add_argument("--out", default=str(SUITE_PATH))
    p.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = p.parse_args()
    records = build_suite(args.per_task, args.seed)
    if args.check:
        same = load_suite(args.out) == records
        print("suite up to date" if same else f"suite at {args.out} differs from the generator")
        return 0 if same else 1
    path = save_suite(records, args.out)
    counts = Counter(r["tag"] for r in records)
    print(f"wrote {len(records)} prompts to {path}: {dict(counts)}; "
          f"{len({r['prompt'] for r in records})} distinct prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
