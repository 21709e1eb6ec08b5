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
- ``lean``: the same arithmetic in fewer operators, exact up to float summation order (float64 tests):
  the text encoder through :class:`FusedBertEncoder` (BERT with one QKV matmul per layer, SDPA without a
  mask when nothing is padded, no pooler; with ``trim_text``), every Sana block through
  :func:`_lean_block_forward` (fused self-attention QKV and cross-attention KV projections, no module
  dispatch / processor inspection / mask repetition; diffusers' own forward while autograd records or
  with other attention processors), and the DC-AE decoder's nearest-x2
  upsample + 3x3 conv blocks as sub-pixel 2x2 convolutions (:func:`subpixel_upsampling`, 16 instead
  of 36 multiply-adds). Fused / sub-pixel weights are copies, rebuilt when a parameter changes in place;
- ``cache_time``: the transformer's (time + CFG) embedding memoised by the exact time / guidance values
  and batch size (:func:`cache_time_embedding`; a 1-step student at the default guidance computes the
  same embedding for every request), only while autograd is off;
- ``channels_last``: the DC-AE decoder (all convolutions) in channels-last memory format; about 1.3-2x
  faster decoding on an AVX2 CPU (oneDNN), bit-for-bit equal up to summation order;
- ``bf16``: ``"all"`` casts transformer and VAE weights to bf16 (what pays on a GPU); ``"linear"`` runs
  the matrix products of the transformer (the lean blocks on bf16 copies of their weights, the other
  ``nn.Linear`` layers under bf16 autocast; the time embedding stays fp32) and of the lean text encoder
  in bf16, with fp32 master weights, activations, norms, attention sums, residuals and VAE; ``"mixed"``
  is ``"linear"`` plus the VAE in bf16 (convolutions included); ``"auto"`` picks ``"all"`` on CUDA,
  ``"mixed"`` on a CPU with native bf16 matmuls (AVX512-BF16 / AMX) and ``"off"`` otherwise. Measured
  on an AVX2-only CPU: bf16 matmuls ~10x and convolutions ~30x slower than fp32 ("auto" = "off"); on
  an AVX512-BF16 Xeon, 1 thread: a [12, 384] x [384, 1536] product 0.12 vs 0.41 ms, the shapes DC-AE
  decoder 5.8 vs 10.6 ms at batch 1 and 24 vs 68 ms at batch 10 (mean |pixel difference| 0.0023 on [-1, 1]);
- ``compile``: ``torch.compile`` in place (state-dict keys unchanged), one recompilation per batch size:
  on CUDA the transformer, the VAE decoder (sub-pixel weights prepared first: one graph) and the
  padding-free text encoder's model (token counts bucketed to multiples of 64, one graph per bucket),
  with ``cuda_graphs`` mode ``"reduce-overhead"`` (SANA-Sprint 1.6B at 1024 px on an H100: 40 ms end to
  end, docs/speed.md); on a
  CPU only the transformer, with inductor's ``freezing`` (:data:`CPU_COMPILE_OPTIONS`; minutes of
  compilation on one core; the compiled VAE decoder measured slower there). Under ``compile`` the
  transformer keeps diffusers' own blocks and no time-embedding cache (both would break the graph).

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
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .pipeline import SprintOutput, SprintPipeline
from .text import TextEncoder
from .text import logger as text_logger

Bf16Mode = Literal["off", "linear", "mixed", "all", "auto"]
BF16_MODES = ("off", "linear", "mixed", "all", "auto")

# Stated tolerances against the fp32 reference (checked by tests/test_fast.py on a random tiny model):
# fp32 paths: max |difference| of images in [0, 1] and of latents; bf16: max |latent difference| relative
# to the latents' std, and mean |image difference| (a random decoder amplifies single pixels).
TOLERANCE = {"fp32": 1e-5, "bf16_latent_rel": 5e-2, "bf16_image_mean": 1e-2}

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_COMPILE_OPTIONS = {"freezing": True}  # inductor: parameters as constants (weight prepacking, folding)
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
    lean: bool = True
    cache_time: bool = True

    def resolved(self, device: torch.device) -> FastOptions:
        """``auto`` / ``None`` replaced by what pays on ``device``; invalid combinations raise ValueError."""
        if self.bf16 not in BF16_MODES:
            raise ValueError(f"bf16 must be one of {', '.join(BF16_MODES)}, got {self.bf16!r}")
        cuda = device.type == "cuda"
        bf16 = self.bf16
        if bf16 == "auto":
            bf16 = "all" if cuda else "mixed" if cpu_has_native_bf16() else "off"
        graphs = self.cuda_graphs
        if graphs is None:
            graphs = cuda and self.compile
        if graphs and not cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device, the pipeline is on {device}")
        if graphs and not self.compile:
            raise ValueError("cuda_graphs is implemented through torch.compile: pass compile=True")
        return FastOptions(
            self.inference_mode, self.channels_last, bf16, self.compile, bool(graphs), self.linear_convs, self.trim_text,
            self.lean, self.cache_time and not self.compile,  # a Python-side cache would break the compiled graph
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

    lean: FusedBertEncoder | None = None
    # Token counts are padded up to a multiple of ``bucket`` (at most max_length): a compiled encoder then
    # sees a handful of shapes (one CUDA graph each) instead of one per prompt length. Real tokens are
    # unchanged: padded keys are masked (BERT) or come after them (a causal decoder such as Gemma-2).
    bucket: int = 1
    compiled = None  # torch.compile'd model (compile_model); None: eager

    def compile_model(self, mode: str | None = None, bucket: int = 64, **compile_kwargs) -> None:
        """Run the model (not the lean BERT forward) under ``torch.compile`` (``mode="reduce-overhead"``: CUDA
        graphs; ``compile_kwargs`` go to ``torch.compile``), token counts bucketed to multiples of ``bucket``;
        one compilation per bucket."""
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.lean = None
        self.bucket = int(bucket)
        self.compiled = torch.compile(self.model, mode=mode, dynamic=False, **compile_kwargs)
        self.clear_cache()

    @classmethod
    def from_encoder(cls, enc: TextEncoder, lean: bool = False, bf16: bool = False) -> PaddingFreeTextEncoder:
        """With ``lean`` (and a supported model, see :class:`FusedBertEncoder`) the model runs through the lean
        forward, with ``bf16`` its matrix products in bf16."""
        new = cls(enc.tokenizer, enc.model, enc.max_length, enc.spec)
        new._warned = enc._warned
        if lean and FusedBertEncoder.supports(enc.model):
            new.lean = FusedBertEncoder(enc.model, bf16=bf16)
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
        n = ids.shape[1]
        padded = min(self.max_length, -(-n // self.bucket) * self.bucket)
        if padded > n:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = F.pad(ids, (0, padded - n), value=pad)
            mask = F.pad(mask, (0, padded - n), value=0)
        device = self.device
        mask = mask.to(device)
        if self.lean is not None:
            embeds = self.lean(ids.to(device), mask).float()
        else:
            model = self.compiled if self.compiled is not None else self.model
            # the product with the mask below copies the output out of a CUDA graph's buffer (reused by its next replay)
            embeds = model(ids.to(device), attention_mask=mask)[0].float()
        b, n, c = embeds.shape
        full = embeds.new_zeros((b, self.max_length, c))
        full[:, :n] = embeds * mask[..., None]
        full_mask = mask.new_zeros((b, self.max_length))
        full_mask[:, :n] = mask
        return full, full_mask.long()


class FusedBertEncoder:
    """A lean forward of a transformers ``BertModel`` (post-LN, absolute positions, exact GELU): ``last_hidden_state``.

    The same arithmetic as the model's own forward with less per-operator overhead: the query, key and
    value projections as one matmul (their weights concatenated once, at construction: later changes
    to the model's weights are not seen), ``F.scaled_dot_product_attention`` with no mask when no key is
    padded, no dropout, no pooler, no output bookkeeping. Equal to the model's output up to float
    rounding (tests/test_fast.py, float64). :meth:`supports` says whether a model qualifies. With
    ``bf16`` the matrices are bf16 copies (products in bf16, biases, norms, attention and residuals fp32).
    """

    def __init__(self, model: nn.Module, bf16: bool = False):
        if not self.supports(model):
            raise ValueError(f"not a plain post-LN BertModel with absolute positions: {type(model).__name__}")
        cfg = model.config
        emb = model.embeddings
        self.heads = int(cfg.num_attention_heads)
        self.hidden = int(cfg.hidden_size)
        self.eps = float(cfg.layer_norm_eps)
        self.bf16 = bool(bf16)
        mat = (lambda w: w.detach().to(torch.bfloat16).contiguous()) if bf16 else (lambda w: w)
        with torch.no_grad():
            self.word = emb.word_embeddings.weight
            self.type0 = emb.token_type_embeddings.weight[0]
            self.pos = emb.position_embeddings.weight
            self.ln = (emb.LayerNorm.weight, emb.LayerNorm.bias)
            self.layers = []
            for layer in model.encoder.layer:
                a = layer.attention
                qkv = (a.self.query, a.self.key, a.self.value)
                self.layers.append((
                    mat(torch.cat([m.weight for m in qkv]).detach()), torch.cat([m.bias for m in qkv]).detach(),
                    mat(a.output.dense.weight), a.output.dense.bias, a.output.LayerNorm.weight, a.output.LayerNorm.bias,
                    mat(layer.intermediate.dense.weight), layer.intermediate.dense.bias,
                    mat(layer.output.dense.weight), layer.output.dense.bias,
                    layer.output.LayerNorm.weight, layer.output.LayerNorm.bias,
                ))

    @staticmethod
    def supports(model: nn.Module) -> bool:
        cfg = getattr(model, "config", None)
        return (
            type(model).__name__ == "BertModel"
            and cfg is not None
            and getattr(cfg, "hidden_act", None) == "gelu"
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
            and not getattr(cfg, "is_decoder", False)
            and not getattr(cfg, "add_cross_attention", False)
            and hasattr(model, "embeddings")
            and hasattr(model, "encoder")
        )

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``model(ids, attention_mask=mask)[0]``: [B, n, hidden]."""
        b, n = ids.shape
        h, heads = self.hidden, self.heads
        x = F.embedding(ids, self.word) + self.type0  # the order of BertEmbeddings' sums
        x = F.layer_norm(x + self.pos[:n], (h,), *self.ln, self.eps).reshape(b * n, h)
        attn_mask = None if mask is None or bool(mask.all()) else mask.bool()[:, None, None, :]
        for w_qkv, b_qkv, wo, bo, ln1w, ln1b, wi, bi, wo2, bo2, ln2w, ln2b in self.layers:
            q, k, v = _linear(x, w_qkv, b_qkv).view(b, n, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b * n, h)
            x = F.layer_norm(_linear(ctx, wo, bo) + x, (h,), ln1w, ln1b, self.eps)
            x = F.layer_norm(_linear(F.gelu(_linear(x, wi, bi)), wo2, bo2) + x, (h,), ln2w, ln2b, self.eps)
        return x.view(b, n, h)


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


# --- lean Sana blocks ----------------------------------------------------------------------------------


def _params_key(tensors) -> tuple:
    return tuple((id(t), t._version) for t in tensors)


def _cat_or_none(tensors):
    if any(t is None for t in tensors):
        return None if all(t is None for t in tensors) else False
    return torch.cat(list(tensors)).detach()


class _LeanWeights(NamedTuple):
    """The weights a lean Sana block multiplies by: (weight, bias) pairs, fused where projections share an input."""

    qkv: tuple  # self-attention Q, K, V
    kv: tuple  # cross-attention K, V
    out1: tuple  # self-attention output
    q2: tuple  # cross-attention query
    out2: tuple  # cross-attention output
    ci: tuple  # Mix-FFN conv_inverted (1x1) as a matrix
    cp: tuple  # Mix-FFN conv_point (1x1) as a matrix


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``; with a bf16 weight and an fp32 ``x``: the product in bf16, the bias added in fp32."""
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    y = F.linear(x.to(w.dtype), w).to(x.dtype)
    return y if b is None else y + b


def _fused_projections(block: nn.Module) -> _LeanWeights | None:
    """The weights of a lean Sana block (:class:`_LeanWeights`): QKV / KV concatenated, the rest as they are.

    With the block's ``_sprint_bf16`` flag (``bf16="linear"`` / ``"mixed"``) every matrix is a bf16 copy (biases fp32).
    Rebuilt whenever a source parameter changes (in-place updates bump ``_version``); None when a
    block's bias layout cannot be fused (some projections with a bias, others without).
    """
    a1, a2, ff = block.attn1, block.attn2, block.ff
    bf16 = bool(block.__dict__.get("_sprint_bf16", False))
    srcs = [a1.to_q, a1.to_k, a1.to_v, a2.to_k, a2.to_v, a1.to_out[0], a2.to_q, a2.to_out[0], ff.conv_inverted,
            ff.conv_point]
    tensors = [t for m in srcs for t in (m.weight, m.bias) if t is not None]
    key = (bf16, *_params_key(tensors))
    cached = block.__dict__.get("_sprint_fused")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.inference_mode(False), torch.no_grad():
        b_qkv = _cat_or_none([a1.to_q.bias, a1.to_k.bias, a1.to_v.bias])
        b_kv = _cat_or_none([a2.to_k.bias, a2.to_v.bias])
        fused = None
        if b_qkv is not False and b_kv is not False:
            w_qkv = torch.cat([a1.to_q.weight, a1.to_k.weight, a1.to_v.weight], 0).detach()
            w_kv = torch.cat([a2.to_k.weight, a2.to_v.weight], 0).detach()
            mats = [w_qkv, w_kv, a1.to_out[0].weight, a2.to_q.weight, a2.to_out[0].weight,
                    ff.conv_inverted.weight.flatten(1), ff.conv_point.weight.flatten(1)]
            if bf16:
                mats = [w.detach().to(torch.bfloat16).contiguous() for w in mats]
            else:
                # stored [in, out]-contiguous (a transposed view for F.linear): MKL's no-transpose GEMM, ~10% faster
                mats[:2] = [w.t().contiguous().t() for w in mats[:2]]
            biases = [b_qkv, b_kv, a1.to_out[0].bias, a2.to_q.bias, a2.to_out[0].bias, ff.conv_inverted.bias,
                      ff.conv_point.bias]
            fused = _LeanWeights(*zip(mats, biases))
    block.__dict__["_sprint_fused"] = (key, fused)
    return fused


def _rms(x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """diffusers ``RMSNorm`` (fp32 statistics) in fewer operators; None: identity."""
    if norm is None:
        return x
    w = norm.weight
    if x.dtype == torch.float32 and (w is None or w.dtype == torch.float32):  # one fused kernel, same formula
        y = F.rms_norm(x, (x.shape[-1],), w, norm.eps)
        return y + norm.bias if getattr(norm, "bias", None) is not None else y
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)
    if w is None:
        return y.to(x.dtype)
    if w.dtype in (torch.float16, torch.bfloat16):
        y = y.to(w.dtype)
    y = y * w
    return y + norm.bias if getattr(norm, "bias", None) is not None else y


@functools.cache
def _sana_processors() -> tuple[type, type]:
    """diffusers' default Sana self-attention (linear) and cross-attention (SDPA) processor classes."""
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    return SanaLinearAttnProcessor2_0, SanaAttnProcessor2_0


_ONE_PLUS_SCALE = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])[:, None]  # rows: shift, scale, gate (msa, mlp)


def _lean_block_supported(block: nn.Module) -> bool:
    from diffusers.models.normalization import RMSNorm

    a1, a2, ff = block.attn1, getattr(block, "attn2", None), block.ff
    norms_ok = all(n is None or isinstance(n, RMSNorm) for a in (a1, a2) if a is not None for n in (a.norm_q, a.norm_k))
    return (
        a2 is not None
        and norms_ok
        and ff.norm_type is None
        and not ff.residual_connection
        and all(_is_patchify_conv(c) and c.kernel_size == (1, 1) for c in (ff.conv_inverted, ff.conv_point))
        and all(getattr(a, name, None) is None for a in (a1, a2) for name in ("spatial_norm", "group_norm", "norm_cross"))
        and not a1.residual_connection and not a2.residual_connection
    )


def _lean_block_forward(block: nn.Module, original, hidden_states, attention_mask=None, encoder_hidden_states=None,
                        encoder_attention_mask=None, timestep=None, height=None, width=None):
    """``SanaTransformerBlock.forward`` without module dispatch, processor inspection or layout shuffles.

    The same arithmetic up to float rounding (summation order, fused multiply-adds, fused RMS norms):
    self-attention Q/K/V and cross-attention K/V as one matmul each (column-major weight copies), the
    Mix-FFN's 1x1 convolutions as matmuls on tokens, the depthwise conv on the channels-last view. Falls back to ``original`` while autograd records, with a self-attention mask,
    or when the attention processors are not diffusers' default Sana ones (e.g. the JVP-safe swap).
    """
    linear_proc, sdpa_proc = _sana_processors()
    a1, a2, ff = block.attn1, block.attn2, block.ff
    fused = None
    if (
        not torch.is_grad_enabled()
        and attention_mask is None
        and type(a1.processor) is linear_proc
        and type(a2.processor) is sdpa_proc
        and a1.rescale_output_factor == 1.0 and a2.rescale_output_factor == 1.0
    ):
        fused = _fused_projections(block)
    if fused is None:
        return original(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
                        height, width)
    b, n, d = hidden_states.shape
    dtype = hidden_states.dtype
    mod = block.scale_shift_table[None] + timestep.reshape(b, 6, -1)
    # diffusers' (1 + scale) terms in the same add: (table + t) + 1 rounds exactly like 1 + (table + t)
    shift_msa, scale_msa1, gate_msa, shift_mlp, scale_mlp1, gate_mlp = (mod + _ONE_PLUS_SCALE.to(mod)).chunk(6, dim=1)

    # 1. linear self-attention (ReLU kernel), as SanaLinearAttnProcessor2_0
    x = F.layer_norm(hidden_states, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    x = torch.addcmul(shift_msa, x, scale_msa1).to(dtype)
    q, k, v = _linear(x, *fused.qkv).split([a1.to_q.out_features, a1.to_k.out_features, a1.to_v.out_features], -1)
    q, k = _rms(q, a1.norm_q), _rms(k, a1.norm_k)
    h1 = a1.heads
    q = F.relu(q.transpose(1, 2).unflatten(1, (h1, -1))).float()  # [B, H, hd, N]
    k = F.relu(k.transpose(1, 2).unflatten(1, (h1, -1)).transpose(2, 3)).float()  # [B, H, N, hd]
    v = F.pad(v.transpose(1, 2).unflatten(1, (h1, -1)).float(), (0, 0, 0, 1), value=1.0)  # [B, H, hd+1, N]
    o = torch.matmul(torch.matmul(v, k), q)
    o = (o[:, :, :-1] / (o[:, :, -1:] + 1e-15)).flatten(1, 2).transpose(1, 2).to(dtype)
    hidden_states = torch.addcmul(hidden_states, gate_msa, _linear(o, *fused.out1))

    # 2. cross-attention, as SanaAttnProcessor2_0 (the mask is the model's additive bias [B, 1, L])
    h2 = a2.heads
    q = _rms(_linear(hidden_states, *fused.q2), a2.norm_q)
    k, v = _linear(encoder_hidden_states, *fused.kv).split([a2.to_k.out_features, a2.to_v.out_features], -1)
    k = _rms(k, a2.norm_k)
    hd = k.shape[-1] // h2
    q = q.view(b, -1, h2, hd).transpose(1, 2)
    k = k.view(b, -1, h2, hd).transpose(1, 2)
    v = v.view(b, -1, h2, hd).transpose(1, 2)
    mask = encoder_attention_mask
    if mask is not None:
        if mask.ndim == 3 and mask.shape[0] == b:  # what the model passes: broadcast over heads
            mask = mask.unsqueeze(1)
        else:
            mask = a2.prepare_attention_mask(mask, k.shape[2], b)
            mask = mask.view(b, h2, -1, mask.shape[-1])
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, -1, h2 * hd).to(q.dtype)
    hidden_states = _linear(o, *fused.out2) + hidden_states

    # 3. Mix-FFN (GLUMBConv) on tokens: 1x1 conv = matmul, depthwise 3x3 on the channels-last view
    x = F.layer_norm(hidden_states, (d,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    x = torch.addcmul(shift_mlp, x, scale_mlp1)
    cd = ff.conv_depth
    x = F.silu(_linear(x, *fused.ci))  # [B, N, 2C]
    x = x.view(b, height, width, -1).permute(0, 3, 1, 2)
    x = F.conv2d(x, cd.weight, cd.bias, cd.stride, cd.padding, cd.dilation, cd.groups)
    x, gate = x.chunk(2, dim=1)
    x = (x * F.silu(gate)).permute(0, 2, 3, 1)  # [B, H, W, C]
    x = _linear(x, *fused.cp).reshape(b, n, -1)
    return torch.addcmul(hidden_states, gate_mlp, x)


def lean_blocks(transformer: nn.Module, bf16: bool = False) -> int:
    """Install :func:`_lean_block_forward` on every supported Sana block of ``transformer``; returns how many.

    An instance-level ``forward`` override (weights, state-dict keys and hooks unchanged); the fused
    projection weights are copies rebuilt when a parameter changes in place. With ``bf16`` every matrix
    product of the block runs on bf16 copies of its weights (fp32 activations cast at each product, fp32
    biases, norms, attention sums and residuals). :func:`restore_blocks` undoes it.
    """
    n = 0
    for block in getattr(transformer, "transformer_blocks", []):
        if "forward" in block.__dict__ or not _lean_block_supported(block):
            continue
        block.forward = functools.partial(_lean_block_forward, block, type(block).forward.__get__(block))
        block.__dict__["_sprint_bf16"] = bool(bf16)
        n += 1
    return n


def restore_blocks(transformer: nn.Module) -> None:
    for block in getattr(transformer, "transformer_blocks", []):
        for attr in ("forward", "_sprint_fused", "_sprint_bf16"):
            block.__dict__.pop(attr, None)


# --- time (+ guidance) embedding cache --------------------------------------------------------------------

TIME_CACHE_SIZE = 32


def _key_part(x):
    if isinstance(x, torch.Tensor):
        return (str(x.dtype), str(x.device), tuple(x.shape), tuple(x.detach().reshape(-1).tolist()))
    return x


def _cached_time_embed(module: nn.Module, original, *args, **kwargs):
    """``module(*args, **kwargs)``, memoised by the exact input values while autograd is off.

    The (time + CFG) embedding is a deterministic function of the time / guidance values (and the batch
    size): every request of a 1-step student at the default guidance computes the same one. The key holds
    every argument's exact values plus the parameters' versions, so in-place weight updates invalidate it.
    """
    if torch.is_grad_enabled():
        return original(*args, **kwargs)
    key = (tuple(_key_part(a) for a in args), tuple((k, _key_part(v)) for k, v in sorted(kwargs.items())),
           _params_key(module.parameters()), torch.is_inference_mode_enabled())
    cache = module.__dict__.setdefault("_sprint_time_cache", {})
    if key in cache:
        out = cache.pop(key)
        cache[key] = out  # most recently used last
        return out
    out = original(*args, **kwargs)
    cache[key] = out
    while len(cache) > TIME_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    return out


def cache_time_embedding(transformer: nn.Module) -> bool:
    """Memoise ``transformer.time_embed`` (:func:`_cached_time_embed`); undo with :func:`restore_time_embedding`."""
    te = getattr(transformer, "time_embed", None)
    if te is None or "forward" in te.__dict__:
        return False
    te.forward = functools.partial(_cached_time_embed, te, type(te).forward.__get__(te))
    return True


def restore_time_embedding(transformer: nn.Module) -> None:
    te = transformer.time_embed
    te.__dict__.pop("forward", None)
    te.__dict__.pop("_sprint_time_cache", None)


# --- VAE: nearest-upsample + 3x3 conv as sub-pixel 2x2 convolutions -------------------------------------

# For nearest x2 upsampling followed by a 3x3 conv (padding 1), output row 2i+a reads source rows
# {i-1, i} (a = 0: kernel rows {0}, {1, 2}) or {i, i+1} (a = 1: kernel rows {0, 1}, {2}); same for columns.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """[4 C_out, C_in, 2, 2] kernels, phase-major (a, b), equivalent to ``weight`` [C_out, C_in, 3, 3] on a 2x upsampled grid."""
    taps = _PHASE_TAPS.to(weight)
    w = torch.einsum("aik,ocks,bjs->abocij", taps, weight, taps)  # [2, 2, C_out, C_in, 2, 2]
    return w.reshape(4 * weight.shape[0], weight.shape[1], 2, 2)


def _subpixel_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kernels, bias) of ``block.conv`` as sub-pixel convolutions, cached on the block and rebuilt when a
    parameter changes in place. A compiled graph cannot compare tensor versions (a graph break per block):
    under ``torch.compile`` the weights prepared before compiling are used as they are (prepare_subpixel)."""
    conv = block.conv
    cached = block.__dict__.get("_sprint_subpixel")
    if cached is not None and torch.compiler.is_compiling():
        return cached[1], cached[2]
    key = _params_key([conv.weight] + ([conv.bias] if conv.bias is not None else []))
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            weight = conv.weight.detach()
            w = subpixel_weight(weight.double()).to(weight.dtype).contiguous(memory_format=torch.channels_last)
            bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        cached = block.__dict__["_sprint_subpixel"] = (key, w, bias)
    return cached[1], cached[2]


def _upsample_conv(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` with 2.25x fewer multiply-adds; channels-last output."""
    conv = block.conv
    w, bias = _subpixel_weights(block)
    b, _, h, wd = x.shape
    c = conv.out_channels
    y = F.conv2d(x, w, bias, padding=1).permute(0, 2, 3, 1)  # [B, H+1, W+1, 4 C_out]
    out = y.new_empty((b, h, 2, wd, 2, c))
    for k, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, i, :, j] = y[:, i : i + h, j : j + wd, k * c : (k + 1) * c]
    return out.view(b, 2 * h, 2 * wd, c).permute(0, 3, 1, 2)


def _upsample_block_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``DCUpBlock2d.forward`` (interpolate mode) with :func:`_upsample_conv`."""
    x = _upsample_conv(block, hidden_states)
    if block.shortcut:
        y = hidden_states.repeat_interleave(block.repeats, dim=1, output_size=hidden_states.shape[1] * block.repeats)
        x = x + F.pixel_shuffle(y, block.factor)
    return x


def _channel_rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers ``RMSNorm`` over the channels of [B, C, H, W] (fp32), as one ``F.rms_norm`` on the channels-last view."""
    y = F.rms_norm(x.movedim(1, -1), (x.shape[1],), norm.weight, norm.eps)
    if norm.bias is not None:
        y = y + norm.bias
    return y.movedim(-1, 1)


def _lean_resblock_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DC-AE ``ResBlock.forward`` (RMS norm): conv, SiLU in place, conv, fused RMS norm, residual."""
    h = F.silu(block.conv1(x), inplace=True)
    return _channel_rms_norm(block.norm, block.conv2(h)) + x


def _is_lean_resblock(m: nn.Module) -> bool:
    from diffusers.models.normalization import RMSNorm

    return (
        type(m).__name__ == "ResBlock"
        and getattr(m, "norm_type", None) == "rms_norm"
        and isinstance(getattr(m, "norm", None), RMSNorm)
        and isinstance(getattr(m, "nonlinearity", None), nn.SiLU)
        and isinstance(getattr(m, "conv1", None), nn.Conv2d)
        and isinstance(getattr(m, "conv2", None), nn.Conv2d)
    )


def _is_subpixel_block(m: nn.Module) -> bool:
    conv = getattr(m, "conv", None)
    return (
        type(m).__name__ == "DCUpBlock2d"
        and getattr(m, "interpolate", False)
        and getattr(m, "interpolation_mode", None) == "nearest"
        and getattr(m, "factor", None) == 2
        and isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
    )


def subpixel_upsampling(decoder: nn.Module) -> int:
    """Run every nearest-x2-upsample + 3x3-conv block of a DC-AE ``decoder`` as sub-pixel 2x2 convolutions.

    Same linear map (the 3x3 taps that read the same source pixel are summed once, in the weights):
    equal up to float rounding, 16 instead of 36 multiply-adds per output pixel and channel pair.
    An instance-level ``forward`` override; :func:`restore_upsampling` undoes it. Returns how many blocks.
    """
    return _override_forwards(decoder, _is_subpixel_block, _upsample_block_forward)


def prepare_subpixel(decoder: nn.Module) -> int:
    """Build the sub-pixel weights of every overridden up-sampling block of ``decoder`` now (before
    ``torch.compile``: a compiled decoder uses them as they are); returns how many blocks."""
    n = 0
    for m in decoder.modules():
        if _is_subpixel_block(m) and "forward" in m.__dict__:
            _subpixel_weights(m)
            n += 1
    return n


def lean_resblocks(decoder: nn.Module) -> int:
    """DC-AE ``ResBlock``s (RMS norm, SiLU) of ``decoder`` with :func:`_lean_resblock_forward`; returns how many."""
    return _override_forwards(decoder, _is_lean_resblock, _lean_resblock_forward)


def _override_forwards(root: nn.Module, match, forward) -> int:
    """Give every not yet overridden submodule ``m`` of ``root`` with ``match(m)`` the instance-level
    ``forward(m, ...)``; returns how many."""
    n = 0
    for m in root.modules():
        if match(m) and "forward" not in m.__dict__:
            m.forward = functools.partial(forward, m)
            n += 1
    return n


def restore_upsampling(decoder: nn.Module) -> None:
    """Undo :func:`subpixel_upsampling` and :func:`lean_resblocks`."""
    for m in decoder.modules():
        if _is_subpixel_block(m) or _is_lean_resblock(m):
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_sprint_subpixel", None)


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
    lean: bool = True,
    cache_time: bool = True,
) -> FastSprintPipeline:
    """A :class:`FastSprintPipeline` on ``pipe``'s modules (changed in place; see the module docstring).

    With ``trim_text`` the fast pipeline gets its own :class:`PaddingFreeTextEncoder` (same tokenizer
    and model, own cache) and, unless compiling, ``pipe.transformer`` a pre-hook cutting padded keys.
    """
    opts = FastOptions(inference_mode, channels_last, bf16, compile, cuda_graphs, linear_convs, trim_text, lean, cache_time)
    opts = opts.resolved(pipe.device)
    bf16_linear = opts.bf16 in ("linear", "mixed")
    text = pipe.text_encoder
    if opts.trim_text:
        text = PaddingFreeTextEncoder.from_encoder(text, lean=opts.lean, bf16=opts.bf16 != "off")
    fast = FastSprintPipeline(text, pipe.model, pipe.vae, pipe.config)
    fast.fast = opts
    if opts.linear_convs:
        convs_as_linear(fast.transformer)
    # Under compile diffusers' own blocks trace into one graph (the lean ones' weight-version checks would
    # break it); eager, the lean blocks do their own bf16 products (bf16_linears covers the other Linears).
    if opts.lean and not opts.compile:
        lean_blocks(fast.transformer, bf16=opts.bf16 != "off")
    if opts.lean:
        subpixel_upsampling(fast.vae.decoder)
        lean_resblocks(fast.vae.decoder)
    if opts.cache_time:
        cache_time_embedding(fast.transformer)
    if opts.trim_text and not opts.compile and not getattr(fast.transformer, "_sprint_trim_hook", None):
        fast.transformer._sprint_trim_hook = trim_cross_attention(fast.transformer)
    if opts.bf16 == "all":
        fast.to(dtype=torch.bfloat16)
    elif bf16_linear:
        bf16_linears(fast.transformer)
    if opts.bf16 == "mixed":  # nn.Module.to: diffusers' own .to() warns about a cast it cannot check
        nn.Module.to(fast.vae, dtype=torch.bfloat16)
    if opts.channels_last:
        fast.vae.to(memory_format=torch.channels_last)
    if opts.compile:
        if fast.device.type == "cuda":
            mode = "reduce-overhead" if opts.cuda_graphs else None
            fast.transformer.compile(mode=mode, dynamic=False)
            if isinstance(fast.text_encoder, PaddingFreeTextEncoder):  # Gemma-2 eager at batch 1: launch-bound
                fast.text_encoder.compile_model(mode)
            prepare_subpixel(fast.vae.decoder)
            fast.vae.decoder.compile(mode=mode, dynamic=False)
        else:  # CPU: weights frozen into the graph (prepacked); the VAE decoder measured slower compiled
            fast.transformer.compile(dynamic=False, options=CPU_COMPILE_OPTIONS)
    return fast


def describe(pipe: SprintPipeline) -> dict:
    """The fast options of a pipeline (all off for a plain :class:`SprintPipeline`)."""
    if isinstance(pipe, FastSprintPipeline):
        return asdict(pipe.fast)
    return asdict(FastOptions(inference_mode=False, channels_last=False, bf16="off", linear_convs=False, trim_text=False,
                              lean=False, cache_time=False))
