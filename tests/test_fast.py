"""Fast paths (fast.py) stay within fast.TOLERANCE of the fp32 reference pipeline on a tiny random model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import IMAGE_SIZE, MAX_LENGTH, tiny_transformer, tiny_vae
from torch import nn

from sana_sprint import fast
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder

PROMPTS = ["a red circle left of a blue square", "two yellow triangles"]


@pytest.fixture
def pipe(tokenizer, bert):
    return SprintPipeline(
        TextEncoder(tokenizer, bert, max_length=MAX_LENGTH),
        tiny_transformer(seed=5),
        tiny_vae(seed=6),
        {"kind": "student", "resolution": IMAGE_SIZE},
    )


def _run(p, steps=2, **kw):
    return p(PROMPTS, steps=steps, seed=3, output_type="pt", **kw)


def _copy(p):
    return SprintPipeline(p.text_encoder, copy.deepcopy(p.model), copy.deepcopy(p.vae), p.config)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("inference_mode", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fp32_fast_paths_match_reference(pipe, steps, inference_mode, channels_last):
    ref = _run(pipe, steps)
    fp = fast.optimize_pipeline(_copy(pipe), inference_mode=inference_mode, channels_last=channels_last, bf16="off")
    out = _run(fp, steps)
    assert (out.images - ref.images).abs().max() <= fast.TOLERANCE["fp32"]
    assert (out.latents - ref.latents).abs().max() <= fast.TOLERANCE["fp32"]
    assert ref.images.std() > 1e-3  # not a constant image
    if inference_mode:
        assert out.images.is_inference()
    if channels_last:
        conv = next(m for m in fp.vae.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("mode", ["linear", "all"])
def test_bf16_within_tolerance_and_not_identical(pipe, mode, steps):
    ref = _run(pipe, steps)
    fp = fast.optimize_pipeline(_copy(pipe), bf16=mode)
    assert fp.fast.bf16 == mode
    out = _run(fp, steps)
    lat_err = (out.latents - ref.latents).abs().max().item() / ref.latents.std().item()
    assert lat_err <= fast.TOLERANCE["bf16_latent_rel"]
    assert (out.images - ref.images).abs().mean() <= fast.TOLERANCE["bf16_image_mean"]
    assert lat_err > 1e-5  # bf16 really ran (a no-op would pass the tolerance trivially)
    assert out.latents.dtype == torch.float32


def test_bf16_linear_only_touches_linears_outside_time_embedding(pipe):
    n = fast.bf16_linears(pipe.transformer)
    linears = [(name, m) for name, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)]
    patched = [name for name, m in linears if "forward" in m.__dict__]
    assert n == len(patched) > 0
    assert all("time_embed" not in name for name in patched)
    assert any("time_embed" in name for name, _ in linears)
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    x = torch.randn(3, linears[-1][1].in_features)
    y = linears[-1][1](x)
    assert y.dtype == torch.float32
    fast.restore_linears(pipe.transformer)
    assert all("forward" not in m.__dict__ for _, m in linears)
    assert torch.equal(linears[-1][1](x), nn.functional.linear(x, linears[-1][1].weight, linears[-1][1].bias))


def test_teacher_fast_path_matches(tokenizer, bert):
    teacher = SprintPipeline(
        TextEncoder(tokenizer, bert, max_length=MAX_LENGTH),
        tiny_transformer(guidance_embeds=False, seed=7),
        tiny_vae(seed=8),
        {"kind": "teacher", "resolution": IMAGE_SIZE},
    )
    ref = _run(teacher, steps=3)
    out = _run(fast.optimize_pipeline(_copy(teacher), bf16="off"), steps=3)
    assert (out.images - ref.images).abs().max() <= fast.TOLERANCE["fp32"]


def test_auto_resolution_and_guards(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: False)
    assert fast.FastOptions().resolved(cpu).bf16 == "off"
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: True)
    assert fast.FastOptions().resolved(cpu).bf16 == "linear"
    assert fast.FastOptions().resolved(torch.device("cuda")).bf16 == "all"
    assert fast.FastOptions(compile=True).resolved(torch.device("cuda")).cuda_graphs is True
    assert fast.FastOptions(compile=True).resolved(cpu).cuda_graphs is False
    with pytest.raises(ValueError, match="CUDA"):
        fast.FastOptions(compile=True, cuda_graphs=True).resolved(cpu)
    with pytest.raises(ValueError, match="compile"):
        fast.FastOptions(cuda_graphs=True).resolved(torch.device("cuda"))
    with pytest.raises(ValueError, match="bf16"):
        fast.FastOptions(bf16="fp8").resolved(cpu)


def test_describe(pipe):
    assert fast.describe(pipe)["inference_mode"] is False
    d = fast.describe(fast.optimize_pipeline(pipe, bf16="off"))
    assert d == {"inference_mode": True, "channels_last": True, "bf16": "off", "compile": False, "cuda_graphs": False}


@pytest.mark.slow
def test_compile_matches_reference(pipe):
    ref = _run(pipe)
    out = _run(fast.optimize_pipeline(_copy(pipe), bf16="off", compile=True))
    assert (out.images - ref.images).abs().max() <= 1e-4
