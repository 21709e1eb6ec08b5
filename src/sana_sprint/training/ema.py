"""Exponential moving average of a module's weights (Polyak averaging), kept in fp32."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``shadow <- decay * shadow + (1 - decay) * param`` after every successful optimiser step.

    The shadow is a frozen deep copy of the module (so it can be sampled from or exported as is);
    being an ``nn.Module``, it is checkpointed like any other state module. Buffers are copied, not
    averaged. ``decay`` is fixed: with a constant parameter p and start s0, after n updates the shadow
    is ``decay^n s0 + (1 - decay^n) p`` (tests check this closed form).

    ``warmup=True`` uses ``min(decay, (1 + n) / (10 + n))`` for update n (n = 0, 1, ...), the usual
    warm-up: short runs are not dominated by the starting weights. This matters for modules that start
    at an exact no-op (a ControlNet's zero projections): with a fixed 0.999, after 700 steps the shadow
    still holds ``0.999^700 = 50 %`` of the zero start, so the exported ControlNet acts at half strength.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = False):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.shadow = copy.deepcopy(module).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        if not self.warmup:
            return self.decay
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        src = dict(module.named_parameters())
        ema_p, cur_p = [], []
        for name, p in self.shadow.named_parameters():
            ema_p.append(p)
            cur_p.append(src[name].detach().to(p.dtype))
        # lerp: s + (1 - decay) (p - s) == decay s + (1 - decay) p
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)
        src_b = dict(module.named_buffers())
        for name, b in self.shadow.named_buffers():
            b.copy_(src_b[name])
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
