"""Teacher fine-tune for distillation: legacy flow model -> dense time + QK-norm (``sana-sprint finetune-teacher``).

SANA-Sprint (paper section 3.2, Fig. 3) does not distil the released SANA checkpoints directly. They
feed time to the sinusoidal embedding as ``1000 t`` and have no normalisation of queries and keys;
both make the sCM tangent ``dF/ds`` (the JVP) and the student's gradients large and noisy. Before
distillation the teacher is therefore converted and briefly fine-tuned:

1. **dense time**: ``config.timestep_scale`` 1000 -> 1, the embedding sees t in [0, 1];
2. **QK-norm**: RMSNorm on q and k across heads in every self- and cross-attention
   (diffusers ``qk_norm="rms_norm_across_heads"``), norm weights initialised to 1.

Both change the function (there is no weight setting that makes them exact), hence the fine-tune,
which is ordinary flow matching with the same :class:`~.teacher.TeacherMethod` and
:class:`~.trainer.Trainer` as ``train-teacher``. :func:`convert_legacy_teacher` is the conversion alone;
every weight of the legacy model is kept bit-identical, only the norm weights are new.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal

from ..cli import command
from ..errors import ModelFolderError, UserError
from .config import ConfigError, TeacherConfig

logger = logging.getLogger(__name__)

QK_NORM = "rms_norm_across_heads"  # == presets.QK_NORM (kept import-light for --help)
NORM_KEYS = (".norm_q.", ".norm_k.")  # the only weights a conversion adds
CONVERSION_KEY = "converted_from"  # sprint_config.json entry written by finetune-teacher


@dataclasses.dataclass
class FinetuneConfig(TeacherConfig):
    """``finetune-teacher``: TeacherConfig whose model comes from ``teacher`` (``preset``/``model`` ignored).

    ``timestep_scale`` and ``qk_norm`` are the *target*: 1.0 and true (dense time + QK-norm) by
    default; ``--no-qk-norm`` or ``--timestep-scale 1000`` make the single-change variants.
    """

    out: str = "runs/finetune-teacher"
    teacher: str = ""  # legacy teacher pipeline folder (kind "teacher")
    steps: int = 2000
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = 100
    ema_decay: float = 0.995  # short run: the EMA must forget the converted (not yet adapted) start
    ckpt_every: int = 250
    sample_every: int = 0

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise ConfigError("teacher: name the legacy teacher folder (--teacher DIR)")
        if self.init:
            raise ConfigError("init: finetune-teacher starts from `teacher`; `init` belongs to train-teacher")


# --- the conversion -------------------------------------------------------------------------------


def legacy_settings(config) -> tuple[float, str | None]:
    """(timestep_scale, qk_norm) of a transformer config (dict or diffusers FrozenDict)."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    return float(get("timestep_scale", 1.0) or 1.0), get("qk_norm", None)


def convert_legacy_teacher(transformer, *, dense_time: bool = True, qk_norm: bool = True):
    """A new ``SanaTransformer2DModel``: ``transformer`` with dense time and/or QK RMS-norm inserted.

    Every existing weight is copied bit for bit (same dtype and device); the inserted ``norm_q`` /
    ``norm_k`` weights are 1 (RMSNorm across heads, as in diffusers). Raises :class:`UserError` when
    nothing would change (the model already has the requested time scale and QK-norm).
    """
    import torch
    from diffusers import SanaTransformer2DModel

    from ..models.presets import init_kwargs

    scale, norm = legacy_settings(transformer.config)
    changes: dict[str, Any] = {}
    if dense_time and scale != 1.0:
        changes["timestep_scale"] = 1.0
    if qk_norm and norm is None:
        changes["qk_norm"] = QK_NORM
    if qk_norm and norm not in (None, QK_NORM):
        raise UserError(f"the teacher already has qk_norm={norm!r}; only legacy models without QK-norm are converted")
    if not changes:
        have = f"time scale {scale:g}" + (f", qk_norm {norm}" if norm else ", no QK-norm")
        raise UserError(f"nothing to convert: the teacher already has {have} (it needs no finetune-teacher)")
    config = init_kwargs(transformer.config)
    config.update(changes)
    param = next(transformer.parameters())
    new = SanaTransformer2DModel(**config).to(param.device, param.dtype)
    old_state = transformer.state_dict()
    target = new.state_dict()
    missing = sorted(set(target) - set(old_state))
    unexpected = sorted(set(old_state) - set(target))
    if unexpected or any(not any(n in k for n in NORM_KEYS) for k in missing):
        raise RuntimeError(f"conversion mismatch: unexpected {unexpected[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for k, v in target.items():
            if k in old_state:
                v.copy_(old_state[k])
            else:
                v.fill_(1.0)  # RMSNorm weight: identity scale
    new.train(transformer.training)
    return new


def describe(transformer) -> str:
    scale, norm = legacy_settings(transformer.config)
    return f"time scale {scale:g}, " + (f"qk_norm {norm}" if norm else "no QK-norm")


# --- folders --------------------------------------------------------------------------------------


def load_legacy_folder(folder: str | Path):
    """(transformer fp32, vae fp32, sprint config, text-encoder spec) of a teacher pipeline folder."""
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    from ..pipeline import LOCAL_TEXT_ENCODER, PACKAGE_ENCODERS, check_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"teacher folder not found: {folder}")
    sprint = check_folder(folder)
    if sprint["kind"] != "teacher":
        raise ModelFolderError(f"{folder}: kind is {sprint['kind']!r}; finetune-teacher needs a teacher folder")
    transformer = SanaTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    if transformer.config.guidance_embeds:
        raise ModelFolderError(f"{folder}: the transformer has guidance embeddings (a student?), not a teacher")
    vae = AutoencoderDC.from_pretrained(folder / "vae").to(torch.float32).eval().requires_grad_(False)
    spec = sprint.get("text_encoder", LOCAL_TEXT_ENCODER)
    te_spec = spec if spec in PACKAGE_ENCODERS else str(folder)
    return transformer, vae, sprint, te_spec


def _model_overrides(transformer) -> dict[str, Any]:
    from ..models.presets import init_kwargs

    return init_kwargs(transformer.config)


def finetune(cfg: FinetuneConfig, text_encoder=None) -> Path:
    """Load ``cfg.teacher``, convert it, fine-tune with TeacherMethod + Trainer, export; returns the folder."""
    import torch

    from ..text import load_text_encoder
    from .teacher import TeacherMethod, prepare_data
    from .trainer import Trainer, resolve_device, seed_everything

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    legacy, vae, sprint, te_spec = load_legacy_folder(cfg.teacher)
    converted = convert_legacy_teacher(legacy, dense_time=cfg.timestep_scale == 1.0, qk_norm=cfg.qk_norm)
    if cfg.timestep_scale != 1.0 and cfg.timestep_scale != legacy_settings(legacy.config)[0]:
        raise ConfigError(f"timestep_scale: the target is 1 (dense) or the teacher's own "
                          f"{legacy_settings(legacy.config)[0]:g}, got {cfg.timestep_scale:g}")
    logger.info("converted teacher: %s -> %s", describe(legacy), describe(converted))
    # The data and the text side are the teacher's own: its encoder, caption length and resolution.
    cfg = cfg.replace(model=_model_overrides(converted), text_encoder=te_spec,
                      max_length=int(sprint.get("max_sequence_length", cfg.max_length)),
                      resolution=int(sprint.get("resolution", cfg.resolution)),
                      flow_shift=float(sprint.get("flow_shift", cfg.flow_shift)),
                      sample_guidance=float(sprint.get("default_guidance", cfg.sample_guidance)))
    vae = vae.to(device)
    data = prepare_data(cfg, vae, device)
    c, h, w = data.latent_shape
    mc = converted.config
    if (mc.in_channels, mc.sample_size, mc.caption_channels) != (c, h, int(data.null_embedding()[0].shape[-1])):
        raise UserError(f"data {cfg.data!r} has latents {data.latent_shape} / text width "
                        f"{data.null_embedding()[0].shape[-1]}, the teacher expects {mc.in_channels}x{mc.sample_size}"
                        f"x{mc.sample_size} / {mc.caption_channels}")
    seed_everything(cfg.seed)
    te = text_encoder or load_text_encoder(te_spec, cfg.max_length)
    method = TeacherMethod(cfg, data, device, vae=vae, text_encoder=te)
    if _model_overrides(method.transformer) != _model_overrides(converted):  # teacher_model_config must reproduce it
        raise RuntimeError("TeacherMethod built a different architecture than the converted teacher")
    with torch.no_grad():  # start (and EMA start) = the converted legacy weights
        method.transformer.load_state_dict(converted.state_dict())
        method.ema.shadow.load_state_dict(converted.state_dict())
    del legacy, converted
    trainer = Trainer(method, data.loader(cfg.batch, cfg.seed), cfg, device)
    out = trainer.fit_and_export()  # --resume restores the checkpoint
    if out is None:  # not the main process: the main one writes the folder
        return trainer.export_folder()
    sprint_path = out / "sprint_config.json"
    info = json.loads(sprint_path.read_text())
    info[CONVERSION_KEY] = {"teacher": str(cfg.teacher), "timestep_scale": legacy_settings(method.transformer.config)[0],
                            "qk_norm": method.transformer.config.qk_norm, "steps": cfg.steps}
    sprint_path.write_text(json.dumps(info, indent=2) + "\n")
    return out


# --- CLI ------------------------------------------------------------------------------------------


@command("finetune-teacher", help="convert a legacy teacher (1000t time, no QK-norm) to dense time + QK-norm and fine-tune it")
def finetune_teacher_command(parser: argparse.ArgumentParser):
    parser.add_argument("--config", default=None, help="JSON config file (flags override it)")
    parser.add_argument("--dry-run", action="store_true", help="print the final config and exit")
    # The model, VAE, text encoder, caption length and resolution come from the teacher folder.
    FinetuneConfig.add_arguments(parser, skip=("preset", "model", "init", "vae", "text_encoder", "max_length", "resolution"))

    def run(args: argparse.Namespace) -> int:
        cfg = FinetuneConfig.from_args(args, args.config)
        if args.dry_run:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if not Path(cfg.teacher).is_dir():
            raise ModelFolderError(f"teacher folder not found: {cfg.teacher}")
        from ..cli import quiet_libraries

        quiet_libraries()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        out = finetune(cfg)
        print(f"exported fine-tuned teacher pipeline to {out}")
        return 0

    return run
