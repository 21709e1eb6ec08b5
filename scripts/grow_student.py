"""Append transformer blocks to a distilled student without changing what it computes (depth growth).

Each new block is a copy of the student's last block with its three residual outputs zeroed: the self-attention
and cross-attention output projections (weight and bias) and the feed-forward's last 1x1 convolution. A block
whose residual branches all add zero is the identity, so the grown student draws the same images as the source
(tested against the source in float64), yet every output projection still receives a gradient at the first step,
so continued distillation can use the new depth. New blocks go after the last one, so a Sprint-ControlNet
(which adds its residuals after the first K < num_layers blocks) keeps acting on the same blocks.

    python scripts/grow_student.py models/shapes-sprint --add 2 --out runs/grow/d8

The output is a copy of the student folder with the transformer's config (num_layers) and weights replaced and
``grow_student.json`` naming the source. Weights keep the source's dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from weight_average import WEIGHTS, out_error, write_copy

CONFIG = "transformer/config.json"
# the residual outputs of a SanaTransformerBlock: zeroing them makes the block the identity map
ZEROED = ("attn1.to_out.0.weight", "attn1.to_out.0.bias", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
          "ff.conv_point.weight", "ff.conv_point.bias")


def grow(state: dict, num_layers: int, add: int) -> dict:
    """``state`` with ``add`` identity blocks (copies of block num_layers - 1, outputs zeroed) appended."""
    if add < 1:
        raise ValueError(f"--add must be >= 1, got {add}")
    src = f"transformer_blocks.{num_layers - 1}."
    block = {k[len(src):]: v for k, v in state.items() if k.startswith(src)}
    if not block:
        raise ValueError(f"no parameters under {src!r}: is num_layers={num_layers} right?")
    if f"transformer_blocks.{num_layers}.scale_shift_table" in state:
        raise ValueError(f"the weights hold more than num_layers={num_layers} blocks")
    missing = [k for k in ZEROED[:-1] if k not in block]  # conv_point has no bias in diffusers' GLUMBConv
    if missing:
        raise ValueError(f"block {num_layers - 1} lacks {missing}: not a SanaTransformerBlock")
    out = dict(state)
    for i in range(num_layers, num_layers + add):
        for name, value in block.items():
            out[f"transformer_blocks.{i}.{name}"] = value.clone().zero_() if name in ZEROED else value.clone()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("student", help="student pipeline folder (sprint_config.json kind 'student')")
    ap.add_argument("--add", type=int, default=2, help="blocks to append (default 2)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    src, out = Path(args.student), Path(args.out)
    if not (src / WEIGHTS).is_file() or not (src / CONFIG).is_file():
        print(f"error: {src} has no {WEIGHTS} / {CONFIG}", file=sys.stderr)
        return 2
    error = out_error(out, {"the source folder": src}, "grow_student.json")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from safetensors.torch import load_file

    config = json.loads((src / CONFIG).read_text())
    try:
        layers = int(config.get("num_layers", 0))
        state = grow(load_file(str(src / WEIGHTS)), layers, args.add)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {"source": str(src), "num_layers": [layers, layers + args.add], "copied_from_block": layers - 1,
            "zeroed": list(ZEROED)}
    write_copy(src, out, state, "grow_student.json", meta)
    config["num_layers"] = layers + args.add
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    size = (out / WEIGHTS).stat().st_size
    print(f"{src} ({layers} blocks) -> {out} ({layers + args.add} blocks, {size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
