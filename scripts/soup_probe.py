"""Why does a weight average of two students break? Mix them one tensor group at a time and look.

For each group of transformer tensors (the time embedding's parts, caption projection, input/output layers, the
blocks' attention / feed-forward), write BASE with that group alone replaced by the midpoint of BASE and
OTHER, sample 1-step images and report their pixel standard deviation (a blank, washed-out image has a small one).
Also reports how far OTHER and the full midpoint move the time embedding the student sees at 1 step (t = pi/2):
the cosine of its hidden activation and of its output to BASE's. docs/results.md "Session 19" used it on v12 and a
continuation that broke every soup it was in.

    python scripts/soup_probe.py --base models/shapes-sprint --other runs/s18/c/export [--work runs/soup_probe]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from weight_average import WEIGHTS, average

GROUPS = {
    "none": lambda k: False,
    "all": lambda k: True,
    "time_embed.timestep_embedder.linear_1": lambda k: k.startswith("time_embed.timestep_embedder.linear_1"),
    "time_embed.timestep_embedder.linear_2": lambda k: k.startswith("time_embed.timestep_embedder.linear_2"),
    "time_embed.guidance_embedder": lambda k: k.startswith("time_embed.guidance_embedder"),
    "time_embed.linear": lambda k: k.startswith("time_embed.linear"),
    "caption": lambda k: k.startswith("caption"),
    "patch_embed / proj_out / scale_shift_table": lambda k: k.startswith(("patch_embed", "proj_out", "scale_shift")),
    "blocks: attn1": lambda k: ".attn1." in k,
    "blocks: attn2": lambda k: ".attn2." in k,
    "blocks: ff": lambda k: ".ff." in k,
}


def mix(base: dict, mid: dict, pick) -> dict:
    """BASE with the tensors PICK selects taken from MID (the midpoint, weight_average.average([base, other]))."""
    return {k: mid[k] if pick(k) else v for k, v in base.items()}


def sample(pipe, prompt: str, num: int) -> tuple[list, dict]:
    """NUM 1-step images, and the call's timestep-embedder hidden activation and time-embedding output (hooks)."""
    got = {}

    def keep(key):
        def hook(module, inputs, output):  # returns None: the call's output is left alone
            got[key] = inputs[0][:1].detach().float().clone()  # t and w are the same for every image
        return hook

    te = pipe.transformer.time_embed
    hooks = [te.timestep_embedder.linear_2.register_forward_hook(keep("hidden")), te.linear.register_forward_hook(keep("output"))]
    with torch.no_grad():
        images = pipe(prompt, steps=1, seed=0, num_images_per_prompt=num).images
    for h in hooks:
        h.remove()
    return images, got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="student folder (its copy receives the mixed weights)")
    ap.add_argument("--other", required=True, help="student folder with the same parameters")
    ap.add_argument("--prompt", default="a red circle above a blue square")
    ap.add_argument("--num", type=int, default=4, help="images per group (default 4)")
    ap.add_argument("--work", default="runs/soup_probe", help="scratch folder (replaced)")
    args = ap.parse_args(argv)
    try:
        base, other = load_file(str(Path(args.base) / WEIGHTS)), load_file(str(Path(args.other) / WEIGHTS))
    except FileNotFoundError as e:
        print(f"error: no transformer weights: {e}", file=sys.stderr)
        return 2
    try:
        mid = average([base, other])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sana_sprint.pipeline import SprintPipeline

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(args.base, work)
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))  # noqa: E731
    print(f"{'midpoint on':45s} pixel std")
    emb = {}
    for name, pick in GROUPS.items():
        save_file(mix(base, mid, pick), str(work / WEIGHTS))
        images, emb[name] = sample(SprintPipeline.from_pretrained(str(work), device="cpu"), args.prompt, args.num)
        std = float(np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in images]).std())
        print(f"{name:45s} {std:6.1f}", flush=True)
    save_file(other, str(work / WEIGHTS))
    emb["other"] = sample(SprintPipeline.from_pretrained(str(work), device="cpu"), args.prompt, 1)[1]
    for name in ("other", "all"):
        print(f"time embedding at t = pi/2, {'OTHER' if name == 'other' else 'midpoint'} vs BASE: cosine hidden "
              f"{cos(emb[name]['hidden'], emb['none']['hidden']):.3f}, output {cos(emb[name]['output'], emb['none']['output']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
