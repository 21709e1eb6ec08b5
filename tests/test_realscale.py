"""Real-scale presets (meta-device parameter counts) and validated loading of local diffusers folders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_SIZE, LATENT_CHANNELS, tiny_transformer, tiny_vae
from diffusers import SanaTransformer2DModel
from test_text_gemma import GEMMA_HIDDEN, tiny_gemma, tiny_gemma_tokenizer

from sana_sprint import realscale
from sana_sprint.errors import ModelFolderError, UserError


def save_gemma(folder, seed: int = 0):
    tok = tiny_gemma_tokenizer()
    tiny_gemma(len(tok), seed=seed).save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana")
    tiny_transformer(guidance_embeds=False, caption_channels=GEMMA_HIDDEN).save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    save_gemma(root)
    return root


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_presets_count_parameters_on_meta():
    big = realscale.describe_preset("sana-sprint-1.6b-1024")
    teacher = realscale.describe_preset("sana-1.6b-1024")
    small = realscale.describe_preset("sana-sprint-0.6b-512")
    assert 1.55e9 < big["transformer_params"] < 1.70e9
    assert 0.55e9 < small["transformer_params"] < 0.65e9
    assert big["latent_shape"] == [32, 32, 32] and small["latent_shape"] == [32, 16, 16]
    assert big["image_tokens"] == 1024 and big["width"] == 2240 and big["caption_channels"] == 2304
    # The student adds only the CFG embedding MLP (sinusoid 256 -> width -> width) to the teacher.
    w = big["width"]
    assert big["transformer_params"] - teacher["transformer_params"] == (256 * w + w) + (w * w + w)
    assert teacher["guidance_embeds"] is False and big["guidance_embeds"] is True
    # DC-AE f32c32: about 0.3 B parameters, split evenly.
    assert 0.28e9 < big["vae_encoder_params"] + big["vae_decoder_params"] < 0.34e9
    with pytest.raises(UserError, match="unknown preset"):
        realscale.describe_preset("sana-9b")


def test_load_components_roundtrip(pipeline_folder):
    c = realscale.load_components(
        pipeline_folder, pipeline_folder, pipeline_folder, resolution=IMAGE_SIZE
    )
    ref = tiny_transformer(guidance_embeds=False, caption_channels=GEMMA_HIDDEN)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(c.transformer.state_dict()[k], v, atol=0, rtol=0)
    assert c.vae.config.latent_channels == LATENT_CHANNELS
    e, m = c.text_encoder.encode(["a red circle"])
    assert e.shape == (1, 300, GEMMA_HIDDEN) and int(m.sum()) == 4  # <bos> a red circle
    # Component folders work as well as the pipeline folder.
    assert realscale.load_vae(pipeline_folder / "vae").config.scaling_factor == pytest.approx(0.41407)


def test_shape_mismatch_is_caught_before_loading(pipeline_folder, tmp_path, monkeypatch):
    import shutil

    bad = tmp_path / "transformer"
    shutil.copytree(pipeline_folder / "transformer", bad)
    _edit_config(bad, caption_channels=GEMMA_HIDDEN + 8)

    def boom(*a, **k):
        raise AssertionError("weights were loaded before validation")

    monkeypatch.setattr(SanaTransformer2DModel, "from_pretrained", boom)
    with pytest.raises(UserError, match=r"disagree.*caption_projection"):
        realscale.load_transformer(bad)
    _edit_config(bad, caption_channels=GEMMA_HIDDEN, num_layers=3)
    with pytest.raises(UserError, match=r"tensors missing from the weights \(transformer_blocks\.2\."):
        realscale.load_transformer(bad)


@pytest.mark.parametrize(
    "damage, error, match",
    [
        ("no_folder", ModelFolderError, "not found"),
        ("no_config", ModelFolderError, "no config.json"),
        ("no_weights", ModelFolderError, "no weights"),
        ("wrong_class", UserError, "describes 'AutoencoderDC'"),
        ("bad_json", ModelFolderError, "not valid JSON"),
    ],
)
def test_broken_folders(pipeline_folder, tmp_path, damage, error, match):
    import shutil

    t = tmp_path / "transformer"
    if damage != "no_folder":
        shutil.copytree(pipeline_folder / "transformer", t)
    if damage == "no_config":
        (t / "config.json").unlink()
    elif damage == "no_weights":
        (t / "diffusion_pytorch_model.safetensors").unlink()
    elif damage == "wrong_class":
        _edit_config(t, _class_name="AutoencoderDC")
    elif damage == "bad_json":
        (t / "config.json").write_text("{")
    with pytest.raises(error, match=match):
        realscale.load_transformer(tmp_path if damage != "no_folder" else tmp_path / "missing")


def test_incompatible_components(pipeline_folder):
    t = realscale.inspect_transformer(pipeline_folder)[1]
    v = realscale.inspect_vae(pipeline_folder)[1]
    realscale.check_compatible(t, v, GEMMA_HIDDEN, IMAGE_SIZE)  # the saved set fits
    with pytest.raises(UserError, match="caption_channels=24 but the text encoder's hidden_size=2304"):
        realscale.check_compatible(t, v, 2304, IMAGE_SIZE)
    with pytest.raises(UserError, match="in_channels=4 but the VAE has latent_channels=32"):
        realscale.check_compatible(t, {**v, "latent_channels": 32})
    with pytest.raises(UserError, match="sample_size=8"):
        realscale.check_compatible(t, v, resolution=2 * IMAGE_SIZE)
    realscale.check_compatible(t, v, resolution=2 * IMAGE_SIZE, strict_resolution=False)
    with pytest.raises(UserError, match="not a multiple"):
        realscale.check_compatible(t, v, resolution=IMAGE_SIZE + 2)
    with pytest.raises(UserError, match="patch_size=3"):
        realscale.check_compatible({**t, "patch_size": 3})


def test_load_components_rejects_caption_mismatch_without_loading(pipeline_folder, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(pipeline_folder, tmp_path / "p")
    _edit_config(tmp_path / "p" / "text_encoder", hidden_size=48)
    monkeypatch.setattr(realscale, "load_transformer", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(UserError, match="hidden_size=48"):
        realscale.load_components(tmp_path / "p", tmp_path / "p", tmp_path / "p")


def test_text_encoder_folder_checks(pipeline_folder, tmp_path):
    import shutil

    shutil.copytree(pipeline_folder, tmp_path / "p")
    _edit_config(tmp_path / "p" / "text_encoder", model_type="bert")
    with pytest.raises(UserError, match="not a Gemma model"):
        realscale.load_gemma(tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "tokenizer")
    for f in (tmp_path / "p" / "text_encoder").glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelFolderError, match="no tokenizer files"):
        realscale.inspect_text_encoder(tmp_path / "p")
