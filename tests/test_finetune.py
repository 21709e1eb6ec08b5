"""finetune-teacher: legacy (1000 t, no QK-norm) -> dense time + QK-norm conversion and fine-tune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    IMAGE_SIZE,
    LATENT,
    MAX_LENGTH,
    TEXT_HIDDEN,
    save_tiny_pipeline,
    tiny_transformer,
    tiny_vae,
)

from sana_sprint import cli
from sana_sprint.errors import UserError
from sana_sprint.models import presets
from sana_sprint.models.wrapper import TrigFlowTransformer
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder
from sana_sprint.training.config import TeacherConfig
from sana_sprint.training.finetune import FinetuneConfig, convert_legacy_teacher, finetune
from sana_sprint.training.teacher import teacher_model_config

RMS_EPS = 1e-5  # diffusers Attention's default eps, used by its qk RMSNorm
pytestmark = pytest.mark.usefixtures("one_thread")


def legacy_transformer(seed: int = 3):
    return tiny_transformer(guidance_embeds=False, seed=seed, timestep_scale=1000.0, qk_norm=None)


def _inputs(dtype=torch.float32, b=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, *LATENT, generator=g).to(dtype)
    e = torch.randn(b, 5, TEXT_HIDDEN, generator=g).to(dtype)
    m = torch.ones(b, 5, dtype=torch.long)
    m[0, 3:] = 0
    t = torch.tensor([0.05, 0.5, 0.93], dtype=dtype)[:b]
    return x, e, m, t


def _raw(transformer, x, e, m, timestep):
    return transformer(x, encoder_hidden_states=e, encoder_attention_mask=m, timestep=timestep, return_dict=False)[0]


@pytest.fixture(scope="module")
def te(tokenizer, bert):
    return TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def legacy_folder(tmp_path_factory, te):
    return save_tiny_pipeline(tmp_path_factory.mktemp("legacy") / "teacher", te, legacy_transformer())


# --- legacy teachers and loaders -----------------------------------------------------------------


def test_train_teacher_config_makes_legacy_models():
    mc = teacher_model_config(TeacherConfig(timestep_scale=1000.0, qk_norm=False), 16, 8, 384)
    assert mc["timestep_scale"] == 1000.0 and mc["qk_norm"] is None
    default = teacher_model_config(TeacherConfig(), 16, 8, 384)
    assert default["timestep_scale"] == 1.0 and default["qk_norm"] == presets.QK_NORM


def test_loaders_feed_legacy_time_scale(legacy_folder, te):
    """Pipeline and distill loaders of a legacy folder feed the transformer 1000 t (from its config)."""
    from sana_sprint.training.distill import load_teacher_folder

    x, e, m, t = _inputs()
    pipe = SprintPipeline.from_pretrained(legacy_folder, text_encoder=te, dtype=torch.float32)
    teacher, _, _ = load_teacher_folder(legacy_folder, "cpu")
    for model in (pipe.model, TrigFlowTransformer(teacher)):
        assert model.config.timestep_scale == 1000.0
        with torch.no_grad():
            v = model.flow_velocity(x, t, e, m)
            assert torch.equal(v, _raw(model.transformer, x, e, m, t * 1000.0))
            assert not torch.allclose(v, _raw(model.transformer, x, e, m, t), atol=1e-3)


# --- the conversion ------------------------------------------------------------------------------


def test_conversion_keeps_weights_and_adds_unit_qk_norm():
    legacy = legacy_transformer()
    new = convert_legacy_teacher(legacy)
    assert new.config.timestep_scale == 1.0 and new.config.qk_norm == presets.QK_NORM
    assert legacy.config.timestep_scale == 1000.0 and legacy.config.qk_norm is None  # input untouched
    old, cur = legacy.state_dict(), new.state_dict()
    assert set(old) <= set(cur)
    for k, v in old.items():
        assert cur[k].dtype == v.dtype and torch.equal(cur[k], v), k  # bit-identical
    added = sorted(set(cur) - set(old))
    blocks = legacy.config.num_layers
    assert len(added) == blocks * 2 * 2  # norm_q and norm_k in attn1 and attn2 of every block
    assert all((".norm_q." in k or ".norm_k." in k) and torch.equal(cur[k], torch.ones_like(cur[k])) for k in added)
    for blk in new.transformer_blocks:
        for attn in (blk.attn1, blk.attn2):
            assert attn.norm_q is not None and attn.norm_k is not None


def _rms64(x):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def test_converted_model_equals_float64_reference():
    """converted(x, t) == legacy network with time t and q, k RMS-normalised (forward hooks, float64)."""
    legacy = legacy_transformer().double()
    new = convert_legacy_teacher(legacy)
    x, e, m, t = _inputs(torch.float64)
    with torch.no_grad():
        out = TrigFlowTransformer(new).flow_velocity(x, t, e, m)
        plain = _raw(legacy, x, e, m, t)
        hooks = []
        for blk in legacy.transformer_blocks:
            for attn in (blk.attn1, blk.attn2):
                for lin in (attn.to_q, attn.to_k):
                    hooks.append(lin.register_forward_hook(lambda mod, inp, o: _rms64(o)))
        try:
            ref = _raw(legacy, x, e, m, t)
        finally:
            for h in hooks:
                h.remove()
    assert out.dtype == torch.float64
    # diffusers' RMSNorm takes the variance in float32: relative error ~1e-7
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (out - plain).abs().max() > 1e-2  # the norm does change the function (the fine-tune is needed)


def test_single_change_variants():
    legacy = legacy_transformer()
    dense = convert_legacy_teacher(legacy, qk_norm=False)
    assert dense.config.timestep_scale == 1.0 and dense.config.qk_norm is None
    assert dense.state_dict().keys() == legacy.state_dict().keys()
    qk = convert_legacy_teacher(legacy, dense_time=False)
    assert qk.config.timestep_scale == 1000.0 and qk.config.qk_norm == presets.QK_NORM


def test_converting_a_modern_model_is_a_user_error():
    with pytest.raises(UserError, match="nothing to convert"):
        convert_legacy_teacher(tiny_transformer(guidance_embeds=False))
    with pytest.raises(UserError, match="nothing to convert"):
        convert_legacy_teacher(legacy_transformer(), dense_time=False, qk_norm=False)


# --- fine-tune: folder in, folder out ------------------------------------------------------------


def _fixed_flow_loss(transformer, data, seeds=(0, 1, 2, 3)) -> float:
    """Mean flow-matching loss on the whole tiny cache with fixed (t, noise) draws, no dropout."""
    from sana_sprint.losses.flow_matching import flow_matching_loss

    net = TrigFlowTransformer(transformer.float().eval())
    x = torch.from_numpy(np.array(data.latents[:], dtype=np.float32)) * data.scaling_factor
    caption = torch.from_numpy(np.array(data.caption_index[:], dtype=np.int64))
    e = torch.from_numpy(data.text_embeds[:][caption].astype("float32"))
    m = torch.from_numpy(data.text_masks[:][caption].astype("int64"))
    null_e, null_m = data.null_embedding()
    losses = []
    with torch.no_grad():
        for s in seeds:
            loss, _ = flow_matching_loss(net.flow_velocity, x, e, m, null_e, null_m,
                                         generator=torch.Generator().manual_seed(s), caption_dropout=0.0)
            losses.append(loss.mean().item())
    return sum(losses) / len(losses)


def test_finetune_lowers_flow_loss_and_exports_a_teacher(tmp_path, legacy_folder, te):
    from diffusers import SanaTransformer2DModel

    from sana_sprint.data.latents import LatentDataset, build_latent_cache
    from sana_sprint.training.distill import load_teacher_folder

    cache = build_latent_cache("shapes", tiny_vae(seed=6), te, 12, tmp_path / "cache", batch=6, size=IMAGE_SIZE,
                               progress=False)
    cfg = FinetuneConfig(teacher=str(legacy_folder), out=str(tmp_path / "run"), data=str(cache), steps=15, batch=12,
                         lr=3e-3, warmup=2, ema_decay=0.8, log_every=5, ckpt_every=15, progress=False,
                         caption_dropout=0.0)
    cfg.validate()
    out = finetune(cfg, text_encoder=te)

    data = LatentDataset(cache)
    start = convert_legacy_teacher(SanaTransformer2DModel.from_pretrained(legacy_folder / "transformer"))
    tuned = SanaTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32)
    assert tuned.config.timestep_scale == 1.0 and tuned.config.qk_norm == presets.QK_NORM
    before, after = _fixed_flow_loss(start, data), _fixed_flow_loss(tuned, data)
    print(f"fixed-draw flow loss: converted start {before:.4f} -> fine-tuned {after:.4f}")
    assert after < 0.9 * before, (before, after)

    sprint = json.loads((out / "sprint_config.json").read_text())
    assert sprint["kind"] == "teacher" and sprint["converted_from"]["teacher"] == str(legacy_folder)
    assert sprint["resolution"] == IMAGE_SIZE
    pipe = SprintPipeline.from_pretrained(out, text_encoder=te, dtype=torch.float32)
    img = pipe("a red circle", steps=2, seed=0, output_type="pt").images
    assert img.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(img).all()
    teacher, _, _ = load_teacher_folder(out, "cpu")
    assert teacher.config.timestep_scale == 1.0
    # A fine-tuned folder is not legacy any more: converting it again is refused (one-line CLI error).
    assert cli.main(["finetune-teacher", "--teacher", str(out), "--out", str(tmp_path / "again"),
                     "--data", str(cache)]) == 2


def _one_line_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_user_errors(capsys, tmp_path, te):
    line = _one_line_error(capsys, cli.main(["finetune-teacher", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path)]))
    assert "not found" in line
    modern = save_tiny_pipeline(tmp_path / "modern", te, tiny_transformer(guidance_embeds=False))
    student = save_tiny_pipeline(tmp_path / "student", te, tiny_transformer(guidance_embeds=True, timestep_scale=1000.0,
                                                                            qk_norm=None), kind="student")
    capsys.readouterr()  # drop the saving progress bars
    line = _one_line_error(capsys, cli.main(["finetune-teacher", "--teacher", str(modern), "--out", str(tmp_path / "r")]))
    assert "nothing to convert" in line
    line = _one_line_error(capsys, cli.main(["finetune-teacher", "--teacher", str(student), "--out", str(tmp_path / "s")]))
    assert "teacher" in line
    line = _one_line_error(capsys, cli.main(["finetune-teacher", "--out", str(tmp_path / "s")]))
    assert "teacher" in line


def test_init_is_refused_in_a_finetune_config(capsys, tmp_path):
    cfg = tmp_path / "ft.json"
    cfg.write_text(json.dumps({"teacher": str(tmp_path), "init": "somewhere"}))
    line = _one_line_error(capsys, cli.main(["finetune-teacher", "--config", str(cfg), "--out", str(tmp_path / "r")]))
    assert "init" in line and "train-teacher" in line
