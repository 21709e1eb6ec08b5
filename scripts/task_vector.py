"""Carry a teacher fine-tune into a distilled student by weight arithmetic (task vector), without training.

A student distilled from teacher A is a fine-tune of A. When A is later fine-tuned into teacher B, the
difference B - A is a "task vector"; adding alpha (B - A) to the student's shared weights gives a student
that holds what B learnt on top of what distillation learnt (task arithmetic, Ilharco et al. 2023). The
student's own parameters (guidance embedder) are left as they are; the teacher's time embedder, stored
under ``time_embed.emb.timestep_embedder`` in the teacher and ``time_embed.timestep_embedder`` in the
student, is matched across the two names.

    python scripts/task_vector.py --student models/shapes-sprint --old runs/teacher_v5/models/shapes-teacher \
        --new models/shapes-teacher --alpha 1.0 --out runs/tv/alpha1

The output is a full student folder (copy of ``--student`` with the transformer weights replaced, stored
in the student's dtype); the arithmetic is done in float64. Prints the norms and the cosine of the two
deltas (B - A and student - A).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from weight_average import WEIGHTS, out_error, write_copy


def apply_task_vector(student: dict, old: dict, new: dict, alpha: float) -> tuple[dict, dict]:
    """student + alpha * (new - old) on every teacher parameter; returns (weights, stats)."""
    from sana_sprint.models.presets import student_key

    if set(old) != set(new):
        raise ValueError(f"the two teachers hold different parameters: {sorted(set(old) ^ set(new))[:4]}")
    out = dict(student)
    missing = [k for k in old if student_key(k) not in student]
    if missing:
        raise ValueError(f"the student lacks teacher parameters, e.g. {missing[:4]}")
    dot = task_sq = stud_sq = 0.0
    for k in old:
        sk = student_key(k)
        if student[sk].shape != old[k].shape or new[k].shape != old[k].shape:
            raise ValueError(f"shape mismatch at {k}: student {tuple(student[sk].shape)}, "
                             f"old {tuple(old[k].shape)}, new {tuple(new[k].shape)}")
        task = new[k].double() - old[k].double()
        own = student[sk].double() - old[k].double()
        dot += float((task * own).sum())
        task_sq += float((task * task).sum())
        stud_sq += float((own * own).sum())
        out[sk] = (student[sk].double() + alpha * task).to(student[sk].dtype)
    cos = dot / max((task_sq * stud_sq) ** 0.5, 1e-30)
    stats = {"alpha": alpha, "task_norm": task_sq**0.5, "student_delta_norm": stud_sq**0.5, "cosine": cos,
             "params": len(old), "student_only": sorted(set(student) - {student_key(k) for k in old})}
    return out, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="models/shapes-sprint")
    ap.add_argument("--old", required=True, help="the teacher the student was distilled from")
    ap.add_argument("--new", default="models/shapes-teacher", help="that teacher's fine-tune")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    for name in ("student", "old", "new"):
        f = Path(getattr(args, name)) / WEIGHTS
        if not f.is_file():
            print(f"error: --{name}: no {WEIGHTS} under {getattr(args, name)}", file=sys.stderr)
            return 2
    out = Path(args.out)
    error = out_error(out, {f"--{name}": getattr(args, name) for name in ("student", "old", "new")}, "task_vector.json")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from safetensors.torch import load_file

    try:
        weights, stats = apply_task_vector(load_file(Path(args.student) / WEIGHTS), load_file(Path(args.old) / WEIGHTS),
                                           load_file(Path(args.new) / WEIGHTS), args.alpha)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats.update(student=args.student, old=args.old, new=args.new)
    write_copy(args.student, out, weights, "task_vector.json", stats)
    print(json.dumps({k: v for k, v in stats.items() if k != "student_only"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
