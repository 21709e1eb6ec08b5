"""Inference fast paths for :class:`~sana_sprint.pipeline.SprintPipeline`, each one optional and measured.

``optimize_pipeline(pipe, ...)`` returns a :class:`FastSprintPipeline` that shares ``pipe``'s modules
(they are changed in place) and samples exactly as the pipeline does, with:

- ``inference_mode``: the whole call under ``torch.inference_mode`` (no autograd bookkeeping at all);
- ``channels_last``: the DC-AE decoder (all convolutions) in channels-last memory format; about 1.3-2x
  faster decoding on an AVX2 CPU (oneDNN), bit-for-bit equal up to summation order;
- ``bf16``: ``"all"`` casts transformer and VAE weights to bf16 (what pays on a GPU); ``"linear"`` runs
  only the transformer's ``nn.Linear`` layers under bf16 autocast, keeping its 1x1/depthwise convolutions,
  attention sums and the VAE in fp32 (on CPUs with native bf16 matmuls: AVX512-BF16 / AMX); ``"auto"``
  picks ``"all"`` on CUDA, ``"linear"`` on a CPU with native bf16 and ``"off"`` otherwise. Measured on
  an AVX2-only CPU: bf16 matmuls are ~10x and convolutions ~30x slower than fp32, so "auto" is "off";
- ``compile``: ``torch.compile`` of the transformer and the VAE decoder, in place (state-dict keys
  unchanged); on CUDA with ``cuda_graphs`` the mode is ``"reduce-overhead"`` (CUDA graphs).

The TrigFlow transform, the sampler's trigonometry and the noise stay fp32 whatever ``bf16`` says
(the wrapper computes them in fp32). Cached text embeddings are the text encoder's own per-prompt
cache. Tolerances against the fp32 reference are stated in :data:`TOLERANCE` and checked by
tests/test_fast.py. Under ``inference_mode`` the text encoder caches inference tensors: do not reuse the
same :class:`~sana_sprint.text.TextEncoder` for training afterwards (call ``clear_cache()`` first).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .pipeline import SprintOutput, SprintPipeline

Bf16Mode = Literal["off", "linear", "all", "auto"]

# Stated tolerances against the fp32 reference (checked by tests/test_fast.py on a random tiny model):
# fp32 paths: max |difference| of images in [0, 1] and of latents; bf16: max |latent difference| relative
# to the latents' std, and mean |image difference| (a random decoder amplifies single pixels).
TOLERANCE = {"fp32": 1e-5, "bf16_latent_rel": 5e-2, "bf16_image_mean": 1e-2}

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_KEEP_FP32 = ("time_embed",)  # time (+CFG) embedding: its precision sets the schedule; cheap anyway


@dataclass(frozen=True)
class FastOptions:
    inference_mode: bool = True
    channels_last: bool = True
    bf16: Bf16Mode = "auto"
    compile: bool = False
    cuda_graphs: bool | None = None  # None: on when compiling on CUDA

    def resolved(self, device: torch.device) -> FastOptions:
        """``auto`` / ``None`` replaced by what pays on ``device``; invalid combinations raise ValueError."""
        if self.bf16 not in ("off", "linear", "all", "auto"):
            raise ValueError(f"bf16 must be off, linear, all or auto, got {self.bf16!r}")
        cuda = device.type == "cuda"
        bf16 = self.bf16
        if bf16 == "auto":
            bf16 = "all" if cuda else "linear" if cpu_has_native_bf16() else "off"
        graphs = self.cuda_graphs
        if graphs is None:
            graphs = cuda and self.compile
        if graphs and not cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device, the pipeline is on {device}")
        if graphs and not self.compile:
            raise ValueError("cuda_graphs is implemented through torch.compile: pass compile=True")
        return FastOptions(self.inference_mode, self.channels_last, bf16, self.compile, bool(graphs))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (where bf16 matmuls beat fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in _BF16_FLAGS)


class FastSprintPipeline(SprintPipeline):
    """A :class:`SprintPipeline` whose calls run under the :class:`FastOptions` it was built with."""

    fast: FastOptions

    def __call__(self, *args, **kwargs) -> SprintOutput:
        if self.fast.inference_mode:
            with torch.inference_mode():
                return super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def decode(self, unit_latents: torch.Tensor, output_type="pt"):
        if self.fast.channels_last and unit_latents.ndim == 4:
            unit_latents = unit_latents.contiguous(memory_format=torch.channels_last)
        return super().decode(unit_latents, output_type)


def _bf16_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = type(module).forward(module, x)
    return y.to(x.dtype)


def bf16_linears(model: nn.Module, skip: tuple[str, ...] = _KEEP_FP32) -> int:
    """Run every ``nn.Linear`` of ``model`` (except under names in ``skip``) in bf16; returns how many.

    An instance-level ``forward`` override: weights and state-dict keys are unchanged (fp32), and
    :func:`restore_linears` undoes it.
    """
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(part in skip for part in name.split(".")):
            module.forward = functools.partial(_bf16_linear_forward, module)
            n += 1
    return n


def restore_linears(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear) and "forward" in module.__dict__:
            del module.forward


def optimize_pipeline(
    pipe: SprintPipeline,
    *,
    inference_mode: bool = True,
    channels_last: bool = True,
    bf16: Bf16Mode = "auto",
    compile: bool = False,
    cuda_graphs: bool | None = None,
) -> FastSprintPipeline:
    """A :class:`FastSprintPipeline` on ``pipe``'s modules (changed in place; see the module docstring)."""
    opts = FastOptions(inference_mode, channels_last, bf16, compile, cuda_graphs).resolved(pipe.device)
    fast = FastSprintPipeline(pipe.text_encoder, pipe.model, pipe.vae, pipe.config)
    fast.fast = opts
    if opts.bf16 == "all":
        fast.to(dtype=torch.bfloat16)
    elif opts.bf16 == "linear":
        bf16_linears(fast.transformer)
    if opts.channels_last:
        fast.vae.to(memory_format=torch.channels_last)
    if opts.compile:
        mode = "reduce-overhead" if opts.cuda_graphs else None
        fast.transformer.compile(mode=mode, dynamic=False)
        fast.vae.decoder.compile(mode=mode, dynamic=False)
    return fast


def describe(pipe: SprintPipeline) -> dict:
    """The fast options of a pipeline (all off for a plain :class:`SprintPipeline`)."""
    if isinstance(pipe, FastSprintPipeline):
        return asdict(pipe.fast)
    return asdict(FastOptions(inference_mode=False, channels_last=False, bf16="off"))
