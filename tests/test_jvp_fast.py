"""models/jvp.py: the constant-weight JVP rules give the plain torch.func.jvp's result (float64), for
each rule alone, through the student and through student + ControlNet, and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LATENT_CHANNELS, MAX_LENGTH, TEXT_HIDDEN, tiny_transformer

from sana_sprint.losses import scm as scm_lib
from sana_sprint.models import TrigFlowTransformer, make_student
from sana_sprint.models.jvp import (
    ConstantWeightConv2d,
    ConstantWeightLinear,
    CrossAttentionCore,
    fast_jvp_layers,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=_g(seed), dtype=dtype)


def _jvp(fn, primals, tangents):
    with torch.no_grad():
        return torch.func.jvp(fn, primals, tangents)


def test_linear_and_conv_rules_match_the_plain_jvp():
    x, dx = _rand(3, 5, 7, seed=1), _rand(3, 5, 7, seed=2)
    w, b = _rand(4, 7, seed=3), _rand(4, seed=4)
    out, tan = _jvp(lambda a: ConstantWeightLinear.apply(torch.sin(a), w, b), (x,), (dx,))
    ref_out, ref_tan = _jvp(lambda a: F.linear(torch.sin(a), w, b), (x,), (dx,))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-14)
    torch.testing.assert_close(tan, ref_tan, rtol=0, atol=1e-13)
    # closed form: d/dx (sin(x) W^T + b) = (cos(x) dx) W^T
    torch.testing.assert_close(tan, (torch.cos(x) * dx) @ w.T, rtol=0, atol=1e-13)
    for groups, k, pad in ((1, 1, 0), (6, 3, 1), (2, 3, 1)):
        x, dx = _rand(2, 6, 5, 5, seed=5), _rand(2, 6, 5, 5, seed=6)
        w, b = _rand(6, 6 // groups, k, k, seed=7), _rand(6, seed=8)
        args = ((1, 1), (pad, pad), (1, 1), groups)
        out, tan = _jvp(lambda a, w=w, b=b, args=args: ConstantWeightConv2d.apply(a * a, w, b, *args), (x,), (dx,))
        ref_out, ref_tan = _jvp(lambda a, w=w, b=b, args=args: F.conv2d(a * a, w, b, *args), (x,), (dx,))
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-13)
        torch.testing.assert_close(tan, ref_tan, rtol=0, atol=1e-12)
        assert tan.abs().max() > 0.1


def test_cross_attention_rule_matches_finite_differences_with_a_mask():
    q, dq = _rand(2, 3, 6, 4, seed=1), _rand(2, 3, 6, 4, seed=2)
    k, v = _rand(2, 3, 5, 4, seed=3), _rand(2, 3, 5, 4, seed=4)
    keep = torch.ones(2, 1, 1, 5, dtype=torch.float64)
    keep[1, ..., 2:] = 0
    bias = (1 - keep) * -10000.0

    def explicit(a):
        return torch.softmax(a @ k.transpose(-1, -2) / 2.0 + bias, dim=-1) @ v

    out, tan = _jvp(lambda a: CrossAttentionCore.apply(a, k, v, bias), (q,), (dq,))
    torch.testing.assert_close(out, explicit(q), rtol=0, atol=1e-12)
    h = 1e-6
    fd = (explicit(q + h * dq) - explicit(q - h * dq)) / (2 * h)
    torch.testing.assert_close(tan, fd, rtol=0, atol=1e-8)
    _, ref = _jvp(explicit, (q,), (dq,))
    torch.testing.assert_close(tan, ref, rtol=0, atol=1e-12)
    # the masked keys get no weight: their values do not move the tangent
    v2 = v.clone()
    v2[1, :, 2:] += 5.0
    _, tan2 = _jvp(lambda a: CrossAttentionCore.apply(a, k, v2, bias), (q,), (dq,))
    torch.testing.assert_close(tan2, tan, rtol=0, atol=1e-9)


def _student64():
    torch.manual_seed(0)
    student = TrigFlowTransformer(make_student(tiny_transformer(guidance_embeds=False, seed=3)), logvar=True)
    with torch.no_grad():  # a non-zero guidance branch (make_student zero-initialises its last layer)
        for p in student.transformer.time_embed.guidance_embedder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_g(9)))
    return student.double()


def _batch(b=3, dtype=torch.float64):
    x = _rand(b, LATENT_CHANNELS, 8, 8, seed=11, dtype=dtype) * 0.5
    s = torch.tensor([0.3, 1.0, 1.5], dtype=dtype)[:b]
    dxds = _rand(b, LATENT_CHANNELS, 8, 8, seed=12, dtype=dtype)
    e = _rand(b, MAX_LENGTH, TEXT_HIDDEN, seed=13, dtype=dtype)
    m = torch.ones(b, MAX_LENGTH, dtype=torch.long)
    m[0, 4:] = 0
    return x, s, dxds, e, m, torch.tensor([4.0, 4.5, 5.0])[:b]


def test_student_jvp_fast_equals_plain_in_float64():
    student = _student64()
    x, s, dxds, e, m, w = _batch()
    F_fast, dF_fast = scm_lib.student_jvp(student, x, s, dxds, e, m, w)
    F_plain, dF_plain = scm_lib.student_jvp(student, x, s, dxds, e, m, w, mode="plain")
    torch.testing.assert_close(F_fast, F_plain, rtol=0, atol=1e-12)  # fused vs explicit softmax primal
    assert (dF_fast - dF_plain).abs().max() < 1e-12 * dF_plain.abs().max()
    assert dF_plain.abs().max() > 0.1
    assert not any("forward" in mod.__dict__ for mod in student.modules())  # restored


def test_student_jvp_fast_under_bf16_autocast_is_close_to_float32():
    student = _student64().float()
    x, s, dxds, e, m, w = (t.float() if t.is_floating_point() else t for t in _batch())
    _, ref = scm_lib.student_jvp(student, x, s, dxds, e, m, w, mode="plain")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fast = scm_lib.student_jvp(student, x, s, dxds, e, m, w)
        _, plain = scm_lib.student_jvp(student, x, s, dxds, e, m, w, mode="plain")
    err_fast = float((fast - ref).norm() / ref.norm())
    err_plain = float((plain - ref).norm() / ref.norm())
    assert err_fast < 0.03 and err_fast < 2 * err_plain + 1e-3, (err_fast, err_plain)


def test_layers_are_restored_after_an_error():
    model = tiny_transformer()
    with pytest.raises(RuntimeError, match="boom"), fast_jvp_layers(model):
        assert any("forward" in mod.__dict__ for mod in model.modules())
        raise RuntimeError("boom")
    assert not any("forward" in mod.__dict__ for mod in model.modules())
    assert all(type(b.attn2.processor).__name__ == "SanaAttnProcessor2_0" for b in model.transformer_blocks)


def test_jvp_mode_is_checked_and_reaches_the_scm_targets(monkeypatch):
    from sana_sprint.training.distill import DistillConfig

    with pytest.raises(ValueError, match="jvp"):
        scm_lib.SCMConfig(jvp="sideways")
    with pytest.raises(ValueError, match="jvp mode"):
        scm_lib.student_jvp(None, None, None, None, None, None, None, mode="sideways")
    assert DistillConfig(out="unused", jvp="plain").scm_config().jvp == "plain"
    seen = []
    real = scm_lib.student_jvp
    monkeypatch.setattr(scm_lib, "student_jvp", lambda *a, **k: seen.append(k["mode"]) or real(*a, **k))
    student = _student64().float()
    teacher = TrigFlowTransformer(tiny_transformer(guidance_embeds=False, seed=3))
    x, s, dxds, e, m, w = (t.float() if t.is_floating_point() else t for t in _batch())
    for mode in ("plain", "fast"):
        scm_lib.scm_targets(student, teacher, x, e, m, e[:1], m[:1], step=5, config=scm_lib.SCMConfig(jvp=mode), s=s,
                            noise=dxds, w=w, student_guidance=True)
    assert seen == ["plain", "fast"]


@pytest.mark.slow
def test_compiled_jvp_equals_the_plain_one():
    """mode "compile" (torch.compile of the plain JVP): same numbers, no recompilation on new values."""
    import torch._dynamo

    torch._dynamo.reset()
    student = _student64().float()
    x, s, dxds, e, m, w = (t.float() if t.is_floating_point() else t for t in _batch())
    for k in range(3):  # new values (and new weights) each call: one compilation serves them all
        with torch.no_grad():
            for p in student.parameters():
                p.mul_(1.0 + 0.01 * k)
        xk, dk = x * (1 + k), dxds.flip(0)
        F_c, dF_c = scm_lib.student_jvp(student, xk, s, dk, e, m, w, mode="compile")
        F_p, dF_p = scm_lib.student_jvp(student, xk, s, dk, e, m, w, mode="plain")
        torch.testing.assert_close(F_c, F_p, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dF_c, dF_p, rtol=1e-4, atol=1e-4 * float(dF_p.abs().max()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
