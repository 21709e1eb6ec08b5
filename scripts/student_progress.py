"""The 1-step student's ShapesEval score against the training samples it has seen, with a log-linear fit.

Reads a manifest (docs/bench/student_progress.json: label, samples, overall, fd_shapes, group, fit per point),
fits overall = a + b * log2(samples) over the points marked ``fit``, prints the slope per doubling and the
sample count at which the fit would reach the teacher's score, and draws the points and the fit.

    python scripts/student_progress.py --manifest docs/bench/student_progress.json --out docs/student_progress.png

The crossing is an extrapolation of the fit, printed as such; the slope and the points are the measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def fit_log2(samples, overall) -> tuple[float, float]:
    """Least-squares (a, b) of overall = a + b * log2(samples)."""
    x = np.log2(np.asarray(samples, dtype=np.float64))
    y = np.asarray(overall, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("the fit needs at least two points with different sample counts")
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default="docs/bench/student_progress.json")
    ap.add_argument("--out", default="docs/student_progress.png")
    ap.add_argument("--target", type=float, default=None, help="score to extrapolate to (default: the manifest's teacher_overall)")
    args = ap.parse_args(argv)
    try:
        man = json.loads(Path(args.manifest).read_text())
        pts = man["points"]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read {args.manifest}: {e}", file=sys.stderr)
        return 2
    target = args.target if args.target is not None else man.get("teacher_overall")
    fit = [p for p in pts if p.get("fit")]
    try:
        a, b = fit_log2([p["samples"] for p in fit], [p["overall"] for p in fit])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"points_fitted": len(fit), "slope_per_doubling": round(b, 4), "intercept": round(a, 4)}
    if target is not None and b > 0:
        res["target"] = target
        res["samples_at_target_extrapolated"] = float(2 ** ((target - a) / b))
    print(json.dumps(res, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, group in enumerate(dict.fromkeys(p["group"] for p in pts)):
        g = [p for p in pts if p["group"] == group]
        ax.scatter([p["samples"] for p in g], [p["overall"] for p in g], label=group, color=f"C{i}", zorder=3)
        for p in g:
            k = pts.index(p)
            ax.annotate(p["label"], (p["samples"], p["overall"]), fontsize=7, textcoords="offset points",
                        xytext=(6, -11) if k % 2 else (6, 5))
    xs = np.geomspace(min(p["samples"] for p in fit), max(p["samples"] for p in fit), 50)
    ax.plot(xs, a + b * np.log2(xs), "k-", lw=1, label=f"fit: {b:+.3f} per doubling")
    if "samples_at_target_extrapolated" in res:
        xe = np.geomspace(xs[-1], res["samples_at_target_extrapolated"], 50)
        ax.plot(xe, a + b * np.log2(xe), "k:", lw=1, label="extrapolation (not measured)")
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"teacher {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(min(p["samples"] for p in pts) / 1.5, None)
    ax.set_xlabel("generator samples seen (batch x updates)")
    ax.set_ylabel("1-step ShapesEval overall (seed 0)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
