"""Cheaper forward-mode JVP of the student (the sCM tangent, DESIGN.md section 4 step 3).

``torch.func.jvp`` treats every tensor the function closes over (the weights, the caption keys and
values) as having a zero tangent, and several of PyTorch's forward-AD formulas still do the work for
it: a ``Linear`` or ``Conv2d`` computes ``W dx`` *and* ``dW x`` with a materialised zero ``dW`` (three
GEMMs/convolutions and an add instead of two), and a matmul against a constant runs its zero half
too. Here the sCM JVP is taken along (x_s, s) with the weights held fixed (theta minus), so:

- :class:`ConstantWeightLinear` / :class:`ConstantWeightConv2d`: ``torch.autograd.Function`` s whose
  JVP is ``W dx`` only (one GEMM / convolution for the tangent);
- :class:`CrossAttentionCore`: softmax attention whose primal runs the fused
  ``scaled_dot_product_attention`` and whose JVP carries the query's tangent only (keys and values
  come from the caption, constant along (x_s, s)):
  ``dO = (P * dS) V - rowsum(P * dS) * O`` with ``dS = dq k^T / sqrt(d)``;
- :func:`fast_jvp_layers`: swaps them into a model (every ``Linear`` / ``Conv2d`` and only the
  cross-attention processors, trap 1: the linear self-attention stays linear) for the duration.

The result is the same JVP (tests/test_jvp_fast.py compares it with the plain ``torch.func.jvp`` in
float64). It is only valid for directions in which the weights and the caption embeddings are
constant, which is what the sCM tangent needs; a tangent on a weight or on the caption is ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention import ExplicitSoftmaxAttnProcessor, cross_attention_modules, explicit_cross_attention


class ConstantWeightLinear(torch.autograd.Function):
    """y = x W^T + b; JVP along x only: dy = dx W^T."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, dx, dweight, dbias):
        (weight,) = ctx.saved_tensors
        return F.linear(dx, weight)


class ConstantWeightConv2d(torch.autograd.Function):
    """y = conv2d(x, W, b); JVP along x only: dy = conv2d(dx, W) (zero padding)."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1])
        ctx.conv = inputs[3:]

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        (weight,) = ctx.saved_tensors
        return F.conv2d(dx, weight, None, *ctx.conv)


class CrossAttentionCore(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + bias) v for [B, H, N, d] q and [B, H, L, d] k, v; JVP along q only."""

    @staticmethod
    def forward(query, key, value, bias):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, key, value, bias = inputs
        ctx.save_for_forward(query, key, value, output, *(() if bias is None else (bias,)))

    @staticmethod
    def jvp(ctx, dquery, dkey, dvalue, dbias):
        query, key, value, out, *bias = ctx.saved_tensors
        compute = torch.promote_types(query.dtype, torch.float32)  # scores and softmax in >= fp32
        scale = query.shape[-1] ** -0.5
        scores = torch.matmul(query.to(compute), key.to(compute).transpose(-1, -2)) * scale
        if bias:
            scores = scores + bias[0].to(compute)
        probs = torch.softmax(scores, dim=-1)
        p_ds = probs * (torch.matmul(dquery.to(compute), key.to(compute).transpose(-1, -2)) * scale)
        d_out = torch.matmul(p_ds, value.to(compute)) - p_ds.sum(-1, keepdim=True) * out.to(compute)
        return d_out.to(out.dtype)


class JVPCrossAttnProcessor(ExplicitSoftmaxAttnProcessor):
    """diffusers' softmax cross-attention (``SanaAttnProcessor2_0``'s math) with :class:`CrossAttentionCore`."""

    @staticmethod
    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return CrossAttentionCore.apply(query, key, value, None if bias is None else bias.to(query.dtype))


def _linear_forward(module: nn.Linear):
    return lambda x: ConstantWeightLinear.apply(x, module.weight, module.bias)


def _conv_forward(module: nn.Conv2d):
    return lambda x: ConstantWeightConv2d.apply(x, module.weight, module.bias, module.stride, module.padding,
                                                module.dilation, module.groups)


@contextlib.contextmanager
def fast_jvp_layers(*models: nn.Module) -> Iterator[None]:
    """Within the block, the ``Linear`` / ``Conv2d`` layers and the cross-attention of ``models`` take the
    constant-weight JVP rules above (the linear self-attention is left as it is); restored on exit."""
    swapped: list[nn.Module] = []
    processors: list[tuple[Attention, object]] = []
    try:
        for model in models:
            for m in model.modules():
                if "forward" in m.__dict__:
                    continue  # already swapped (a module shared by two models) or patched by someone else
                if type(m) is nn.Linear:
                    m.forward = _linear_forward(m)
                elif type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
                    m.forward = _conv_forward(m)
                else:
                    continue
                swapped.append(m)
            processor = JVPCrossAttnProcessor()
            for m in cross_attention_modules(model):
                processors.append((m, m.processor))
                m.processor = processor
        yield
    finally:
        for m in swapped:
            del m.forward
        for m, p in reversed(processors):
            m.processor = p


@contextlib.contextmanager
def jvp_layers(*models: nn.Module, fast: bool = True) -> Iterator[None]:
    """What ``jvp_mode`` swaps in for ``models``: :func:`fast_jvp_layers` (``fast``) or only the explicit-softmax
    cross-attention (PyTorch's forward-AD formulas everywhere else)."""
    if fast:
        with fast_jvp_layers(*models):
            yield
    else:
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(explicit_cross_attention(model))
            yield
