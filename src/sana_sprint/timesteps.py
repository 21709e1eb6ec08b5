"""Time distributions for training and time schedules for sampling (pure functions).

Conventions: TrigFlow time s in [0, pi/2] (pi/2 = pure noise); flow time t in [0, 1] (1 = pure noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .trigflow import HALF_PI, SIGMA_DATA, flow_time, trig_time

# sCM generator times: tau ~ N(P_mean, P_std^2), s = arctan(exp(tau) / sd). Official SANA-Sprint values.
SCM_P_MEAN = 0.2
SCM_P_STD = 1.6
# LADD discriminator re-noising times: same map with N(-0.6, 1.0).
LADD_P_MEAN = -0.6
LADD_P_STD = 1.0

# Default consistency-sampling schedules (DESIGN.md section 7); a model folder may override them.
DEFAULT_SCHEDULES: dict[int, list[float]] = {
    1: [HALF_PI, 0.0],
    2: [HALF_PI, 1.3, 0.0],
    3: [HALF_PI, 1.3, 1.0, 0.0],
    4: [HALF_PI, 1.3, 1.1, 0.6, 0.0],
}


def lognormal_trig_time(
    n: int,
    p_mean: float = SCM_P_MEAN,
    p_std: float = SCM_P_STD,
    sigma_data: float = SIGMA_DATA,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """s = arctan(exp(tau) / sd), tau ~ N(p_mean, p_std^2): sCM's log-normal-in-sigma proposal, in TrigFlow form."""
    tau = torch.randn(n, generator=generator, dtype=torch.float32) * p_std + p_mean
    return torch.atan(torch.exp(tau) / sigma_data).to(device or "cpu")


def with_max_time(
    s: torch.Tensor, prob: float, generator: torch.Generator | None = None, max_time: float = HALF_PI
) -> torch.Tensor:
    """Max-time weighting (paper Tab. 6): each sample's time is replaced by pi/2 with probability ``prob``."""
    if prob <= 0:
        return s
    u = torch.rand(s.shape[0], generator=generator, dtype=torch.float32).to(s.device)
    return torch.where(u < prob, torch.full_like(s, max_time), s)


def logit_normal_flow_time(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flow-matching training time t = sigmoid(N(mean, std^2)) (SD3 / SANA logit-normal)."""
    u = torch.randn(n, generator=generator, dtype=torch.float32) * std + mean
    return torch.sigmoid(u).to(device or "cpu")


def shift_flow_time(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SANA/SD3 time shift: t' = shift t / (1 + (shift - 1) t). shift > 1 spends more steps at high noise."""
    t = torch.as_tensor(t, dtype=torch.float64 if not isinstance(t, torch.Tensor) else None)
    return shift * t / (1 + (shift - 1) * t)


def flow_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 flow times from 1 to 0 (linear in t before the shift), float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_flow_time(t, shift)


def trig_schedule(steps: int, s_max: float = HALF_PI) -> torch.Tensor:
    """steps + 1 TrigFlow times, uniformly spaced in flow time t (equivalently a flow Euler grid), float64."""
    t = flow_schedule(steps)
    s = torch.atan2(t, 1 - t)
    s[0] = min(s_max, float(s[0]))
    return s


def repair_schedule(start: float, steps: int) -> list[float]:
    """TrigFlow times [start > ... > 0] for ``steps`` flow Euler steps uniform in flow time from flow_time(start)
    down to 0 (a teacher's repair of a re-noised image; scripts/teacher_pairs.py, distill's refine_teacher_steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigma = float(flow_time(torch.tensor(start, dtype=torch.float64)))
    ts = [float(x) for x in trig_time(torch.linspace(sigma, 0.0, steps + 1, dtype=torch.float64))]
    ts[0] = float(start)
    return ts


def consistency_schedule(
    steps: int, timesteps: Sequence[float] | None = None, defaults: dict[int, list[float]] | None = None
) -> list[float]:
    """Times [s_0 > s_1 > ... > s_N = 0] for N-step consistency sampling.

    ``timesteps`` may be given with or without the final 0 (N or N+1 values). Otherwise the model's
    ``defaults`` (per step count) are used, then :data:`DEFAULT_SCHEDULES`, then linspace(pi/2, 0).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if timesteps is not None:
        ts = [float(x) for x in timesteps]
        if len(ts) == steps:
            ts = ts + [0.0]
        if len(ts) != steps + 1:
            raise ValueError(f"{steps} steps need {steps} timesteps (or {steps + 1} ending in 0), got {len(ts)}")
        validate_timesteps(ts)
        return ts
    for table in (defaults or {}, DEFAULT_SCHEDULES):
        key_table = {int(k): v for k, v in table.items()}
        if steps in key_table:
            return [float(x) for x in key_table[steps]]
    return [HALF_PI * (1 - i / steps) for i in range(steps + 1)]


# Slack above pi/2 so that the rounded 1.5708 (diffusers' SCMScheduler default max time) is accepted.
_MAX_TIME_SLACK = 1e-5


def validate_timesteps(ts: Sequence[float]) -> None:
    """Raise ValueError unless times are strictly decreasing, inside (0, pi/2], and end at 0."""
    if abs(ts[-1]) > 0:
        raise ValueError(f"the last timestep must be 0, got {ts[-1]}")
    for x in ts[:-1]:
        if not (0 < x <= HALF_PI + _MAX_TIME_SLACK) or not math.isfinite(x):
            raise ValueError(f"timestep {x} is outside (0, pi/2]")
    for a, b in zip(ts[:-1], ts[1:]):
        if not a > b:
            raise ValueError(f"timesteps must be strictly decreasing, got {list(ts)}")
