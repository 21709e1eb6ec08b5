"""``sana-sprint train-teacher``: registered with the CLI group; torch/diffusers load only when it runs."""

from __future__ import annotations

import argparse

from ..cli import command
from .config import TeacherConfig


@command("train-teacher", help="train the flow-matching teacher (dense time, QK-norm) on shapes or an image folder")
def train_teacher_command(parser: argparse.ArgumentParser):
    parser.add_argument("--config", default=None, help="JSON config file (flags override it)")
    parser.add_argument("--dry-run", action="store_true", help="print the final config and exit")
    TeacherConfig.add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from .teacher import run as run_teacher

        return run_teacher(args)

    return run


@command("distill", help="distil a teacher into one 1-4 step student (hybrid sCM + LADD)")
def distill_command(parser: argparse.ArgumentParser):
    from .distill import add_args

    add_args(parser)

    def run(args: argparse.Namespace) -> int:
        from .distill import run as run_distill

        return run_distill(args)

    return run


@command("train-vae", help="train the small shapes-world AutoencoderDC (f8, 16 latent channels)")
def train_vae_command(parser: argparse.ArgumentParser):
    from .vae_config import add_args

    add_args(parser)

    def run(args: argparse.Namespace) -> int:
        from .vae import run as run_vae

        return run_vae(args)

    return run
