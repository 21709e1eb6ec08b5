"""Relation contrast: make the flow model *use* a caption's relation words ("left of", "above", ...).

The teacher's flow loss barely rewards the relation: below t ~ 0.9 the noisy latent already shows which
object is where, and even at t ~ 1 knowing the relation lowers the irreducible error by ~2 %
(docs/results.md, "Position"). So the model ignores it: its error is the same with the true caption and
with the relation swapped. This loss asks for that difference directly. For a latent x of a position
scene, one noise eps and one (high) time t, with the true caption c and the swapped caption c' (left <->
right, above <-> below; objects and colours unchanged):

    e   = mean (v(x_t, t, c)  - (eps - x))^2        e' = mean (v(x_t, t, c') - (eps - x))^2
    L   = T * softplus((e - e') / T)

the logistic loss of a two-way "which caption made this image" classifier whose logits are -e / T (a
diffusion classifier), scaled by T so that its gradient, sigmoid((e - e') / T) * (grad e - grad e'), is
of the size of the flow loss's own. It falls once the true caption predicts the scene better than the
swapped one by a few T and saturates there. It cannot be met by degrading the swapped caption: that is
another scene's true caption, trained by the flow loss on its own scenes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..trigflow import flow_noise, flow_target
from .flow_matching import VelocityFn, per_sample_mse


def relation_contrast_loss(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    swapped_embeds: torch.Tensor,
    swapped_mask: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample relation contrast loss [B] (see the module docstring) and logged terms.

    One velocity call on the doubled batch (true captions, then swapped ones), same x_t and t for both.
    Terms: ``rel_loss``, ``rel_gap`` = mean (e' - e) (> 0: the relation is used), ``rel_win`` = share of
    samples with e < e'.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = x.float() if x.dtype != torch.float64 else x
    x_t = flow_noise(x, eps, t)
    target = flow_target(x, eps)
    v = velocity_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([embeds, swapped_embeds.to(embeds.dtype)]),
                    torch.cat([mask, swapped_mask.to(mask.dtype)]))
    err, err_swapped = per_sample_mse(v, torch.cat([target, target])).chunk(2)
    loss = temperature * F.softplus((err - err_swapped) / temperature)
    with torch.no_grad():
        terms = {"rel_loss": loss.mean(), "rel_gap": (err_swapped - err).mean(), "rel_win": (err < err_swapped).float().mean()}
    return loss, terms
