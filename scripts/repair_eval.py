"""ShapesEval of the teacher's repair of a student's 1-step images: the quality of ``teacher_pairs.py
--refine-student`` targets (issue 5; docs/results.md "Session 23").

Each image: u = the student's 1-step latent from the evaluation's own noise (the image's generator), re-noised
to TrigFlow time T with a second draw from the same generator, then ``--refine-steps`` teacher flow Euler steps
with real CFG (``teacher_pairs.refine``). Same prompts, seeds and scoring as ``sana-sprint eval``; the result JSON
has the evaluation's keys plus the repair settings.

    python scripts/repair_eval.py --student models/shapes-sprint --refine-time 0.6 --fd --out runs/repair_06.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class RepairPipe:
    """What ``evaluation.run.evaluate`` calls, built from a student and a teacher pipeline."""

    def __init__(self, student, teacher, refine_time: float, refine_steps: int):
        self.student, self.teacher = student, teacher
        self.refine_time, self.refine_steps = refine_time, refine_steps
        self.config = student.config

    def _schedule(self, steps, timesteps):
        return [math.pi / 2, 0.0]

    def __call__(self, prompts, steps=None, timesteps=None, guidance_scale=None, generator=None,
                 num_images_per_prompt=1, output_type="pil", noise_scale=1.0):
        import torch
        from teacher_pairs import refine

        from sana_sprint.models.presets import vae_compression
        from sana_sprint.sampling import randn

        gens = list(generator)
        height, width = self.student._size(None, None)
        c = vae_compression(self.student.vae.config)
        shape = (len(gens), int(self.student.transformer.config.in_channels), height // c, width // c)
        noise = randn(shape, gens)  # what the student pipeline itself draws for these generators
        renoise = randn(shape, gens)  # the generators' next draws
        out = refine(self.teacher, self.student, list(prompts), float(guidance_scale), noise, renoise,
                     self.refine_time, self.refine_steps, self.student.device)
        unit = out.latents
        with torch.no_grad():
            return type(out)(self.teacher.decode(unit, output_type), unit)


def write_grid(student, teacher, repair, records, args) -> None:
    import torch

    from sana_sprint.evaluation.run import sample_seed, save_grid

    picks = [i for i, r in enumerate(records) if r["tag"] != "single_object"][::37][:12]
    images, captions = [], []
    for i in picks:
        prompt = records[i]["prompt"]
        seed = sample_seed(args.seed, i, 0)
        gen = lambda seed=seed: [torch.Generator().manual_seed(seed)]  # noqa: E731
        w = args.guidance
        images.append(student([prompt], steps=1, timesteps=[math.pi / 2], guidance_scale=w, generator=gen(),
                              output_type="np").images[0])
        images.append(repair([prompt], guidance_scale=w, generator=gen(), output_type="np").images[0])
        images.append(teacher([prompt], steps=20, guidance_scale=w, generator=gen(), output_type="np").images[0])
        captions += [f"1 step: {prompt}", f"repaired from t={args.refine_time}", "teacher, 20 steps"]
    save_grid(args.grid, [(255 * x).round().astype("uint8") for x in images], captions)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="models/shapes-sprint")
    ap.add_argument("--teacher", default="models/shapes-teacher")
    ap.add_argument("--refine-time", type=float, default=0.6)
    ap.add_argument("--refine-steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="a balanced subset of this many prompts (0: all 540)")
    ap.add_argument("--fd", action="store_true", help="also FD_shapes against 2,000 ground-truth renders")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--grid", default="", help="also a PNG: for 12 multi-object prompts (first image of each), the "
                    "student's 1-step image, its repair and the teacher's own 20-step sample from the same noise")
    args = ap.parse_args(argv)
    if not (0 < args.refine_time < math.pi / 2) or args.refine_steps < 1:
        print("error: --refine-time must be in (0, pi/2) and --refine-steps >= 1", file=sys.stderr)
        return 2
    for name in ("student", "teacher"):
        if not Path(getattr(args, name)).is_dir():
            print(f"error: no {name} folder at {getattr(args, name)}", file=sys.stderr)
            return 2

    import torch

    from sana_sprint.evaluation.run import balanced_subset, evaluate, load_prompts
    from sana_sprint.pipeline import SprintPipeline

    torch.set_num_threads(args.threads)
    teacher = SprintPipeline.from_pretrained(args.teacher)
    student = SprintPipeline.from_pretrained(args.student, text_encoder=teacher.text_encoder)
    if teacher.kind != "teacher" or student.kind != "student":
        print("error: --teacher must be a teacher folder and --student a student folder", file=sys.stderr)
        return 2
    records = load_prompts(None)
    indices = balanced_subset([r["tag"] for r in records], args.limit or None)
    repair = RepairPipe(student, teacher, args.refine_time, args.refine_steps)
    res = evaluate(repair, [records[i] for i in indices],
                   guidance=args.guidance, seed=args.seed, images_per_prompt=args.images_per_prompt,
                   batch=args.batch, fd=args.fd, indices=indices, progress=sys.stderr.isatty())
    if args.grid:
        write_grid(student, teacher, repair, records, args)
    res.update(student=args.student, teacher=args.teacher, refine_time=args.refine_time,
               refine_steps=args.refine_steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    tasks = " ".join(f"{k} {v:.3f}" for k, v in res["tasks"].items())
    print(f"overall {res['overall']:.3f}" + (f", FD {res['fd_shapes']:.2f}" if "fd_shapes" in res else "") + f" ({tasks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
