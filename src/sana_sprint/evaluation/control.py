"""``sana-sprint eval-control``: control fidelity and ShapesEval under control, on held-out conditions.

Held-out set: ``num`` world scenes from :func:`control_records` (seed :data:`CONTROL_EVAL_SEED`, disjoint
from the training seed 0 and from the ShapesEval suite's seed; tasks interleaved as in the suite, so
any prefix is task-balanced). For each scene: render it, take its condition (the scribble, or the thin
edges, as the ControlNet was trained), generate an image from the scene's prompt *under that
condition*, then score

- control fidelity: :func:`~sana_sprint.data.conditions.edge_prf` of the condition's edges against the
  edges of the generated image (precision, recall, F1 with a 1 px tolerance); ``edge_f1`` is the mean F1;
- ShapesEval: the GenEval rules with the deterministic detector on the same images; the ``colors`` task
  (one object of a named colour) is the headline number, the other tasks are reported too.

``--reference ground-truth`` scores the rendered scenes themselves (the metric's ceiling: F1 ~1) and
``--reference blank`` plain background images (its floor: F1 0): the metric's own sanity check.
Image ``i`` uses the noise seed ``sample_seed(seed, i, 0)`` (as ``sana-sprint eval``), so teacher and
student runs are paired.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sana_sprint.cli import command, parse_timesteps, pick_device, resolve_model
from sana_sprint.errors import UserError

CONTROL_EVAL_SEED = 20250402  # != 0 (training) and != suite.SUITE_SEED (ShapesEval)
DEFAULT_NUM = 500
HEADLINE_TASK = "colors"
GRID_PAIRS = 16  # (condition, image) pairs in the PNG next to the JSON

# generate(records, conditions uint8 [H, W, 3], ground truths uint8, generators) -> images uint8 [H, W, 3]
Generate = Callable[[Sequence[dict], Sequence[np.ndarray], Sequence[np.ndarray], list], list[np.ndarray]]


def control_records(num: int = DEFAULT_NUM, seed: int = CONTROL_EVAL_SEED) -> list[dict]:
    """The first ``num`` held-out scenes (GenEval metadata + ``objects`` / ``background`` to render them)."""
    from sana_sprint.data.shapes import TASKS
    from sana_sprint.evaluation.suite import build_suite

    if num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    return build_suite(per_task=math.ceil(num / len(TASKS)), seed=seed)[:num]


def render_conditions(records: Sequence[dict], size: int, condition: str = "scribble") -> tuple[list, list]:
    """(ground-truth renders, their conditions), uint8 [size, size, 3] each."""
    from sana_sprint.data.control_cache import condition_image
    from sana_sprint.evaluation.suite import render_ground_truth

    gts = [render_ground_truth(r, size) for r in records]
    return gts, [condition_image(g, condition) for g in gts]


# --- reference "generators" (metric sanity checks) ------------------------------------------------


def ground_truth_images(records, conds, gts, gens) -> list[np.ndarray]:
    return [np.asarray(g) for g in gts]


def blank_images(records, conds, gts, gens) -> list[np.ndarray]:
    return [np.broadcast_to(np.asarray(r["background"], np.uint8), g.shape).copy() for r, g in zip(records, gts)]


class ControlledGenerator:
    """A pipeline + ControlNet as a :data:`Generate` callable (the conditions go through the pipeline's VAE)."""

    def __init__(self, pipe, controlnet, steps=None, timesteps=None, guidance=None, conditioning_scale=None):
        from sana_sprint.models.controlnet import ControlledTrigFlow

        controlnet.to(pipe.device, pipe.dtype).eval()
        self.model = ControlledTrigFlow(pipe.model, controlnet).eval()
        pipe.model = self.model  # same forward signature: the pipeline's samplers run unchanged
        self.pipe, self.steps, self.timesteps, self.guidance = pipe, steps, timesteps, guidance
        self.scale = conditioning_scale

    def __call__(self, records, conds, gts, gens) -> list[np.ndarray]:
        import torch

        from sana_sprint.data.conditions import to_tensor
        from sana_sprint.models.controlnet import encode_control

        control = encode_control(self.pipe.vae, torch.stack([to_tensor(c) for c in conds]))
        with self.model.bind(control.to(self.pipe.device, self.pipe.dtype), self.scale):
            out = self.pipe([r["prompt"] for r in records], steps=self.steps, timesteps=self.timesteps,
                            guidance_scale=self.guidance, generator=gens, output_type="np")
        return [(np.clip(a, 0, 1) * 255).round().astype(np.uint8) for a in out.images]


# --- scoring --------------------------------------------------------------------------------------


def score_pair(record: dict, condition: np.ndarray, image: np.ndarray, detector) -> dict:
    from sana_sprint.data.conditions import edge_prf
    from sana_sprint.evaluation.geneval import evaluate_image

    p, r, f1 = edge_prf(condition, image)
    ok, reason = evaluate_image(detector.detect(image), record)
    return {"tag": record["tag"], "prompt": record["prompt"], "edge_f1": f1, "edge_precision": p, "edge_recall": r,
            "correct": bool(ok), "reason": reason}


def summarize_control(rows: Sequence[dict]) -> dict:
    from sana_sprint.evaluation.geneval import summarize

    shapes = summarize((r["tag"], r["correct"]) for r in rows)
    out = {key: float(np.mean([r[key] for r in rows])) for key in ("edge_f1", "edge_precision", "edge_recall")}
    out[HEADLINE_TASK] = shapes["tasks"].get(HEADLINE_TASK, float("nan"))
    out["shapes_eval"] = shapes["overall"]
    out["tasks"] = shapes["tasks"]
    out["edge_f1_by_task"] = {t: float(np.mean([r["edge_f1"] for r in rows if r["tag"] == t])) for t in shapes["tasks"]}
    out["n"] = len(rows)
    return out


def evaluate_control(generate: Generate, records: Sequence[dict], size: int = 64, condition: str = "scribble",
                     seed: int = 0, batch: int = 32, detector=None, results: list | None = None,
                     grid_path=None, progress: bool = True) -> dict:
    """Generate an image per record under its condition and score it; see the module docstring."""
    import torch
    from tqdm.auto import tqdm

    from sana_sprint.evaluation.detector import ShapesDetector
    from sana_sprint.evaluation.run import sample_seed

    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    detector = detector or ShapesDetector()
    t0 = time.perf_counter()
    rows, grid = [], []
    bar = tqdm(total=len(records), desc="eval-control", unit="img", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    try:
        for start in range(0, len(records), batch):
            idx = list(range(start, min(start + batch, len(records))))
            recs = [records[i] for i in idx]
            gts, conds = render_conditions(recs, size, condition)
            gens = [torch.Generator().manual_seed(sample_seed(seed, i, 0)) for i in idx]
            images = generate(recs, conds, gts, gens)
            for i, rec, cond, img in zip(idx, recs, conds, images, strict=True):
                row = {"index": i, **score_pair(rec, cond, img, detector)}
                rows.append(row)
                if len(grid) < GRID_PAIRS:
                    grid.append((cond, img, row))
            bar.update(len(idx))
            bar.set_postfix(edge_f1=f"{np.mean([r['edge_f1'] for r in rows]):.3f}", refresh=False)
    finally:
        bar.close()
    out = summarize_control(rows)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    if results is not None:
        results.extend(rows)
    if grid_path is not None and grid:
        from sana_sprint.evaluation.run import save_grid

        images, captions, correct = [], [], []
        for cond, img, row in grid:
            images += [cond, img]
            captions += ["condition", f"F1 {row['edge_f1']:.2f}: {row['prompt']}"]
            correct += [True, row["correct"]]
        save_grid(grid_path, images, captions, correct)
    return out


def load_controlled(model: str, controlnet: str | None, device=None):
    """(pipeline, ControlNet, its sprint extras, ControlNet folder) for a model folder and a ControlNet folder.

    Without ``controlnet`` the model folder's own ``controlnet/`` (a distilled Sprint-ControlNet export) is used.
    """
    from sana_sprint.cli import quiet_libraries
    from sana_sprint.models.controlnet import SprintControlNet
    from sana_sprint.pipeline import SprintPipeline

    folder = resolve_model(model)
    if folder is None:
        raise UserError(f"model folder not found: {model}")
    if controlnet is None:
        if not (folder / "controlnet").is_dir():
            raise UserError(f"--controlnet is required: {folder} has no controlnet/ subfolder")
        controlnet = str(folder / "controlnet")
    if not Path(controlnet).is_dir():
        raise UserError(f"ControlNet folder not found: {controlnet}")
    quiet_libraries()
    pipe = SprintPipeline.from_pretrained(folder, device=pick_device(device) if device is not None else None)
    net = SprintControlNet.from_pretrained(controlnet, base=pipe.transformer)
    extra = SprintControlNet.read_config(controlnet).get("sprint", {})
    return pipe, net, extra, str(controlnet)


@command("eval-control", help="ControlNet: control fidelity (edge F1) and ShapesEval under control on held-out scribbles")
def eval_control_command(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="teacher or student model folder (or a name in models/)")
    p.add_argument("--controlnet", default=None, help="ControlNet folder (default: MODEL/controlnet)")
    p.add_argument("--reference", choices=["ground-truth", "blank"], default=None,
                   help="score rendered scenes / blank images instead of a model (the metric's ceiling / floor)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's; teachers 20)")
    p.add_argument("--timesteps", default=None, help="explicit TrigFlow times, e.g. 1.5708,1.3 (0 appended)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (default: the model's)")
    p.add_argument("--conditioning-scale", type=float, default=None, help="ControlNet output scale (default: the ControlNet's default for the step count, else 1)")
    p.add_argument("--condition", choices=["scribble", "edges"], default=None,
                   help="condition type (default: the ControlNet's, else scribble)")
    p.add_argument("--num", type=int, default=DEFAULT_NUM, help="held-out conditions (default: %(default)s)")
    p.add_argument("--eval-seed", type=int, default=CONTROL_EVAL_SEED, help="world seed of the held-out scenes")
    p.add_argument("--seed", type=int, default=0, help="noise seed base (image i uses sample_seed(seed, i, 0))")
    p.add_argument("--batch", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="image size for --reference (default: 64)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="result JSON (+ a PNG grid and a per-image JSONL next to it)")

    def run(args: argparse.Namespace) -> int:
        from sana_sprint.evaluation.run import check_guidance, check_positive, result_path, write_results

        out = result_path(args.out)
        for name in ("steps", "num", "batch", "size"):
            check_positive(name, getattr(args, name))
        check_guidance(args.guidance)
        if args.eval_seed == 0:
            raise UserError("--eval-seed 0 is the training seed: held-out scenes need another seed")
        timesteps = parse_timesteps(args.timesteps)
        meta: dict = {}
        if args.reference is not None:
            if args.model or args.controlnet:
                raise UserError("--reference scores reference images: it cannot be combined with --model / --controlnet")
            generate = ground_truth_images if args.reference == "ground-truth" else blank_images
            size, condition = args.size or 64, args.condition or "scribble"
            meta = {"reference": args.reference}
        else:
            if args.model is None:
                raise UserError("--model is required (or --reference)")
            pipe, net, extra, cn_folder = load_controlled(args.model, args.controlnet, args.device)
            condition = args.condition or extra.get("condition", "scribble")
            size = int(pipe.config.get("resolution") or 64)
            if args.size is not None and args.size != size:
                raise UserError(f"--size {args.size} differs from the model's resolution {size}")
            schedule = pipe._schedule(args.steps, timesteps)
            scale = net.default_scale(len(schedule) - 1) if args.conditioning_scale is None else args.conditioning_scale
            generate = ControlledGenerator(pipe, net, args.steps, timesteps, args.guidance, scale)
            meta = {"model": str(resolve_model(args.model)), "controlnet": cn_folder, "kind": pipe.kind, "steps": len(schedule) - 1, "timesteps": [float(s) for s in schedule],
                    "guidance": float(pipe.config["default_guidance"] if args.guidance is None else args.guidance),
                    "conditioning_scale": scale}
        records = control_records(args.num, args.eval_seed)
        rows: list = []
        result = evaluate_control(generate, records, size=size, condition=condition, seed=args.seed, batch=args.batch,
                                  results=rows, grid_path=out.with_suffix(".png"), progress=not args.no_progress)
        result = {**result, **meta, "condition": condition, "eval_seed": args.eval_seed, "seed": args.seed, "size": size}
        write_results(out, result, rows)
        print(f"edge_f1={result['edge_f1']:.4f} {HEADLINE_TASK}={result[HEADLINE_TASK]:.4f} "
              f"shapes_eval={result['shapes_eval']:.4f} ({result['n']} images)")
        print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.jsonl')}")
        return 0

    return run
