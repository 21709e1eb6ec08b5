"""Sanity benchmark for FD_shapes: noise floor between real sets, monotone rise under degradation.

    python scripts/validate_fd.py --n 2000 --out runs/fd/validate

Set A = the fixed reference set (``reference_stats``); set B = a disjoint real set (another world
seed). FD(A, B) is the noise floor at this n; B is then blurred (Gaussian sigma in pixels) or
noised (Gaussian std in the project's [-1, 1] image units, clipped, saved as uint8) at increasing
levels, and FD(A, degraded B) must rise monotonically. Writes ``fd_validation.json`` and
``fd_validation.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BLUR_SIGMAS = (0.5, 1.0, 2.0, 3.0)
NOISE_STDS = (0.05, 0.1, 0.2, 0.4)
OTHER_SEED = 5151


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0), mode="nearest")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def add_noise(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = images.astype(np.float64) / 127.5 - 1.0 + rng.normal(0.0, std, size=images.shape)
    return np.clip(np.rint((np.clip(x, -1, 1) + 1) * 127.5), 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--net", default=None, help="feature net folder (default models/shapes-fd)")
    p.add_argument("--out", default="runs/fd/validate")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from sana_sprint.evaluation import fd as FD

    torch.set_num_threads(args.threads)
    t0 = time.time()
    net = FD.load_feature_net(args.net)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = FD.reference_stats(args.n, net=net, cache_dir=out)
    other = FD.world_images(args.n, OTHER_SEED)

    def fd(images):
        return FD.frechet_distance(*FD.feature_stats(FD.extract_features(images, net)), *ref)

    rows = [{"kind": "real", "level": 0.0, "fd": fd(other)}]
    # second noise-floor estimate: two halves of B against each other (n/2 vs n/2)
    half = args.n // 2
    floor_half = FD.fd_shapes(other[:half], other[half:], net)
    for s in BLUR_SIGMAS:
        rows.append({"kind": "blur", "level": s, "fd": fd(blur(other, s))})
    for s in NOISE_STDS:
        rows.append({"kind": "noise", "level": s, "fd": fd(add_noise(other, s))})

    floor = rows[0]["fd"]
    checks = {}
    for kind in ("blur", "noise"):
        vals = [floor] + [r["fd"] for r in rows if r["kind"] == kind]
        checks[f"{kind}_monotone"] = bool(all(a < b for a, b in zip(vals, vals[1:])))
        checks[f"{kind}_weakest_over_floor"] = vals[1] / floor
    res = {"n": args.n, "reference_seed": FD.REFERENCE_SEED, "other_seed": OTHER_SEED,
           "noise_floor": floor, "noise_floor_halves": floor_half, "rows": rows, "checks": checks,
           "sec": time.time() - t0}

    print(f"{'kind':<6} {'level':>6} {'FD_shapes':>10}")
    for r in rows:
        print(f"{r['kind']:<6} {r['level']:>6.2f} {r['fd']:>10.3f}")
    print(json.dumps(checks))
    (out / "fd_validation.json").write_text(json.dumps(res, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for a, kind, unit in ((ax[0], "blur", "Gaussian blur sigma (px)"), (ax[1], "noise", "noise std ([-1, 1] units)")):
        lv = [0.0] + [r["level"] for r in rows if r["kind"] == kind]
        a.plot(lv, [floor] + [r["fd"] for r in rows if r["kind"] == kind], "o-")
        a.axhline(floor, color="k", ls="--", lw=0.8, label="real vs real")
        a.set_xlabel(unit), a.set_ylabel("FD_shapes"), a.set_yscale("log"), a.legend()
    fig.suptitle(f"FD_shapes vs {args.n} reference renders")
    fig.tight_layout()
    fig.savefig(out / "fd_validation.png", dpi=100)
    return 0 if all(v for k, v in checks.items() if k.endswith("monotone")) else 1


if __name__ == "__main__":
    sys.exit(main())
