"""trigflow.py: the flow -> TrigFlow transform (Prop. 3.1) against float64 references and closed forms."""

import math

import pytest
import torch

from sana_sprint import trigflow as tf

SD = tf.SIGMA_DATA
F64 = torch.float64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def _times(n=64):
    # interior times plus both ends
    return torch.cat(
        [torch.tensor([0.0, tf.HALF_PI], dtype=F64), torch.linspace(1e-3, tf.HALF_PI - 1e-3, n, dtype=F64)]
    )


# ---- (a) algebraic round trips -------------------------------------------------------------------


def test_time_maps_round_trip():
    s = _times()
    assert torch.allclose(tf.trig_time(tf.flow_time(s)), s, atol=1e-14, rtol=0)
    t = torch.linspace(0, 1, 101, dtype=F64)
    assert torch.allclose(tf.flow_time(tf.trig_time(t)), t, atol=1e-14, rtol=0)
    # k = sqrt(t^2 + (1-t)^2) = 1 / (sin s + cos s)
    assert torch.allclose(
        tf.flow_scale(tf.flow_time(s)), 1 / (torch.sin(s) + torch.cos(s)), atol=1e-14, rtol=0
    )


def test_velocity_round_trip_is_identity():
    s = _times(6)
    t = tf.flow_time(s)
    x = _rand(len(s), 3, 4, 4, seed=1)
    v = _rand(len(s), 3, 4, 4, seed=2)
    F = tf.trigflow_from_flow(x, v, t)
    assert F.dtype == F64
    assert torch.allclose(tf.flow_from_trigflow(x, F, t), v, atol=1e-12, rtol=0)
    assert torch.allclose(tf.trigflow_from_flow(x, tf.flow_from_trigflow(x, v, t), t), v, atol=1e-12, rtol=0)


# ---- (b) consistency with the ideal targets ------------------------------------------------------


def test_consistency_fn_recovers_x0_from_ideal_target():
    s = _times(10)
    x0 = _rand(len(s), 2, 3, seed=3) * SD
    z = _rand(len(s), 2, 3, seed=4) * SD
    x_s = tf.trigflow_noise(x0, z, s)
    F = tf.trigflow_target(x0, z, s)
    assert torch.allclose(tf.consistency_fn(x_s, F, s), x0, atol=1e-14, rtol=0)


def test_transform_maps_ideal_flow_velocity_to_ideal_trigflow_target():
    s = _times(10)
    t = tf.flow_time(s)
    x0 = _rand(len(s), 2, 5, seed=5) * SD  # training space
    z = _rand(len(s), 2, 5, seed=6) * SD
    x, eps = x0 / SD, z / SD  # unit-std flow space
    x_s = tf.trigflow_noise(x0, z, s)
    # the flow sample at t is k * x_s / sd
    x_fm, t2 = tf.flow_input(x_s, s)
    assert torch.allclose(t2, t, atol=0, rtol=0)
    assert torch.allclose(x_fm, tf.flow_noise(x, eps, t), atol=1e-14, rtol=0)
    F = tf.trigflow_from_flow(x_s / SD, tf.flow_target(x, eps), t)
    assert torch.allclose(F, tf.trigflow_target(x0, z, s), atol=1e-13, rtol=0)
    assert torch.allclose(
        tf.trigflow_velocity(F), (torch.cos(s)[:, None, None] * z - torch.sin(s)[:, None, None] * x0)
    )


def test_transform_matches_independent_derivation():
    """x = x_fm - t v, eps = x_fm + (1-t) v, F = cos s eps - sin s x = (cos s - sin s) x_fm + v / (sin s + cos s)."""
    s = _times(20)
    t = tf.flow_time(s)
    x_fm = _rand(len(s), 7, seed=7)
    v = _rand(len(s), 7, seed=8)
    c, si = torch.cos(s)[:, None], torch.sin(s)[:, None]
    x_scaled = x_fm * (c + si)  # x_s / sd = x_fm / k
    expected = (c - si) * x_fm + v / (si + c)
    F = tf.trigflow_from_flow(x_scaled, v, t)
    assert torch.allclose(F, expected, atol=1e-12, rtol=0)
    # the comparison is sharp: a sign flip on either term is far off
    for flipped in ((c + si) * x_fm + v / (si + c), (c - si) * x_fm - v / (si + c)):
        assert (F - flipped).abs().max() > 0.1


# ---- (c) boundaries ------------------------------------------------------------------------------


def test_boundary_s0_is_flow_t0():
    s = torch.zeros(3, dtype=F64)
    x_scaled, v = _rand(3, 4, seed=9), _rand(3, 4, seed=10)
    t = tf.flow_time(s)
    assert torch.equal(t, torch.zeros(3, dtype=F64))
    assert torch.equal(tf.flow_scale(t), torch.ones(3, dtype=F64))
    x_fm, _ = tf.flow_input(x_scaled * SD, s)
    assert torch.allclose(x_fm, x_scaled, atol=1e-15, rtol=0)
    # at t = 0: x_fm = x, v = eps - x, so F = eps = x_fm + v
    assert torch.allclose(tf.trigflow_from_flow(x_scaled, v, t), x_scaled + v, atol=1e-15, rtol=0)
    # f(x_s, 0) = x_s: clean data is its own consistency value
    assert torch.equal(tf.consistency_fn(x_scaled, v, s), x_scaled)


def test_boundary_half_pi_is_flow_t1():
    s = torch.full((3,), tf.HALF_PI, dtype=F64)
    x_scaled, v = _rand(3, 4, seed=11), _rand(3, 4, seed=12)
    t = tf.flow_time(s)
    assert torch.allclose(t, torch.ones(3, dtype=F64), atol=1e-15, rtol=0)
    assert torch.allclose(tf.flow_scale(t), torch.ones(3, dtype=F64), atol=1e-15, rtol=0)
    x_fm, _ = tf.flow_input(x_scaled * SD, s)
    assert torch.allclose(x_fm, x_scaled, atol=1e-14, rtol=0)
    # at t = 1: x_fm = eps, v = eps - x, so F = -x = v - x_fm
    assert torch.allclose(tf.trigflow_from_flow(x_scaled, v, t), v - x_scaled, atol=1e-14, rtol=0)
    # f(x_s, pi/2) = -sd F
    assert torch.allclose(tf.consistency_fn(x_scaled, v, s), -SD * v, atol=1e-14, rtol=0)


def test_half_precision_time_is_upcast():
    s = torch.tensor([tf.HALF_PI], dtype=torch.bfloat16)
    assert tf.flow_time(s).dtype == torch.float32
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    assert tf.consistency_fn(x, x, torch.tensor([0.5])).dtype == torch.float32


# ---- (d) lossless on a closed-form velocity field ------------------------------------------------
# Data x ~ N(mu, diag(sig^2)) in unit-std space, eps ~ N(0, I), x_t = (1-t) x + t eps. Per dimension
# (x_t, eps - x) are jointly Gaussian: E[x_t] = (1-t) mu, Var x_t = (1-t)^2 sig^2 + t^2 =: r(t)^2,
# E[v] = -mu, Cov(v, x_t) = t - (1-t) sig^2, so v*(x_t, t) = -mu + (t - (1-t) sig^2) / r^2 (x_t - (1-t) mu).
# The ODE keeps the standardised coordinate fixed: x_t = (1-t) mu + r(t) x_1, hence x_0 = mu + sig x_1.

MU = torch.tensor([1.5, -0.7, 0.0], dtype=F64)
SIG = torch.tensor([0.3, 1.2, 2.0], dtype=F64)


def v_star(x_t, t):
    t = t[:, None]
    r2 = (1 - t) ** 2 * SIG**2 + t**2
    return -MU + (t - (1 - t) * SIG**2) / r2 * (x_t - (1 - t) * MU)


def test_v_star_is_the_regression_target():
    """Monte-Carlo check of the derivation: E[(eps - x) - v*(x_t)] = 0 and uncorrelated with x_t."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = MU + SIG * torch.randn(n, 3, generator=g, dtype=F64)
    eps = torch.randn(n, 3, generator=g, dtype=F64)
    t = torch.full((n,), 0.37, dtype=F64)
    x_t = tf.flow_noise(x, eps, t)
    resid = (eps - x) - v_star(x_t, t)
    assert resid.mean(0).abs().max() < 0.02
    assert ((resid * (x_t - x_t.mean(0))).mean(0)).abs().max() < 0.02


def _flow_euler(x, n):
    ts = torch.linspace(1, 0, n + 1, dtype=F64)
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (b - a) * v_star(x, a.expand(x.shape[0]))
    return x


def _trig_euler(x_s, n):
    ss = torch.linspace(tf.HALF_PI, 0, n + 1, dtype=F64)
    for a, b in zip(ss[:-1], ss[1:]):
        s = a.expand(x_s.shape[0])
        x_fm, t = tf.flow_input(x_s, s)
        F = tf.trigflow_from_flow(x_s / SD, v_star(x_fm, t), t)
        x_s = x_s + (b - a) * tf.trigflow_velocity(F)
    return x_s


def test_trigflow_euler_through_transform_matches_flow_euler():
    eps = _rand(256, 3, seed=13)
    exact = MU + SIG * eps  # x_0 of the flow ODE started at x_1 = eps
    gaps, errs_flow, errs_trig = [], [], []
    for n in (10, 40, 160):
        x_flow = _flow_euler(eps, n)
        x_trig = _trig_euler(SD * eps, n) / SD  # TrigFlow starts at sd * eps and ends in training space
        gaps.append((x_trig - x_flow).abs().max().item())
        errs_flow.append((x_flow - exact).abs().max().item())
        errs_trig.append((x_trig - exact).abs().max().item())
    for errs in (gaps, errs_flow, errs_trig):
        assert errs[0] > errs[1] > errs[2], errs
    # first-order solvers: 16x the steps cuts the error by about 16x
    assert errs_flow[2] < errs_flow[0] / 8 and errs_trig[2] < errs_trig[0] / 8
    # at 160 steps both are within 1% of the data's range of the exact x0, and of each other
    scale = exact.abs().max().item()
    assert gaps[2] < 0.01 * scale and errs_trig[2] < 0.01 * scale and errs_flow[2] < 0.01 * scale


@pytest.mark.parametrize("s", [0.2, 0.8, 1.3])
def test_trigflow_ode_is_the_flow_ode(s):
    """dx_s/ds = sd F equals the chain rule through x_s = sd (sin s + cos s) x_t(s): finite differences in float64."""
    eps = _rand(8, 3, seed=14)

    def x_s_of(s_):  # exact trajectory in TrigFlow space
        t = tf.flow_time(torch.tensor(s_, dtype=F64))
        x_t = (1 - t) * MU + torch.sqrt((1 - t) ** 2 * SIG**2 + t**2) * eps
        return SD * x_t / tf.flow_scale(t)

    h = 1e-5
    fd = (x_s_of(s + h) - x_s_of(s - h)) / (2 * h)
    x_s = x_s_of(s)
    sb = torch.full((8,), s, dtype=F64)
    x_fm, t = tf.flow_input(x_s, sb)
    F = tf.trigflow_from_flow(x_s / SD, v_star(x_fm, t), t)
    assert torch.allclose(SD * F, fd, atol=1e-8, rtol=0)
    assert math.isfinite(F.abs().max().item())
