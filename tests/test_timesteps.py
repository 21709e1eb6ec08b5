"""timesteps.py: training-time distributions match their definitions; schedules validate their input."""

import math

import pytest
import torch

from sana_sprint import timesteps as ts
from sana_sprint.trigflow import HALF_PI, SIGMA_DATA, flow_time

N = 200_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "p_mean,p_std", [(ts.SCM_P_MEAN, ts.SCM_P_STD), (-0.8, 1.6), (ts.LADD_P_MEAN, ts.LADD_P_STD)]
)
def test_lognormal_trig_time_is_lognormal_in_sigma(p_mean, p_std):
    s = ts.lognormal_trig_time(N, p_mean, p_std, generator=_gen())
    assert s.shape == (N,) and s.dtype == torch.float32
    assert float(s.min()) > 0 and float(s.max()) <= HALF_PI
    tau = torch.log(torch.tan(s.double()) * SIGMA_DATA)  # sigma = sd tan s is log-normal
    assert abs(tau.mean().item() - p_mean) < 0.02
    assert abs(tau.std().item() - p_std) < 0.015
    # median maps through the monotone transform exactly: median(s) = arctan(exp(p_mean) / sd)
    assert abs(s.median().item() - math.atan(math.exp(p_mean) / SIGMA_DATA)) < 0.01


def test_lognormal_trig_time_is_reproducible():
    a = ts.lognormal_trig_time(16, generator=_gen(3))
    b = ts.lognormal_trig_time(16, generator=_gen(3))
    c = ts.lognormal_trig_time(16, generator=_gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_with_max_time_replaces_with_probability_p(p):
    s = ts.lognormal_trig_time(N, generator=_gen(1))
    out = ts.with_max_time(s, p, generator=_gen(2))
    replaced = out != s
    assert abs(replaced.double().mean().item() - p) < 0.01
    assert torch.all(out[replaced] == torch.tensor(HALF_PI, dtype=torch.float32))
    assert torch.equal(out[~replaced], s[~replaced])


def test_with_max_time_edge_probabilities():
    s = ts.lognormal_trig_time(100, generator=_gen(1))
    assert torch.equal(ts.with_max_time(s, 0.0), s)
    assert torch.all(ts.with_max_time(s, 1.0) == torch.tensor(HALF_PI, dtype=torch.float32))


def test_logit_normal_flow_time():
    t = ts.logit_normal_flow_time(N, mean=0.3, std=0.8, generator=_gen(5))
    assert float(t.min()) > 0 and float(t.max()) < 1
    u = torch.log(t.double() / (1 - t.double()))
    assert abs(u.mean().item() - 0.3) < 0.01 and abs(u.std().item() - 0.8) < 0.01


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_shift_flow_time_multiplies_the_odds(shift):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    out = ts.shift_flow_time(t, shift)
    # t' / (1 - t') = shift * t / (1 - t): the shift is a scaling of the noise-to-signal odds
    assert torch.allclose(out / (1 - out), shift * t / (1 - t), rtol=1e-12, atol=0)
    assert float(ts.shift_flow_time(0.0, shift)) == 0.0 and float(ts.shift_flow_time(1.0, shift)) == 1.0
    assert torch.all(out[1:] > out[:-1])
    if shift > 1:
        assert torch.all(out > t)
    # shifts compose multiplicatively, so shift then 1/shift is the identity
    assert torch.allclose(ts.shift_flow_time(out, 1 / shift), t, atol=1e-14, rtol=0)


def test_flow_schedule():
    sched = ts.flow_schedule(10, shift=3.0)
    assert sched.shape == (11,) and sched.dtype == torch.float64
    assert sched[0] == 1.0 and sched[-1] == 0.0
    assert torch.all(sched[1:] < sched[:-1])
    assert torch.allclose(sched, ts.shift_flow_time(torch.linspace(1, 0, 11, dtype=torch.float64), 3.0))
    with pytest.raises(ValueError):
        ts.flow_schedule(0)


def test_trig_schedule_is_uniform_in_flow_time():
    s = ts.trig_schedule(8)
    assert s[0] == pytest.approx(HALF_PI) and s[-1] == 0.0
    assert torch.allclose(flow_time(s), torch.linspace(1, 0, 9, dtype=torch.float64), atol=1e-15)
    assert float(ts.trig_schedule(4, s_max=1.5)[0]) == 1.5


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_default_schedules_are_valid(steps):
    sched = ts.consistency_schedule(steps)
    assert sched == [float(x) for x in ts.DEFAULT_SCHEDULES[steps]]
    assert len(sched) == steps + 1
    ts.validate_timesteps(sched)


def test_consistency_schedule_with_and_without_trailing_zero():
    assert ts.consistency_schedule(2, [1.5, 0.8]) == [1.5, 0.8, 0.0]
    assert ts.consistency_schedule(2, [1.5, 0.8, 0.0]) == [1.5, 0.8, 0.0]
    assert ts.consistency_schedule(1, torch.tensor([1.2])) == [pytest.approx(1.2), 0.0]
    # diffusers' SCMScheduler default max time is 1.57080, a rounding of pi/2 from above
    assert ts.consistency_schedule(1, [1.57080]) == [1.57080, 0.0]


def test_consistency_schedule_fallbacks():
    assert ts.consistency_schedule(2, defaults={"2": [1.5, 1.0, 0.0]}) == [1.5, 1.0, 0.0]
    assert ts.consistency_schedule(1, defaults={"2": [1.5, 1.0, 0.0]}) == ts.DEFAULT_SCHEDULES[1]
    five = ts.consistency_schedule(5)
    assert five == pytest.approx([HALF_PI * (1 - i / 5) for i in range(6)])
    ts.validate_timesteps(five)


@pytest.mark.parametrize(
    "steps,timesteps",
    [
        (2, [1.0, 1.3]),  # increasing
        (2, [1.3, 1.3, 0.0]),  # not strictly decreasing
        (1, [1.7]),  # above pi/2
        (2, [1.5, -0.1]),  # negative
        (2, [1.5, 0.0]),  # 0 before the end
        (2, [1.5, 1.0, 0.5]),  # N + 1 values not ending in 0
        (2, [1.5]),  # too short
        (2, [1.5, 1.0, 0.5, 0.0]),  # too long
        (1, [float("nan")]),
        (0, None),
    ],
)
def test_consistency_schedule_rejects_bad_input(steps, timesteps):
    with pytest.raises(ValueError):
        ts.consistency_schedule(steps, timesteps)
