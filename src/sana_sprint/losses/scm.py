"""sCM continuous-time consistency loss with a CFG teacher (SANA-Sprint / sCM; DESIGN.md section 4).

One generator step, per sample b (x_s = cos s x0 + sin s z, z ~ N(0, sd^2 I)):

    dxds  = sd (F_T(null) + w (F_T(y) - F_T(null)))                         teacher, CFG, no grad
    F_m, dF = jvp(F_theta-(., ., y, w), (x_s/sd, s), (cos s sin s dxds/sd, cos s sin s))   no grad
    g     = -cos^2 s (sd F_m - dxds) - r (cos s sin s x_s + sd dF)         r = min(1, step / H)
    g     = g / (||g||_2 + c)                                               c = 0.1, norm over the sample
    L_b   = mean_elements( 1/(sd tan s) / exp(logvar) (F_theta - F_m - g)^2 + logvar )

``F_theta`` is a normal forward with gradients and ``logvar = logvar(s, w)`` the student's
adaptive-weighting head. The element mean (not a sum) follows the official implementation, whose
``loss.mean()`` over [B, C, H, W] is the batch mean of these per-sample losses. The network sees
``x_s / sd``; all trigonometry and tangent algebra run in float32 (float64 inputs stay float64).

The no-grad half (:func:`scm_targets`) and the loss (:func:`scm_loss_from`) are split so a method
can batch the student's gradient forward with other work; :func:`scm_loss` does both.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..timesteps import SCM_P_MEAN, SCM_P_STD, lognormal_trig_time
from ..trigflow import SIGMA_DATA, _bcast, _f32, trigflow_noise

DEFAULT_GUIDANCE_SCALES = (4.0, 4.5, 5.0)  # w drawn per sample (official SANA-Sprint)
TANGENT_NORM_EPS = 0.1  # c in g / (||g|| + c) (sCM paper)
JVP_MODES = ("fast", "plain", "compile")  # student_jvp's ways of computing the same JVP


@dataclass(frozen=True)
class SCMConfig:
    """sCM settings. ``tangent_warmup`` H counts *generator* updates: r = min(1, g_step / H).

    The official H = 4000 counts G and D updates together (1:1 alternation), i.e. 2000 generator
    updates; H = 0 disables the warm-up (r = 1 from the first step).
    """

    p_mean: float = SCM_P_MEAN
    p_std: float = SCM_P_STD
    guidance_scales: tuple[float, ...] = DEFAULT_GUIDANCE_SCALES
    tangent_warmup: int = 2000
    tangent_eps: float = TANGENT_NORM_EPS
    sigma_data: float = SIGMA_DATA
    jvp: str = "fast"  # student_jvp mode: fast / plain / compile

    def __post_init__(self):
        if self.p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")
        if not self.guidance_scales:
            raise ValueError("guidance_scales must not be empty")
        if self.tangent_warmup < 0:
            raise ValueError(f"tangent_warmup must be >= 0, got {self.tangent_warmup}")
        if self.tangent_eps <= 0:
            raise ValueError(f"tangent_eps must be > 0, got {self.tangent_eps}")
        if self.jvp not in JVP_MODES:
            raise ValueError(f"jvp must be one of {JVP_MODES}, got {self.jvp!r}")


@dataclass
class SCMTargets:
    """Everything the sCM loss needs that carries no gradient (per-sample tensors, batch first)."""

    x_s: torch.Tensor  # noisy sample (training space)
    s: torch.Tensor  # [B] TrigFlow time
    w: torch.Tensor  # [B] CFG scale of the teacher target (and the student's guidance input)
    dxds: torch.Tensor  # teacher CFG velocity dx_s/ds
    g: torch.Tensor  # normalised tangent
    tangent_norm: torch.Tensor  # [B] ||g|| before normalisation
    r: float  # tangent warm-up factor


@dataclass
class SCMOutput:
    loss: torch.Tensor  # [B] per-sample loss (the batch mean is the official scalar loss)
    F_theta: torch.Tensor
    logs: dict[str, float]


# ----------------------------------------------------------------------------- small pure pieces


def sample_guidance(
    n: int, scales: Sequence[float] = DEFAULT_GUIDANCE_SCALES, generator: torch.Generator | None = None
) -> torch.Tensor:
    """w [n] drawn uniformly from ``scales`` (float32)."""
    choices = torch.as_tensor(list(scales), dtype=torch.float32)
    return choices[torch.randint(len(choices), (n,), generator=generator)]


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r = min(1, step / H): weight of the dF/ds term (sCM tangent warm-up); H = 0 means r = 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / warmup_steps)


def cfg_combine(F_cond: torch.Tensor, F_uncond: torch.Tensor, w: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """dx_s/ds = sd (F_u + w (F_c - F_u)) with per-sample w [B]."""
    w = _bcast(w, F_cond)
    return sigma_data * (F_uncond + w * (F_cond - F_uncond))


def scm_tangent(
    F_m: torch.Tensor, dF: torch.Tensor, dxds: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor, r: float,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """g = -cos^2 s (sd F_m - dxds) - r (cos s sin s x_s + sd dF)  (dF already carries the cos s sin s factor)."""
    s = _bcast(s, x_s)
    cos, sin = torch.cos(s), torch.sin(s)
    return -(cos**2) * (sigma_data * F_m - dxds) - r * (cos * sin * x_s + sigma_data * dF)


def normalize_tangent(g: torch.Tensor, eps: float = TANGENT_NORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(g / (||g||_2 + eps), ||g||_2 [B]): the norm is over all elements of each sample."""
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return g / (_bcast(norm, g) + eps), norm


def adaptive_weighted_loss(
    F_theta: torch.Tensor, F_minus: torch.Tensor, g: torch.Tensor, logvar: torch.Tensor, s: torch.Tensor,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """Per-sample  mean_elements( 1/(sd tan s) / exp(logvar) (F_theta - F_minus - g)^2 ) + logvar  -> [B]."""
    s = _f32(s)
    weight = 1.0 / (sigma_data * torch.tan(s))
    mse = (F_theta - F_minus - g).square().flatten(1).mean(1)
    return weight / torch.exp(logvar) * mse + logvar


# ----------------------------------------------------------------------------- network calls


def _expand_to(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b, *t.shape[1:]) if t.shape[0] == 1 else t


def _pad_tokens(e: torch.Tensor, m: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = length - e.shape[1]
    if pad <= 0:
        return e, m
    return nn.functional.pad(e, (0, 0, 0, pad)), nn.functional.pad(m, (0, pad))


def padded_cat(embeds: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate caption embeddings [B_i, L_i, D] and masks [B_i, L_i] along the batch, shorter ones
    zero-padded with mask 0 to the longest L."""
    length = max(e.shape[1] for e in embeds)
    pairs = [_pad_tokens(e, m, length) for e, m in zip(embeds, masks, strict=True)]
    return torch.cat([e for e, _ in pairs]), torch.cat([m for _, m in pairs])


def paired_conditions(
    ehs: torch.Tensor, mask: torch.Tensor | None, null_ehs: torch.Tensor, null_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[cond; uncond] embeddings and masks for one doubled-batch call.

    The unconditional half uses the null embedding's *own* mask (trap 7), broadcast to the batch;
    sequences of different lengths are zero-padded with mask 0.
    """
    b = ehs.shape[0]
    if mask is None:
        mask = torch.ones(ehs.shape[:2], dtype=torch.long, device=ehs.device)
    null_ehs = _expand_to(null_ehs.to(ehs.device, ehs.dtype), b)
    null_mask = (
        torch.ones(null_ehs.shape[:2], dtype=mask.dtype, device=ehs.device)
        if null_mask is None
        else _expand_to(null_mask.to(ehs.device, mask.dtype), b)
    )
    return padded_cat([ehs, null_ehs], [mask, null_mask])


@torch.no_grad()
def teacher_cfg_velocity(
    teacher: nn.Module,
    x_s: torch.Tensor,
    s: torch.Tensor,
    ehs: torch.Tensor,
    mask: torch.Tensor | None,
    null_ehs: torch.Tensor,
    null_mask: torch.Tensor | None,
    w: torch.Tensor,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """Teacher's guided velocity dx_s/ds, cond and uncond in one doubled batch, no grad."""
    b = x_s.shape[0]
    both_ehs, both_mask = paired_conditions(ehs, mask, null_ehs, null_mask)
    x2 = (x_s / sigma_data).repeat(2, *([1] * (x_s.ndim - 1)))
    F = _f32(teacher(x2, torch.cat([s, s]), both_ehs, both_mask))
    return cfg_combine(F[:b], F[b:], w, sigma_data)


@contextlib.contextmanager
def _checkpointing_off(module: nn.Module) -> Iterator[None]:
    """Gradient checkpointing off for every submodule that has it (trap 8), restored on exit."""
    saved = [(m, m.gradient_checkpointing) for m in module.modules() if hasattr(m, "gradient_checkpointing")]
    try:
        for m, _ in saved:
            m.gradient_checkpointing = False
        yield
    finally:
        for m, v in saved:
            m.gradient_checkpointing = v


def _jvp_context(student: nn.Module, fast: bool = True):
    return student.jvp_mode(fast=fast) if hasattr(student, "jvp_mode") else contextlib.nullcontext()


def _jvp_call(student: nn.Module, x, s, tx, ts, ehs, mask, guidance):
    def F_fn(x_scaled, s_):
        return student(x_scaled, s_, ehs, mask, guidance=guidance)

    return torch.func.jvp(F_fn, (x, s), (tx, ts))


@functools.cache
def _compiled_jvp():
    """``_jvp_call`` under ``torch.compile`` (built once per process; inductor fuses the tangent's
    element-wise work, which at small widths costs more than the matrix products)."""
    return torch.compile(_jvp_call, dynamic=False)


@torch.no_grad()
def student_jvp(
    student: nn.Module,
    x_s: torch.Tensor,
    s: torch.Tensor,
    dxds: torch.Tensor,
    ehs: torch.Tensor,
    mask: torch.Tensor | None,
    guidance: torch.Tensor | None,
    sigma_data: float = SIGMA_DATA,
    mode: str = "fast",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_m, dF): the stop-grad student and its JVP along (cos s sin s dxds / sd, cos s sin s).

    Runs under no_grad (the weights act as constants = theta minus), with gradient checkpointing off
    and the cross-attention swapped to a forward-mode-safe processor (``jvp_mode``). ``mode``:

    - ``fast`` (default): models/jvp.py's constant-weight rules for Linear / Conv2d and a query-only
      cross-attention JVP: the same JVP without the zero weight-tangent products;
    - ``plain``: PyTorch's own forward-AD formulas (only the cross-attention made explicit);
    - ``compile``: ``plain`` under ``torch.compile`` (compiles on the first call; pays off where the
      element-wise work dominates, e.g. the small shapes models on a CPU).
    """
    if mode not in JVP_MODES:
        raise ValueError(f"jvp mode must be one of {JVP_MODES}, got {mode!r}")
    cs = torch.cos(_f32(s)) * torch.sin(_f32(s))
    tx, ts = _bcast(cs, x_s) * dxds / sigma_data, cs
    call = _compiled_jvp() if mode == "compile" else _jvp_call
    with _checkpointing_off(student), _jvp_context(student, fast=mode == "fast"):
        F_m, dF = call(student, x_s / sigma_data, _f32(s), tx, ts, ehs, mask, guidance)
    return _f32(F_m), _f32(dF)


def scm_targets(
    student: nn.Module,
    teacher: nn.Module,
    x0: torch.Tensor,
    ehs: torch.Tensor,
    mask: torch.Tensor | None,
    null_ehs: torch.Tensor,
    null_mask: torch.Tensor | None,
    *,
    step: int,
    config: SCMConfig = SCMConfig(),
    generator: torch.Generator | None = None,
    s: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    student_guidance: bool | None = None,
) -> SCMTargets:
    """Draw (s, z, w), run the teacher and the student JVP, build the normalised tangent (no grad).

    ``noise`` is unit-variance (scaled by sd here). ``student_guidance`` (default: the student's
    ``has_guidance``) says whether w is fed to the student as its CFG embedding.
    """
    sd = config.sigma_data
    b = x0.shape[0]
    x0 = _f32(x0)
    if s is None:
        s = lognormal_trig_time(b, config.p_mean, config.p_std, sd, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    if w is None:
        w = sample_guidance(b, config.guidance_scales, generator).to(x0.device)
    s = _f32(s).to(x0.device)
    x_s = trigflow_noise(x0, sd * noise.to(x0.dtype), s)
    if student_guidance is None:
        student_guidance = bool(getattr(student, "has_guidance", False))
    guidance = w if student_guidance else None

    dxds = teacher_cfg_velocity(teacher, x_s, s, ehs, mask, null_ehs, null_mask, w, sd)
    F_m, dF = student_jvp(student, x_s, s, dxds, ehs, mask, guidance, sd, mode=config.jvp)
    r = tangent_warmup(step, config.tangent_warmup)
    g_raw = scm_tangent(F_m, dF, dxds, x_s, s, r, sd)
    g, norm = normalize_tangent(g_raw, config.tangent_eps)
    return SCMTargets(x_s=x_s, s=s, w=w, dxds=dxds, g=g, tangent_norm=norm, r=r)


def scm_loss_from(
    F_theta: torch.Tensor, logvar: torch.Tensor, targets: SCMTargets, sigma_data: float = SIGMA_DATA
) -> SCMOutput:
    """The adaptive-weighted sCM loss given the student's gradient forward (F_theta, logvar).

    F_minus = F_theta.detach(): the same network at the same input as the JVP primal F_m, but
    taken from this forward so that F_theta - F_minus is exactly 0 (bf16 autocast would otherwise
    leave rounding noise in the target); the official implementation does the same.
    """
    F_theta = _f32(F_theta)
    logvar = _f32(logvar).reshape(-1)
    loss = adaptive_weighted_loss(F_theta, F_theta.detach(), targets.g, logvar, targets.s, sigma_data)
    with torch.no_grad():
        weight = 1.0 / (sigma_data * torch.tan(targets.s))
        mse = (F_theta - F_theta.detach() - targets.g).square().flatten(1).mean(1)
        logs = {
            "scm/loss": loss.mean().item(),
            "scm/loss_no_logvar": (weight * mse).mean().item(),
            "scm/mse": mse.mean().item(),
            "scm/logvar": logvar.mean().item(),
            "scm/tangent_norm": targets.tangent_norm.mean().item(),
            "scm/r": float(targets.r),
            "scm/s": targets.s.mean().item(),
        }
    return SCMOutput(loss=loss, F_theta=F_theta, logs=logs)


def scm_loss(
    student: nn.Module,
    teacher: nn.Module,
    x0: torch.Tensor,
    ehs: torch.Tensor,
    mask: torch.Tensor | None,
    null_ehs: torch.Tensor,
    null_mask: torch.Tensor | None,
    *,
    step: int,
    config: SCMConfig = SCMConfig(),
    generator: torch.Generator | None = None,
    s: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    student_guidance: bool | None = None,
) -> SCMOutput:
    """Full sCM loss for one batch: :func:`scm_targets` then the student's gradient forward.

    ``student`` is a ``TrigFlowTransformer`` with a logvar head; returns the per-sample loss [B].
    """
    tg = scm_targets(
        student, teacher, x0, ehs, mask, null_ehs, null_mask, step=step, config=config, generator=generator,
        s=s, noise=noise, w=w, student_guidance=student_guidance,
    )
    if student_guidance is None:
        student_guidance = bool(getattr(student, "has_guidance", False))
    guidance = tg.w if student_guidance else None
    F_theta, logvar = student(tg.x_s / config.sigma_data, tg.s, ehs, mask, guidance=guidance, return_logvar=True)
    return scm_loss_from(F_theta, logvar, tg, config.sigma_data)
