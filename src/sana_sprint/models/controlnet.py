"""Sprint ControlNet: a trainable copy of the first K blocks of a frozen SANA transformer (DESIGN.md section 8).

Structure (official SANA ControlNet, PixArt-delta style):

    h_0   = patch_embed(x_t) + before_proj(patch_embed(control))      # before_proj zero-initialised
    h_i   = copy_i(h_{i-1}, caption, time)                             # i = 0..K-1, copies of base blocks 0..K-1
    out_i = scale * after_proj_i(h_i)                                  # after_proj_i zero-initialised

``out_i`` is ``controlnet_block_samples[i]``; diffusers' ``SanaTransformer2DModel`` adds it to the main
stream after base block ``i + 1`` (its convention: sample ``i - 1`` after block ``i`` for 0 < i <= K), so
K is at most ``num_layers - 1``. The control image is VAE-encoded (:func:`encode_control`) and patch
embedded by the *base's* embedder, which stays shared and frozen; the time (+CFG) embedding and the
caption projection are the base's too. Only the copies and the two projections are saved.

:class:`ControlledTrigFlow` is a :class:`~sana_sprint.models.wrapper.TrigFlowTransformer` with the same
forward signature plus a ``control`` input, so samplers and the distillation method use it unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelFolderError, UserError
from .jvp import jvp_layers
from .presets import init_kwargs
from .wrapper import TrigFlowTransformer, _time

DEFAULT_NUM_BLOCKS = 7  # official SANA ControlNet
CONFIG_NAME = "controlnet_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Base config keys that fix the shape of a block (and so of our weights).
_BLOCK_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "num_cross_attention_heads",
    "cross_attention_head_dim",
    "cross_attention_dim",
    "attention_bias",
    "norm_elementwise_affine",
    "norm_eps",
    "mlp_ratio",
    "qk_norm",
    "dropout",
)


def _width(cfg: dict[str, Any]) -> int:
    return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


def _block(cfg: dict[str, Any]) -> SanaTransformerBlock:
    """One block exactly as ``SanaTransformer2DModel.__init__`` builds it."""
    return SanaTransformerBlock(
        _width(cfg),
        cfg["num_attention_heads"],
        cfg["attention_head_dim"],
        dropout=cfg.get("dropout", 0.0),
        num_cross_attention_heads=cfg["num_cross_attention_heads"],
        cross_attention_head_dim=cfg["cross_attention_head_dim"],
        cross_attention_dim=cfg["cross_attention_dim"],
        attention_bias=cfg.get("attention_bias", False),
        norm_elementwise_affine=cfg.get("norm_elementwise_affine", False),
        norm_eps=cfg.get("norm_eps", 1e-6),
        mlp_ratio=cfg.get("mlp_ratio", 2.5),
        qk_norm=cfg.get("qk_norm"),
    )


def _zero_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, L] keep-mask -> additive bias [B, 1, L], as ``SanaTransformer2DModel.forward`` does."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class SprintControlNet(nn.Module):
    """The control branch. Holds only its own weights; the base transformer is passed to :meth:`forward`."""

    def __init__(self, base_config: dict[str, Any], num_blocks: int = DEFAULT_NUM_BLOCKS):
        super().__init__()
        cfg = init_kwargs(base_config)
        depth = int(cfg["num_layers"])
        if depth < 2:
            raise ValueError("a ControlNet needs a base with at least 2 blocks (samples are added after blocks 1..K)")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.base_config = cfg
        self.num_blocks = min(int(num_blocks), depth - 1)
        self.info: dict[str, Any] = {}  # the folder's "sprint" metadata (from_pretrained)
        width = _width(cfg)
        self.blocks = nn.ModuleList([_block(cfg) for _ in range(self.num_blocks)])
        self.before_proj = _zero_linear(width)
        self.after_proj = nn.ModuleList([_zero_linear(width) for _ in range(self.num_blocks)])

    @classmethod
    def from_base(cls, base: SanaTransformer2DModel, num_blocks: int = DEFAULT_NUM_BLOCKS) -> SprintControlNet:
        """Copies of the first ``num_blocks`` (capped at depth - 1) base blocks; zero projections."""
        net = cls(dict(base.config), num_blocks)
        param = next(base.parameters())
        net.to(param.device, param.dtype)
        for i, block in enumerate(net.blocks):
            block.load_state_dict(copy.deepcopy(base.transformer_blocks[i].state_dict()))
        return net

    def default_scale(self, steps: int) -> float:
        """Conditioning scale used when a caller gives none: the folder's ``default_conditioning_scale`` for
        this step count (chosen on tuning scenes by scripts/choose_conditioning_scale.py), else its
        ``conditioning_scale``, else 1."""
        per_steps = self.info.get("default_conditioning_scale") or {}
        if str(int(steps)) in per_steps:
            return float(per_steps[str(int(steps))])
        return float(self.info.get("conditioning_scale", 1.0))

    def check_base(self, base: SanaTransformer2DModel) -> None:
        cfg = dict(base.config)
        bad = [k for k in _BLOCK_KEYS if k in self.base_config and cfg.get(k) != self.base_config[k]]
        if bad or int(cfg["num_layers"]) <= self.num_blocks:
            raise ValueError(f"ControlNet does not fit this base transformer (differs in {bad or ['num_layers']})")

    def forward(
        self,
        base: SanaTransformer2DModel,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        control_latents: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        conditioning_scale: float | torch.Tensor = 1.0,
    ) -> list[torch.Tensor]:
        """``controlnet_block_samples`` for ``base``: K tensors [B, N, width].

        Arguments are those ``base.forward`` receives: flow-space ``hidden_states`` [B, C, H, W], the
        already-scaled ``timestep`` and ``guidance``; ``control_latents`` [B or 1, C, H, W] in the same
        (unit-std) space as ``hidden_states``. ``conditioning_scale``: a number, or one per sample (a 1-D
        tensor of length B or 1, repeated like the latents when CFG stacks the batch; 0 = that sample
        runs as the base alone).
        """
        b, _, height, width = hidden_states.shape
        p = base.config.patch_size
        control = _match_batch(control_latents, b).to(hidden_states.dtype)
        if isinstance(conditioning_scale, torch.Tensor) and conditioning_scale.ndim == 1:  # one scale per sample
            conditioning_scale = _match_batch(conditioning_scale, b).to(hidden_states.dtype).view(b, 1, 1)
        x = base.patch_embed(hidden_states)
        x = x + self.before_proj(base.patch_embed(control))
        if guidance is not None:
            temb, _ = base.time_embed(timestep, guidance=guidance, hidden_dtype=x.dtype)
        else:
            temb, _ = base.time_embed(timestep, batch_size=b, hidden_dtype=x.dtype)
        ehs = base.caption_projection(encoder_hidden_states).view(b, -1, x.shape[-1])
        ehs = base.caption_norm(ehs)
        mask = _mask_bias(encoder_attention_mask, x.dtype)
        samples = []
        for block, proj in zip(self.blocks, self.after_proj):
            x = block(x, None, ehs, mask, temb, height // p, width // p)
            samples.append(proj(x) * conditioning_scale)
        return samples

    # -- persistence --------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None,
                        extra: dict[str, Any] | None = None) -> None:
        """Write ``controlnet_config.json`` + safetensors weights (cast to ``dtype`` if given, e.g. fp16).

        ``extra`` (JSON-able: the condition type, training settings) is stored in the config under
        ``"sprint"``; loading ignores it.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, "num_blocks": self.num_blocks, "base_config": self.base_config}
        if extra:
            config["sprint"] = extra
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))

    @staticmethod
    def read_config(folder: str | Path) -> dict[str, Any]:
        """The folder's ``controlnet_config.json`` (``"sprint"`` holds what :meth:`save_pretrained` got as ``extra``)."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise ModelFolderError(f"{folder}: not a ControlNet folder (missing {CONFIG_NAME})")
        return json.loads(path.read_text())

    @classmethod
    def from_pretrained(cls, folder: str | Path, base: SanaTransformer2DModel | None = None) -> SprintControlNet:
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise ModelFolderError(f"{folder}: not a ControlNet folder (missing {name})")
        config = json.loads((folder / CONFIG_NAME).read_text())
        net = cls(config["base_config"], config["num_blocks"])
        net.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        net.info = dict(config.get("sprint", {}))
        if base is not None:
            try:
                net.check_base(base)
            except ValueError as e:  # a user's folder built for another base: one-line error, no traceback
                raise ModelFolderError(f"{folder}: {e}") from None
            param = next(base.parameters())
            net.to(param.device, param.dtype)
        return net

    @staticmethod
    def record_default_scales(folder: str | Path, selection: dict[str, Any], dry_run: bool = False) -> dict[str, float]:
        """Store per-step-count default conditioning scales chosen on tuning scenes in ``folder``'s config.

        ``selection``: ``{"tune_eval_seed", "seed", "num", "tie", "steps": {"N": {"chosen": scale, ...}}}``
        (scripts/choose_conditioning_scale.py). Step counts chosen earlier under the same tuning settings
        and not measured again are kept, so step counts can be tuned one run at a time; a selection made
        under other settings is refused (the choices would not be comparable). Returns the new
        ``default_conditioning_scale`` mapping; ``dry_run`` only checks (nothing is written).
        """
        path = Path(folder) / CONFIG_NAME
        config = SprintControlNet.read_config(folder)
        sprint = config.setdefault("sprint", {})
        settings = ("tune_eval_seed", "seed", "num", "tie")
        old = sprint.get("conditioning_scale_selection") or {}
        old_steps = dict(old.get("steps") or {})
        if old_steps and any(old.get(k) != selection.get(k) for k in settings):
            differ = ", ".join(f"{k} {old.get(k)} vs {selection.get(k)}" for k in settings if old.get(k) != selection.get(k))
            raise UserError(f"{path}: its default scales were chosen with other tuning settings ({differ}); "
                            f"rerun every step count ({','.join(sorted(old_steps, key=int))}) with the same settings")
        merged = {**old_steps, **{str(k): v for k, v in selection["steps"].items()}}
        merged = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))
        defaults = {k: float(v["chosen"]) for k, v in merged.items()}
        if dry_run:
            return defaults
        sprint["default_conditioning_scale"] = defaults
        extra = {k: v for d in (old, selection) for k, v in d.items() if k not in (*settings, "steps")}  # e.g. a note
        sprint["conditioning_scale_selection"] = {**{k: selection.get(k) for k in settings}, "steps": merged, **extra}
        path.write_text(json.dumps(config, indent=2) + "\n")
        return defaults


def _match_batch(control: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a control batch to ``batch`` (1 -> B, or B -> kB when CFG stacks the batch)."""
    n = control.shape[0]
    if n == batch:
        return control
    if batch % n:
        raise ValueError(f"control batch {n} does not divide the model batch {batch}")
    return control.repeat(batch // n, *([1] * (control.ndim - 1)))


@dataclass
class _Control:
    """Control input travelling through ``TrigFlowTransformer.forward`` to :meth:`ControlledTrigFlow.flow_velocity`."""

    latents: torch.Tensor
    scale: float | torch.Tensor


class ControlledTrigFlow(TrigFlowTransformer):
    """A TrigFlow model F(x_s/sd, s, y, control): base wrapper + ControlNet, base frozen.

    ``forward(x_scaled, s, encoder_hidden_states, encoder_attention_mask, guidance, ..., control=,
    conditioning_scale=)``. Without ``control`` the latents bound by :meth:`bind` are used, so code
    written for a plain :class:`TrigFlowTransformer` (samplers, the distillation method) runs unchanged
    inside ``with model.bind(control_latents):``. With no control at all it is exactly the base.
    The TrigFlow transform is the base wrapper's own (applied once): the ControlNet joins at
    :meth:`flow_velocity`, where the flow-space input and dense time are known.
    """

    def __init__(
        self,
        base: TrigFlowTransformer,
        controlnet: SprintControlNet,
        conditioning_scale: float = 1.0,
        freeze_base: bool = True,
    ):
        super().__init__(base.transformer, sigma_data=base.sigma_data, logvar=False)
        self.logvar_linear = base.logvar_linear
        controlnet.check_base(base.transformer)
        self.controlnet = controlnet
        self.conditioning_scale = float(conditioning_scale)
        self._bound: _Control | None = None
        if freeze_base:
            self.transformer.requires_grad_(False)

    @contextlib.contextmanager
    def bind(self, control_latents: torch.Tensor | None, conditioning_scale: float | torch.Tensor | None = None
             ) -> Iterator[None]:
        """Use ``control_latents`` for every call without an explicit ``control`` inside the block
        (``conditioning_scale``: a number or one per sample, see :meth:`SprintControlNet.forward`)."""
        saved = self._bound
        scale = self.conditioning_scale if conditioning_scale is None else conditioning_scale
        self._bound = None if control_latents is None else _Control(control_latents, scale)
        try:
            yield
        finally:
            self._bound = saved

    @contextlib.contextmanager
    def jvp_mode(self, fast: bool = True) -> Iterator[ControlledTrigFlow]:
        """As :meth:`TrigFlowTransformer.jvp_mode`, for the base and the ControlNet branch."""
        with jvp_layers(self.transformer, self.controlnet, fast=fast):
            yield self

    def flow_velocity(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        controlnet_block_samples: Sequence[torch.Tensor] | _Control | None = None,
        control: torch.Tensor | None = None,
        conditioning_scale: float | None = None,
    ) -> torch.Tensor:
        ctrl = controlnet_block_samples if isinstance(controlnet_block_samples, _Control) else None
        if control is not None:
            ctrl = _Control(control, self.conditioning_scale if conditioning_scale is None else conditioning_scale)
        elif ctrl is None and controlnet_block_samples is None:
            ctrl = self._bound
        if ctrl is not None:
            b = x_t.shape[0]
            t = _time(t, x_t)
            timestep = t * float(getattr(self.transformer.config, "timestep_scale", 1.0) or 1.0)
            controlnet_block_samples = self.controlnet(
                self.transformer,
                x_t,
                timestep,
                encoder_hidden_states,
                ctrl.latents.to(x_t.device),
                encoder_attention_mask,
                self._guidance(guidance, b, x_t.device),
                ctrl.scale,
            )
        return super().flow_velocity(
            x_t, t, encoder_hidden_states, encoder_attention_mask, guidance, controlnet_block_samples
        )

    def forward(
        self,
        x_scaled: torch.Tensor,
        s: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        controlnet_block_samples=None,
        return_logvar: bool = False,
        control: torch.Tensor | None = None,
        conditioning_scale: float | None = None,
    ):
        """F(x_s/sd, s, y) with the ControlNet applied for ``control`` (or the bound control, or none)."""
        if control is not None:
            scale = self.conditioning_scale if conditioning_scale is None else conditioning_scale
            controlnet_block_samples = _Control(control, scale)
        return super().forward(
            x_scaled, s, encoder_hidden_states, encoder_attention_mask, guidance, controlnet_block_samples, return_logvar
        )


def controlled_F(
    wrapper: TrigFlowTransformer,
    controlnet: SprintControlNet,
    x_scaled: torch.Tensor,
    s: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    guidance: torch.Tensor | float | None,
    control_latents: torch.Tensor,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """One-call form of :class:`ControlledTrigFlow` (does not freeze the base)."""
    model = ControlledTrigFlow(wrapper, controlnet, conditioning_scale, freeze_base=False)
    return model(x_scaled, s, encoder_hidden_states, encoder_attention_mask, guidance, control=control_latents)


@torch.no_grad()
def encode_control(vae, images: torch.Tensor) -> torch.Tensor:
    """Control images [B, 3, H, W] in [-1, 1] -> unit-std latents (``vae latent * scaling_factor``), the flow space."""
    param = next(vae.parameters())
    latent = vae.encode(images.to(param.device, param.dtype)).latent
    return latent.float() * float(vae.config.scaling_factor)
