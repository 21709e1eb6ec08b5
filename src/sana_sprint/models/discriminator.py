"""LADD discriminator: small trainable heads on the frozen teacher's token features (DESIGN.md section 5).

The teacher is the *same object* as the sCM teacher; it is not registered as a submodule here, so
``Discriminator.parameters()`` / ``state_dict()`` hold only the heads. Features are read with
forward hooks on ``transformer.transformer_blocks[i]`` (outputs [B, N, C]) and only while
:meth:`Discriminator.forward` runs, so the teacher's other uses (the sCM CFG target) store nothing.

Head (StyleGAN-T's DiscHead, idea credited to Sauer et al.; tokens as a 1-D sequence [B, C, N]):
spectral-norm Conv1d k=1 -> virtual BatchNorm -> LeakyReLU 0.2 -> residual (x + f(x))/sqrt 2 with
f = same block at k=9 -> spectral-norm Conv1d C->1 = one logit per token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

VIRTUAL_BATCH = 8
LEAKY_SLOPE = 0.2
DEFAULT_NUM_HEADS = 4


def feature_blocks(num_layers: int, num_heads: int = DEFAULT_NUM_HEADS) -> list[int]:
    """Evenly spread block indices from ~10% depth to the last block.

    ceil(linspace(round(L/10), L-1, n)) gives the official [2, 8, 14, 19] for 20 layers, [3, 11, 19, 27]
    for 28 and [1, 3, 5, 7] for 8; with fewer layers than heads every block is used.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    n = max(1, min(num_heads, num_layers))
    if n == 1:
        return [num_layers - 1]
    start = min(round(num_layers / 10), num_layers - n)
    stop = num_layers - 1
    idx = [math.ceil(start + i * (stop - start) / (n - 1) - 1e-9) for i in range(n)]
    return sorted(set(idx))


class VirtualBatchNorm1d(nn.Module):
    """BatchNorm over [B, C, N] computed separately on consecutive groups of ``virtual_batch`` samples.

    Statistics are per channel over (samples in the group, tokens), always from the current batch
    (train and eval alike, as StyleGAN-T's ``BatchNormLocal``; a discriminator is never used for
    inference). The last group may be smaller, so any batch size works, including 1.
    """

    def __init__(self, channels: int, virtual_batch: int = VIRTUAL_BATCH, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if virtual_batch < 1:
            raise ValueError(f"virtual_batch must be >= 1, got {virtual_batch}")
        self.virtual_batch = virtual_batch
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in torch.split(x, self.virtual_batch, dim=0):
            mean = chunk.mean(dim=(0, 2), keepdim=True)
            var = chunk.var(dim=(0, 2), keepdim=True, unbiased=False)
            out.append((chunk - mean) * torch.rsqrt(var + self.eps))
        y = torch.cat(out, dim=0)
        if self.weight is not None:
            y = y * self.weight[None, :, None] + self.bias[None, :, None]
        return y


def _block(channels: int, kernel: int, virtual_batch: int) -> nn.Sequential:
    return nn.Sequential(
        spectral_norm(nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")),
        VirtualBatchNorm1d(channels, virtual_batch),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.fn(x)) / math.sqrt(2)  # keeps unit variance for uncorrelated branches


class DiscriminatorHead(nn.Module):
    """Tokens [B, C, N] -> logits [B, N]."""

    def __init__(self, channels: int, virtual_batch: int = VIRTUAL_BATCH):
        super().__init__()
        self.main = nn.Sequential(_block(channels, 1, virtual_batch), Residual(_block(channels, 9, virtual_batch)))
        self.cls = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.main(x)).squeeze(1)


class Discriminator(nn.Module):
    """Heads on hooked teacher blocks. ``forward(x_scaled, s, ehs, mask) -> logits [B, heads * N]``.

    ``teacher`` is a ``TrigFlowTransformer`` (frozen by the caller). Gradients reach the input
    through the teacher when the input requires grad (generator step); for the discriminator step,
    :meth:`features` can run the teacher under no_grad.
    """

    def __init__(
        self,
        teacher: nn.Module,
        block_indices: Sequence[int] | None = None,
        virtual_batch: int = VIRTUAL_BATCH,
    ):
        super().__init__()
        blocks = teacher.transformer.transformer_blocks
        self.block_indices = list(block_indices) if block_indices is not None else feature_blocks(len(blocks))
        if not self.block_indices or any(not 0 <= i < len(blocks) for i in self.block_indices):
            raise ValueError(f"block indices {self.block_indices} out of range for {len(blocks)} blocks")
        cfg = teacher.transformer.config
        width = cfg.num_attention_heads * cfg.attention_head_dim
        self.heads = nn.ModuleList(DiscriminatorHead(width, virtual_batch) for _ in self.block_indices)
        self.__dict__["teacher"] = teacher  # shared, not a submodule: never in parameters() / state_dict()
        self._features: dict[int, torch.Tensor] | None = None
        self._hooks = [blocks[i].register_forward_hook(self._make_hook(i)) for i in self.block_indices]

    def _make_hook(self, index: int):
        def hook(module, args, output):
            if self._features is not None:
                self._features[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def features(
        self, x_scaled: torch.Tensor, s: torch.Tensor, ehs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Token features [B, C, N] of the hooked blocks (one teacher forward)."""
        self._features = {}
        try:
            self.teacher(x_scaled, s, ehs, mask)
            feats = [self._features[i] for i in self.block_indices]
        finally:
            self._features = None
        return [f.transpose(1, 2) for f in feats]

    def head_logits(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-token logits of every head, concatenated: [B, heads * N] (float32)."""
        return torch.cat([head(f).float().flatten(1) for head, f in zip(self.heads, feats)], dim=1)

    def forward(
        self, x_scaled: torch.Tensor, s: torch.Tensor, ehs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head_logits(self.features(x_scaled, s, ehs, mask))
