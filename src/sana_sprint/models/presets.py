"""``SanaTransformer2DModel`` configurations and the teacher -> student initialisation.

Configs are plain dicts for ``SanaTransformer2DModel(**cfg)``. All Sprint models use dense time
(``timestep_scale`` 1.0: the transformer sees t in [0, 1]) and QK RMS-norm (DESIGN.md section 6).
Teachers have no guidance embedding; students add one (``guidance = 0.1 * w``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SanaTransformer2DModel

QK_NORM = "rms_norm_across_heads"
GUIDANCE_EMBEDS_SCALE = 0.1  # student sees guidance = 0.1 * w (SANA-Sprint CFG embedding)


def _sana(
    *,
    latent_channels: int,
    heads: int,
    head_dim: int,
    layers: int,
    cross_heads: int,
    cross_head_dim: int,
    caption_channels: int,
    sample_size: int,
    mlp_ratio: float = 2.5,
    patch_size: int = 1,
    guidance_embeds: bool = False,
    timestep_scale: float = 1.0,
    qk_norm: str | None = QK_NORM,
) -> dict[str, Any]:
    width = heads * head_dim
    if cross_heads * cross_head_dim != width:
        # The caption is projected to the model width before cross-attention, so key/value width = width.
        raise ValueError(f"cross-attention width {cross_heads}x{cross_head_dim} must equal width {width}")
    return dict(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        num_cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_head_dim,
        cross_attention_dim=width,
        caption_channels=caption_channels,
        mlp_ratio=mlp_ratio,
        dropout=0.0,
        attention_bias=False,
        sample_size=sample_size,
        patch_size=patch_size,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=None,
        guidance_embeds=guidance_embeds,
        guidance_embeds_scale=GUIDANCE_EMBEDS_SCALE,
        qk_norm=qk_norm,
        timestep_scale=timestep_scale,
    )


def shapes_teacher(latent_channels: int = 16, resolution: int = 64, vae_compression: int = 8) -> dict[str, Any]:
    """Teacher for the 64x64 shapes world: f8 DC-AE latents (8x8xC), width 256, 8 layers (~9.0 M params)."""
    return _sana(
        latent_channels=latent_channels,
        heads=8,
        head_dim=32,
        layers=8,
        cross_heads=4,
        cross_head_dim=64,
        caption_channels=384,  # all-MiniLM-L6-v2
        sample_size=resolution // vae_compression,
    )


def tiny(latent_channels: int = 4, caption_channels: int = 32, sample_size: int = 8, guidance_embeds: bool = True) -> dict[str, Any]:
    """A ~20k-parameter model for tests (2 layers, width 16)."""
    return _sana(
        latent_channels=latent_channels,
        heads=2,
        head_dim=8,
        layers=2,
        cross_heads=2,
        cross_head_dim=8,
        caption_channels=caption_channels,
        sample_size=sample_size,
        guidance_embeds=guidance_embeds,
    )


def sana_1600m(res: int = 1024, guidance_embeds: bool = True) -> dict[str, Any]:
    """SANA(-Sprint) 1.6B: 20 layers, 70x32 heads, cross 20x112, Gemma-2 captions, DC-AE f32c32.

    ``guidance_embeds=False`` gives the (dense-time, QK-norm) teacher.
    """
    return _sana(
        latent_channels=32,
        heads=70,
        head_dim=32,
        layers=20,
        cross_heads=20,
        cross_head_dim=112,
        caption_channels=2304,
        sample_size=res // 32,
        guidance_embeds=guidance_embeds,
    )


def sana_600m(res: int = 1024, guidance_embeds: bool = True) -> dict[str, Any]:
    """SANA(-Sprint) 0.6B: 28 layers, 36x32 heads, cross 16x72 (width 1152)."""
    return _sana(
        latent_channels=32,
        heads=36,
        head_dim=32,
        layers=28,
        cross_heads=16,
        cross_head_dim=72,
        caption_channels=2304,
        sample_size=res // 32,
        guidance_embeds=guidance_embeds,
    )


def init_kwargs(config: Any) -> dict[str, Any]:
    """A model config (diffusers ``FrozenDict`` or a config.json dict) as constructor arguments: without the
    private ``_class_name`` / ``_diffusers_version`` / ``_name_or_path`` ... entries."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def teacher_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same architecture without the CFG embedding."""
    return {**dict(cfg), "guidance_embeds": False}


def student_from_teacher_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same architecture plus the CFG embedding (guidance = 0.1 * w)."""
    return {**init_kwargs(cfg), "guidance_embeds": True, "guidance_embeds_scale": GUIDANCE_EMBEDS_SCALE}


# Teacher (AdaLayerNormSingle) -> student (SanaCombinedTimestepGuidanceEmbeddings) time-embedding keys.
_TIME_EMBED_KEYS = {
    "time_embed.emb.timestep_embedder.": "time_embed.timestep_embedder.",
}


def student_key(key: str) -> str:
    """The student's name for a teacher parameter (the student's time embedding is a combined one)."""
    for old, new in _TIME_EMBED_KEYS.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def make_student(teacher: SanaTransformer2DModel) -> SanaTransformer2DModel:
    """A guidance-embedding copy of ``teacher`` that computes exactly the teacher's function for any guidance.

    All weights are copied; the guidance MLP's last layer is zero so its embedding adds exactly 0.
    """
    if teacher.config.guidance_embeds:
        raise ValueError("make_student expects a teacher without guidance embeddings")
    param = next(teacher.parameters())
    student = SanaTransformer2DModel(**student_from_teacher_config(teacher.config)).to(param.device, param.dtype)
    state = {student_key(k): v for k, v in teacher.state_dict().items()}
    target = student.state_dict()
    unexpected = sorted(set(state) - set(target))
    if unexpected:
        raise RuntimeError(f"teacher weights with no place in the student: {unexpected[:5]}")
    missing = sorted(set(target) - set(state))
    if any(not k.startswith("time_embed.guidance_embedder.") for k in missing):
        raise RuntimeError(f"student weights not found in the teacher: {missing[:5]}")
    student.load_state_dict(state, strict=False)
    with torch.no_grad():
        last = student.time_embed.guidance_embedder.linear_2
        last.weight.zero_()
        last.bias.zero_()
    return student


# --- autoencoder configs (AutoencoderDC) used by tests and the random demo model -------------------


def tiny_vae(latent_channels: int = 4) -> dict[str, Any]:
    """A tiny DC-AE with compression 4 (3 stages), for tests."""
    return dict(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def vae_compression(vae_config) -> int:
    """Spatial compression of an AutoencoderDC, computed as diffusers' Sana pipelines do."""
    return 2 ** (len(vae_config["encoder_block_out_channels"] if isinstance(vae_config, dict) else vae_config.encoder_block_out_channels) - 1)
