"""LADD adversarial losses in latent space with the teacher as discriminator backbone (DESIGN.md section 5).

Generator (student) term, per batch:
    s_G ~ sCM times, replaced by pi/2 with probability p        (max-time weighting; pi/2 itself, trap 4)
    x0_hat = cos s_G x_s - sin s_G sd F_theta(x_s/sd, s_G)      student forward with grad
    x_D = cos s_D x0_hat + sin s_D z',  s_D = arctan(exp(N(-0.6, 1)) / sd)
    L_adv_G = -mean(D(x_D/sd, s_D, y))                          grad flows through the frozen teacher
Discriminator term (hinge): 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake))), fakes made
without grad by the same rule; real and fake re-noised at independent s_D. Optional misaligned
pairs add the real latents rolled by one within consecutive groups of ``misaligned_group`` samples
(the discriminator's virtual-batch groups), with the original prompts, as extra fakes.
Means are over every token logit of every head and every sample.

Randomness: every draw takes ``generator``, a ``torch.Generator`` (or None: global RNG) or a
``training.distributed.RankDraws`` (anything with ``rows(fn, n, segments)``), which draws the rows
for the global batch of a multi-process run and keeps this rank's (see :func:`per_sample`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..timesteps import LADD_P_MEAN, LADD_P_STD, SCM_P_MEAN, SCM_P_STD, lognormal_trig_time, with_max_time
from ..trigflow import HALF_PI, SIGMA_DATA, _f32, consistency_fn, trigflow_noise


@dataclass(frozen=True)
class LADDConfig:
    max_time_prob: float = 0.5  # p of s_G = pi/2 (paper Tab. 6: 0.5 -> FID 8.32, 0.7 -> 8.11)
    p_mean: float = SCM_P_MEAN  # generator times (the sCM distribution)
    p_std: float = SCM_P_STD
    d_p_mean: float = LADD_P_MEAN  # discriminator re-noising times
    d_p_std: float = LADD_P_STD
    misaligned_pairs: bool = True
    misaligned_group: int = 8  # rolled within groups of this many samples (= the discriminator's virtual batch)
    sigma_data: float = SIGMA_DATA

    def __post_init__(self):
        if not 0.0 <= self.max_time_prob <= 1.0:
            raise ValueError(f"max_time_prob must be in [0, 1], got {self.max_time_prob}")
        if self.p_std <= 0 or self.d_p_std <= 0:
            raise ValueError("time distribution std must be > 0")
        if self.misaligned_group < 1:
            raise ValueError(f"misaligned_group must be >= 1, got {self.misaligned_group}")


# ----------------------------------------------------------------------------- pure pieces


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, real term, fake term): 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    real = torch.relu(1.0 - real_logits).mean()
    fake = torch.relu(1.0 + fake_logits).mean()
    return 0.5 * (real + fake), real, fake


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge generator term -mean D(fake)."""
    return -fake_logits.mean()


def per_sample(fn, n: int, generator, segments: int = 1) -> torch.Tensor:
    """``fn(rows, torch_generator)``: a tensor of ``rows`` per-sample draws. With a plain generator
    (or None) this is ``fn(n, generator)``; with a ``RankDraws`` the draw is made for the global batch
    and this rank's ``n`` rows are returned (``segments``: see ``RankDraws.rows``)."""
    rows = getattr(generator, "rows", None)
    if rows is not None:
        return rows(fn, n, segments)
    return fn(n, generator)


def generator_time(n: int, config: LADDConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """s_G: the sCM time distribution with max-time override (s = pi/2 exactly, with probability p)."""

    def draw(m, g):
        s = lognormal_trig_time(m, config.p_mean, config.p_std, config.sigma_data, generator=g)
        return with_max_time(s, config.max_time_prob, generator=g, max_time=HALF_PI)

    return per_sample(draw, n, generator).to(device or "cpu")


def discriminator_time(n: int, config: LADDConfig, generator: torch.Generator | None = None, device=None,
                       segments: int = 1) -> torch.Tensor:
    """s_D = arctan(exp(N(-0.6, 1)) / sd)."""

    def draw(m, g):
        return lognormal_trig_time(m, config.d_p_mean, config.d_p_std, config.sigma_data, generator=g)

    return per_sample(draw, n, generator, segments).to(device or "cpu")


def misaligned_index(b: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(src, dst) of the misaligned pairs of a batch of ``b``: real latent ``src[i]`` goes with prompt
    ``dst[i]``. The batch is cut into consecutive groups of ``group`` samples (None: one group = the
    whole batch; the last group may be smaller) and rolled by one within each group; a group of one
    sample has no mismatched partner and contributes nothing. None when no pair is left (B = 1)."""
    g = b if group is None else int(group)
    src, dst = [], []
    for start in range(0, b, g):
        n = min(g, b - start)
        if n > 1:
            idx = torch.arange(start, start + n)
            src.append(torch.roll(idx, 1))
            dst.append(idx)
    if not src:
        return None
    return torch.cat(src), torch.cat(dst)


def misaligned(x0: torch.Tensor, group: int | None = None) -> torch.Tensor | None:
    """Real latents rolled by one within groups of ``group`` (see :func:`misaligned_index`; paired with
    the original prompts ``dst`` = mismatched pairs); None for B = 1, where rolling is the identity."""
    pairs = misaligned_index(x0.shape[0], group)
    if pairs is None:
        return None
    src, dst = pairs
    if len(dst) != x0.shape[0]:
        raise ValueError("a group of one sample has no misaligned pair: use misaligned_index")
    return x0[src.to(x0.device)]


def _randn_like(x: torch.Tensor, generator, segments: int = 1) -> torch.Tensor:
    def draw(m, g):
        return torch.randn((m, *x.shape[1:]), generator=g, dtype=torch.float32)

    return per_sample(draw, x.shape[0], generator, segments).to(x.device, x.dtype)


def renoise(x0: torch.Tensor, s: torch.Tensor, generator, sigma_data: float = SIGMA_DATA, segments: int = 1):
    """x = cos s x0 + sin s sd z with fresh noise (training space)."""
    return trigflow_noise(x0, sigma_data * _randn_like(x0, generator, segments), s)


# ----------------------------------------------------------------------------- network calls


def generator_draws(
    x0: torch.Tensor, config: LADDConfig, generator: torch.Generator | None = None, s: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_s, s_G): fresh-noise input of the student's adversarial sample, at max-time-weighted s_G."""
    x0 = _f32(x0)
    if s is None:
        s = generator_time(x0.shape[0], config, generator, x0.device)
    return renoise(x0, s, generator, config.sigma_data), s


def student_sample(
    student: nn.Module,
    x0: torch.Tensor,
    ehs: torch.Tensor,
    mask: torch.Tensor | None,
    guidance: torch.Tensor | None,
    config: LADDConfig,
    generator: torch.Generator | None = None,
    s: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, s_G): one-step student prediction from fresh noise at s_G (grad follows the caller's mode)."""
    sd = config.sigma_data
    x_s, s = generator_draws(x0, config, generator, s)
    F = student(x_s / sd, s, ehs, mask, guidance=guidance)
    return consistency_fn(x_s, _f32(F), s, sd), s


def adversarial_g_loss(
    student: nn.Module,
    disc: nn.Module,
    x0: torch.Tensor,
    ehs: torch.Tensor,
    mask: torch.Tensor | None,
    guidance: torch.Tensor | None,
    config: LADDConfig = LADDConfig(),
    generator: torch.Generator | None = None,
    x0_hat: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_adv_G = -mean D(renoise(x0_hat)). ``x0_hat`` may be given (a student sample with grad)."""
    sd = config.sigma_data
    if x0_hat is None:
        x0_hat, _ = student_sample(student, x0, ehs, mask, guidance, config, generator)
    s_D = discriminator_time(x0_hat.shape[0], config, generator, x0_hat.device)
    logits = disc(renoise(x0_hat, s_D, generator, sd) / sd, s_D, ehs, mask)
    loss = generator_adv_loss(logits)
    return loss, {"ladd/g_adv": loss.item(), "ladd/g_logits": logits.mean().item()}


def normalised_feature_mse(feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean over layers l of mean((f_l - t_l)^2) / mean(t_l^2): each hooked block weighs the same whatever the
    scale of its activations (the normaliser is the target's, without grad)."""
    if len(feats) != len(targets) or not feats:
        raise ValueError(f"need the same number (>= 1) of feature maps, got {len(feats)} and {len(targets)}")
    per_layer = []
    for f, t in zip(feats, targets):
        f, t = f.float(), t.float().detach()
        per_layer.append((f - t).square().mean() / t.square().mean().clamp_min(1e-12))
    return torch.stack(per_layer).mean()


def feature_regression_loss(
    disc: nn.Module,
    x0_hat: torch.Tensor,
    x0_target: torch.Tensor,
    ehs: torch.Tensor,
    mask: torch.Tensor | None,
    config: LADDConfig = LADDConfig(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Regression of ``x0_hat`` onto ``x0_target`` (both training space) in the discriminator backbone's
    feature space: both re-noised at the same s_D with the same noise, compared by
    :func:`normalised_feature_mse` over the hooked teacher blocks. Gradients flow to ``x0_hat`` only."""
    sd = config.sigma_data
    x0_hat, x0_target = _f32(x0_hat), _f32(x0_target).detach()
    s_D = discriminator_time(x0_hat.shape[0], config, generator, x0_hat.device)
    z = sd * _randn_like(x0_hat, generator)
    with torch.no_grad():
        targets = disc.features(trigflow_noise(x0_target, z, s_D) / sd, s_D, ehs, mask)
    feats = disc.features(trigflow_noise(x0_hat, z, s_D) / sd, s_D, ehs, mask)
    return normalised_feature_mse(feats, targets)


def discriminator_loss(
    student: nn.Module,
    disc: nn.Module,
    x0: torch.Tensor,
    ehs: torch.Tensor,
    mask: torch.Tensor | None,
    guidance: torch.Tensor | None,
    config: LADDConfig = LADDConfig(),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Hinge loss of the heads. The student and the teacher features run without grad."""
    sd = config.sigma_data
    x0 = _f32(x0)
    b = x0.shape[0]
    if mask is None:
        mask = torch.ones(ehs.shape[:2], dtype=torch.long, device=ehs.device)
    with torch.no_grad():
        fake, _ = student_sample(student, x0, ehs, mask, guidance, config, generator)
        fake_ehs, fake_mask = ehs, mask
        pairs = misaligned_index(b, config.misaligned_group) if config.misaligned_pairs else None
        segments = 1
        if pairs is not None:
            src, dst = (i.to(x0.device) for i in pairs)
            fake = torch.cat([fake, x0[src]])
            fake_ehs, fake_mask = torch.cat([ehs, ehs[dst]]), torch.cat([mask, mask[dst]])
            segments = 2 if len(dst) == b else 1  # [fakes; misaligned reals] (multi-process: always 2 x b)
        s_real = discriminator_time(b, config, generator, x0.device)
        s_fake = discriminator_time(fake.shape[0], config, generator, x0.device, segments)
        real_feats = disc.features(renoise(x0, s_real, generator, sd) / sd, s_real, ehs, mask)
        fake_feats = disc.features(renoise(fake, s_fake, generator, sd, segments) / sd, s_fake, fake_ehs, fake_mask)
    real_logits = disc.head_logits([f.detach() for f in real_feats])
    fake_logits = disc.head_logits([f.detach() for f in fake_feats])
    loss, real, fake_term = hinge_d_loss(real_logits, fake_logits)
    logs = {
        "ladd/d_loss": loss.item(),
        "ladd/d_real": real.item(),
        "ladd/d_fake": fake_term.item(),
        "ladd/d_real_logits": real_logits.mean().item(),
        "ladd/d_fake_logits": fake_logits.mean().item(),
    }
    return loss, logs
