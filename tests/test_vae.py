import json

import numpy as np
import pytest
import torch

from sana_sprint.training import vae as V


def tiny_cfg(**kw):
    base = dict(preset="tiny", size=16, steps=3, batch=4, bank_size=8, refresh=2, lr=3e-3, warmup=1,
                scale_images=8, ckpt_every=2, log_every=1, threads=1, bf16=False)
    base.update(kw)
    return V.VAETrainConfig(**base)


def test_scaling_factor_is_inverse_std():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 4, 8, 8, generator=g) * 2.5 + 0.3
    expected = 1.0 / np.std(z.numpy().astype(np.float64), ddof=1)
    assert V.latent_scaling_factor(z) == pytest.approx(expected, rel=1e-10)
    assert (z.double() * V.latent_scaling_factor(z)).std().item() == pytest.approx(1.0, rel=1e-9)
    assert V.latent_scaling_factor(torch.tensor([1.0, -1.0, 1.0, -1.0])) == pytest.approx(np.sqrt(3 / 4))


def test_measure_scaling_factor_uses_encoder_latents():
    torch.manual_seed(0)
    vae = V.build_vae(tiny_cfg())
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent
    assert V.measure_scaling_factor(vae, x, batch=4) == pytest.approx(1 / z.double().std().item(), rel=1e-5)


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 4, 4)
    y = x + 0.02  # MSE 4e-4 on a peak-to-peak of 2 -> 10 log10(4 / 4e-4) = 40 dB
    assert torch.allclose(V.psnr(y, x), torch.full((2,), 40.0), atol=1e-4)


def test_reconstruction_loss_terms():
    x = torch.zeros(1, 1, 2, 3)
    y = x.clone()
    y[..., 0, 0] = 1.0
    loss, terms = V.reconstruction_loss(y, x, 1.0, 1.0, 1.0)
    assert terms["l1"] == pytest.approx(1 / 6) and terms["mse"] == pytest.approx(1 / 6)
    # one pixel differs: 1 of 4 horizontal and 1 of 3 vertical differences
    assert terms["edge"] == pytest.approx(1 / 4 + 1 / 3)
    assert loss.item() == pytest.approx(1 / 6 + 1 / 6 + 1 / 4 + 1 / 3)


def test_lr_schedule_warmup_then_cosine():
    cfg = tiny_cfg(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert V.lr_at(0, cfg) == pytest.approx(0.1)
    assert V.lr_at(10, cfg) == pytest.approx(1.0)
    assert V.lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [V.lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_bank_refreshes_with_unseen_indices():
    from sana_sprint.data.shapes import ShapesWorld

    bank = V.ImageBank(ShapesWorld(16), seed=3, size=6, refresh=2, generator=torch.Generator().manual_seed(0))
    x = bank.batch(4)
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert bank.next_index == 8 and sorted(bank.indices.tolist()) != list(range(6))
    assert set(bank.indices.tolist()) <= set(range(8))


def test_train_lowers_loss_and_exports(tmp_path):
    cfg = tiny_cfg(steps=6, ckpt_every=100)
    torch.manual_seed(0)
    # Overfit one fixed batch to check the update direction: refresh 0 and bank == batch.
    cfg.refresh, cfg.bank_size, cfg.batch = 0, 4, 4
    summary = V.train_vae(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for name in ("config.json", "loss.png", "recon.png", "checkpoint.pt", "vae/config.json"):
        assert (tmp_path / name).exists(), name
    from diffusers import AutoencoderDC
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    loaded = AutoencoderDC.from_pretrained(tmp_path / "vae")
    assert loaded.config.scaling_factor == pytest.approx(summary["scaling_factor"])


def test_resume_matches_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = tiny_cfg(steps=4, ckpt_every=100)
    V.train_vae(cfg, full, progress=False, export=False)
    V.train_vae(cfg, part, progress=False, export=False, stop_after=2)
    state = torch.load(part / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["optimizer"]["state"], "optimizer moments must be saved"
    V.train_vae(cfg, part, resume=True, progress=False, export=False)
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    assert b["step"] == 4
    assert torch.equal(a["bank"]["indices"], b["bank"]["indices"])
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
        assert torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6), k
    exp_avg = lambda s: [v["exp_avg"] for v in s["optimizer"]["state"].values()]  # noqa: E731
    for x, y in zip(exp_avg(a), exp_avg(b)):
        assert torch.allclose(x, y, atol=1e-6)


def test_resume_without_flag_starts_over(tmp_path):
    cfg = tiny_cfg(steps=4, ckpt_every=100)
    V.train_vae(cfg, tmp_path, progress=False, export=False, stop_after=2)
    V.train_vae(cfg, tmp_path, progress=False, export=False, stop_after=1)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 1


def test_config_validation():
    with pytest.raises(ValueError):
        tiny_cfg(preset="huge")
    with pytest.raises(ValueError):
        tiny_cfg(batch=16, bank_size=8)


def test_shapes_preset_is_f8_c16_and_small():
    cfg = V.VAETrainConfig()
    vae = V.build_vae(cfg)
    n = sum(p.numel() for p in vae.parameters())
    assert n * 2 < 3.5e6, "fp16 weights must stay well under 4 MB"
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent
    assert z.shape == (1, 16, 8, 8)


def test_ema_decay_ramps_up_to_configured_value():
    cfg = tiny_cfg(ema_decay=0.999)
    assert V.ema_decay_at(0, cfg) == pytest.approx(0.1)
    assert V.ema_decay_at(90, cfg) == pytest.approx(0.91)
    assert V.ema_decay_at(10**6, cfg) == 0.999


def test_ema_update_is_lerp():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    V.ema_update(a, b, 0.9)
    for pa, e in zip(a.parameters(), expected):
        assert torch.allclose(pa, e)


def test_foreground_weights_mark_objects_and_their_rim():
    x = torch.full((1, 3, 8, 8), 0.8)
    x[..., 3:5, 3:5] = -0.5  # a 2x2 object
    w = V.foreground_weights(x, fg_weight=2.0)
    assert w.shape == (1, 1, 8, 8)
    assert torch.all(w[..., 2:6, 2:6] == 3.0)  # object dilated by 1 px
    assert w.sum().item() == 64 + 2.0 * 16


def test_weighted_loss_normalises_weights():
    x, y = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4) * 0.5
    w = torch.rand(1, 1, 4, 4) + 0.5
    _, plain = V.reconstruction_loss(y, x)
    _, weighted = V.reconstruction_loss(y, x, weights=w)
    assert weighted["l1"] == pytest.approx(plain["l1"]) and weighted["mse"] == pytest.approx(plain["mse"])


def test_decoder_finetune_keeps_encoder_and_latents(tmp_path):
    base = tmp_path / "base"
    V.train_vae(tiny_cfg(steps=2, ckpt_every=100), base, progress=False)
    ft = tmp_path / "ft"
    cfg = tiny_cfg(steps=3, ckpt_every=100, init_from=str(base / "checkpoint.pt"), freeze_encoder=True, fg_weight=2.0)
    summary = V.train_vae(cfg, ft, progress=False)
    a = torch.load(base / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(ft / "checkpoint.pt", weights_only=False)["model"]
    enc = [k for k in a if k.startswith("encoder.")]
    dec = [k for k in a if k.startswith("decoder.")]
    assert all(torch.equal(a[k], b[k]) for k in enc)
    assert any(not torch.equal(a[k], b[k]) for k in dec)
    base_cfg = json.loads((base / "vae" / "config.json").read_text())
    assert summary["scaling_factor"] == pytest.approx(base_cfg["scaling_factor"], rel=1e-6)
    with pytest.raises(ValueError):
        tiny_cfg(freeze_encoder=True)
