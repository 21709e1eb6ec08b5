"""Forward-mode-AD-safe cross-attention for the sCM JVP (DESIGN.md section 9, trap 1).

``scaled_dot_product_attention`` has no forward-mode derivative, so during ``torch.func.jvp`` the
cross-attention (``attn2``, softmax attention over the caption) runs through an explicit
matmul + masked softmax with the same math as diffusers' ``SanaAttnProcessor2_0``. The linear
self-attention (``attn1``) is already JVP-safe and must stay linear: only ``attn2`` is swapped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

CROSS_ATTENTION_NAME = "attn2"


def cross_attention_inputs(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, k, v [B, heads, N or L, head_dim], additive mask bias [B, heads, 1, L] or None) as diffusers'
    ``SanaAttnProcessor2_0`` forms them (projections, then the QK-norms)."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, kv_len, _ = context.shape
    if attention_mask is not None:
        # The transformer passes an additive bias [B, 1, L] (0 keep, -10000 drop); same reshaping as diffusers.
        attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

    query = attn.to_q(hidden_states)
    key = attn.to_k(context)
    value = attn.to_v(context)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    return query, key, value, attention_mask


def cross_attention_output(attn: Attention, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, heads, N, head_dim] attention output -> the layer's output (merge heads, to_out, rescale)."""
    batch, heads, _, head_dim = out.shape
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    return out / attn.rescale_output_factor


class ExplicitSoftmaxAttnProcessor:
    """softmax(q k^T / sqrt(d) + mask_bias) v, written out (differentiable in forward and reverse mode)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, key, value, attention_mask = cross_attention_inputs(attn, hidden_states, encoder_hidden_states,
                                                                   attention_mask)
        return cross_attention_output(attn, self.attend(query, key, value, attention_mask), query.dtype)

    @staticmethod
    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias) v on [B, heads, ., head_dim], scores and softmax in >= fp32."""
        compute = torch.promote_types(query.dtype, torch.float32)
        scores = torch.matmul(query.to(compute), key.to(compute).transpose(-1, -2)) * query.shape[-1] ** -0.5
        if bias is not None:
            scores = scores + bias.to(compute)
        return torch.matmul(torch.softmax(scores, dim=-1), value.to(compute))


_EXPLICIT = ExplicitSoftmaxAttnProcessor()


def cross_attention_modules(model: nn.Module) -> list[Attention]:
    """Every cross-attention layer (``*.attn2``) of ``model``."""
    return [
        m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == CROSS_ATTENTION_NAME and isinstance(m, Attention)
    ]


@contextlib.contextmanager
def explicit_cross_attention(model: nn.Module) -> Iterator[None]:
    """Swap only the cross-attention processors to :class:`ExplicitSoftmaxAttnProcessor`; restore on exit."""
    modules = cross_attention_modules(model)
    saved = [m.processor for m in modules]
    processor = _EXPLICIT  # one instance: a compiled JVP (scm.student_jvp mode "compile") guards on it
    try:
        for m in modules:
            m.processor = processor
        yield
    finally:
        for m, p in zip(modules, saved):
            m.processor = p
