"""Train the small latent autoencoder (diffusers ``AutoencoderDC``) on the shapes world.

f8 on 64x64 images -> 8x8x16 latents. Loss = L1 + MSE + a light edge (finite-difference) term.
Data: a bank of world renders that is partly refreshed with never-seen samples every step, so the
stream is effectively infinite while rendering (~5 ms/image on CPU) stays off the critical path.
The bank is a pure function of (seed, step), so a resumed run re-renders it instead of storing it.

Run dir layout: ``config.json`` (the config used), ``checkpoint.pt`` (atomic, resumable),
``losses.jsonl``, ``loss.png``, ``recon.png`` and the exported diffusers folder ``vae/`` (fp16,
``scaling_factor`` = 1 / std of latents measured on held-out renders).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana_sprint.data.shapes import ShapesWorld

# The config, presets and flags live in a torch-free module (``sana-sprint train-vae --help`` stays light).
from .vae_config import PRESETS, SHAPES_VAE, TINY_VAE, VAETrainConfig, add_args, config_from_args  # noqa: F401


def build_vae(cfg: VAETrainConfig):
    from diffusers import AutoencoderDC

    return AutoencoderDC(**cfg.vae_kwargs())


# ----------------------------------------------------------------------------- pure math
def foreground_weights(target: torch.Tensor, fg_weight: float, threshold: float = 0.05) -> torch.Tensor:
    """[B, 1, H, W] = 1 + fg_weight on pixels within 1 px of an object, else 1.

    The background is flat, so a pixel is foreground when it differs from the top-left corner
    (the world keeps objects off the border) by more than ``threshold`` in some channel.
    Small objects cover few pixels; without this their shape (circle vs rounded square) barely
    moves a per-pixel mean loss.
    """
    bg = target[:, :, :1, :1]
    fg = ((target - bg).abs().amax(1, keepdim=True) > threshold).float()
    fg = F.max_pool2d(fg, 3, stride=1, padding=1)
    return 1.0 + fg_weight * fg


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0,
                        mse_weight: float = 1.0, edge_weight: float = 0.0,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L1 + MSE + edge loss; the edge term is L1 between horizontal/vertical finite differences,
    which penalises blurred shape boundaries more than flat-area errors do. ``weights`` (broadcast
    to the image, e.g. ``foreground_weights``) reweights L1 and MSE per pixel, normalised by its mean."""
    recon, target = recon.float(), target.float()
    w = torch.ones_like(target[:, :1]) if weights is None else weights.expand_as(target[:, :1])
    w = w / w.mean()
    l1 = ((recon - target).abs() * w).mean()
    mse = ((recon - target).square() * w).mean()
    loss = l1_weight * l1 + mse_weight * mse
    terms = {"l1": l1.item(), "mse": mse.item()}
    if edge_weight > 0:
        dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
        dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
        edge = (dx(recon) - dx(target)).abs().mean() + (dy(recon) - dy(target)).abs().mean()
        loss = loss + edge_weight * edge
        terms["edge"] = edge.item()
    terms["loss"] = loss.item()
    return loss, terms


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE)."""
    mse = (recon.float().clamp(-1, 1) - target.float()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std over all latent values (float64), so ``z * factor`` has unit std."""
    return float(1.0 / latents.double().std())


def ema_decay_at(step: int, cfg: VAETrainConfig) -> float:
    """EMA decay ramped as (1 + step) / (10 + step) up to ``cfg.ema_decay``: a fixed 0.999 over a
    ~1k-step run keeps too much of the early weights (measured: 27.7 dB EMA vs 33.5 dB raw)."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def lr_at(step: int, cfg: VAETrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------- data
def render_images(world: ShapesWorld, seed: int, indices) -> torch.Tensor:
    """World renders as float [N, 3, H, W] in [-1, 1]."""
    arr = np.stack([world.sample(seed, int(i)).image for i in indices])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class ImageBank:
    """Fixed-size pool of world renders; ``refresh`` slots get never-seen world indices each step.

    State = (slot -> world index, next index, generator), so it can be rebuilt exactly on resume.
    """

    def __init__(self, world: ShapesWorld, seed: int, size: int, refresh: int, generator: torch.Generator):
        self.world, self.seed, self.refresh, self.gen = world, seed, refresh, generator
        self.indices = torch.arange(size)
        self.next_index = size
        self.images = render_images(world, seed, self.indices.tolist())

    def state_dict(self) -> dict:
        return {"indices": self.indices.clone(), "next_index": self.next_index, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.indices = state["indices"].clone()
        self.next_index = int(state["next_index"])
        self.gen.set_state(state["gen"])
        self.images = render_images(self.world, self.seed, self.indices.tolist())

    def batch(self, n: int) -> torch.Tensor:
        if self.refresh:
            slots = torch.randperm(len(self.indices), generator=self.gen)[: self.refresh]
            new = torch.arange(self.next_index, self.next_index + len(slots))
            self.images[slots] = render_images(self.world, self.seed, new.tolist())
            self.indices[slots] = new
            self.next_index += len(slots)
        pick = torch.randperm(len(self.indices), generator=self.gen)[:n]
        x = self.images[pick]
        # Horizontal flips keep the world's conventions (triangles point up).
        flip = torch.rand(n, generator=self.gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------- checkpoints
def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 128, bf16: bool = False) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(vae.encode(images[i:i + batch]).latent.float())
    return torch.cat(out)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 128, bf16: bool = False) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = vae.encode(images[i:i + batch]).latent
            out.append(vae.decode(z).sample.float().clamp(-1, 1))
    return torch.cat(out)


def measure_scaling_factor(vae, images: torch.Tensor, batch: int = 128) -> float:
    return latent_scaling_factor(encode_latents(vae, images, batch))


# ----------------------------------------------------------------------------- plots
def save_recon_grid(path: Path, images: torch.Tensor, recon: torch.Tensor, n: int = 16) -> None:
    """Two rows per group: originals above reconstructions."""
    from PIL import Image

    n = min(n, len(images))
    cols = 8
    rows = []
    for s in range(0, n, cols):
        for t in (images[s:s + cols], recon[s:s + cols]):
            t = torch.cat([t, torch.ones(cols - len(t), *t.shape[1:])]) if len(t) < cols else t
            rows.append(torch.cat(list(t), dim=2))
    grid = torch.cat(rows, dim=1)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


def save_loss_plot(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "l1", "mse", "edge"):
        if key in history[0]:
            ax[0].plot(steps, [h[key] for h in history], label=key)
    ax[0].set_yscale("log"), ax[0].set_xlabel("step"), ax[0].legend()
    ax[1].plot(steps, [h["psnr"] for h in history], label="train-batch PSNR (dB)")
    ax[1].axhline(30.0, color="k", ls="--", lw=0.8)
    ax[1].set_xlabel("step"), ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- training
def _save_state(path: Path, step: int, model, ema, opt, bank: ImageBank, history: list, cfg) -> None:
    atomic_torch_save({
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "bank": bank.state_dict(),
        "history": history,
        "config": dataclasses.asdict(cfg),
        "torch_rng": torch.get_rng_state(),
    }, path)


def load_vae_weights(path) -> dict:
    """fp32 state dict from a run's ``checkpoint.pt`` (raw weights) or a diffusers folder."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)["model"]
    from diffusers import AutoencoderDC

    return {k: v.float() for k, v in AutoencoderDC.from_pretrained(path).state_dict().items()}


def export_vae(vae, out: Path, scaling_factor: float) -> Path:
    """Save as a diffusers folder in fp16 safetensors, with the measured ``scaling_factor``."""
    vae = copy.deepcopy(vae).to(torch.float16)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    vae.save_pretrained(out, safe_serialization=True)
    return Path(out)


def train_vae(cfg: VAETrainConfig, out_dir, resume: bool = False, progress: bool = True,
              export: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) and export ``out_dir/vae``. Returns a summary dict.

    ``stop_after`` ends this session at that step with a checkpoint (the schedule still follows
    ``cfg.steps``), as if the run had been interrupted.
    """
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    model = build_vae(cfg)
    if cfg.init_from:
        model.load_state_dict(load_vae_weights(cfg.init_from))
    if cfg.freeze_encoder:
        model.encoder.requires_grad_(False)
    ema = copy.deepcopy(model).requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    world = ShapesWorld(cfg.size)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        bank = ImageBank.__new__(ImageBank)
        bank.world, bank.seed, bank.refresh, bank.gen = world, cfg.seed, cfg.refresh, gen
        bank.load_state_dict(state["bank"])
    else:
        bank = ImageBank(world, cfg.seed, cfg.bank_size, cfg.refresh, gen)
    (out / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg),
                                                 "vae": cfg.vae_kwargs()}, indent=2, default=list))

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, dynamic_ncols=True, mininterval=5)
    log = open(out / "losses.jsonl", "a")
    t0, acc = time.time(), []
    sec_before = history[-1]["sec"] if history else 0.0  # wall time of earlier sessions
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    while step < end:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x = bank.batch(cfg.batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            with torch.set_grad_enabled(not cfg.freeze_encoder):
                z = model.encode(x).latent
            recon = model.decode(z).sample
        weights = foreground_weights(x, cfg.fg_weight) if cfg.fg_weight > 0 else None
        loss, terms = reconstruction_loss(recon, x, cfg.l1_weight, cfg.mse_weight, cfg.edge_weight, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        ema_update(ema, model, ema_decay_at(step, cfg))
        step += 1
        terms["psnr"] = psnr(recon.detach(), x).mean().item()
        acc.append(terms)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {k: float(np.mean([a[k] for a in acc])) for k in acc[0]}
            row.update(step=step, lr=lr_at(step - 1, cfg), sec=sec_before + time.time() - t0)
            history.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            acc = []
            bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.2f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save_state(ckpt_path, step, model, ema, opt, bank, history, cfg)
            save_loss_plot(out / "loss.png", history)
    bar.close()
    log.close()
    summary = {"steps": step, "train_sec_this_session": time.time() - t0,
               "train_sec_total": history[-1]["sec"] if history else 0.0}
    if step < cfg.steps:
        _save_state(ckpt_path, step, model, ema, opt, bank, history, cfg)
        return summary

    # Export whichever of raw / EMA weights reconstructs better on renders from scale_seed
    # (not training data; the held-out evaluation in scripts/eval_vae.py uses yet another seed).
    held = render_images(world, cfg.scale_seed, range(min(cfg.scale_images, 256)))
    candidates = {"ema": ema.eval(), "raw": model.eval()}
    scores = {k: float(psnr(reconstruct(m, held), held).mean()) for k, m in candidates.items()}
    best = max(scores, key=scores.get)
    summary.update(selection_psnr=scores, exported_weights=best)
    rec = reconstruct(candidates[best], held)
    save_recon_grid(out / "recon.png", held, rec, n=32)
    if export:
        scale_imgs = render_images(world, cfg.scale_seed, range(cfg.scale_images))
        summary["scaling_factor"] = measure_scaling_factor(candidates[best], scale_imgs)
        export_vae(candidates[best], out / "vae", summary["scaling_factor"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(args) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        print(json.dumps({"train": dataclasses.asdict(cfg), "vae": cfg.vae_kwargs()}, indent=2, default=list))
        return 0
    summary = train_vae(cfg, args.out, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sana-sprint train-vae", description=__doc__.splitlines()[0])
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
