"""Flow-matching loss vs an independent float64 computation; caption dropout uses the null mask."""

from __future__ import annotations

import numpy as np
import torch

from sana_sprint.losses.flow_matching import FlowDraws, draw, flow_matching_loss

B, C, H, W, L, D = 6, 4, 3, 3, 5, 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    embeds = torch.randn(B, L, D, generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.3).long()
    mask[:, 0] = 1
    null_e = torch.randn(1, L, D, generator=g)
    null_m = torch.zeros(1, L, dtype=torch.long)
    null_m[0, :2] = 1
    return x, embeds, mask, null_e, null_m


def _velocity(A, u):
    """A deterministic 'network': channel mixing + time + masked-mean caption term."""

    def fn(x_t, t, e, m):
        pooled = (e * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # [B, D]
        c = pooled @ u  # [B, C]
        return torch.einsum("oc,bchw->bohw", A, x_t) * (1 + t.reshape(-1, 1, 1, 1)) + c[:, :, None, None]

    return fn


def test_matches_float64_reference():
    x, embeds, mask, null_e, null_m = _inputs()
    g = torch.Generator().manual_seed(1)
    A, u = torch.randn(C, C, generator=g) * 0.3, torch.randn(D, C, generator=g)
    draws = FlowDraws(
        t=torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 0.99]),
        eps=torch.randn(B, C, H, W, generator=g),
        drop=torch.tensor([False, True, False, False, True, False]),
    )
    loss, terms = flow_matching_loss(_velocity(A, u), x, embeds, mask, null_e, null_m, draws=draws)

    # Independent numpy float64 computation.
    xn, en, mn = x.double().numpy(), embeds.double().numpy(), mask.double().numpy()
    t, eps, drop = draws.t.double().numpy(), draws.eps.double().numpy(), draws.drop.numpy()
    An, un = A.double().numpy(), u.double().numpy()
    ref = np.zeros(B)
    for i in range(B):
        e_i = null_e[0].double().numpy() if drop[i] else en[i]
        m_i = null_m[0].double().numpy() if drop[i] else mn[i]
        xt = (1 - t[i]) * xn[i] + t[i] * eps[i]
        c = ((e_i * m_i[:, None]).sum(0) / m_i.sum()) @ un
        v = np.einsum("oc,chw->ohw", An, xt) * (1 + t[i]) + c[:, None, None]
        ref[i] = ((v - (eps[i] - xn[i])) ** 2).mean()
    np.testing.assert_allclose(loss.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert abs(float(terms["loss"]) - ref.mean()) < 1e-5
    assert abs(float(terms["dropped"]) - 2 / 6) < 1e-6


def test_dropout_uses_null_embedding_and_its_own_mask():
    x, embeds, mask, null_e, null_m = _inputs()
    seen = {}

    def fn(x_t, t, e, m):
        seen["e"], seen["m"] = e, m
        return torch.zeros_like(x_t)

    draws = draw(x, torch.Generator().manual_seed(3), caption_dropout=0.5)
    assert 0 < int(draws.drop.sum()) < B  # both branches exercised with this seed
    flow_matching_loss(fn, x, embeds, mask, null_e, null_m, draws=draws)
    for i in range(B):
        if draws.drop[i]:
            assert torch.equal(seen["e"][i], null_e[0]) and torch.equal(seen["m"][i], null_m[0])
        else:
            assert torch.equal(seen["e"][i], embeds[i]) and torch.equal(seen["m"][i], mask[i])


def test_oracle_velocity_has_zero_loss():
    x, embeds, mask, null_e, null_m = _inputs()
    draws = draw(x, torch.Generator().manual_seed(0))
    # eps - x recovered from x_t alone given x: (x_t - x) / t
    loss, _ = flow_matching_loss(lambda x_t, t, e, m: (x_t - x) / t.reshape(-1, 1, 1, 1), x, embeds, mask,
                                 null_e, null_m, draws=draws)
    assert loss.max() < 1e-9 + 1e-5
    loss_bad, _ = flow_matching_loss(lambda x_t, t, e, m: x_t, x, embeds, mask, null_e, null_m, draws=draws)
    assert loss_bad.min() > 1e-2


def test_draw_statistics_and_determinism():
    x = torch.zeros(20000, 1, 1, 1)
    d = draw(x, torch.Generator().manual_seed(0), caption_dropout=0.1, logit_mean=0.5, logit_std=1.5)
    logit = torch.log(d.t / (1 - d.t))
    assert abs(float(logit.mean()) - 0.5) < 0.05 and abs(float(logit.std()) - 1.5) < 0.05
    assert abs(float(d.drop.float().mean()) - 0.1) < 0.01
    assert abs(float(d.eps.std()) - 1.0) < 0.03
    d2 = draw(x, torch.Generator().manual_seed(0), caption_dropout=0.1, logit_mean=0.5, logit_std=1.5)
    assert torch.equal(d.t, d2.t) and torch.equal(d.eps, d2.eps) and torch.equal(d.drop, d2.drop)
    assert not draw(x, torch.Generator().manual_seed(0), caption_dropout=0.0).drop.any()


def test_high_t_mixture_draws():
    """The second logit-normal: off = the plain draws bit for bit; on = a per-sample choice between the
    two, reconstructed here from the same generator stream; the mixture's share and median as asked."""
    from scipy.special import logit

    x = torch.zeros(20000, 1)
    plain = draw(x, torch.Generator().manual_seed(5), caption_dropout=0.1)
    off = draw(x, torch.Generator().manual_seed(5), caption_dropout=0.1, high_t_prob=0.0)
    assert torch.equal(plain.t, off.t) and torch.equal(plain.eps, off.eps) and torch.equal(plain.drop, off.drop)

    g = torch.Generator().manual_seed(5)
    d = draw(x, g, caption_dropout=0.1, high_t_prob=0.3, high_t_logit_mean=2.0, high_t_logit_std=0.5)
    ref = torch.Generator().manual_seed(5)
    base = torch.sigmoid(torch.randn(20000, generator=ref, dtype=torch.float32))
    high = torch.sigmoid(torch.randn(20000, generator=ref, dtype=torch.float32) * 0.5 + 2.0)
    pick = torch.rand(20000, generator=ref) < 0.3
    assert torch.equal(d.t, torch.where(pick, high, base))
    assert abs(pick.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / 20000) ** 0.5
    z = torch.from_numpy(logit(d.t[pick].double().numpy()))
    assert abs(z.mean().item() - 2.0) < 0.03 and abs(z.std().item() - 0.5) < 0.02
    all_high = draw(x, torch.Generator().manual_seed(5), high_t_prob=1.0, high_t_logit_mean=2.0, high_t_logit_std=0.5)
    assert abs(torch.median(all_high.t).item() - torch.sigmoid(torch.tensor(2.0)).item()) < 0.01
