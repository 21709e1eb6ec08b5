"""Train the FD_shapes feature network (src/sana_sprint/evaluation/fd.py) on the shapes world.

Targets, read from each scene's object list: per class x colour counts (regression), where objects
of each class / colour are (presence of a centre in each cell of a 4x4 grid, multi-label) and the
summed object size per class (regression). The 128-d layer feeding these heads becomes the FD
feature space, so it encodes counts, colours, shapes, positions and sizes.

    python scripts/train_fd_net.py --out runs/fd --steps 2500 --batch 32 --export models/shapes-fd

``--degrade P`` (experimental, not used for the shipped net) also blurs/noises a fraction P of
each batch and adds a head regressing the level, to make the features register image quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana_sprint.data.shapes import CLASSES, COLORS, ShapesWorld
from sana_sprint.evaluation.fd import ShapesFeatureNet, save_feature_net

GRID = 4
N_COUNT = len(CLASSES) * len(COLORS)
N_CLS_GRID = len(CLASSES) * GRID * GRID
N_COL_GRID = len(COLORS) * GRID * GRID
N_SIZE = len(CLASSES)
NUM_OUTPUTS = N_COUNT + N_CLS_GRID + N_COL_GRID + N_SIZE
TRAIN_SEED, VAL_SEED = 1001, 1002
# Optional degradation head: part of each batch is blurred or noised and the net regresses the
# level, so the FD features also register image quality, not only scene content.
MAX_BLUR, MAX_NOISE = 3.0, 0.4  # Gaussian sigma in px; noise std in [-1, 1] units
N_DEGRADE = 2


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of float [B, C, H, W]; sigma [B] in px (0 = identity)."""
    r = int(np.ceil(3 * MAX_BLUR))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # sigma -> 0 gives a delta kernel
    b, c, h, w = x.shape
    kk = k.repeat_interleave(c, 0)  # [B*C, K]
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, kk[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x_u8: torch.Tensor, frac: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blur or noise a random ``frac`` of the batch (half each); returns uint8 images and the
    [B, 2] targets (blur sigma / MAX_BLUR, noise std / MAX_NOISE), zero for clean images."""
    b = len(x_u8)
    x = x_u8.float() / 127.5 - 1
    u = torch.rand(b, generator=gen)
    level = torch.rand(b, generator=gen)
    blur = u < frac / 2
    noise = (u >= frac / 2) & (u < frac)
    tgt = torch.zeros(b, N_DEGRADE)
    if blur.any():
        x[blur] = gaussian_blur(x[blur], level[blur] * MAX_BLUR)
        tgt[blur, 0] = level[blur]
    if noise.any():
        x[noise] = x[noise] + torch.randn(x[noise].shape, generator=gen) * (level[noise] * MAX_NOISE)[:, None, None, None]
        tgt[noise, 1] = level[noise]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), tgt


def scene_targets(objects: list[dict]) -> np.ndarray:
    """[NUM_OUTPUTS] float32: counts | class grid | colour grid | size per class."""
    counts = np.zeros((len(CLASSES), len(COLORS)), np.float32)
    cls_grid = np.zeros((len(CLASSES), GRID, GRID), np.float32)
    col_grid = np.zeros((len(COLORS), GRID, GRID), np.float32)
    sizes = np.zeros(len(CLASSES), np.float32)
    for o in objects:
        c, k = CLASSES.index(o["class"]), COLORS.index(o["color"])
        gx, gy = min(int(o["cx"] * GRID), GRID - 1), min(int(o["cy"] * GRID), GRID - 1)
        counts[c, k] += 1
        cls_grid[c, gy, gx] = 1
        col_grid[k, gy, gx] = 1
        sizes[c] += o["size"] * 4  # sizes are ~0.16-0.45: scale to ~1
    return np.concatenate([counts.ravel(), cls_grid.ravel(), col_grid.ravel(), sizes])


def render(world: ShapesWorld, seed: int, indices) -> tuple[torch.Tensor, torch.Tensor]:
    imgs, tgts = [], []
    for i in indices:
        s = world.sample(seed, int(i))
        imgs.append(s.image)
        tgts.append(scene_targets(s.objects))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(tgts))


def loss_fn(pred: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, dict]:
    a, c = N_COUNT, N_COUNT + N_CLS_GRID + N_COL_GRID
    count = F.mse_loss(pred[:, :a], tgt[:, :a])
    grid = F.binary_cross_entropy_with_logits(pred[:, a:c], tgt[:, a:c]) * 10  # sparse labels
    size = F.mse_loss(pred[:, c:NUM_OUTPUTS], tgt[:, c:NUM_OUTPUTS])
    loss = 5 * count + grid + size
    terms = {"count": count.item(), "grid": grid.item(), "size": size.item()}
    if pred.shape[1] > NUM_OUTPUTS:
        deg = F.mse_loss(pred[:, NUM_OUTPUTS:], tgt[:, NUM_OUTPUTS:])
        loss = loss + 5 * deg
        terms["degrade"] = deg.item()
    return loss, terms


@torch.no_grad()
def validate(net: ShapesFeatureNet, x: torch.Tensor, t: torch.Tensor) -> dict:
    pred = torch.cat([net.heads(net(x[i:i + 250])) for i in range(0, len(x), 250)])
    a, c = N_COUNT, N_COUNT + N_CLS_GRID + N_COL_GRID
    counts_exact = (pred[:, :a].round() == t[:, :a]).all(1).float().mean().item()
    count_mae = (pred[:, :a] - t[:, :a]).abs().mean().item()
    count_total_exact = (pred[:, :a].sum(1).round() == t[:, :a].sum(1)).float().mean().item()
    grid_acc = ((pred[:, a:c] > 0).float() == t[:, a:c]).all(1).float().mean().item()
    size_mae = (pred[:, c:NUM_OUTPUTS] - t[:, c:NUM_OUTPUTS]).abs().mean().item() / 4
    return {"counts_exact": counts_exact, "count_mae": count_mae, "total_count_exact": count_total_exact, "grids_exact": grid_acc, "size_mae": size_mae}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fd")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bank", type=int, default=6000, help="pool of renders, partly refreshed each step")
    p.add_argument("--refresh", type=int, default=8)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--degrade", type=float, default=0.0,
                   help="fraction of each batch blurred/noised, with a head regressing the level")
    p.add_argument("--export", default=None, help="also write the net here (e.g. models/shapes-fd)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(vars(args), indent=2))
    world = ShapesWorld(64)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    bank_x, bank_t = render(world, TRAIN_SEED, range(args.bank))
    val_x, val_t = render(world, VAL_SEED, range(args.val))
    next_index = args.bank
    print(f"rendered {args.bank + args.val} images in {time.time() - t0:.0f}s", flush=True)

    net = ShapesFeatureNet(num_outputs=NUM_OUTPUTS + (N_DEGRADE if args.degrade > 0 else 0))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine to 2%
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / args.steps)))))
    hist = []
    from tqdm import tqdm

    bar = tqdm(range(args.steps), mininterval=10, dynamic_ncols=True)
    for step in bar:
        slots = torch.randperm(args.bank, generator=gen)[: args.refresh]
        bank_x[slots], bank_t[slots] = render(world, TRAIN_SEED, range(next_index, next_index + len(slots)))
        next_index += len(slots)
        pick = torch.randperm(args.bank, generator=gen)[: args.batch]
        x, t = bank_x[pick], bank_t[pick]
        if args.degrade > 0:
            x, dt = degrade(x, args.degrade, gen)
            t = torch.cat([t, dt], 1)
        loss, terms = loss_fn(net.heads(net(x)), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            hist.append({"step": step + 1, "loss": loss.item(), **terms})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    metrics = validate(net, val_x, val_t)
    metrics["train_sec"] = time.time() - t0
    print(json.dumps(metrics), flush=True)
    (out / "history.json").write_text(json.dumps(hist))
    extra = {"targets": "counts[class,colour] | class 4x4 grid | colour 4x4 grid | size per class",
             "train": {**vars(args), "train_seed": TRAIN_SEED, "val_seed": VAL_SEED}, "val": metrics}
    save_feature_net(net, out / "net", extra)
    if args.export:
        save_feature_net(net, args.export, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
