"""Fast paths (fast.py) stay within fast.TOLERANCE of the fp32 reference pipeline on a tiny random model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import IMAGE_SIZE, MAX_LENGTH, tiny_transformer, tiny_vae
from torch import nn

from sana_sprint import fast
from sana_sprint.models.attention import explicit_cross_attention
from sana_sprint.models.wrapper import TrigFlowTransformer
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
@pytest.mark.parametrize("mode", ["linear", "mixed", "all"])
def test_bf16_within_tolerance_and_not_identical(pipe, mode, steps):
    ref = _run(pipe, steps)
    fp = fast.optimize_pipeline(_copy(pipe), bf16=mode)
    assert fp.fast.bf16 == mode
    assert fp.vae.dtype == (torch.float32 if mode == "linear" else torch.bfloat16)
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
    assert fast.FastOptions().resolved(cpu).bf16 == "mixed"
    assert fast.FastOptions().resolved(torch.device("cuda")).bf16 == "all"
    assert fast.FastOptions(compile=True).resolved(torch.device("cuda")).cuda_graphs is True
    assert fast.FastOptions(compile=True).resolved(cpu).cuda_graphs is False
    assert fast.FastOptions(compile=True).resolved(cpu).cache_time is False and fast.FastOptions().resolved(cpu).cache_time
    with pytest.raises(ValueError, match="CUDA"):
        fast.FastOptions(compile=True, cuda_graphs=True).resolved(cpu)
    with pytest.raises(ValueError, match="compile"):
        fast.FastOptions(cuda_graphs=True).resolved(torch.device("cuda"))
    with pytest.raises(ValueError, match="bf16"):
        fast.FastOptions(bf16="fp8").resolved(cpu)


def test_describe(pipe):
    fresh = _copy(pipe)
    assert fast.describe(pipe)["inference_mode"] is False
    d = fast.describe(fast.optimize_pipeline(pipe, bf16="off"))
    assert d == {"inference_mode": True, "channels_last": True, "bf16": "off", "compile": False, "cuda_graphs": False,
                 "linear_convs": True, "trim_text": True, "lean": True, "cache_time": True}
    compiled = fast.optimize_pipeline(fresh, bf16="off", compile=True)  # compiles lazily: nothing runs here
    assert isinstance(compiled.text_encoder, fast.PaddingFreeTextEncoder)
    assert getattr(compiled.transformer, "_sprint_trim_hook", None) is None  # fixed key count under compile
    # diffusers' own blocks and no Python-side time cache under compile (one graph); lean text encoder kept
    assert not any("forward" in b.__dict__ for b in compiled.transformer.transformer_blocks)
    assert "forward" not in compiled.transformer.time_embed.__dict__ and compiled.text_encoder.lean is not None


# --- convolutions as matmuls -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,size", [(1, (4, 4)), (1, (5, 3)), (2, (8, 6)), (2, (7, 9)), (3, (9, 6))])
@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_conv_as_linear_equals_conv_float64(kernel, size, layout):
    torch.manual_seed(kernel)
    conv = nn.Conv2d(6, 5, kernel, stride=kernel).double()
    h, w = size
    if layout == "nchw":
        x = torch.randn(3, 6, h, w, dtype=torch.float64)
    else:  # what the Sana blocks pass: a [B, C, H, W] view of token-major [B, H, W, C] activations
        x = torch.randn(3, h, w, 6, dtype=torch.float64).permute(0, 3, 1, 2)
    ref = conv(x)
    assert fast.convs_as_linear(conv) == 1
    out = conv(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-12
    fast.restore_convs(conv)
    assert "forward" not in conv.__dict__


def test_convs_as_linear_touches_only_patchify_convs(pipe):
    t = pipe.transformer
    keys = {k: v.clone() for k, v in t.state_dict().items()}
    convs = {name: m for name, m in t.named_modules() if isinstance(m, nn.Conv2d)}
    n = fast.convs_as_linear(t)
    changed = sorted(name for name, m in convs.items() if "forward" in m.__dict__)
    # every block: conv_inverted + conv_point (1x1); plus the patch embedding; never the depthwise 3x3
    blocks = len(t.transformer_blocks)
    assert n == len(changed) == 2 * blocks + 1
    assert "patch_embed.proj" in changed and not any(name.endswith("conv_depth") for name in changed)
    assert set(t.state_dict()) == set(keys) and all(torch.equal(t.state_dict()[k], v) for k, v in keys.items())
    fast.restore_convs(t)


def _transformer_out(model, x, e, m, w):
    return model(x, torch.full((x.shape[0],), 1.2), e, m, guidance=w)


def test_linear_convs_transformer_float64(pipe):
    """The whole transformer with 1x1/patch convs as matmuls equals the conv version in float64."""
    model = copy.deepcopy(pipe.model).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    e = torch.randn(3, MAX_LENGTH, 32, generator=g, dtype=torch.float64)
    m = torch.ones(3, MAX_LENGTH, dtype=torch.long)
    ref = _transformer_out(model, x, e, m, 4.5)
    assert fast.convs_as_linear(model.transformer) > 0
    out = _transformer_out(model, x, e, m, 4.5)
    assert ref.std() > 1e-3 and (out - ref).abs().max() < 1e-10


# --- padding-free text -----------------------------------------------------------------------------------

SHORT = ["two cats", "a red dog left of a blue square"]  # 4 and 10 tokens with [CLS]/[SEP]


@pytest.fixture
def long_pipe(tokenizer, bert):
    """max_length 16 > every SHORT prompt, so padding is really skipped."""
    return SprintPipeline(
        TextEncoder(tokenizer, bert, max_length=16), tiny_transformer(seed=5), tiny_vae(seed=6),
        {"kind": "student", "resolution": IMAGE_SIZE},
    )


def test_padding_free_encoder_equals_padded_on_real_tokens(tokenizer, bert, caplog):
    ref = TextEncoder(tokenizer, bert, max_length=16)
    enc = fast.PaddingFreeTextEncoder.from_encoder(ref)
    prompts = [*SHORT, "a " * 30 + "square"]  # the last one is truncated to 16 tokens
    e_ref, m_ref = ref.encode(prompts)
    with caplog.at_level("WARNING"):
        e, m = enc.encode(prompts)
    assert "truncated to max_sequence_length=16" in caplog.text
    assert e.shape == e_ref.shape and e.dtype == torch.float32 and torch.equal(m, m_ref)
    assert m.sum(1).tolist() == [4, 10, 16]
    keep = m.bool()
    assert (e[keep] - e_ref[keep]).abs().max() < 1e-5
    assert torch.all(e[~keep] == 0) and e_ref[~keep].abs().max() > 0.1  # pads differ, masked out
    # shorter batches are padded to their own longest prompt only, still the same values
    e1, m1 = fast.PaddingFreeTextEncoder.from_encoder(ref).encode(SHORT[:1])
    assert torch.equal(m1, m_ref[:1]) and (e1[0, :4] - e_ref[0, :4]).abs().max() < 1e-5


def test_trim_hook_cuts_padded_keys_only():
    calls = []

    class Probe(nn.Module):
        def forward(self, x, encoder_hidden_states=None, encoder_attention_mask=None):
            calls.append((encoder_hidden_states.shape[1], encoder_attention_mask.clone()))
            return x

    probe = Probe()
    handle = fast.trim_cross_attention(probe)
    e = torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]])
    probe(torch.zeros(1), encoder_hidden_states=e, encoder_attention_mask=mask)
    probe(torch.zeros(1), encoder_hidden_states=e, encoder_attention_mask=torch.ones(2, 6, dtype=torch.long))
    handle.remove()
    probe(torch.zeros(1), encoder_hidden_states=e, encoder_attention_mask=mask)
    assert [c[0] for c in calls] == [3, 6, 6]
    assert torch.equal(calls[0][1], mask[:, :3])


@pytest.mark.parametrize("steps", [1, 2])
def test_trim_text_through_pipeline_matches_padded(long_pipe, steps):
    ref = long_pipe(SHORT, steps=steps, seed=3, output_type="pt")
    fp = fast.optimize_pipeline(_copy(long_pipe), bf16="off", linear_convs=False, trim_text=True)
    assert isinstance(fp.text_encoder, fast.PaddingFreeTextEncoder)
    seen = []
    probe = fp.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    out = fp(SHORT, steps=steps, seed=3, output_type="pt")
    probe.remove()
    assert seen == [10] * steps  # the hooks run in order: trimmed to the longest prompt (10 of 16)
    assert ref.images.std() > 1e-3
    assert (out.images - ref.images).abs().max() <= fast.TOLERANCE["fp32"]
    assert (out.latents - ref.latents).abs().max() <= fast.TOLERANCE["fp32"]


def test_trim_text_teacher_real_cfg_matches_padded(tokenizer, bert):
    """Teacher: cond + the null prompt (its own mask) batched for real CFG, cut to the longest of both."""
    teacher = SprintPipeline(
        TextEncoder(tokenizer, bert, max_length=16), tiny_transformer(guidance_embeds=False, seed=7),
        tiny_vae(seed=8), {"kind": "teacher", "resolution": IMAGE_SIZE},
    )
    ref = teacher(SHORT, steps=3, seed=1, output_type="pt")
    out = fast.optimize_pipeline(_copy(teacher), bf16="off")(SHORT, steps=3, seed=1, output_type="pt")
    assert (out.images - ref.images).abs().max() <= fast.TOLERANCE["fp32"]
    assert (out.latents - ref.latents).abs().max() <= fast.TOLERANCE["fp32"]


@pytest.mark.slow
def test_compile_matches_reference(pipe):
    ref = _run(pipe)
    out = _run(fast.optimize_pipeline(_copy(pipe), bf16="off", compile=True))
    assert (out.images - ref.images).abs().max() <= 1e-4


# --- lean text encoder and Sana blocks -------------------------------------------------------------------


def test_fused_bert_equals_transformers_float64(tokenizer, bert):
    model = copy.deepcopy(bert).double()
    fused = fast.FusedBertEncoder(model)
    enc = fast.PaddingFreeTextEncoder.from_encoder(TextEncoder(tokenizer, model, max_length=16))
    ids, mask = enc._tokenize(SHORT + ["one square"])  # right-padded to the longest prompt
    assert mask.sum(1).tolist() == [4, 10, 4]
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)[0]
        out = fused(ids, mask)
        keep = mask.bool()
        assert ref.std() > 0.1 and (out - ref)[keep].abs().max() < 1e-12  # padded rows are masked out anyway
        one = ids[1:2]  # no padding: the unmasked attention path
        assert (fused(one, torch.ones_like(one)) - model(one)[0]).abs().max() < 1e-12


def test_fused_bert_bf16_close_to_float64(tokenizer, bert):
    """bf16 products (fp32 everything else) stay within the stated bf16 tolerance of a float64 BERT."""
    ref_model = copy.deepcopy(bert).double()
    fused = fast.FusedBertEncoder(copy.deepcopy(bert).float(), bf16=True)
    assert all(layer[i].dtype == torch.bfloat16 for layer in fused.layers for i in (0, 2, 6, 8))
    enc = fast.PaddingFreeTextEncoder.from_encoder(TextEncoder(tokenizer, ref_model, max_length=16))
    ids, mask = enc._tokenize(SHORT + ["one square"])
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask)[0]
        out = fused(ids, mask)
    assert out.dtype == torch.float32
    err = (out.double() - ref)[mask.bool()].abs().max().item() / ref.std().item()
    assert 1e-5 < err <= fast.TOLERANCE["bf16_latent_rel"]


def test_fused_bert_refuses_other_architectures(bert):
    assert fast.FusedBertEncoder.supports(bert)
    other = copy.deepcopy(bert)
    other.config.hidden_act = "gelu_new"
    assert not fast.FusedBertEncoder.supports(other) and not fast.FusedBertEncoder.supports(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="BertModel"):
        fast.FusedBertEncoder(other)


def test_lean_text_encoder_in_pipeline(long_pipe):
    fp = fast.optimize_pipeline(_copy(long_pipe), bf16="off")
    assert fp.text_encoder.lean is not None
    assert fast.optimize_pipeline(_copy(long_pipe), bf16="off", lean=False).text_encoder.lean is None
    ref_e, ref_m = long_pipe.text_encoder.encode(SHORT)
    e, m = fp.text_encoder.encode(SHORT)
    assert torch.equal(m, ref_m) and (e - ref_e)[m.bool()].abs().max() < 1e-5


def _lean_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
    e = torch.randn(3, MAX_LENGTH, 32, generator=g, dtype=dtype)
    m = torch.ones(3, MAX_LENGTH, dtype=torch.long)
    m[0, 5:] = 0
    m[2, 2:] = 0
    return x, e, m


@pytest.mark.parametrize("guidance", [True, False])
def test_lean_blocks_equal_diffusers_blocks_float64(guidance):
    """The lean block forward equals diffusers' block forward in float64 (padded keys, student and teacher)."""
    model = TrigFlowTransformer(tiny_transformer(guidance_embeds=guidance, seed=4)).double()
    x, e, m = _lean_inputs(torch.float64)
    w = 4.5 if guidance else None
    with torch.no_grad():
        ref = _transformer_out(model, x, e, m, w)
        assert fast.lean_blocks(model.transformer) == len(model.transformer.transformer_blocks) == 2
        out = _transformer_out(model, x, e, m, w)
        assert all("_sprint_fused" in b.__dict__ for b in model.transformer.transformer_blocks)  # the lean path ran
    assert ref.std() > 1e-3 and (out - ref).abs().max() < 1e-10
    fast.restore_blocks(model.transformer)
    assert all("forward" not in b.__dict__ for b in model.transformer.transformer_blocks)


@pytest.mark.parametrize("guidance", [True, False])
def test_lean_blocks_bf16_close_to_float64(guidance):
    """Lean blocks on bf16 weight copies: within the stated bf16 tolerance of diffusers' blocks in float64."""
    model = TrigFlowTransformer(tiny_transformer(guidance_embeds=guidance, seed=4))
    ref_model = copy.deepcopy(model).double()
    x, e, m = _lean_inputs(torch.float32)
    w = 4.5 if guidance else None
    with torch.no_grad():
        ref = _transformer_out(ref_model, x.double(), e.double(), m, w)
        assert fast.lean_blocks(model.transformer, bf16=True) == 2
        out = _transformer_out(model, x, e, m, w)
        fused = [b.__dict__["_sprint_fused"][1] for b in model.transformer.transformer_blocks]
    assert all(wt.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.float32)
               for f in fused for wt, bias in f)
    assert out.dtype == torch.float32
    err = (out.double() - ref).abs().max().item() / ref.std().item()
    assert 1e-5 < err <= fast.TOLERANCE["bf16_latent_rel"]
    fast.restore_blocks(model.transformer)
    assert not any(k in b.__dict__ for b in model.transformer.transformer_blocks for k in ("_sprint_bf16", "forward"))


def test_lean_blocks_fall_back_and_follow_weight_updates():
    model = TrigFlowTransformer(tiny_transformer(seed=4)).double()
    x, e, m = _lean_inputs(torch.float64)
    fast.lean_blocks(model.transformer)
    blocks = model.transformer.transformer_blocks
    ref = _transformer_out(model, x, e, m, 4.5)  # autograd on: diffusers' own forward
    assert ref.requires_grad and not any("_sprint_fused" in b.__dict__ for b in blocks)
    with torch.no_grad():
        assert (_transformer_out(model, x, e, m, 4.5) - ref).abs().max() < 1e-10
        blocks[0].attn1.to_k.weight.add_(0.3)  # in-place update: the fused copy must be rebuilt
        blocks[1].attn2.to_v.weight.mul_(1.5)
        out = _transformer_out(model, x, e, m, 4.5)
        fast.restore_blocks(model.transformer)
        changed = _transformer_out(model, x, e, m, 4.5)
        assert (changed - ref).abs().max() > 1e-3 and (out - changed).abs().max() < 1e-10
        # a swapped cross-attention processor (the JVP-safe one) -> the block's own forward
        fast.lean_blocks(model.transformer)
        with explicit_cross_attention(model.transformer):
            swapped = _transformer_out(model, x, e, m, 4.5)
        assert (swapped - changed).abs().max() < 1e-10


@pytest.mark.parametrize("steps", [1, 2])
def test_lean_pipeline_matches_reference_fp32(long_pipe, steps):
    ref = long_pipe(SHORT, steps=steps, seed=3, output_type="pt")
    fp = fast.optimize_pipeline(_copy(long_pipe), bf16="off")
    assert sum("forward" in b.__dict__ for b in fp.transformer.transformer_blocks) == 2
    out = fp(SHORT, steps=steps, seed=3, output_type="pt")
    assert ref.images.std() > 1e-3
    assert (out.images - ref.images).abs().max() <= fast.TOLERANCE["fp32"]
    assert (out.latents - ref.latents).abs().max() <= fast.TOLERANCE["fp32"]
    # bf16="linear": the same lean blocks and lean text encoder on bf16 weight copies
    linear = fast.optimize_pipeline(_copy(long_pipe), bf16="linear")
    blocks = linear.transformer.transformer_blocks
    assert all(b.__dict__.get("_sprint_bf16") for b in blocks) and linear.text_encoder.lean.bf16
    out = linear(SHORT, steps=steps, seed=3, output_type="pt")
    assert all(w.dtype == torch.bfloat16 for b in blocks for w, _ in b.__dict__["_sprint_fused"][1])
    lat_err = (out.latents - ref.latents).abs().max().item() / ref.latents.std().item()
    assert 1e-5 < lat_err <= fast.TOLERANCE["bf16_latent_rel"]
    assert (out.images - ref.images).abs().mean() <= fast.TOLERANCE["bf16_image_mean"]


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("size", [(4, 4), (5, 3)])
def test_subpixel_upsampling_equals_upsample_conv_float64(shortcut, size):
    from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d

    torch.manual_seed(0)
    block = DCUpBlock2d(6, 3 if not shortcut else 6, interpolate=True, shortcut=shortcut).double()
    with torch.no_grad():
        block.conv.bias.normal_()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        assert fast.subpixel_upsampling(block) == 1
        out = block(x)
        assert out.shape == ref.shape == (2, block.conv.out_channels, 2 * size[0], 2 * size[1])
        assert ref.std() > 0.1 and (out - ref).abs().max() < 1e-12
        block.conv.weight[0, 0, 1, 2] += 1.0  # the cached sub-pixel kernels follow in-place updates
        out = block(x)
        fast.restore_upsampling(block)
        assert "forward" not in block.__dict__ and (block(x) - out).abs().max() < 1e-12


def test_subpixel_upsampling_in_dcae_decoder(pipe):
    """The tiny DC-AE decoder (interpolating up-blocks) decodes the same images within the fp32 tolerance."""
    vae = copy.deepcopy(pipe.vae)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z).sample
        n = fast.subpixel_upsampling(vae.decoder)
        out = vae.decode(z).sample
    assert n == sum(fast._is_subpixel_block(m) for m in vae.decoder.modules()) and n > 0
    assert ref.std() > 1e-3 and (out - ref).abs().max() < fast.TOLERANCE["fp32"]


def test_compiled_lean_decoder_is_one_graph(pipe):
    """A compiled DC-AE decoder with sub-pixel / lean blocks traces into one graph (fullgraph) once the
    sub-pixel weights are prepared, and decodes what the eager decoder does (the CUDA compile path)."""
    vae = copy.deepcopy(pipe.vae)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z).sample
        n = fast.subpixel_upsampling(vae.decoder)
        assert n > 0 and fast.lean_resblocks(vae.decoder) > 0 and fast.prepare_subpixel(vae.decoder) == n
        torch._dynamo.reset()
        decoder = torch.compile(vae.decoder, backend="eager", fullgraph=True)  # raises on any graph break
        out = decoder(z)
    assert ref.std() > 1e-3 and (out - ref).abs().max() < fast.TOLERANCE["fp32"]


def test_time_embedding_cache_is_exact_and_invalidated():
    t = tiny_transformer(seed=4)
    te = t.time_embed
    calls = []
    te.register_forward_hook(lambda *a: calls.append(1))
    s1, g1 = torch.tensor([1.2, 0.3]), torch.tensor([0.45, 0.45])
    with torch.no_grad():
        ref = te(s1, guidance=g1, hidden_dtype=torch.float32)
        assert fast.cache_time_embedding(t)
        a = te(s1, guidance=g1, hidden_dtype=torch.float32)
        b = te(s1.clone(), guidance=g1.clone(), hidden_dtype=torch.float32)  # same values: served from the cache
        assert len(te._sprint_time_cache) == 1 and all(torch.equal(x, y) for x, y in zip(a, ref))
        assert all(x is y for x, y in zip(a, b))
        c = te(torch.tensor([1.2, 0.31]), guidance=g1, hidden_dtype=torch.float32)  # another time: computed
        assert len(te._sprint_time_cache) == 2 and not torch.equal(c[0], a[0])
        te.linear.weight.mul_(2.0)  # in-place update: a new key
        d = te(s1, guidance=g1, hidden_dtype=torch.float32)
        assert len(te._sprint_time_cache) == 3 and not torch.equal(d[0], a[0])
        for i in range(fast.TIME_CACHE_SIZE + 5):
            te(torch.tensor([float(i)]), guidance=torch.tensor([0.1]), hidden_dtype=torch.float32)
        assert len(te._sprint_time_cache) == fast.TIME_CACHE_SIZE
    n = len(te._sprint_time_cache)
    te(s1, guidance=g1, hidden_dtype=torch.float32)  # autograd on: never cached
    assert len(te._sprint_time_cache) == n
    fast.restore_time_embedding(t)
    assert "forward" not in te.__dict__ and "_sprint_time_cache" not in te.__dict__


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_rms_equals_diffusers_rmsnorm(bias, dtype):
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-5, elementwise_affine=True, bias=bias).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        if bias:
            norm.bias.normal_()
    x = torch.randn(3, 5, 24, dtype=dtype) * 3
    with torch.no_grad():
        ref = norm(x)
        out = fast._rms(x, norm)
    assert out.dtype == ref.dtype and ref.std() > 0.5
    assert (out - ref).abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)
    assert fast._rms(x, None) is x


def test_fast_path_keeps_the_sincos_position_embedding(tokenizer, bert):
    """Students of teacher v3 add diffusers' sin-cos position embedding after the patchify conv."""
    p = SprintPipeline(TextEncoder(tokenizer, bert, max_length=MAX_LENGTH),
                       tiny_transformer(seed=5, interpolation_scale=1), tiny_vae(seed=6),
                       {"kind": "student", "resolution": IMAGE_SIZE})
    assert p.transformer.patch_embed.pos_embed is not None
    for steps in (1, 2):
        ref = _run(p, steps)
        fp = fast.optimize_pipeline(_copy(p), bf16="off")
        out = _run(fp, steps)
        assert ref.images.std() > 1e-3
        assert (out.latents - ref.latents).abs().max() <= fast.TOLERANCE["fp32"]
        assert (out.images - ref.images).abs().max() <= fast.TOLERANCE["fp32"]
    # the reference itself depends on the embedding (else the check above would not cover it)
    ref1 = _run(p, 1)
    with torch.no_grad():
        p.transformer.patch_embed.pos_embed.zero_()
    assert (_run(p, 1).latents - ref1.latents).abs().max() > 1e-3
