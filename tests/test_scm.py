"""sCM loss against an independent float64 computation (finite-difference JVP, formulas written out)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LATENT_CHANNELS, MAX_LENGTH, TEXT_HIDDEN, tiny_transformer

from sana_sprint.losses import scm
from sana_sprint.models import TrigFlowTransformer, make_student

SD = 0.5

pytestmark = pytest.mark.usefixtures("one_thread")


def _models():
    teacher = TrigFlowTransformer(tiny_transformer(guidance_embeds=False).double()).requires_grad_(False)
    student = TrigFlowTransformer(make_student(teacher.transformer), logvar=True).double()
    # The wrapper feeds the logvar head a float32 embedding: keep the 17-parameter head in float32.
    student.logvar_linear.float()
    torch.manual_seed(3)
    with torch.no_grad():  # move the student off the teacher so F_m, dF, w all matter
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = SD * torch.randn(b, LATENT_CHANNELS, 8, 8, generator=g, dtype=torch.float64)
    ehs = torch.randn(b, MAX_LENGTH, TEXT_HIDDEN, generator=g, dtype=torch.float64)
    mask = torch.ones(b, MAX_LENGTH, dtype=torch.long)
    mask[0, 4:] = 0
    null = torch.randn(1, MAX_LENGTH, TEXT_HIDDEN, generator=g, dtype=torch.float64)
    null_mask = torch.zeros(1, MAX_LENGTH, dtype=torch.long)
    null_mask[0, :2] = 1  # the empty prompt has its own (short) mask
    s = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)[:b]
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    w = torch.tensor([4.0, 5.0, 4.5], dtype=torch.float64)[:b]
    return x0, ehs, mask, null, null_mask, s, noise, w


def _reference(teacher, student, x0, ehs, mask, null, null_mask, s, noise, w, r, h=1e-3):
    """Everything per sample, with separate cond/uncond calls and a central-difference JVP."""
    B = x0.shape[0]
    losses, tangents = [], []
    with torch.no_grad():
        for b in range(B):
            sb, xb = s[b : b + 1], x0[b : b + 1]
            c, si = math.cos(sb.item()), math.sin(sb.item())
            x_s = c * xb + si * (SD * noise[b : b + 1])
            Fc = teacher(x_s / SD, sb, ehs[b : b + 1], mask[b : b + 1])
            Fu = teacher(x_s / SD, sb, null, null_mask)
            v = SD * (Fu + w[b].item() * (Fc - Fu))

            def F(xx, ss, b=b):
                return student(xx, ss, ehs[b : b + 1], mask[b : b + 1], guidance=w[b : b + 1])

            tx, ts = c * si * v / SD, c * si
            F_m = F(x_s / SD, sb)
            dF = (F(x_s / SD + h * tx, sb + h * ts) - F(x_s / SD - h * tx, sb - h * ts)) / (2 * h)
            g = -(c * c) * (SD * F_m - v) - r * (c * si * x_s + SD * dF)
            g = g / (torch.sqrt((g * g).sum()) + 0.1)
            lv = student.logvar(sb, guidance=w[b : b + 1])[0]
            weight = 1.0 / (SD * math.tan(sb.item()))
            # F_theta - F_theta.detach() is 0 in value: the residual is -g.
            per_elem = weight * torch.exp(-lv) * (0.0 - g) ** 2 + lv
            losses.append(per_elem.sum() / per_elem.numel())
            tangents.append(g[0])
    return torch.stack(losses), torch.stack(tangents)


def test_scm_loss_matches_float64_reference():
    step, r = 50, 0.5  # r strictly between 0 and 1: both tangent terms and the warm-up scaling count
    teacher, student = _models()
    x0, ehs, mask, null, null_mask, s, noise, w = _batch()
    cfg = scm.SCMConfig(tangent_warmup=100)
    out = scm.scm_loss(student, teacher, x0, ehs, mask, null, null_mask, step=step, config=cfg, s=s, noise=noise, w=w)
    tg = scm.scm_targets(student, teacher, x0, ehs, mask, null, null_mask, step=step, config=cfg, s=s, noise=noise, w=w)
    ref_loss, ref_g = _reference(teacher, student, x0, ehs, mask, null, null_mask, s, noise, w, r)
    assert out.loss.shape == (3,) and out.loss.dtype == torch.float64
    assert out.logs["scm/r"] == r
    # diffusers runs the sinusoidal time embedding in fp32, so the s-direction difference quotient carries
    # ~1e-7 / h of rounding: compare relative to the tangent's scale (a wrong term would be O(1) off).
    assert (tg.g - ref_g).abs().max() < 1e-3 * ref_g.abs().max()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-3, atol=0)
    # The loss is differentiable into the student (through F_theta and the logvar head).
    out.loss.mean().backward()
    assert student.logvar_linear.weight.grad.abs().sum() > 0
    assert student.transformer.proj_out.weight.grad.abs().sum() > 0


def test_r0_tangent_has_no_dF_term():
    teacher, student = _models()
    x0, ehs, mask, null, null_mask, s, noise, w = _batch()
    tg = scm.scm_targets(
        student, teacher, x0, ehs, mask, null, null_mask, step=0, config=scm.SCMConfig(tangent_warmup=10),
        s=s, noise=noise, w=w,
    )
    assert tg.r == 0.0
    with torch.no_grad():
        F_m = student(tg.x_s / SD, s, ehs, mask, guidance=w)
    c2 = torch.cos(s).view(-1, 1, 1, 1) ** 2
    g_raw = -c2 * (SD * F_m - tg.dxds)
    expected = g_raw / (g_raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    torch.testing.assert_close(tg.g, expected, rtol=1e-10, atol=1e-12)
    # and the pure formula ignores dF entirely at r = 0
    dF = torch.randn_like(F_m)
    torch.testing.assert_close(
        scm.scm_tangent(F_m, dF, tg.dxds, tg.x_s, s, 0.0), scm.scm_tangent(F_m, 0 * dF, tg.dxds, tg.x_s, s, 0.0)
    )


def test_tangent_normalisation_per_sample():
    g = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    g[1] *= 100.0
    g[2] = 0.0
    out, norm = scm.normalize_tangent(g, 0.1)
    ref_norm = torch.tensor([math.sqrt(sum(v * v for v in gb.flatten().tolist())) for gb in g], dtype=torch.float64)
    torch.testing.assert_close(norm, ref_norm)
    for b in range(3):
        torch.testing.assert_close(out[b], g[b] / (ref_norm[b] + 0.1))
    # norms after normalisation: n / (n + c) < 1, and a zero tangent stays zero
    assert out[1].norm() == pytest.approx(ref_norm[1] / (ref_norm[1] + 0.1))
    assert out[2].abs().max() == 0
    # scaling one sample leaves the others unchanged
    g2 = g.clone()
    g2[0] *= 7
    torch.testing.assert_close(scm.normalize_tangent(g2, 0.1)[0][1:], out[1:])


def test_teacher_cfg_combination_uses_null_mask_and_per_sample_w():
    teacher, _ = _models()
    x0, ehs, mask, null, null_mask, s, noise, w = _batch()
    x_s = torch.cos(s).view(-1, 1, 1, 1) * x0 + torch.sin(s).view(-1, 1, 1, 1) * SD * noise
    v = scm.teacher_cfg_velocity(teacher, x_s, s, ehs, mask, null, null_mask, w)
    for b in range(3):
        Fc = teacher(x_s[b : b + 1] / SD, s[b : b + 1], ehs[b : b + 1], mask[b : b + 1])
        Fu = teacher(x_s[b : b + 1] / SD, s[b : b + 1], null, null_mask)
        ref = SD * ((1 - w[b]) * Fu + w[b] * Fc)  # the same combination, written as an interpolation
        torch.testing.assert_close(v[b : b + 1], ref, rtol=1e-10, atol=1e-12)
    # w = 1 is the conditional prediction; the null branch's own mask matters (trap 7)
    v1 = scm.teacher_cfg_velocity(teacher, x_s, s, ehs, mask, null, null_mask, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(v1, SD * teacher(x_s / SD, s, ehs, mask), rtol=1e-10, atol=1e-12)
    v_wrong = scm.teacher_cfg_velocity(teacher, x_s, s, ehs, mask, null, mask[:1], w)
    assert (v_wrong - v).abs().max() > 1e-6


def test_adaptive_weighted_loss_gradient_and_form():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    lv = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.4, 1.2], dtype=torch.float64)
    loss = scm.adaptive_weighted_loss(F, F.detach(), tgt, lv, s)
    wgt = 1 / (SD * torch.tan(s))
    ref = torch.stack([wgt[b] / torch.exp(lv[b]) * (tgt[b] ** 2).mean() + lv[b] for b in range(2)])
    torch.testing.assert_close(loss, ref)
    loss.sum().backward()
    n = tgt[0].numel()
    torch.testing.assert_close(F.grad, (-2 * (wgt / torch.exp(lv)).view(-1, 1, 1, 1) * tgt / n).detach())
    # d/dlogvar: 1 - weighted mse; zero at the optimum exp(logvar) = weight * mse
    torch.testing.assert_close(lv.grad, 1 - wgt / torch.exp(lv.detach()) * (tgt**2).flatten(1).mean(1))


def test_guidance_draws_and_warmup():
    w = scm.sample_guidance(1000, (4.0, 4.5, 5.0), torch.Generator().manual_seed(0))
    assert set(w.tolist()) == {4.0, 4.5, 5.0}
    assert scm.tangent_warmup(0, 100) == 0.0 and scm.tangent_warmup(50, 100) == 0.5
    assert scm.tangent_warmup(1000, 100) == 1.0 and scm.tangent_warmup(0, 0) == 1.0
    with pytest.raises(ValueError):
        scm.SCMConfig(tangent_eps=0)


def test_paired_conditions_pads_different_lengths():
    ehs = torch.randn(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.long)
    null = torch.randn(1, 3, 3)
    e, m = scm.paired_conditions(ehs, mask, null, torch.ones(1, 3, dtype=torch.long))
    assert e.shape == (4, 5, 3) and m.tolist()[2] == [1, 1, 1, 0, 0]
    torch.testing.assert_close(e[3, :3], null[0])
