"""Multistep consistency sampling (sCM / SANA-Sprint; DESIGN.md section 7)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..trigflow import SIGMA_DATA, consistency_fn, trigflow_noise
from .noise import Generators, randn


def consistency(
    F_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_init: torch.Tensor,
    s_schedule: Sequence[float] | torch.Tensor,
    generators: Generators = None,
    sigma_data: float = SIGMA_DATA,
    return_all: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Denoise to x0 at each time s_0 > ... > s_{N-1}, re-noising to the next time in between.

    ``x_init`` = sd * randn, the state at s_0; ``s_schedule`` has N + 1 entries ending in 0 (N model
    calls). ``F_fn(x_s / sd, s_batch[B]) -> F``. Returns x0 in training space (std sd), or with
    ``return_all`` the list of the N per-step x0 predictions (the last is the sample).

    Noise is drawn after every step, the last one included (where sin(0) = 0 cancels it), exactly as
    diffusers' ``SCMScheduler.step``: the same generators then give the same images as
    ``SanaSprintPipeline``, and image i depends only on generator i.
    """
    latents = x_init.float() if x_init.dtype in (torch.float16, torch.bfloat16) else x_init
    dtype = torch.float64 if latents.dtype == torch.float64 else torch.float32
    ss = torch.as_tensor(s_schedule, dtype=torch.float64).to(device=latents.device, dtype=dtype)
    b = latents.shape[0]
    x0s = []
    for i in range(len(ss) - 1):
        F = F_fn(latents / sigma_data, ss[i].expand(b)).to(latents.dtype)
        x0 = consistency_fn(latents, F, ss[i].expand(b), sigma_data)  # x0 = cos(s) x_s - sin(s) sd F
        noise = randn(latents.shape, generators, device=latents.device) * sigma_data
        latents = trigflow_noise(x0, noise.to(latents.dtype), ss[i + 1].expand(b))  # cos(s') x0 + sin(s') z
        x0s.append(x0)
    return x0s if return_all else x0s[-1]
