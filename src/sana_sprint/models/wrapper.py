"""TrigFlow wrapper around diffusers' ``SanaTransformer2DModel`` (the "preconditioning" layer).

The transformer is a flow-matching velocity model ``v(x_t, t, y)``. This wrapper turns it into the
TrigFlow model ``F(x_s/sd, s, y)`` of SANA-Sprint Prop. 3.1, applying the transform exactly once.
Time is fed densely: the transformer sees ``t * config.timestep_scale`` as a float (1.0 for dense-time
models, 1000 for legacy SANA checkpoints; diffusers itself ignores ``timestep_scale``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import SanaTransformer2DModel
from torch import nn

from .. import trigflow as tf
from .jvp import jvp_layers


def _time(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Per-sample time [B] in at least float32 (float64 stays float64: finite-difference tests need it)."""
    x = tf._f32(torch.as_tensor(x, device=like.device))
    if x.ndim == 0:
        x = x.expand(like.shape[0])
    return x


class TrigFlowTransformer(nn.Module):
    def __init__(self, transformer: SanaTransformer2DModel, sigma_data: float = tf.SIGMA_DATA, logvar: bool = False):
        super().__init__()
        self.transformer = transformer
        self.sigma_data = sigma_data
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        # Adaptive-weighting head (sCM): logvar(s) from the time(+CFG) embedding.
        self.logvar_linear = nn.Linear(width, 1) if logvar else None

    @property
    def config(self):
        return self.transformer.config

    @contextlib.contextmanager
    def jvp_mode(self, fast: bool = True) -> Iterator[TrigFlowTransformer]:
        """Make ``torch.func.jvp`` work, and cheap, for a JVP along (x_s, s) with the weights held fixed.

        ``fast`` (default): ``models/jvp.py``'s constant-weight rules for every Linear / Conv2d and a
        fused-primal cross-attention with a query-only JVP. ``fast=False``: only the softmax cross-attention
        becomes explicit (the plain forward-AD formulas elsewhere). Linear self-attention is untouched in both.
        """
        with jvp_layers(self.transformer, fast=fast):
            yield self

    @property
    def has_guidance(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def _guidance(self, guidance, batch: int, device) -> torch.Tensor | None:
        if not self.has_guidance:
            return None
        if guidance is None:
            raise ValueError("this model has guidance embeddings: pass guidance (the CFG scale w)")
        g = torch.as_tensor(guidance, dtype=torch.float32, device=device)
        if g.ndim == 0:
            g = g.expand(batch)
        return g * float(self.transformer.config.guidance_embeds_scale)

    def flow_velocity(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        controlnet_block_samples=None,
    ) -> torch.Tensor:
        """The raw flow velocity v(x_t, t) with dense time; ``guidance`` is the raw CFG scale w."""
        b = x_t.shape[0]
        t = _time(t, x_t)
        timestep = t * float(getattr(self.transformer.config, "timestep_scale", 1.0) or 1.0)
        return self.transformer(
            x_t,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            guidance=self._guidance(guidance, b, x_t.device),
            controlnet_block_samples=controlnet_block_samples,
            return_dict=False,
        )[0]

    def time_embedding(self, s: torch.Tensor, guidance=None) -> torch.Tensor:
        """The transformer's (time + CFG) embedding at TrigFlow time s: input of the logvar head."""
        t = tf.flow_time(tf._f32(s)) * float(getattr(self.transformer.config, "timestep_scale", 1.0) or 1.0)
        te = self.transformer.time_embed
        g = self._guidance(guidance, t.shape[0], t.device)
        dtype = next(self.transformer.parameters()).dtype
        if g is not None:
            _, emb = te(t, guidance=g, hidden_dtype=dtype)
        else:
            _, emb = te(t, batch_size=t.shape[0], hidden_dtype=dtype)
        return emb

    def logvar(self, s: torch.Tensor, guidance=None) -> torch.Tensor:
        if self.logvar_linear is None:
            raise ValueError("this wrapper was built without a logvar head")
        return self.logvar_linear(self.time_embedding(s, guidance).float()).squeeze(-1)

    def forward(
        self,
        x_scaled: torch.Tensor,
        s: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        controlnet_block_samples=None,
        return_logvar: bool = False,
    ):
        """F(x_s/sd, s, y) in float32 (float64 for float64 inputs). ``x_scaled`` = x_s / sd."""
        s = _time(s, x_scaled)
        t = tf.flow_time(s)
        x_hi = tf._f32(x_scaled)  # the transform in >= fp32, never bf16
        x_fm = x_hi * tf._bcast(tf.flow_scale(t), x_hi)
        v = self.flow_velocity(
            x_fm.to(x_scaled.dtype), t, encoder_hidden_states, encoder_attention_mask, guidance, controlnet_block_samples
        )
        F = tf.trigflow_from_flow(x_hi, tf._f32(v), t)
        if return_logvar:
            return F, self.logvar(s, guidance)
        return F
