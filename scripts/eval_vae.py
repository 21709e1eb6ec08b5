"""Measure the shapes VAE: PSNR on held-out world renders and ShapesEval of its reconstructions.

    python scripts/eval_vae.py --vae models/shapes-vae --n 1000 --out runs/vae/eval.json

Targets (issue 3): PSNR >= 30 dB on 1,000 held-out images (world seed disjoint from training),
and ShapesEval(reconstructions of the suite's ground truth) within 0.01 of ShapesEval(ground truth).
The folder's fp16 weights are loaded into fp32 modules (diffusers' default), as pipelines use them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HELDOUT_SEED = 9001  # training uses seed 0, the scaling factor seed 777


def to_unit(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", default="models/shapes-vae")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=HELDOUT_SEED)
    p.add_argument("--suite-limit", type=int, default=None, help="score only the first K suite prompts")
    p.add_argument("--no-fd", action="store_true", help="skip FD_shapes(recon, GT)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import AutoencoderDC

    from sana_sprint.evaluation.fd import world_images
    from sana_sprint.training.vae import psnr, reconstruct

    t0 = time.time()
    vae = AutoencoderDC.from_pretrained(args.vae).float().eval()
    n_params = sum(p.numel() for p in vae.parameters())
    weights = Path(args.vae) / "diffusion_pytorch_model.safetensors"
    res = {"vae": str(args.vae), "params": n_params, "weights_bytes": weights.stat().st_size,
           "scaling_factor": vae.config.scaling_factor, "n": args.n, "seed": args.seed}

    gt = world_images(args.n, args.seed)
    x = to_unit(gt)
    rec = reconstruct(vae, x)
    res["psnr_db"] = float(psnr(rec, x).mean())
    rec_u8 = to_u8(rec)
    res["psnr_db_uint8"] = float(psnr(to_unit(rec_u8), x).mean())  # as saved as PNG
    res["psnr_db_min"] = float(psnr(rec, x).min())
    with torch.no_grad():
        z = vae.encode(x[:500]).latent
    res["scaled_latent_std"] = float((z * vae.config.scaling_factor).std())

    if not args.no_fd:
        try:
            from sana_sprint.evaluation.fd import fd_shapes

            # paired: the same scenes (isolates reconstruction error); unpaired: against another real
            # set, to compare with the real-vs-real floor at this n
            other = world_images(args.n, args.seed + 1)
            res["fd_shapes_recon_vs_own_gt"] = fd_shapes(rec_u8, gt)
            res["fd_shapes_recon_vs_other_gt"] = fd_shapes(rec_u8, other)
            res["fd_shapes_gt_vs_other_gt"] = fd_shapes(gt, other)
        except FileNotFoundError as e:
            res["fd_shapes_recon_vs_own_gt"] = None
            print(f"FD skipped: {e}", file=sys.stderr)

    from sana_sprint.evaluation.suite import load_suite, render_ground_truth, score_images

    suite = load_suite()[: args.suite_limit]
    gt_suite = np.stack([render_ground_truth(r) for r in suite])
    rec_suite = to_u8(reconstruct(vae, to_unit(gt_suite)))
    s_gt = score_images(zip(suite, gt_suite))
    s_rec = score_images(zip(suite, rec_suite))
    res["shapes_eval_gt"] = s_gt
    res["shapes_eval_recon"] = s_rec
    res["shapes_eval_gap"] = float(s_gt["overall"] - s_rec["overall"])
    res["targets"] = {"psnr>=30": res["psnr_db"] >= 30.0, "shapes_eval_gap<=0.01": abs(res["shapes_eval_gap"]) <= 0.01}
    res["sec"] = time.time() - t0
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
