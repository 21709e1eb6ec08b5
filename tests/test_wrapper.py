"""TrigFlow wrapper, JVP-safe cross-attention and the teacher -> student copy, on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from conftest import LATENT_CHANNELS, MAX_LENGTH, TEXT_HIDDEN, tiny_transformer
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from sana_sprint import trigflow as tf
from sana_sprint.models import TrigFlowTransformer, make_student
from sana_sprint.models.attention import ExplicitSoftmaxAttnProcessor, cross_attention_modules
from sana_sprint.models.jvp import JVPCrossAttnProcessor


def _inputs(b=2, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, LATENT_CHANNELS, 8, 8, generator=g, dtype=dtype)
    s = torch.rand(b, generator=g, dtype=dtype) * 1.2 + 0.2
    y = torch.randn(b, MAX_LENGTH, TEXT_HIDDEN, generator=g, dtype=dtype)
    mask = torch.ones(b, MAX_LENGTH, dtype=torch.long)
    mask[0, 3:] = 0  # padding must matter: the softmax mask bias is part of what we test
    mask[-1, 6:] = 0
    return x, s, y, mask


def _g(w, b=2):
    # diffusers (and the wrapper) form guidance * guidance_embeds_scale in float32
    return torch.full((b,), w, dtype=torch.float32) * 0.1


@pytest.fixture
def wrapped64():
    return TrigFlowTransformer(tiny_transformer().double())


def test_forward_is_trigflow_transform_of_direct_call(wrapped64):
    x, s, y, mask = _inputs()
    F = wrapped64(x, s, y, mask, guidance=4.5)
    t = tf.flow_time(s)
    x_fm = x * tf.flow_scale(t).view(-1, 1, 1, 1)
    v = wrapped64.transformer(
        x_fm, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t, guidance=_g(4.5)
    ).sample
    torch.testing.assert_close(F, tf.trigflow_from_flow(x, v, t), rtol=0, atol=1e-12)
    assert F.dtype == torch.float64


def test_jvp_matches_finite_difference_and_reverse_mode(wrapped64):
    x, s, y, mask = _inputs()
    g = torch.Generator().manual_seed(7)
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ts = torch.randn(s.shape, generator=g, dtype=torch.float64)

    def f(x_, s_):
        return wrapped64(x_, s_, y, mask, guidance=4.0)

    with wrapped64.jvp_mode():
        F, dF = torch.func.jvp(f, (x, s), (tx, ts))
    torch.testing.assert_close(F, f(x, s), rtol=0, atol=1e-12)

    # Second implementation: reverse-mode (double-backward) JVP through diffusers' own SDPA processor
    # (math backend: the fused CPU kernel has no double backward).
    with sdpa_kernel(SDPBackend.MATH):
        _, dF_rev = torch.autograd.functional.jvp(f, (x, s), (tx, ts))
    # diffusers' linear self-attention runs in fp32 even for a float64 model: agreement is ~1e-7 relative.
    assert (dF - dF_rev).abs().max() < 1e-5 * dF.abs().max()

    # Central finite difference. Parts of diffusers' Sana run in fp32 even in a float64 model (time
    # embedding, linear attention), so rounding is ~1e-7 / h; ReLU kinks limit h from above.
    h = 1e-4
    with torch.no_grad():
        fd = (f(x + h * tx, s + h * ts) - f(x - h * tx, s - h * ts)) / (2 * h)
    err = (dF - fd).abs().max() / dF.abs().max()
    assert err < 2e-3, err
    # The time tangent matters (a JVP that ignored s, e.g. integer time, would fail here).
    with wrapped64.jvp_mode():
        _, dF_x_only = torch.func.jvp(f, (x, s), (tx, torch.zeros_like(ts)))
    assert (dF - dF_x_only).abs().max() > 1e-3 * dF.abs().max()


@pytest.mark.parametrize("fast", [True, False])
def test_jvp_mode_swaps_only_cross_attention_and_restores(wrapped64, fast):
    x, s, y, mask = _inputs()
    blocks = wrapped64.transformer.transformer_blocks
    before1 = [b.attn1.processor for b in blocks]
    before2 = [b.attn2.processor for b in blocks]
    assert all(isinstance(p, SanaAttnProcessor2_0) for p in before2)
    F_normal = wrapped64(x, s, y, mask, guidance=3.0)
    linears = [m for m in wrapped64.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    with wrapped64.jvp_mode(fast=fast):
        assert [b.attn1.processor for b in blocks] == before1
        assert all(isinstance(p, SanaLinearAttnProcessor2_0) for p in before1)
        cross = JVPCrossAttnProcessor if fast else ExplicitSoftmaxAttnProcessor
        assert all(isinstance(b.attn2.processor, cross) for b in blocks)
        assert len(cross_attention_modules(wrapped64.transformer)) == len(blocks)
        assert all(("forward" in m.__dict__) == fast for m in linears)
        F_jvp = wrapped64(x, s, y, mask, guidance=3.0)
    assert [b.attn2.processor for b in blocks] == before2
    assert not any("forward" in m.__dict__ for m in linears)
    torch.testing.assert_close(F_jvp, F_normal, rtol=0, atol=1e-12)


def test_explicit_processor_matches_sdpa_with_mask():
    model = tiny_transformer().double()
    attn = model.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 64, 16, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, MAX_LENGTH, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(2, MAX_LENGTH, dtype=torch.float64)
    mask[1, 2:] = 0
    bias = ((1 - mask) * -10000.0).unsqueeze(1)
    ref = SanaAttnProcessor2_0()(attn, h, ctx, bias)
    out = ExplicitSoftmaxAttnProcessor()(attn, h, ctx, bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # and the mask changes the result (so the comparison above covers it)
    assert (ExplicitSoftmaxAttnProcessor()(attn, h, ctx, None) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_timestep_scale_is_applied(scale):
    model = tiny_transformer(guidance_embeds=False, timestep_scale=scale).double()
    w = TrigFlowTransformer(model)
    x, _, y, mask = _inputs()
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    v = w.flow_velocity(x, t, y, mask)
    ref = model(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t * scale).sample
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-12)
    if scale != 1.0:
        plain = model(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t).sample
        assert (v - plain).abs().max() > 1e-3


def test_guidance_model_requires_guidance(wrapped64):
    x, s, y, mask = _inputs()
    with pytest.raises(ValueError, match="guidance"):
        wrapped64(x, s, y, mask)


def test_guidance_is_scaled_by_config():
    w = TrigFlowTransformer(tiny_transformer().double())
    x, s, y, mask = _inputs()
    t = tf.flow_time(s)
    v = w.flow_velocity(x, t, y, mask, guidance=4.5)
    ref = w.transformer(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t, guidance=_g(4.5)).sample
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-12)


def test_student_equals_teacher_at_init():
    teacher = tiny_transformer(guidance_embeds=False, seed=5)
    student = make_student(teacher)
    assert student.config.guidance_embeds and student.config.guidance_embeds_scale == 0.1
    assert not teacher.config.guidance_embeds
    x, s, y, mask = _inputs(dtype=torch.float32)
    t = tf.flow_time(s)
    with torch.no_grad():
        ref = teacher(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t).sample
        outs = [
            student(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t, guidance=torch.full((2,), g)).sample
            for g in (0.0, 0.45, 10.0)
        ]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # Every teacher weight was copied (not just the ones that happen to share names).
    torch.testing.assert_close(
        student.time_embed.timestep_embedder.linear_1.weight, teacher.time_embed.emb.timestep_embedder.linear_1.weight
    )
    # Once the guidance layer learns something, guidance changes the output.
    with torch.no_grad():
        student.time_embed.guidance_embedder.linear_2.weight.normal_(0, 0.1)
        a = student(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t, guidance=torch.full((2,), 0.0)).sample
        b = student(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t, guidance=torch.full((2,), 1.0)).sample
    assert (a - b).abs().max() > 1e-5


def test_make_student_rejects_student():
    with pytest.raises(ValueError):
        make_student(tiny_transformer(guidance_embeds=True))


def test_dtype_casts_log_no_empty_float32_warning():
    """diffusers warns "should be kept in float32: []" on every ``.to(dtype)``; importing sana_sprint drops
    exactly that (empty-list) message, and a class that does keep modules in float32 still warns."""
    import logging

    import sana_sprint  # noqa: F401  (installs the filter)

    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("diffusers.models.modeling_utils")
    handler, level = Grab(level=logging.WARNING), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)  # other code may have lowered diffusers' verbosity (set_verbosity_error)
    try:
        model = tiny_transformer(guidance_embeds=False, seed=3)
        model.to("cpu", torch.bfloat16)
        student = make_student(model)
        assert next(student.parameters()).dtype == torch.bfloat16
        assert not [m for m in seen if "float32" in m]
        model._keep_in_fp32_modules = ["proj_out"]
        model.to(torch.float32)
        assert len([m for m in seen if "should be kept in float32: ['proj_out']" in m]) == 1
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
