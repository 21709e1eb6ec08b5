"""How sharp are a model's shapes? The detector's fill ratio on single-object prompts, per requested class.

ShapesEval's detector tells squares, circles and triangles apart by their fill ratio (object area over its
bounding box; prototypes square 0.95, circle 0.78, triangle 0.58, see ``evaluation/detector.py``). A square whose
corners are rounded off drifts towards the circle's fill and is counted as a circle, so "expected square, found
none" failures are a blur symptom, not a layout one. For every ``single_object`` prompt of the suite (90 prompts x
``--images`` samples, the evaluation's own seeds) this reports, per requested class: mean and quartiles of the
fill of the most confident detection, and how often that detection has the requested class. A histogram of the
fills (one panel per model and requested class) is written next to ``--out``.

    python scripts/shape_fill.py models/shapes-sprint:1 models/shapes-sprint:4 models/shapes-teacher:20 --out runs/eval/fill.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CLASSES = ("square", "circle", "triangle")


def model_fills(pipe, records, steps: int, images: int, seed: int, guidance: float, batch: int = 32) -> dict:
    """Per requested class: the fill ratio and class of the most confident detection of each image."""
    import numpy as np
    import torch

    from sana_sprint.evaluation.detector import ShapesDetector
    from sana_sprint.evaluation.run import sample_seed

    det = ShapesDetector()
    jobs = [(r, k) for r in records for k in range(images)]
    out: dict = {c: {"fill": [], "found": []} for c in CLASSES}
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        gens = [torch.Generator().manual_seed(sample_seed(seed, int(r["index"]), k)) for r, k in chunk]
        res = pipe([r["prompt"] for r, _ in chunk], steps=steps, guidance_scale=guidance, generator=gens,
                   num_images_per_prompt=1, output_type="pil")
        for (r, _), im in zip(chunk, res.images, strict=True):
            want = r["include"][0]["class"]
            found = det.detect(np.asarray(im.convert("RGB")))
            out[want]["fill"].append(found[0].fill if found else float("nan"))
            out[want]["found"].append(found[0].cls if found else "none")
    return out


def summarize(fills: dict) -> dict:
    """Mean / quartiles of the finite fills and the share of images whose top detection has the requested class."""
    import numpy as np

    rows = {}
    for cls, d in fills.items():
        f = np.asarray(d["fill"], dtype=np.float64)
        ok = f[np.isfinite(f)]
        rows[cls] = {"n": len(f), "detected": int(len(ok)),
                     "fill_mean": float(ok.mean()) if len(ok) else None,
                     "fill_q25_q50_q75": [float(q) for q in np.quantile(ok, [0.25, 0.5, 0.75])] if len(ok) else None,
                     "class_accuracy": float(np.mean([c == cls for c in d["found"]])) if d["found"] else None}
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sana_sprint.evaluation.detector import SHAPE_PROTOTYPES

    names = list(results)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.9 * len(names) + 0.6), sharex=True, squeeze=False)
    bins = np.linspace(0.4, 1.1, 36)
    for ax, name in zip(axes[:, 0], names, strict=True):
        for cls, color in zip(CLASSES, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            f = np.asarray(results[name]["fills"][cls]["fill"], dtype=np.float64)
            ax.hist(f[np.isfinite(f)], bins=bins, alpha=0.6, color=color, label=f"asked for a {cls}")
            ax.axvline(SHAPE_PROTOTYPES[cls][0], color=color, ls="--", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("images")
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("fill ratio of the top detection (dashed: the detector's prototypes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="FOLDER[:STEPS] (steps default: the model's own default)")
    ap.add_argument("--images", type=int, default=4, help="samples per prompt (default 4, as the evaluation)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, as `sana-sprint eval --seed`")
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="result JSON; the histogram PNG goes next to it")
    args = ap.parse_args(argv)
    if args.images < 1:
        print("error: --images must be >= 1", file=sys.stderr)
        return 2

    import torch

    from sana_sprint.errors import UserError
    from sana_sprint.evaluation.run import load_prompts
    from sana_sprint.pipeline import SprintPipeline

    torch.set_num_threads(args.threads)
    records = [r for r in load_prompts(None) if r["tag"] == "single_object"]
    results = {}
    try:
        for spec in args.models:
            folder, _, steps = spec.rpartition(":") if ":" in spec else (spec, "", "")
            if steps and not steps.isdigit():
                raise UserError(f"{spec!r}: expected FOLDER or FOLDER:STEPS with STEPS a positive integer")
            pipe = SprintPipeline.from_pretrained(folder, device="cpu")
            k = int(steps) if steps else None
            fills = model_fills(pipe, records, k, args.images, args.seed, args.guidance)
            name = f"{folder} ({k or 'default'} step{'' if k == 1 else 's'})"
            results[name] = {"summary": summarize(fills), "fills": fills}
            print(name)
            for cls, row in results[name]["summary"].items():
                q = row["fill_q25_q50_q75"]
                print(f"  {cls:8s} fill mean {row['fill_mean']:.3f}  quartiles {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}"
                      f"  top detection is a {cls}: {row['class_accuracy']:.3f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "images": args.images, "guidance": args.guidance,
                               "models": results}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
