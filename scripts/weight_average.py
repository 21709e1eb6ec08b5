"""Average the transformer weights of several student folders (a "model soup", Wortsman et al. 2022).

Students continued from one model by different runs usually stay in one basin; the mean of their weights can beat
each of them. Not always: a run that drifted (rising regression loss, gradient-norm spikes) can leave it, and then
even its mean with its own starting point draws blank images (docs/results.md "Session 19"), so score every
ingredient alone and the soup before using it. Every folder must hold the same parameters with the same shapes;
the mean is taken in float64 and stored in the first folder's dtypes. The output is a copy of the first folder
with the weights replaced, plus ``weight_average.json`` naming the sources and weights.

    python scripts/weight_average.py --out runs/soup runs/a/export runs/b/export runs/c/export [--weights 1,1,2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def average(states: list[dict], weights: list[float] | None = None) -> dict:
    """sum_i w_i state_i / sum_i w_i per parameter (float64), in the first state's dtypes."""
    if len(states) < 2:
        raise ValueError(f"need at least two weight sets, got {len(states)}")
    w = [1.0] * len(states) if weights is None else [float(x) for x in weights]
    if len(w) != len(states) or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"need one weight >= 0 per folder with a positive sum, got {weights}")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ValueError(f"folder {i + 1} holds other parameters: {sorted(set(s) ^ keys)[:4]}")
        bad = [k for k in keys if s[k].shape != states[0][k].shape]
        if bad:
            raise ValueError(f"folder {i + 1}: shape mismatch at {bad[0]}")
    total = sum(w)
    return {k: (sum(wi * s[k].double() for wi, s in zip(w, states)) / total).to(states[0][k].dtype) for k in states[0]}


def out_error(out: Path, inputs: dict[str, str | Path], marker: str) -> str | None:
    """Why ``out`` may not receive a weight-edited copy, or None: it is one of ``inputs`` (values; the keys name
    them in the message), or it exists without a ``marker`` file, so it is not an earlier output of the script."""
    for label, folder in inputs.items():
        if out.resolve() == Path(folder).resolve():
            return f"--out must differ from {label} (that folder would be overwritten)"
    if out.exists() and not (out / marker).is_file():
        return f"--out {out} exists and is not an earlier output of this script; not overwriting it"
    return None


def write_copy(src: str | Path, out: Path, weights: dict, marker: str, info: dict) -> None:
    """``out`` (an earlier one replaced) = a copy of the student folder ``src`` with its transformer weights
    replaced by ``weights`` and ``info`` written to ``out / marker``."""
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / marker).write_text(json.dumps(info, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="student folders (the first one is copied for everything else)")
    ap.add_argument("--weights", default=None, help="comma-separated mixing weights (default: equal)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    for f in args.folders:
        if not (Path(f) / WEIGHTS).is_file():
            print(f"error: no {WEIGHTS} under {f}", file=sys.stderr)
            return 2
    error = out_error(out, {f"the input {f}": f for f in args.folders}, "weight_average.json")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        weights = None if args.weights is None else [float(x) for x in args.weights.split(",")]
    except ValueError:
        print(f"error: --weights must be numbers separated by commas, got {args.weights!r}", file=sys.stderr)
        return 2
    from safetensors.torch import load_file

    try:
        avg = average([load_file(Path(f) / WEIGHTS) for f in args.folders], weights)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {"folders": args.folders, "weights": weights or [1.0] * len(args.folders)}
    write_copy(args.folders[0], out, avg, "weight_average.json", info)
    print(f"wrote {out} (mean of {len(args.folders)} folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
