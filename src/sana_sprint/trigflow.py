"""TrigFlow math: pure tensor functions, no networks, no schedules.

Notation (DESIGN.md section 2): ``sd`` = sigma_data, TrigFlow time ``s`` in [0, pi/2], flow time
``t`` in [0, 1]. Training-space data ``x0`` has std ``sd``; noise ``z ~ N(0, sd^2 I)``. A flow model
works in unit-std space: it sees ``x_t = (1 - t) x0/sd + t eps`` and predicts ``v = eps - x0/sd``.

All trigonometry is done in at least float32 (bf16 turns 1.5708 into 1.5703): every function
upcasts half-precision inputs with :func:`_f32`.
"""

from __future__ import annotations

import math

import torch

SIGMA_DATA = 0.5
HALF_PI = math.pi / 2


def _f32(x: torch.Tensor | float) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        return x.float()
    return x


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalar [B] (or scalar) -> shape broadcastable against ``like`` [B, ...]."""
    v = _f32(v).to(like.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def flow_time(s: torch.Tensor) -> torch.Tensor:
    """t = sin s / (sin s + cos s): flow time of TrigFlow time s (Prop. 3.1)."""
    s = _f32(s)
    return torch.sin(s) / (torch.sin(s) + torch.cos(s))


def trig_time(t: torch.Tensor) -> torch.Tensor:
    """s = atan2(t, 1 - t): inverse of :func:`flow_time`."""
    t = _f32(t)
    return torch.atan2(t, 1 - t)


def flow_scale(t: torch.Tensor) -> torch.Tensor:
    """k = sqrt(t^2 + (1-t)^2) = 1 / (sin s + cos s): maps x_s/sd to the flow sample x_t = k x_s/sd."""
    t = _f32(t)
    return torch.sqrt(t**2 + (1 - t) ** 2)


def trigflow_from_flow(x_scaled: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """TrigFlow output F from a flow velocity (Prop. 3.1).

    F = ((1 - 2t) x_fm + (1 - 2t + 2t^2) v) / k   with   x_fm = k * x_scaled,  x_scaled = x_s / sd.
    ``v`` must be the velocity evaluated at (x_fm, t).
    """
    t = _bcast(t, x_scaled)
    k = flow_scale(t)
    x_fm = x_scaled * k
    return ((1 - 2 * t) * x_fm + (1 - 2 * t + 2 * t**2) * v) / k


def flow_from_trigflow(x_scaled: torch.Tensor, F: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`trigflow_from_flow`: v = (k F - (1 - 2t) x_fm) / (1 - 2t + 2t^2)."""
    t = _bcast(t, x_scaled)
    k = flow_scale(t)
    x_fm = x_scaled * k
    return (k * F - (1 - 2 * t) * x_fm) / (1 - 2 * t + 2 * t**2)


def flow_input(x_s: torch.Tensor, s: torch.Tensor, sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fm, t): the flow-model input equivalent to TrigFlow state x_s at time s."""
    t = flow_time(s)
    return (x_s / sigma_data) * _bcast(flow_scale(t), x_s), t


def consistency_fn(x_s: torch.Tensor, F: torch.Tensor, s: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """sCM parameterisation f(x_s, s) = cos(s) x_s - sin(s) sd F: the predicted clean sample x0."""
    s = _bcast(s, x_s)
    return torch.cos(s) * x_s - torch.sin(s) * sigma_data * F


def trigflow_noise(x0: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = cos(s) x0 + sin(s) z (z already has std sd)."""
    s = _bcast(s, x0)
    return torch.cos(s) * x0 + torch.sin(s) * z


def trigflow_target(x0: torch.Tensor, z: torch.Tensor, s: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Ideal F = (dx_s/ds) / sd = (cos(s) z - sin(s) x0) / sd."""
    s = _bcast(s, x0)
    return (torch.cos(s) * z - torch.sin(s) * x0) / sigma_data


def flow_noise(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation x_t = (1 - t) x + t eps."""
    t = _bcast(t, x)
    return (1 - t) * x + t * eps


def flow_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching velocity target v = eps - x."""
    return eps - x


def trigflow_velocity(F: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """dx_s/ds = sd * F."""
    return sigma_data * F
