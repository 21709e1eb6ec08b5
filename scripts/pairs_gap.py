"""How far a student's 1-step output is from the teacher's samples, on training pairs and on held-out pairs.

The 1-step regression term (``distill`` ``pairs`` / ``regress_weight``) fits the student's 1-step map to a
fixed set of teacher noise -> image pairs (``scripts/teacher_pairs.py``). This reports, for each pairs folder,
the mean over the first ``--n`` pairs of mean((x0_student - x0_teacher)^2) in unit-std latents (the quantity the
term trains, logged as ``loss_regress``), with the pair's own noise, caption and guidance scale. A folder the
student trained on against one made with another ``--seed`` (new noise, same captions) tells whether the
student has fitted the pairs it saw beyond what it does on fresh noise, i.e. whether more pairs would help.

    python scripts/teacher_pairs.py --n 512 --shard 512 --seed 1 --out runs/pairs/v6_20_ho      # held-out pairs
    python scripts/pairs_gap.py --model models/shapes-sprint runs/pairs/v6_20_4k runs/pairs/v6_20_ho
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def pairs_mse(pipe, folder: str | Path, n: int, batch: int = 64) -> tuple[float, float, int]:
    """(mean, standard error, count) over the first ``n`` pairs of the per-pair latent MSE at 1 step."""
    import torch

    from sana_sprint.data.pairs import TeacherPairs

    pairs = TeacherPairs(folder)
    n = min(n, len(pairs))
    per = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n))
        for wv in torch.unique(pairs.w[idx]).tolist():  # one guidance scale per pipeline call
            rows = idx[pairs.w[idx] == wv]
            prompts = [pairs.captions[int(c)] for c in pairs.caption_index[rows]]
            res = pipe(prompts, steps=1, guidance_scale=wv, latents=pairs.noise[rows], output_type="latent")
            diff = res.latents.double().cpu() - pairs.x0[rows].double()
            per[rows] = diff.square().flatten(1).mean(1)
    return float(per.mean()), float(per.std() / n**0.5) if n > 1 else 0.0, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/shapes-sprint", help="student pipeline folder")
    ap.add_argument("pairs", nargs="+", help="pairs folders (scripts/teacher_pairs.py)")
    ap.add_argument("--n", type=int, default=512, help="pairs per folder (the first n)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.n < 1:
        print("error: --n must be >= 1", file=sys.stderr)
        return 2

    import torch

    from sana_sprint.errors import UserError
    from sana_sprint.pipeline import SprintPipeline

    torch.set_num_threads(args.threads)
    try:
        pipe = SprintPipeline.from_pretrained(args.model)
        if pipe.kind != "student":
            raise UserError(f"{args.model} is a {pipe.kind} folder, not a student")
        rows = {}
        for folder in args.pairs:
            mean, se, n = pairs_mse(pipe, folder, args.n)
            rows[folder] = {"mse": mean, "se": se, "n": n}
            print(f"{folder}: 1-step latent MSE {mean:.4f} +- {se:.4f} (n={n})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "pairs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
