"""Our SprintPipeline vs diffusers' SanaSprintPipeline on the same tiny random folder (fp32, <= 1e-5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, MAX_LENGTH, save_tiny_pipeline, tiny_transformer
from diffusers import SanaSprintPipeline, SCMScheduler

from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder

PROMPTS = ["A red circle left of a blue square", "  two Yellow triangles  "]
W = 4.5


class _CustomTimestepSCM(SCMScheduler):
    """diffusers' retrieve_timesteps drops num_inference_steps with custom timesteps; infer it."""

    def set_timesteps(self, num_inference_steps=None, timesteps=None, **kw):
        if num_inference_steps is None and timesteps is not None:
            num_inference_steps = len(timesteps) - 1
        return super().set_timesteps(num_inference_steps, timesteps, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer, bert):
    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    student = tiny_transformer(guidance_embeds=True, seed=3)
    return save_tiny_pipeline(tmp_path_factory.mktemp("sprint"), te, student, kind="student", vae_seed=4)


def _gens(n, seed=10):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _diffusers(folder, tokenizer, bert, steps, timesteps, output_type, latents=None, scheduler_cls=None):
    pipe = SanaSprintPipeline.from_pretrained(folder, text_encoder=bert, tokenizer=tokenizer)
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = {}
    if steps == 2 and timesteps is None:
        pass  # diffusers' default [1.5708, 1.3, 0]
    elif timesteps is None:
        kw.update(intermediate_timesteps=None)  # linspace(1.5708, 0, steps + 1)
    else:
        kw.update(timesteps=timesteps, max_timesteps=None, intermediate_timesteps=None)
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=W,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        generator=_gens(len(PROMPTS)),
        latents=latents,
        output_type=output_type,
        use_resolution_binning=False,
        max_sequence_length=MAX_LENGTH,
        complex_human_instruction=None,
        **kw,
    ).images


@pytest.mark.parametrize(
    "steps,ours_ts,diff_ts,custom",
    [
        (1, [1.5708, 0.0], None, False),
        (2, [1.5708, 1.3, 0.0], None, False),
        (4, torch.linspace(1.5708, 0, 5).tolist(), None, False),
        (4, [1.5683, 1.3, 1.1, 0.6, 0.0], [1.5683, 1.3, 1.1, 0.6, 0.0], True),
    ],
)
def test_images_match_diffusers(folders, tokenizer, bert, steps, ours_ts, diff_ts, custom):
    ours = SprintPipeline.from_pretrained(folders)
    assert ours.text_encoder.spec is None and ours.kind == "student"
    out = ours(PROMPTS, timesteps=ours_ts, guidance_scale=W, generator=_gens(len(PROMPTS)), output_type="pt")
    ref = _diffusers(folders, tokenizer, bert, steps, diff_ts, "pt", scheduler_cls=_CustomTimestepSCM if custom else None)
    assert out.images.shape == ref.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (out.images - ref).abs().max() <= 1e-5
    # The images are not trivially constant (a test of something).
    assert ref.std() > 1e-3

    lat = ours(PROMPTS, timesteps=ours_ts, guidance_scale=W, generator=_gens(len(PROMPTS)), output_type="latent").images
    ref_lat = _diffusers(folders, tokenizer, bert, steps, diff_ts, "latent", scheduler_cls=_CustomTimestepSCM if custom else None)
    assert (lat - ref_lat).abs().max() <= 1e-5


def test_numpy_and_explicit_latents_match_diffusers(folders, tokenizer, bert):
    ours = SprintPipeline.from_pretrained(folders)
    latents = torch.randn(2, 4, IMAGE_SIZE // 4, IMAGE_SIZE // 4, generator=torch.Generator().manual_seed(0))
    out = ours(PROMPTS, steps=2, timesteps=[1.5708, 1.3], guidance_scale=W, generator=_gens(2), latents=latents, output_type="np")
    ref = _diffusers(folders, tokenizer, bert, 2, None, "np", latents=latents)
    assert isinstance(out.images, np.ndarray) and out.images.shape == ref.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.abs(out.images - ref).max() <= 1e-5
    # A different guidance gives a different image: guidance really reaches the model in both.
    other = ours(PROMPTS, steps=2, guidance_scale=1.0, generator=_gens(2), latents=latents, output_type="np").images
    assert np.abs(other - ref).max() > 1e-4


def test_pil_output_matches_diffusers(folders, tokenizer, bert):
    ours = SprintPipeline.from_pretrained(folders)
    out = ours(PROMPTS, timesteps=[1.5708, 0.0], generator=_gens(2)).images
    ref = _diffusers(folders, tokenizer, bert, 1, None, "pil")
    assert [im.size for im in out] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    diff = max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() for a, b in zip(out, ref))
    assert diff <= 1  # uint8 rounding of values within 1e-5


def test_default_schedule_is_not_half_pi_rounding():
    # sprint_config stores 1.5708 like diffusers; pi/2 itself would also be valid.
    assert abs(1.5708 - math.pi / 2) < 1e-4


def test_student_with_sincos_position_embedding_matches_diffusers(tmp_path, tokenizer, bert):
    """Students of teacher v3 carry diffusers' sin-cos position embedding (interpolation_scale=1)."""
    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    student = tiny_transformer(guidance_embeds=True, seed=3, interpolation_scale=1)
    assert student.patch_embed.pos_embed is not None
    folder = save_tiny_pipeline(tmp_path, te, student, kind="student", vae_seed=4)
    ours = SprintPipeline.from_pretrained(folder)
    assert ours.transformer.config.interpolation_scale == 1
    out = ours(PROMPTS, timesteps=[1.5708, 1.3, 0.0], guidance_scale=W, generator=_gens(len(PROMPTS)), output_type="pt")
    ref = _diffusers(folder, tokenizer, bert, 2, None, "pt")
    assert (out.images - ref).abs().max() <= 1e-5 and ref.std() > 1e-3
    # the embedding is used: the same weights without it give another image
    plain = tiny_transformer(guidance_embeds=True, seed=3)
    plain.load_state_dict(student.state_dict())
    nope = save_tiny_pipeline(tmp_path / "nope", te, plain, kind="student", vae_seed=4)
    other = SprintPipeline.from_pretrained(nope)(PROMPTS, timesteps=[1.5708, 1.3, 0.0], guidance_scale=W,
                                                 generator=_gens(len(PROMPTS)), output_type="pt").images
    assert (other - ref).abs().max() > 1e-3
