"""Noise -> image pairs from the teacher's own sampler, for the student's 1-step regression term (issue 5).

For rows of a latent cache (the distillation's training captions), draw unit noise z and a guidance
scale w from {4, 4.5, 5} and run the teacher pipeline (flow Euler, ``--steps`` steps, real CFG w, the
folder's time shift) from exactly that noise. Each shard ``pairs-NNNNN.pt`` holds

    noise [n, C, H, W] (unit std, the pipeline's x_T), x0 [n, C, H, W] (unit-std latents the teacher
    reached), caption_index [n] (into the cache's unique captions), w [n]

Shards are written as they finish; a rerun skips the ones already there (same seed -> same draws), so
the script can be stopped and resumed. ``distill`` reads the folder with ``pairs`` / ``regress_weight``.

With ``--refine-student DIR --refine-time T`` the targets are the teacher's repair of a student's own 1-step
output instead (SDEdit): u = the student's 1-step latent from the pair's noise (same w), re-noised to
TrigFlow time T with fresh noise e (flow space: (1 - sigma) u + sigma e, sigma = sin T / (sin T + cos T)),
then the teacher's flow Euler with real CFG w over ``--refine-steps`` steps uniform in sigma down to 0. The
noise, captions and w are the same draws as the plain pairs of the same seed; only x0 differs. The layout is
the student's (a target it can reach), the drawing the teacher's (docs/results.md "Session 23").

    python scripts/teacher_pairs.py --teacher models/shapes-teacher --cache runs/cache/shapes-12000-r64 \
        --n 8192 --out runs/pairs/teacher20
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def refine(teacher, student, prompts, w, noise, renoise, refine_time: float, steps: int, device):
    """The teacher's repair (``steps`` flow Euler steps with CFG w) of the student's 1-step output from ``noise``,
    re-noised to ``refine_time`` with ``renoise`` (all unit-std latents)."""
    import torch

    from sana_sprint.timesteps import repair_schedule
    from sana_sprint.trigflow import flow_time

    u = student(prompts, steps=1, timesteps=[math.pi / 2], guidance_scale=w, latents=noise.to(device),
                output_type="latent").latents.float()
    sigma = float(flow_time(torch.tensor(refine_time, dtype=torch.float64)))  # the flow time the repair starts at
    x = (1 - sigma) * u + sigma * renoise.to(device)
    return teacher(prompts, timesteps=repair_schedule(refine_time, steps), guidance_scale=w, latents=x,
                   output_type="latent")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="models/shapes-teacher")
    ap.add_argument("--cache", default="runs/cache/shapes-12000-r64", help="latent cache whose captions to use")
    ap.add_argument("--n", type=int, default=8192, help="pairs (rounded up to whole shards)")
    ap.add_argument("--shard", type=int, default=256, help="pairs per shard file")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scales", default="4.0,4.5,5.0")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/pairs/teacher20")
    ap.add_argument("--shard-range", default="",
                    help="START:END: make only shards START..END-1 (of the --n / --shard ones), so that several "
                         "processes can fill one folder side by side; default all")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (the noise is drawn on the CPU either way)")
    ap.add_argument("--refine-student", default="",
                    help="a student folder: x0 = the teacher's repair of that student's 1-step output (see above)")
    ap.add_argument("--refine-time", type=float, default=0.6, help="TrigFlow time the student's output is re-noised to")
    ap.add_argument("--refine-steps", type=int, default=10, help="teacher flow Euler steps from --refine-time to 0")
    ap.add_argument("--cached-text", action="store_true",
                    help="take the captions' embeddings from the cache instead of running the text encoder "
                         "(the values the distillation trains on; no text-encoder weights needed)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from sana_sprint.data.latents import LatentDataset
    from sana_sprint.pipeline import SprintPipeline

    if min(args.n, args.batch, args.steps, args.shard) < 1:
        print("error: --n, --shard, --batch and --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        scales = [float(x) for x in args.guidance_scales.split(",")]
    except ValueError:
        print(f"error: --guidance-scales must be comma-separated numbers, got {args.guidance_scales!r}", file=sys.stderr)
        return 2
    shards = -(-args.n // args.shard)
    first, last = 0, shards
    if args.shard_range:
        try:
            first, last = (int(x) for x in args.shard_range.split(":"))
        except ValueError:
            print(f"error: --shard-range must be START:END (two integers), got {args.shard_range!r}", file=sys.stderr)
            return 2
        if not 0 <= first < last <= shards:
            print(f"error: --shard-range {args.shard_range}: need 0 <= START < END <= {shards} (the number of shards)",
                  file=sys.stderr)
            return 2
    if not Path(args.teacher).is_dir():
        print(f"error: no teacher folder at {args.teacher}", file=sys.stderr)
        return 2
    if args.refine_student:
        if not Path(args.refine_student).is_dir():
            print(f"error: no student folder at {args.refine_student}", file=sys.stderr)
            return 2
        if not (0 < args.refine_time < math.pi / 2) or args.refine_steps < 1:
            print("error: --refine-time must be in (0, pi/2) and --refine-steps >= 1", file=sys.stderr)
            return 2
    try:
        ds = LatentDataset(args.cache)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"error: --device: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    pipe = SprintPipeline.from_pretrained(args.teacher, text_encoder=ds.text_encoder() if args.cached_text else None)
    pipe.to(device)
    if pipe.kind != "teacher":
        print(f"error: {args.teacher} is a {pipe.kind} folder, not a teacher", file=sys.stderr)
        return 2
    student = None
    if args.refine_student:
        student = SprintPipeline.from_pretrained(args.refine_student, text_encoder=pipe.text_encoder)
        student.to(device)
        if student.kind != "student":
            print(f"error: {args.refine_student} is a {student.kind} folder, not a student", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": str(args.teacher), "cache": str(args.cache), "steps": args.steps, "guidance_scales": scales,
            "seed": args.seed, "shard": args.shard, "shards": shards, "flow_shift": pipe.config.get("flow_shift"),
            "text": "cache" if args.cached_text else "encoder"}
    if student is not None:
        meta.update(refine_student=str(args.refine_student), refine_time=args.refine_time,
                    refine_steps=args.refine_steps)
    old = out / "meta.json"
    if old.exists():
        prev = json.loads(old.read_text())
        prev.setdefault("text", "encoder")  # folders written before --cached-text
        diff = {k: (prev.get(k), v) for k, v in meta.items() if k != "shards" and prev.get(k) != v}
        if diff:
            print(f"error: {out} holds pairs made with other settings: {diff}", file=sys.stderr)
            return 2
    old.write_text(json.dumps(meta, indent=2) + "\n")

    shape = (int(pipe.transformer.config.in_channels), *ds.latent_shape[-2:])
    todo = range(first, last)
    bar = tqdm(total=len(todo) * args.shard, desc="teacher pairs", unit="pair")
    t0 = time.perf_counter()
    for k in todo:
        path = out / f"pairs-{k:05d}.pt"
        if path.exists():
            bar.update(args.shard)
            continue
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + k)  # each shard's draws depend only on (seed, k)
        rows = torch.randint(len(ds), (args.shard,), generator=g).numpy()
        w = torch.as_tensor(scales)[torch.randint(len(scales), (args.shard,), generator=g)]
        noise = torch.randn((args.shard, *shape), generator=g)
        cids = np.asarray(ds.caption_index[rows]).astype(np.int64)
        renoise = torch.randn(noise.shape, generator=g) if student is not None else None  # after the plain draws
        x0 = torch.empty_like(noise)
        for i in range(0, args.shard, args.batch):
            sl = slice(i, i + args.batch)
            # one guidance scale per call: sort the batch's rows by w
            for wv in torch.unique(w[sl]).tolist():
                sel = torch.nonzero(w[sl] == wv).flatten() + i
                prompts = [ds.captions[c] for c in cids[sel.numpy()]]
                if student is None:
                    res = pipe(prompts, steps=args.steps, guidance_scale=wv, latents=noise[sel].to(device),
                               output_type="latent")
                else:
                    res = refine(pipe, student, prompts, wv, noise[sel], renoise[sel], args.refine_time,
                                 args.refine_steps, device)
                x0[sel] = res.latents.float().cpu()
            bar.update(min(args.batch, args.shard - i))
        tmp = path.with_suffix(".tmp")
        torch.save({"noise": noise, "x0": x0, "caption_index": torch.from_numpy(cids), "w": w.float()}, tmp)
        tmp.replace(path)
    bar.close()
    done = len(list(out.glob("pairs-*.pt")))
    print(f"{len(todo) * args.shard} pairs (shards {first}..{last - 1}) in {out}, which holds {done} of {shards} shards "
          f"({time.perf_counter() - t0:.0f} s this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
