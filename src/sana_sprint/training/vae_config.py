"""Config, presets and command-line flags of ``sana-sprint train-vae`` (:mod:`sana_sprint.training.vae`).

Kept free of torch so that building the command's parser (``sana-sprint train-vae --help``) is fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

# Small DC-AE: f8 (three 2x downsamplings: a pixel-unshuffle stem + 2 stages), 16 latent channels,
# ResBlocks only (8x8 tokens are too few for linear attention to pay for itself). No full-resolution
# blocks (layers_per_block[0] = 0): the stem and the head work at 32x32 with space<->channel moves,
# which halves the CPU cost. Channel ratios are powers of two as DC-AE's shortcuts require; the
# decoder is deeper than the encoder and upsamples by interpolate + conv (4x fewer weights than
# pixel-shuffle convs). ~1.47 M params, ~3 MB in fp16.
SHAPES_VAE = dict(
    in_channels=3,
    latent_channels=16,
    encoder_block_types="ResBlock",
    decoder_block_types="ResBlock",
    encoder_block_out_channels=(24, 48, 96, 96),
    decoder_block_out_channels=(24, 48, 96, 96),
    encoder_layers_per_block=(0, 1, 1, 1),
    decoder_layers_per_block=(0, 2, 2, 3),
    encoder_qkv_multiscales=((), (), (), ()),
    decoder_qkv_multiscales=((), (), (), ()),
    upsample_block_type="interpolate",
)

# Test-sized: 2 stages (f2), a handful of channels.
TINY_VAE = dict(
    in_channels=3,
    latent_channels=4,
    encoder_block_types="ResBlock",
    decoder_block_types="ResBlock",
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    encoder_layers_per_block=(1, 1),
    decoder_layers_per_block=(1, 1),
    encoder_qkv_multiscales=((), ()),
    decoder_qkv_multiscales=((), ()),
)

PRESETS = {"shapes": SHAPES_VAE, "tiny": TINY_VAE}


@dataclass
class VAETrainConfig:
    preset: str = "shapes"
    size: int = 64
    steps: int = 1200
    batch: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * this
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5
    ema_decay: float = 0.999
    # bf16 autocast only pays on CPUs with AVX512-BF16/AMX; on AVX2-only CPUs convs fall back to a
    # slow path (5x slower than fp32), so it is opt-in.
    bf16: bool = False
    seed: int = 0  # world seed for training data
    bank_size: int = 2048
    refresh: int = 8  # fresh world samples swapped into the bank per step
    scale_seed: int = 777  # world seed for the scaling-factor measurement (not training data)
    scale_images: int = 2048
    ckpt_every: int = 250
    log_every: int = 25
    threads: int = 1  # more OpenMP threads than free cores makes convs much slower
    fg_weight: float = 0.0  # extra loss weight on object pixels (see foreground_weights)
    # Decoder fine-tuning (SD's "ft-MSE" recipe): start from a trained VAE and train only the decoder,
    # so the latent space (and every model trained on it) stays valid.
    init_from: str | None = None  # a run's checkpoint.pt or an exported diffusers folder
    freeze_encoder: bool = False
    extra: dict = field(default_factory=dict)  # AutoencoderDC overrides on top of the preset

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch", "bank_size", "size", "ckpt_every", "log_every", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.batch > self.bank_size:
            raise ValueError("batch must not exceed bank_size")
        if self.freeze_encoder and not self.init_from:
            raise ValueError("freeze_encoder needs init_from (a trained encoder)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")

    def vae_kwargs(self) -> dict:
        return {**PRESETS[self.preset], **self.extra}


# ----------------------------------------------------------------------------- CLI glue
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoint, plots, exported vae/)")
    p.add_argument("--steps", type=int, default=VAETrainConfig.steps)
    p.add_argument("--batch", type=int, default=VAETrainConfig.batch)
    p.add_argument("--lr", type=float, default=VAETrainConfig.lr)
    p.add_argument("--preset", choices=sorted(PRESETS), default=VAETrainConfig.preset)
    p.add_argument("--threads", type=int, default=VAETrainConfig.threads)
    p.add_argument("--seed", type=int, default=VAETrainConfig.seed)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on AVX512-BF16/AMX CPUs)")
    p.add_argument("--fg-weight", type=float, default=VAETrainConfig.fg_weight,
                   help="extra loss weight on object pixels")
    p.add_argument("--edge-weight", type=float, default=VAETrainConfig.edge_weight)
    p.add_argument("--warmup", type=int, default=VAETrainConfig.warmup)
    p.add_argument("--init-from", default=None, help="start from a checkpoint.pt or a diffusers VAE folder")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train only the decoder (keeps the latent space of --init-from)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    p.add_argument("--dry-run", action="store_true", help="print the config and exit")


def config_from_args(args) -> VAETrainConfig:
    return VAETrainConfig(preset=args.preset, steps=args.steps, batch=args.batch, lr=args.lr,
                          fg_weight=args.fg_weight, edge_weight=args.edge_weight, warmup=args.warmup,
                          init_from=args.init_from, freeze_encoder=args.freeze_encoder,
                          threads=args.threads, seed=args.seed, bf16=args.bf16)
