"""GemmaPromptEncoder against diffusers' SanaSprintPipeline.encode_prompt on a tiny random Gemma-2."""

from __future__ import annotations

import re

import pytest
import torch

from sana_sprint.text_gemma import GemmaPromptEncoder, default_complex_human_instruction, select_index

GEMMA_HIDDEN = 24
PROMPTS = ["A red Circle left of a blue square  ", "two yellow triangles", "purple"]
LONG_PROMPT = " ".join(["a green square above an orange circle"] * 60)  # > 300 tokens: truncated


def tiny_gemma_tokenizer():
    """A Gemma-like tokenizer built offline: word-level, ``<bos>`` prepended, no EOS, ``<pad>`` = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = " ".join(default_complex_human_instruction() + PROMPTS + [LONG_PROMPT, "cat dog the of"]).lower()
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_gemma(vocab_size: int, hidden: int = GEMMA_HIDDEN, seed: int = 0):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=12,
        max_position_embeddings=1024,
        sliding_window=64,  # shorter than the sequence: the sliding layer must behave as in diffusers too
        pad_token_id=0,
        attn_implementation="eager",
    )
    return Gemma2Model(cfg).eval()


@pytest.fixture(scope="module")
def gemma_parts():
    tok = tiny_gemma_tokenizer()
    return tok, tiny_gemma(len(tok))


@pytest.fixture(scope="module")
def sprint_pipeline(gemma_parts):
    from conftest import tiny_transformer, tiny_vae
    from diffusers import SanaSprintPipeline, SCMScheduler

    tok, model = gemma_parts
    return SanaSprintPipeline(
        tokenizer=tok, text_encoder=model, vae=tiny_vae(), transformer=tiny_transformer(), scheduler=SCMScheduler()
    )


def test_select_index_keeps_bos_and_tail():
    assert select_index(4) == [0, -3, -2, -1]
    assert len(select_index(300)) == 300


@pytest.mark.parametrize("chi", [False, True])
@pytest.mark.parametrize("prompts", [PROMPTS, [LONG_PROMPT, "purple"]])
def test_matches_diffusers_encode_prompt(gemma_parts, sprint_pipeline, chi, prompts):
    tok, model = gemma_parts
    instruction = default_complex_human_instruction() if chi else None
    ref_e, ref_m = sprint_pipeline.encode_prompt(
        prompts, device=torch.device("cpu"), max_sequence_length=300, complex_human_instruction=instruction
    )
    enc = GemmaPromptEncoder(tok, model, max_length=300, complex_human_instruction=instruction)
    e, m = enc.encode(prompts)
    assert e.shape == (len(prompts), 300, GEMMA_HIDDEN) and e.dtype == torch.float32
    assert torch.equal(m, ref_m.long())
    torch.testing.assert_close(e, ref_e.float(), atol=1e-6, rtol=0)
    # One prompt at a time (the per-prompt cache path) gives the same rows.
    e1, _ = GemmaPromptEncoder(tok, model, complex_human_instruction=instruction).encode(prompts[-1])
    torch.testing.assert_close(e1[0], ref_e[-1].float(), atol=1e-6, rtol=0)


def test_instruction_changes_the_embedding_and_keeps_bos(gemma_parts):
    tok, model = gemma_parts
    plain = GemmaPromptEncoder(tok, model)
    chi = GemmaPromptEncoder(tok, model, complex_human_instruction=default_complex_human_instruction())
    (e0, m0), (e1, m1) = plain.encode(PROMPTS[:1]), chi.encode(PROMPTS[:1])
    assert not torch.allclose(e0, e1)
    # With the instruction, the kept window holds BOS, the instruction's tail and the prompt: more valid tokens.
    assert m1.sum() > m0.sum() and m1[0, 0] == 1 and m0[0, 0] == 1
    # Right padding: the mask is a prefix of ones.
    for m in (m0[0], m1[0]):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()


def test_null_embedding_has_no_instruction(gemma_parts, sprint_pipeline):
    tok, model = gemma_parts
    enc = GemmaPromptEncoder(tok, model, complex_human_instruction=default_complex_human_instruction())
    ne, nm = enc.null_embedding()
    ref_e, ref_m = sprint_pipeline.encode_prompt([""], device=torch.device("cpu"), complex_human_instruction=None)
    torch.testing.assert_close(ne, ref_e.float(), atol=1e-6, rtol=0)
    assert torch.equal(nm, ref_m.long()) and int(nm.sum()) == 1  # BOS only


@pytest.mark.parametrize("bucket", [1, 16, 64])
def test_padding_free_gemma_equals_padded(gemma_parts, bucket):
    """The fast path's padding-free encoder (token counts padded to a multiple of ``bucket``) gives the real
    tokens of the 300-token padded encoding: Gemma is causal, right padding never reaches them."""
    from sana_sprint.fast import PaddingFreeTextEncoder

    tok, model = gemma_parts
    enc = GemmaPromptEncoder(tok, model)
    free = PaddingFreeTextEncoder.from_encoder(enc)
    free.bucket = bucket
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        ref, ref_mask = enc.encode(PROMPTS)
        out, mask = free.encode(PROMPTS)
    finally:
        handle.remove()
    longest = int(ref_mask.sum(1).max())
    assert seen == [300, -(-longest // bucket) * bucket]
    assert torch.equal(mask, ref_mask)
    real = mask.bool()
    assert ref[real].std() > 0.1 and (out[real] - ref[real]).abs().max() < 1e-5
    assert (out[~real] == 0).all()


def test_compiled_gemma_encoder_is_one_graph(gemma_parts):
    """compile_model (the CUDA fast path's text encoder): Gemma-2 traces into one graph per bucket and encodes
    what the eager model does."""
    from sana_sprint.fast import PaddingFreeTextEncoder

    tok, model = gemma_parts
    ref, ref_mask = GemmaPromptEncoder(tok, model).encode(PROMPTS)
    free = PaddingFreeTextEncoder.from_encoder(GemmaPromptEncoder(tok, model))
    torch._dynamo.reset()
    free.compile_model(bucket=16, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    out, mask = free.encode(PROMPTS)
    assert free.bucket == 16 and free.compiled is not None and torch.equal(mask, ref_mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="bucket"):
        free.compile_model(bucket=0)
