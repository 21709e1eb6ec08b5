"""Inference fast paths for :class:`~sana_sprint.pipeline.SprintPipeline`, each one optional and measured.

``optimize_pipeline(pipe, ...)`` returns a :class:`FastSprintPipeline` that shares ``pipe``'s modules
(they are changed in place) and samples exactly as the pipeline does, with:

- ``inference_mode``: the whole call under ``torch.inference_mode`` (no autograd bookkeeping at all);
- ``linear_convs``: the transformer's convolutions whose kernel equals their stride (the 1x1
  ``conv_inverted`` / ``conv_point`` of every GLUMBConv Mix-FFN and the patch embedding) run as one
  ``F.linear`` over channels on the token-major (NHWC) activations the blocks already hold; same
  parameters and state-dict keys, exact up to summation order. On a tiny latent grid PyTorch sends a
  1x1 convolution of such (channels-last strided) input to its slow reference kernel; measured on an
  AVX2 CPU, 1 thread, width 224: 0.2 vs 0.2 ms at batch 1 and 2.3 vs 16 ms at batch 10 per
  ``conv_inverted`` (4x4 grid), 2.8 vs 15 ms at batch 1 on a 16x16 grid. The depthwise 3x3 conv is left
  to oneDNN on its channels-last input: it was the fastest option measured (0.08 ms at batch 1 on a
  4x4 grid, 0.27 ms on 16x16; nine shifted multiply-adds 0.10 / 0.68 ms, unfold 1-140 ms);
- ``trim_text``: padding-free text encoding (:class:`PaddingFreeTextEncoder`: the encoder runs on the
  real tokens only, the batch padded to its longest prompt, the embeddings zero-padded to
  ``max_length`` with mask 0) and the transformer's cross-attention cut to the longest real prompt of
  each call. Sana adds -10000 to masked keys' scores, so in fp32 they weigh exactly 0: outputs equal
  the padded path up to float rounding. Under ``compile`` only the encoder is padding-free (the
  transformer keeps max_length keys: a varying length would recompile);
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
import torch.nn.functional as F
from torch import nn

from .pipeline import SprintOutput, SprintPipeline
from .text import TextEncoder
from .text import logger as text_logger

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
    linear_convs: bool = True
    trim_text: bool = True

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
        return FastOptions(
            self.inference_mode, self.channels_last, bf16, self.compile, bool(graphs), self.linear_convs, self.trim_text
        )


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


# --- convolutions as matmuls ------------------------------------------------------------------------


def _conv_as_linear_forward(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a conv with kernel == stride, no padding/dilation/groups: patchify + ``F.linear``.

    The result is a [B, C_out, H', W'] view of a token-major [B, H', W', C_out] tensor (channels-last
    strides), which is what the Sana blocks flatten back to tokens.
    """
    kh, kw = module.kernel_size
    b, c, h, w = x.shape
    ho, wo = h // kh, w // kw
    if kh == kw == 1:
        tokens = x.permute(0, 2, 3, 1)
    else:
        x = x[:, :, : ho * kh, : wo * kw]  # a strided conv drops the remainder too
        tokens = x.reshape(b, c, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, ho, wo, c * kh * kw)
    y = F.linear(tokens, module.weight.reshape(module.out_channels, -1), module.bias)
    return y.permute(0, 3, 1, 2)


def _is_patchify_conv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and tuple(m.kernel_size) == tuple(m.stride)
        and tuple(m.padding) == (0, 0)
        and tuple(m.dilation) == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def convs_as_linear(model: nn.Module) -> int:
    """Run every ``nn.Conv2d`` of ``model`` with kernel == stride (1x1 convs, patch embedding) as ``F.linear``.

    An instance-level ``forward`` override (weights, state-dict keys and module types unchanged);
    :func:`restore_convs` undoes it. Returns how many convolutions were changed.
    """
    n = 0
    for module in model.modules():
        if _is_patchify_conv(module):
            module.forward = functools.partial(_conv_as_linear_forward, module)
            n += 1
    return n


def restore_convs(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and "forward" in module.__dict__:
            del module.forward


# --- padding-free text --------------------------------------------------------------------------------


class PaddingFreeTextEncoder(TextEncoder):
    """A :class:`~sana_sprint.text.TextEncoder` that runs its model on the real tokens only.

    The batch is padded to its longest prompt (not to ``max_length``); the embeddings are then padded
    with zeros to ``max_length`` and the mask with 0, so ``encode`` keeps its contract ([B, max_length, C],
    real tokens first). The real tokens' embeddings equal the padded encoder's up to float rounding
    (padded keys get a -inf-like bias in BERT-style encoders); padded positions differ (zeros instead of
    the encoder's outputs for [PAD]) but carry mask 0, and Sana's cross-attention gives them weight 0.
    Shares tokenizer and model with the encoder it was made from; has its own prompt cache.
    """

    @classmethod
    def from_encoder(cls, enc: TextEncoder) -> PaddingFreeTextEncoder:
        new = cls(enc.tokenizer, enc.model, enc.max_length, enc.spec)
        new._warned = enc._warned
        return new

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) [B, n], right-padded to the longest prompt (at most max_length), as the tokenizer would."""
        tok = self.tokenizer
        tok.padding_side = "right"
        ids = tok(texts, add_special_tokens=True, truncation=False).input_ids  # one call also serves the warning
        if max(map(len, ids)) > self.max_length:
            for text, seq in zip(texts, ids):
                if len(seq) > self.max_length and text not in self._warned:
                    self._warned.add(text)
                    text_logger.warning(
                        "prompt has %d tokens, truncated to max_sequence_length=%d: %r", len(seq), self.max_length, text
                    )
            enc = tok(texts, padding="longest", max_length=self.max_length, truncation=True,
                      add_special_tokens=True, return_tensors="pt")
            return enc.input_ids, enc.attention_mask
        n = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0  # masked either way
        out = torch.full((len(ids), n), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, seq in enumerate(ids):
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        return out, mask

    @torch.no_grad()
    def _encode_uncached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._tokenize(texts)
        device = self.device
        mask = mask.to(device)
        embeds = self.model(ids.to(device), attention_mask=mask)[0].float()
        b, n, c = embeds.shape
        full = embeds.new_zeros((b, self.max_length, c))
        full[:, :n] = embeds * mask[..., None]
        full_mask = mask.new_zeros((b, self.max_length))
        full_mask[:, :n] = mask
        return full, full_mask.long()


def _trim_cross_attention(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: cut ``encoder_hidden_states`` / ``encoder_attention_mask`` to the last key kept by any sample."""
    mask = kwargs.get("encoder_attention_mask")
    states = kwargs.get("encoder_hidden_states")
    if mask is None or states is None or mask.ndim != 2 or states.ndim != 3 or len(args) > 1:
        return None
    kept = mask.bool().any(0).nonzero()
    n = int(kept.max()) + 1 if kept.numel() else mask.shape[1]
    if n >= mask.shape[1]:
        return None
    return args, {**kwargs, "encoder_hidden_states": states[:, :n], "encoder_attention_mask": mask[:, :n]}


def trim_cross_attention(transformer: nn.Module):
    """Install :func:`_trim_cross_attention` on ``transformer``; returns the hook handle (``.remove()`` undoes it)."""
    return transformer.register_forward_pre_hook(_trim_cross_attention, with_kwargs=True)


# --- bf16 ----------------------------------------------------------------------------------------------


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
    linear_convs: bool = True,
    trim_text: bool = True,
) -> FastSprintPipeline:
    """A :class:`FastSprintPipeline` on ``pipe``'s modules (changed in place; see the module docstring).

    With ``trim_text`` the fast pipeline gets its own :class:`PaddingFreeTextEncoder` (same tokenizer
    and model, own cache) and, unless compiling, ``pipe.transformer`` a pre-hook cutting padded keys.
    """
    opts = FastOptions(inference_mode, channels_last, bf16, compile, cuda_graphs, linear_convs, trim_text)
    opts = opts.resolved(pipe.device)
    text = PaddingFreeTextEncoder.from_encoder(pipe.text_encoder) if opts.trim_text else pipe.text_encoder
    fast = FastSprintPipeline(text, pipe.model, pipe.vae, pipe.config)
    fast.fast = opts
    if opts.linear_convs:
        convs_as_linear(fast.transformer)
    if opts.trim_text and not opts.compile and not getattr(fast.transformer, "_sprint_trim_hook", None):
        fast.transformer._sprint_trim_hook = trim_cross_attention(fast.transformer)
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
    return asdict(FastOptions(inference_mode=False, channels_last=False, bf16="off", linear_convs=False, trim_text=False))
