"""Deterministic ODE samplers: flow-matching Euler and TrigFlow Euler (stateless, k-diffusion style)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..trigflow import SIGMA_DATA


def _state(x: torch.Tensor) -> torch.Tensor:
    """Integrate in float32 at least (half-precision accumulation drifts over many steps)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _times(schedule: Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.as_tensor(schedule, dtype=torch.float64).to(device=x.device, dtype=dtype)


def _progress(n: int, enabled: bool):
    if not enabled:
        return range(n)
    from tqdm.auto import trange

    return trange(n)


def flow_euler(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    t_schedule: Sequence[float] | torch.Tensor,
    progress: bool = False,
) -> torch.Tensor:
    """Solve dx/dt = v(x, t) from t_0 (= 1, noise) to t_N (= 0) in unit-std flow space.

    ``velocity_fn(x, t_batch[B]) -> v``. Returns x at ``t_schedule[-1]`` (float32 or float64).
    """
    x = _state(x_T)
    ts = _times(t_schedule, x)
    for i in _progress(len(ts) - 1, progress):
        v = velocity_fn(x, ts[i].expand(x.shape[0]))
        x = x + (ts[i + 1] - ts[i]) * v.to(x.dtype)  # x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)
    return x


def trigflow_euler(
    F_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_init: torch.Tensor,
    s_schedule: Sequence[float] | torch.Tensor,
    sigma_data: float = SIGMA_DATA,
    progress: bool = False,
) -> torch.Tensor:
    """Solve the TrigFlow PF-ODE dx_s/ds = sd F(x_s/sd, s) from s_0 (= pi/2) to s_N (= 0).

    ``x_init`` = sd * randn at s_0; ``F_fn(x_s / sd, s_batch[B]) -> F``. Returns x at ``s_schedule[-1]``
    in training space (data std sd).
    """
    x = _state(x_init)
    ss = _times(s_schedule, x)
    for i in _progress(len(ss) - 1, progress):
        F = F_fn(x / sigma_data, ss[i].expand(x.shape[0]))
        x = x + (ss[i + 1] - ss[i]) * sigma_data * F.to(x.dtype)  # x_{i+1} = x_i + (s_{i+1} - s_i) sd F
    return x
