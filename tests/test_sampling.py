"""sampling/: stateless samplers against closed forms, oracles and diffusers' own implementation."""

import math

import pytest
import torch
from diffusers import SCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from sana_sprint import trigflow as tf
from sana_sprint.sampling import cfg, cfg_batched, consistency, flow_euler, randn, trigflow_euler
from sana_sprint.timesteps import DEFAULT_SCHEDULES, flow_schedule

SD = tf.SIGMA_DATA
F64 = torch.float64
SHAPE = (4, 3, 2, 2)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---- noise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["list", "single", "list1"])
def test_randn_matches_diffusers_randn_tensor(kind):
    seeds = [7, 8, 9, 10] if kind == "list" else [7]
    shape = SHAPE if kind != "list1" else (1, *SHAPE[1:])
    make = (lambda: _gens(seeds)) if kind != "single" else (lambda: torch.Generator().manual_seed(7))
    ga, gb = make(), make()
    ours, ref = randn(shape, ga), randn_tensor(shape, generator=gb)
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
    # generator states advance identically too
    ours2, ref2 = randn(shape, ga), randn_tensor(shape, generator=gb)
    assert torch.equal(ours2, ref2) and not torch.equal(ours, ours2)


def test_randn_is_per_sample():
    batch = randn(SHAPE, _gens([1, 2, 3, 4]))
    for i, seed in enumerate([1, 2, 3, 4]):
        assert torch.equal(batch[i : i + 1], randn((1, *SHAPE[1:]), _gens([seed])))
    with pytest.raises(ValueError):
        randn(SHAPE, _gens([1, 2]))
    assert randn(SHAPE, None, dtype=F64).dtype == F64


# ---- guidance ------------------------------------------------------------------------------------


def test_cfg_combines_predictions():
    x = torch.randn(3, 2)
    t = torch.full((3,), 0.4)
    fc, fu = (lambda x, t: 2 * x + t[:, None]), (lambda x, t: -x)
    for w in (0.0, 1.0, 4.5):
        assert torch.allclose(cfg(fc, fu, w)(x, t), -x + w * (3 * x + t[:, None]))
    assert torch.allclose(cfg(fc, fu, 0.0)(x, t), fu(x, t)) and torch.allclose(
        cfg(fc, fu, 1.0)(x, t), fc(x, t)
    )
    w = torch.tensor([0.0, 1.0, 3.0])
    assert torch.allclose(cfg(fc, fu, w)(x, t), -x + w[:, None] * (3 * x + t[:, None]))


def test_cfg_batched_equals_two_passes():
    calls = []

    def fn(x, t, cond):  # a conditional "model": uses the embedding and the mask per sample
        emb, mask = cond
        calls.append(x.shape[0])
        return x * emb.mean(1, keepdim=True) + t[:, None] * mask.sum(1, keepdim=True)

    x, t = torch.randn(3, 5), torch.full((3,), 0.7)
    cond = (torch.randn(3, 4), torch.ones(3, 4))
    uncond = (torch.randn(3, 4), torch.tensor([[1.0, 0, 0, 0]] * 3))
    two_pass = cfg(lambda x, t: fn(x, t, cond), lambda x, t: fn(x, t, uncond), 4.5)(x, t)
    calls.clear()
    one_pass = cfg_batched(fn, cond, uncond, 4.5)(x, t)
    assert calls == [6]
    assert torch.allclose(one_pass, two_pass, atol=1e-6)


# ---- flow Euler ----------------------------------------------------------------------------------


def test_flow_euler_linear_velocity_closed_form():
    """v = a x: Euler gives prod_i (1 + (t_{i+1} - t_i) a) x_T exactly; the ODE gives exp(-a) x_T."""
    a = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    x_T = torch.randn(2, 3, dtype=F64)
    seen = []

    def v(x, t):
        seen.append(t.clone())
        return a * x

    errs = []
    for steps in (8, 32, 128):
        sched = flow_schedule(steps, shift=3.0)
        seen.clear()
        out = flow_euler(v, x_T, sched)
        factor = torch.prod(1 + (sched[1:] - sched[:-1])[:, None] * a, dim=0)
        assert out.dtype == F64 and torch.allclose(out, factor * x_T, atol=1e-13, rtol=0)
        assert (
            len(seen) == steps and torch.equal(torch.stack(seen)[:, 0], sched[:-1]) and seen[0].shape == (2,)
        )
        errs.append((out - torch.exp(-a) * x_T).abs().max().item())
    assert errs[0] > 3 * errs[1] > 9 * errs[2] and errs[2] < 0.05


def test_flow_euler_runs_half_precision_state_in_float32():
    out = flow_euler(lambda x, t: -x, torch.ones(2, 2, dtype=torch.bfloat16), [1.0, 0.5, 0.0], progress=True)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full((2, 2), 2.25))


# ---- TrigFlow Euler vs flow Euler through the transform -----------------------------------------

MU = torch.tensor([1.0, -0.5], dtype=F64)
SIG = torch.tensor([0.4, 1.5], dtype=F64)


def v_star(x_t, t):
    """Optimal rectified-flow velocity for x ~ N(MU, SIG^2), eps ~ N(0, 1) (derived in test_trigflow.py)."""
    t = t[:, None]
    return -MU + (t - (1 - t) * SIG**2) / ((1 - t) ** 2 * SIG**2 + t**2) * (x_t - (1 - t) * MU)


def trigflow_of(velocity_fn):
    """Closure: velocity model -> TrigFlow model F(x_s / sd, s), by Prop. 3.1."""

    def F_fn(x_scaled, s):
        x_fm, t = tf.flow_input(x_scaled * SD, s)
        return tf.trigflow_from_flow(x_scaled, velocity_fn(x_fm, t), t)

    return F_fn


def test_trigflow_euler_matches_flow_euler():
    eps = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = MU + SIG * eps
    gaps, errs = [], []
    for steps in (10, 40, 160):
        x_flow = flow_euler(v_star, eps, flow_schedule(steps))
        s_sched = tf.trig_time(flow_schedule(steps))  # the same grid, in TrigFlow time
        x_trig = trigflow_euler(trigflow_of(v_star), SD * eps, s_sched) / SD
        gaps.append((x_trig - x_flow).abs().max().item())
        errs.append((x_trig - exact).abs().max().item())
    # first order: 16x the steps shrinks both the gap and the error about 16x
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < gaps[0] / 8 and gaps[2] < 0.05
    assert errs[0] > errs[1] > errs[2] and errs[2] < errs[0] / 8 and errs[2] < 0.02


# ---- consistency sampling ------------------------------------------------------------------------

X0_STAR = torch.tensor([[0.3, -0.2], [0.1, 0.45]], dtype=F64)  # training space


def oracle_point_mass(x_scaled, s):
    """Ideal F for data concentrated at X0_STAR: z = (x_s - cos s x0*) / sin s, F = (cos s z - sin s x0*) / sd."""
    s = s[:, None, None]
    x_s = SD * x_scaled
    z = (x_s - torch.cos(s) * X0_STAR) / torch.sin(s)
    return (torch.cos(s) * z - torch.sin(s) * X0_STAR) / SD


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_with_oracle_returns_the_point_mass(steps):
    x_init = SD * torch.randn(3, 2, 2, dtype=F64)
    x0s = consistency(oracle_point_mass, x_init, DEFAULT_SCHEDULES[steps], _gens([1, 2, 3]), return_all=True)
    assert len(x0s) == steps
    for x0 in x0s:
        assert x0.dtype == F64 and torch.allclose(x0, X0_STAR.expand(3, 2, 2), atol=1e-12, rtol=0)


A = SD * torch.tensor([0.5, 2.0], dtype=F64)  # training-space data std per dim
M = SD * torch.tensor([1.0, -1.0], dtype=F64)  # training-space data mean


def consistency_oracle_gaussian(x_scaled, s):
    """Exact consistency function of Gaussian data: f(x_s, s) = M + A (x_s - cos s M) / std_s, written as F."""
    s = s[:, None]
    x_s = SD * x_scaled
    std_s = torch.sqrt(torch.cos(s) ** 2 * A**2 + torch.sin(s) ** 2 * SD**2)
    f = M + A * (x_s - torch.cos(s) * M) / std_s
    return (torch.cos(s) * x_s - f) / (torch.sin(s) * SD)  # inverts f = cos s x_s - sin s sd F


def test_one_step_is_the_ode_map_and_n_steps_resample_exactly():
    n = 8_000  # 16k elements: below torch's intra-op parallel grain, fast on a busy CPU
    eps = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    one = consistency(consistency_oracle_gaussian, SD * eps, [tf.HALF_PI, 0.0])
    assert torch.allclose(one, M + A * eps, atol=1e-12, rtol=0)  # deterministic: the PF-ODE endpoint of eps
    four = consistency(
        consistency_oracle_gaussian, SD * eps, DEFAULT_SCHEDULES[4], torch.Generator().manual_seed(1)
    )
    # fresh noise makes the 4-step sample differ per sample, yet with an exact model it is still an exact sample
    assert (four - one).abs().mean() > 0.1
    for x in (one, four):
        assert torch.allclose(x.mean(0), M, atol=4 * A.max().item() / math.sqrt(n))
        assert torch.allclose(x.std(0), A, rtol=0.04)  # 5 standard errors


def test_consistency_is_independent_of_batch_composition():
    def F_fn(x, s):  # nonlinear, per-sample, float32
        return torch.tanh(x) * torch.cos(s)[:, None, None, None] + 0.1 * x**2

    sched = DEFAULT_SCHEDULES[4]
    seeds = [11, 12, 13, 14]
    x_init = SD * randn(SHAPE, _gens(seeds))
    batch = consistency(F_fn, x_init, sched, _gens(seeds))
    for i, seed in enumerate(seeds):
        single = consistency(F_fn, SD * randn((1, *SHAPE[1:]), _gens([seed])), sched, _gens([seed]))
        assert torch.equal(single[0], batch[i])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_matches_diffusers_scm_scheduler(steps):
    """Bit-for-bit against SCMScheduler.step with the same generators, including the generator state after."""

    def F_fn(x, s):
        return torch.sin(3 * x) + s[:, None, None, None] * x

    sched = DEFAULT_SCHEDULES[steps]
    seeds = [3, 4, 5, 6]
    g_ref = _gens(seeds)
    latents = randn_tensor(SHAPE, generator=g_ref) * SD
    scheduler = SCMScheduler()
    scheduler.set_timesteps(steps, timesteps=sched, max_timesteps=None, intermediate_timesteps=None)
    scheduler.set_begin_index(0)  # as the pipeline does
    for s in scheduler.timesteps[:-1]:
        s_b = s.expand(SHAPE[0])
        latents, ref = scheduler.step(
            SD * F_fn(latents / SD, s_b), s_b, latents, generator=g_ref, return_dict=False
        )

    g = _gens(seeds)
    ours = consistency(F_fn, SD * randn(SHAPE, g), sched, g)
    assert torch.equal(ours, ref)
    assert torch.equal(randn(SHAPE, g), randn(SHAPE, g_ref))


@pytest.mark.parametrize("steps", [2, 4])
def test_consistency_matches_sana_sprint_pipeline(steps):
    """End to end against diffusers' SanaSprintPipeline with a tiny transformer and our TrigFlow wrapper.

    diffusers 0.42's pipeline cannot take custom timesteps (retrieve_timesteps drops num_inference_steps),
    so its built-in schedules are used: [1.5708, 1.3, 0] for 2 steps, linspace(1.5708, 0) otherwise.
    """
    from diffusers import SanaTransformer2DModel
    from diffusers.pipelines.sana.pipeline_sana_sprint import SanaSprintPipeline

    from sana_sprint.models.wrapper import TrigFlowTransformer

    torch.manual_seed(0)
    net = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=2, patch_size=1, guidance_embeds=True, qk_norm="rms_norm_across_heads",
    ).eval()  # fmt: skip
    emb, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    pipe = SanaSprintPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=net, scheduler=SCMScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    if steps == 2:
        sched, inter = [1.57080, 1.3, 0.0], 1.3
    else:
        sched, inter = torch.linspace(1.57080, 0, steps + 1).tolist(), None
    ref = pipe(
        prompt_embeds=emb, prompt_attention_mask=mask, height=64, width=64, num_inference_steps=steps,
        intermediate_timesteps=inter, guidance_scale=4.5,
        generator=_gens([0, 1]), output_type="latent", use_resolution_binning=False,
    ).images  # fmt: skip

    model = TrigFlowTransformer(net)
    g = _gens([0, 1])
    with torch.no_grad():
        x0 = consistency(
            lambda x, s: model(x, s, emb, mask, guidance=4.5), SD * randn((2, 4, 2, 2), g), sched, g
        )
    assert torch.equal(x0 / SD, ref)  # same generators, same float32 op order: bit-identical
