"""Classifier-free guidance as callable combinators (the sampler never knows about conditions)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Fn = Callable[..., torch.Tensor]


def _per_sample(w: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(w, torch.Tensor) and w.ndim == 1:
        return w.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return w


def cfg(fn_cond: Fn, fn_uncond: Fn, w: torch.Tensor | float) -> Fn:
    """Guided prediction u + w (c - u) (Ho & Salimans); ``w`` is a scalar or per-sample [B]."""

    def guided(x: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        c = fn_cond(x, t, *args, **kwargs)
        u = fn_uncond(x, t, *args, **kwargs)
        return u + _per_sample(w, c) * (c - u)

    return guided


def _cat(a, b):
    if a is None:
        return None
    if isinstance(a, tuple | list):
        return type(a)(_cat(x, y) for x, y in zip(a, b))
    return torch.cat([a, b], dim=0)


def cfg_batched(fn: Callable, cond, uncond, w: torch.Tensor | float) -> Fn:
    """u + w (c - u) in one call of ``fn(x, t, condition)`` on a doubled batch [cond; uncond].

    ``cond`` / ``uncond`` are tensors with a leading batch dim, or tuples of them (e.g. embeds, mask),
    concatenated element-wise; ``None`` entries stay ``None``.
    """
    both = _cat(cond, uncond)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t2 = torch.cat([t, t], dim=0) if isinstance(t, torch.Tensor) and t.ndim == 1 else t
        out = fn(torch.cat([x, x], dim=0), t2, both)
        c, u = out[:b], out[b:]
        return u + _per_sample(w, c) * (c - u)

    return guided
