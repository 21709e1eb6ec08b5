"""Flow-matching (rectified flow) loss for the teacher: per-sample losses + logged terms, no I/O.

x_t = (1 - t) x + t eps,  target v* = eps - x,  loss_i = mean_{c,h,w} (v(x_t, t, y_i) - v*)^2
with logit-normal t (SD3 / SANA) and caption dropout to the text encoder's own null embedding and
null mask (so the model learns the unconditional branch CFG will query; DESIGN.md trap 7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..timesteps import logit_normal_flow_time
from ..trigflow import flow_noise, flow_target

CAPTION_DROPOUT = 0.1

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FlowDraws:
    """The random draws of one loss evaluation (kept separate so tests can recompute the loss)."""

    t: torch.Tensor  # [B] flow time in (0, 1), float32
    eps: torch.Tensor  # [B, ...] standard normal noise
    drop: torch.Tensor  # [B] bool: caption replaced by the null condition


def draw(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    caption_dropout: float = CAPTION_DROPOUT,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    high_t_prob: float = 0.0,
    high_t_logit_mean: float = 2.5,
    high_t_logit_std: float = 0.7,
) -> FlowDraws:
    """t ~ sigmoid(N(mean, std^2)), eps ~ N(0, I), drop ~ Bernoulli(p), all from ``generator`` on CPU.

    With ``high_t_prob`` > 0 each sample's t comes with that probability from a second logit-normal
    (``high_t_logit_mean``, ``high_t_logit_std``; by default median t = 0.92), the noise levels where a
    layout is decided: below them the noisy latent already shows which object is where. At 0 the draws
    are exactly those of the plain logit-normal (no extra numbers are drawn).
    Drawing on the CPU generator makes a run reproducible across devices and checkpoint-resumable.
    """
    b = x.shape[0]
    t = logit_normal_flow_time(b, logit_mean, logit_std, generator=generator)
    if high_t_prob > 0:
        high = logit_normal_flow_time(b, high_t_logit_mean, high_t_logit_std, generator=generator)
        t = torch.where(torch.rand(b, generator=generator) < high_t_prob, high, t)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    drop = torch.rand(b, generator=generator) < caption_dropout
    return FlowDraws(t.to(x.device), eps.to(x.device, x.dtype if x.dtype == torch.float64 else torch.float32), drop.to(x.device))


def apply_caption_dropout(
    embeds: torch.Tensor, mask: torch.Tensor, null_embeds: torch.Tensor, null_mask: torch.Tensor, drop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with ``drop`` take the null embedding [1, L, C] AND its own mask [1, L]."""
    d3 = drop.reshape(-1, 1, 1)
    e = torch.where(d3, null_embeds.to(embeds.dtype).expand_as(embeds), embeds)
    m = torch.where(drop.reshape(-1, 1), null_mask.to(mask.dtype).expand_as(mask), mask)
    return e, m


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all non-batch dims of (pred - target)^2, in >= float32."""
    d = pred.float() - target.float() if pred.dtype != torch.float64 else pred - target
    return d.pow(2).flatten(1).mean(1)


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor,
    generator: torch.Generator | None = None,
    caption_dropout: float = CAPTION_DROPOUT,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    draws: FlowDraws | None = None,
    high_t_prob: float = 0.0,
    high_t_logit_mean: float = 2.5,
    high_t_logit_std: float = 0.7,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample flow-matching loss [B] and logged terms.

    ``x`` is the clean latent in unit-std flow space (vae latent * scaling_factor).
    ``velocity_fn(x_t, t, embeds, mask) -> v``. ``draws`` overrides the random draws (tests).
    """
    if draws is None:
        draws = draw(x, generator, caption_dropout, logit_mean, logit_std, high_t_prob, high_t_logit_mean,
                     high_t_logit_std)
    x = x.float() if x.dtype != torch.float64 else x
    x_t = flow_noise(x, draws.eps, draws.t)  # (1 - t) x + t eps
    target = flow_target(x, draws.eps)  # eps - x
    e, m = apply_caption_dropout(embeds, mask, null_embeds, null_mask, draws.drop)
    v = velocity_fn(x_t, draws.t, e, m)
    loss = per_sample_mse(v, target)
    with torch.no_grad():
        terms = {
            "loss": loss.mean(),
            "t_mean": draws.t.mean(),
            "dropped": draws.drop.float().mean(),
            "v_std": v.float().std(),
        }
    return loss, terms
