"""Benchmark the ShapesEval detector + scorer on the fixed suite (rerun it after any change).

Conditions, one ground-truth render per suite prompt:
  gt            clean renders                                 expect overall >= 0.98, tasks >= 0.95
  blur0.7       Gaussian blur sigma 0.7 px                    (generated images are soft)
  jpeg75/50     JPEG round trip, quality 75 / 50 (4:2:0)      (blocky, chroma-subsampled colour)
  blur+noise    blur 0.7 px + iid pixel noise, std 8/255      (VAE-like softness and grain)
  cast          per-channel gain (0.9, 1.05, 0.95) + 10        (colour cast / brightness change)
  shuffled      gt images paired with a permutation of the prompts   expect <= 0.15
  noise         iid Gaussian noise images                      expect <= 0.05
  blobs         smooth random colour fields (blurred noise)    informational
Writes a JSON report and prints a table; exits 1 if an expectation fails. Expectations are for
the default 64x64; at 32x32 (objects down to 5 px) blur and JPEG are reported but not judged.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from sana_sprint.data.shapes import TASKS
from sana_sprint.evaluation.suite import SUITE_PATH, load_suite, render_ground_truth, score_images


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(np.rint(ndimage.gaussian_filter(img.astype(np.float64), (sigma, sigma, 0))), 0, 255).astype(np.uint8)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=str(SUITE_PATH))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--out", default="runs/detector_validation.json")
    args = p.parse_args()

    suite = load_suite(args.suite)
    if args.limit:
        suite = suite[: args.limit]
    metas = [{k: r[k] for k in ("tag", "include", "exclude", "prompt")} for r in suite]
    gt = [render_ground_truth(r, args.size) for r in suite]
    rng = np.random.default_rng(0)
    perm = (np.arange(len(suite)) + 1 + rng.permutation(len(suite) - 1)[0]) % len(suite)  # no fixed points
    shape = (args.size, args.size, 3)
    conditions = {
        "gt": list(zip(metas, gt)),
        "blur0.7": [(m, blur(x, 0.7)) for m, x in zip(metas, gt)],
        "jpeg75": [(m, jpeg(x, 75)) for m, x in zip(metas, gt)],
        "jpeg50": [(m, jpeg(x, 50)) for m, x in zip(metas, gt)],
        "blur+noise": [(m, _u8(ndimage.gaussian_filter(x.astype(np.float64), (0.7, 0.7, 0)) + rng.normal(0, 8, x.shape)))
                       for m, x in zip(metas, gt)],
        "cast": [(m, _u8(x * np.array([0.9, 1.05, 0.95]) + 10.0)) for m, x in zip(metas, gt)],
        "shuffled": [(metas[j], x) for j, x in zip(perm, gt)],
        "noise": [(m, np.clip(rng.normal(127.5, 64.0, shape), 0, 255).astype(np.uint8)) for m in metas],
        "blobs": [(m, np.clip(127.5 + 400.0 * ndimage.gaussian_filter(rng.normal(0, 1, shape), (2, 2, 0)), 0, 255)
                   .astype(np.uint8)) for m in metas],
    }
    expect = {
        "gt": lambda s: s["overall"] >= 0.98 and min(s["tasks"].values()) >= 0.95,
        "blur0.7": lambda s: s["overall"] >= 0.98 and min(s["tasks"].values()) >= 0.95,
        "jpeg75": lambda s: s["overall"] >= 0.95,
        "blur+noise": lambda s: s["overall"] >= 0.95,
        "cast": lambda s: s["overall"] >= 0.95,
    }
    if args.size < 64:  # 5 px objects do not survive blur/JPEG: report, do not judge
        del expect["blur0.7"], expect["jpeg75"], expect["blur+noise"]
    expect |= {
        "shuffled": lambda s: s["overall"] <= 0.15,
        "noise": lambda s: s["overall"] <= 0.05,
    }
    report, failed = {"suite": args.suite, "size": args.size, "n_prompts": len(suite), "conditions": {}}, []
    header = f"{'condition':<10} {'overall':>8} " + " ".join(f"{t[:12]:>12}" for t in TASKS) + "   check"
    print(header)
    print("-" * len(header))
    for name, pairs in conditions.items():
        t0 = time.perf_counter()
        s = score_images(pairs)
        s["seconds"] = round(time.perf_counter() - t0, 2)
        ok = expect[name](s) if name in expect else None
        s["pass"] = ok
        report["conditions"][name] = s
        if ok is False:
            failed.append(name)
        mark = {True: "ok", False: "FAIL", None: "info"}[ok]
        print(f"{name:<10} {s['overall']:>8.3f} " + " ".join(f"{s['tasks'].get(t, float('nan')):>12.3f}" for t in TASKS)
              + f"   {mark}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"report -> {args.out}" + (f"; FAILED: {failed}" if failed else "; all expectations hold"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
