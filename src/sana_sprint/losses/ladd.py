"""LADD adversarial losses in latent space with the teacher as discriminator backbone (DESIGN.md section 5).

Generator (student) term, per batch:
    s_G ~ sCM times, replaced by pi/2 with probability p        (max-time weighting; pi/2 itself, trap 4)
    x0_hat = cos s_G x_s - sin s_G sd F_theta(x_s/sd, s_G)      student forward with grad
    x_D = cos s_D x0_hat + sin s_D z',  s_D = arctan(exp(N(-0.6, 1)) / sd)
    L_adv_G = -mean(D(x_D/sd, s_D, y))                          grad flows through the frozen teacher
Discriminator term (hinge): 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake))), fakes made
without grad by the same rule; real and fake re-noised at independent s_D. Optional misaligned
pairs add the real latents rolled by one in the batch, with the original prompts, as extra fakes.
Means are over every token logit of every head and every sample.
"""

from __future__ import annotations

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
    sigma_data: float = SIGMA_DATA

    def __post_init__(self):
        if not 0.0 <= self.max_time_prob <= 1.0:
            raise ValueError(f"max_time_prob must be in [0, 1], got {self.max_time_prob}")
        if self.p_std <= 0 or self.d_p_std <= 0:
            raise ValueError("time distribution std must be > 0")


# ----------------------------------------------------------------------------- pure pieces


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, real term, fake term): 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    real = torch.relu(1.0 - real_logits).mean()
    fake = torch.relu(1.0 + fake_logits).mean()
    return 0.5 * (real + fake), real, fake


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge generator term -mean D(fake)."""
    return -fake_logits.mean()


def generator_time(n: int, config: LADDConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """s_G: the sCM time distribution with max-time override (s = pi/2 exactly, with probability p)."""
    s = lognormal_trig_time(n, config.p_mean, config.p_std, config.sigma_data, generator=generator)
    return with_max_time(s, config.max_time_prob, generator=generator, max_time=HALF_PI).to(device or "cpu")


def discriminator_time(n: int, config: LADDConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """s_D = arctan(exp(N(-0.6, 1)) / sd)."""
    return lognormal_trig_time(n, config.d_p_mean, config.d_p_std, config.sigma_data, generator=generator, device=device)


def misaligned(x0: torch.Tensor) -> torch.Tensor | None:
    """Real latents rolled by one (paired with the original prompts = mismatched pairs); None for B = 1,
    where rolling is the identity and the pair would be aligned."""
    return torch.roll(x0, 1, dims=0) if x0.shape[0] > 1 else None


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def renoise(x0: torch.Tensor, s: torch.Tensor, generator: torch.Generator | None, sigma_data: float = SIGMA_DATA):
    """x = cos s x0 + sin s sd z with fresh noise (training space)."""
    return trigflow_noise(x0, sigma_data * _randn_like(x0, generator), s)


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
        shifted = misaligned(x0) if config.misaligned_pairs else None
        if shifted is not None:
            fake = torch.cat([fake, shifted])
            fake_ehs, fake_mask = torch.cat([ehs, ehs]), torch.cat([mask, mask])
        s_real = discriminator_time(b, config, generator, x0.device)
        s_fake = discriminator_time(fake.shape[0], config, generator, x0.device)
        real_feats = disc.features(renoise(x0, s_real, generator, sd) / sd, s_real, ehs, mask)
        fake_feats = disc.features(renoise(fake, s_fake, generator, sd) / sd, s_fake, fake_ehs, fake_mask)
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
