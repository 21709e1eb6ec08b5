"""DistillMethod on tiny components: init, a short run, exact resume, export to both pipelines."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, LATENT, MAX_LENGTH, TRAIN_PROMPTS, train_batch
from diffusers import SanaSprintPipeline
from safetensors.torch import load_file

from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder
from sana_sprint.training import checkpoint as ckpt
from sana_sprint.training.config import ConfigError
from sana_sprint.training.distill import DistillConfig, DistillMethod, SamplePrompts, load_teacher_folder
from sana_sprint.training.trainer import Stepper, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _method(folder, te: TextEncoder, **overrides) -> DistillMethod:
    cfg = DistillConfig(**{"out": "unused", "batch": 3, "lr": 1e-3, "lr_d": 1e-3, "grad_clip": 1.0,
                           "tangent_warmup": 0, "sample_count": 2, "progress": False, **overrides})
    cfg.validate()
    teacher, vae, _ = load_teacher_folder(folder, "cpu")
    e, m = te.encode(TRAIN_PROMPTS[:2])
    torch.manual_seed(0)  # head initialisation: equal for every method built here
    return DistillMethod(
        cfg, teacher, scaling_factor=vae.config.scaling_factor, latent_shape=LATENT, null=te.null_embedding(),
        vae=vae, prompts=SamplePrompts(e, m, TRAIN_PROMPTS[:2]), teacher_dir=folder,
    )


@pytest.mark.parametrize("cfg_embed", [True, False])
def test_student_equals_teacher_at_step_0(teacher_folder, text_encoder, cfg_embed):
    method = _method(teacher_folder, text_encoder, cfg_embed=cfg_embed)
    b = train_batch(text_encoder)
    x = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.2, 1.0, 1.5707964])
    with torch.no_grad():
        F_t = method.teacher(x, s, b["embeds"], b["mask"])
        for w in (1.0, 4.5, 7.0):
            torch.testing.assert_close(method.student(x, s, b["embeds"], b["mask"], guidance=w), F_t, rtol=0, atol=1e-6)
    # one frozen teacher, shared by the sCM target and the discriminator
    assert method.disc.teacher is method.teacher
    assert not any(p.requires_grad for p in method.teacher.parameters())
    trainable = {id(p) for g in method.opt_g.param_groups for p in g["params"]}
    guidance_params = list(method.student.transformer.time_embed.guidance_embedder.parameters())
    assert all((id(p) in trainable) == cfg_embed for p in guidance_params)
    assert id(method.student.logvar_linear.weight) in trainable
    assert {id(p) for g in method.opt_d.param_groups for p in g["params"]} == {id(p) for p in method.disc.heads.parameters()}


def test_short_scm_run_lowers_loss(teacher_folder, text_encoder):
    method = _method(teacher_folder, text_encoder, loss="scm")
    stepper = Stepper(method.optimizers(), {}, method.cfg.grad_clip, "cpu")
    batch = train_batch(text_encoder)
    losses = []
    for step in range(30):
        method.gen.manual_seed(123)  # same (s, z, w) every step: only the weights change
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logs = method.train_step(batch, step, stepper)
        losses.append(logs["scm/loss"])
    assert stepper.steps["generator"] == 30 and not stepper.skipped
    assert "discriminator" not in stepper.steps
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses


def test_g_step_updates_student_only_and_d_step_heads_only(teacher_folder, text_encoder):
    method = _method(teacher_folder, text_encoder, loss="both")
    stepper = Stepper(method.optimizers(), {}, method.cfg.grad_clip, "cpu")
    x0, e, m = method.prepare_batch(train_batch(text_encoder))
    snap = lambda mod: {k: v.clone() for k, v in mod.state_dict().items()}  # noqa: E731
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    st, hd, te = snap(method.student), snap(method.disc.heads), snap(method.teacher)
    logs = method.generator_step(x0, e, m, 0, stepper)
    assert logs["skipped_g"] == 0 and "loss_adv_g" in logs and "loss_scm" in logs
    assert changed(st, snap(method.student)) and not changed(hd, snap(method.disc.heads))
    assert not method.opt_d.state and all(p.requires_grad for p in method.disc.parameters())
    st = snap(method.student)
    logs = method.discriminator_step(x0, e, m, stepper)
    assert logs["skipped_d"] == 0 and {"ladd/d_real", "ladd/d_fake"} <= set(logs)
    assert not changed(st, snap(method.student)) and changed(hd, snap(method.disc.heads))
    assert not changed(te, snap(method.teacher))


def test_freeze_keeps_the_named_parameters_fixed(teacher_folder, text_encoder):
    prefix = "time_embed.timestep_embedder"
    method = _method(teacher_folder, text_encoder, loss="both", freeze=[prefix])
    trainable = {id(p) for g in method.opt_g.param_groups for p in g["params"]}
    named = dict(method.student.transformer.named_parameters())
    frozen = {k for k in named if k.startswith(prefix)}
    assert frozen and all((id(named[k]) in trainable) == (k not in frozen) for k in named)
    stepper = Stepper(method.optimizers(), {}, method.cfg.grad_clip, "cpu")
    x0, e, m = method.prepare_batch(train_batch(text_encoder))
    before = {k: v.detach().clone() for k, v in named.items()}
    for step in range(2):
        assert method.generator_step(x0, e, m, step, stepper)["skipped_g"] == 0
    moved = {k for k in named if not torch.equal(before[k], named[k].detach())}
    assert not moved & frozen and moved  # the rest trains
    with pytest.raises(ConfigError, match="matches no student parameter"):
        _method(teacher_folder, text_encoder, freeze=["time_embed.nope"])
    for bad in ([""], "time_embed", [3]):
        with pytest.raises(ConfigError, match="freeze"):
            DistillConfig(out="unused", freeze=bad).validate()


def test_lr_scale_multiplies_the_first_update_of_the_named_parameters(teacher_folder, text_encoder):
    """Adam's update is linear in the learning rate, so with equal gradients at the first step a prefix at 5x moves
    exactly 5x as far as in a run without lr_scale, and every other parameter moves the same."""
    prefix, scale = "transformer_blocks.1.attn1.to_out", 5.0

    def moved(**kw):
        method = _method(teacher_folder, text_encoder, loss="both", **kw)
        named = dict(method.student.transformer.named_parameters())
        before = {k: v.detach().clone().double() for k, v in named.items()}
        x0, e, m = method.prepare_batch(train_batch(text_encoder))
        stepper = Stepper(method.optimizers(), {}, method.cfg.grad_clip, "cpu")
        assert method.generator_step(x0, e, m, 0, stepper)["skipped_g"] == 0
        return {k: named[k].detach().double() - before[k] for k in named}

    ref, got = moved(), moved(lr_scale={prefix: scale})
    hit = [k for k in ref if k.startswith(prefix)]
    assert hit and all(ref[k].abs().max() > 0 for k in hit)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k] * (scale if k in hit else 1.0), rtol=1e-5, atol=1e-9)
    with pytest.raises(ConfigError, match="matches no trained student parameter"):
        _method(teacher_folder, text_encoder, lr_scale={"transformer_blocks.99.": 2.0})
    for bad in ({"": 2.0}, {"x": 0}, {"x": True}, ["x"]):
        with pytest.raises(ConfigError, match="lr_scale"):
            DistillConfig(out="unused", lr_scale=bad).validate()


def _batches(te):
    b = train_batch(te)
    while True:
        yield b


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_checkpoint_resume_restores_everything(tmp_path, teacher_folder, text_encoder, ema_decay):
    common = dict(loss="both", bf16=False, log_every=1, ckpt_every=2, sample_every=0, keep_last=0, ema_decay=ema_decay)
    ref = _method(teacher_folder, text_encoder, out=str(tmp_path / "a"), steps=4, **common)
    Trainer(ref, _batches(text_encoder), ref.cfg, torch.device("cpu")).fit()

    first = _method(teacher_folder, text_encoder, out=str(tmp_path / "b"), steps=2, **common)
    Trainer(first, _batches(text_encoder), first.cfg, torch.device("cpu")).fit()
    last = ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert sorted(ckpt.read_meta(last)["modules"]) == ["disc_heads", "logvar", "student"] + ["student_ema"] * bool(ema_decay)
    assert set(load_file(str(last / "modules" / "logvar.safetensors"))) == {"weight", "bias"}

    resumed = _method(teacher_folder, text_encoder, out=str(tmp_path / "b"), steps=4, resume=True, **common)
    with torch.no_grad():  # scramble what resume must restore
        for p in resumed.student.parameters():
            p.add_(1.0)
        if ema_decay:
            for p in resumed.ema.shadow.parameters():
                p.add_(1.0)
    trainer = Trainer(resumed, _batches(text_encoder), resumed.cfg, torch.device("cpu"))
    trainer.fit()
    assert trainer.stepper.steps == {"generator": 4, "discriminator": 4}
    out = trainer.fit_and_export()  # already at `steps`: exports; records the steps actually run
    assert json.loads((out / "sprint_config.json").read_text())["distill"]["trained_steps"] == 4
    for name, mod in ref.state_modules().items():
        got = resumed.state_modules()[name].state_dict()
        for k, v in mod.state_dict().items():
            assert torch.equal(got[k], v), (name, k)
    for name, opt in ref.optimizers().items():
        a, b = opt.state_dict()["state"], resumed.optimizers()[name].state_dict()["state"]
        assert a.keys() == b.keys()
        for i in a:
            assert all(torch.equal(a[i][k], b[i][k]) for k in ("exp_avg", "exp_avg_sq", "step")), (name, i)
    assert torch.equal(ref.gen.get_state(), resumed.gen.get_state())
    # teacher untouched by training
    fresh, _, _ = load_teacher_folder(teacher_folder, "cpu")
    for k, v in fresh.state_dict().items():
        assert torch.equal(resumed.teacher.transformer.state_dict()[k], v), k


def test_student_ema_follows_the_closed_form_and_is_what_is_sampled_and_exported(tmp_path, teacher_folder, text_encoder):
    """shadow_n = d shadow_{n-1} + (1 - d) theta_n after each applied generator update (float64
    recomputation from the student's weights after every step), starting at the student copied from
    the teacher; a skipped update leaves it alone; sample grids and the export use it."""
    d = 0.7
    method = _method(teacher_folder, text_encoder, loss="both", ema_decay=d, ema_warmup=False)
    stepper = Stepper(method.optimizers(), {}, method.cfg.grad_clip, "cpu")
    batch = train_batch(text_encoder)
    ref = {k: v.double() for k, v in method.student.transformer.state_dict().items()}
    for step in range(3):
        method.train_step(batch, step, stepper)
        for k, v in method.student.transformer.named_parameters():
            ref[k] = d * ref[k] + (1 - d) * v.detach().double()
    assert stepper.steps["generator"] == 3 and not stepper.skipped
    shadow = dict(method.ema.shadow.named_parameters())
    moved = max((shadow[k].double() - v.double()).abs().max().item()
                for k, v in method.student.transformer.named_parameters())
    assert moved > 1e-5  # the EMA is not the raw student
    for k, p in shadow.items():
        torch.testing.assert_close(p.double(), ref[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")

    # a skipped (non-finite) generator update moves neither the student nor its EMA
    before = {k: v.clone() for k, v in method.ema.shadow.state_dict().items()}
    nan_batch = {**batch, "latents": batch["latents"].clone().fill_(float("nan"))}
    logs = method.train_step(nan_batch, 3, stepper)
    assert logs["skipped_g"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in method.ema.shadow.state_dict().items())

    # samples come from the EMA weights: equal to a method whose student *is* the EMA
    e, m = method.prompts.embeds, method.prompts.masks
    got = method.sample(e, m, [5, 6], steps=2)
    raw = DistillMethod.sample(types.SimpleNamespace(**{**vars(method), "ema": None}), e, m, [5, 6], steps=2)
    plain = _method(teacher_folder, text_encoder, loss="both")
    plain.student.transformer.load_state_dict(method.ema.shadow.state_dict())
    torch.testing.assert_close(got, plain.sample(e, m, [5, 6], steps=2), rtol=0, atol=1e-6)
    assert (got - raw).abs().max() > 1e-4

    out = method.export(tmp_path / "student")
    config = json.loads((out / "sprint_config.json").read_text())["distill"]
    assert config["weights"] == "ema" and config["ema_decay"] == d
    saved = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    for k, v in method.ema.shadow.state_dict().items():
        assert torch.equal(saved[k], v.to(torch.float16)), k


def test_ema_settings_are_checked():
    with pytest.raises(ConfigError, match="ema_decay"):
        DistillConfig(out="unused", ema_decay=1.0).validate()
    with pytest.raises(ConfigError, match="ema_decay: not supported with controlnet"):
        DistillConfig(out="unused", ema_decay=0.99, controlnet="models/shapes-controlnet").validate()


def test_export_loads_in_both_pipelines(tmp_path, teacher_folder, text_encoder, tokenizer, bert):
    method = _method(teacher_folder, text_encoder)
    with torch.no_grad():  # a student that differs from the teacher and depends on guidance
        for p in method.student.transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    method.sample_grid(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file()
    out = method.export(tmp_path / "student")
    config = json.loads((out / "sprint_config.json").read_text())
    assert config["kind"] == "student" and config["default_steps"] == 2
    assert set(config["default_timesteps"]) == {"1", "2", "3", "4"}
    weights = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any("logvar" in k for k in weights) and any("guidance_embedder" in k for k in weights)

    ours = SprintPipeline.from_pretrained(out)
    assert ours.kind == "student"
    gens = lambda: [torch.Generator().manual_seed(7 + i) for i in range(2)]  # noqa: E731
    mine = ours(TRAIN_PROMPTS[:2], steps=2, guidance_scale=4.5, generator=gens(), output_type="pt").images
    pipe = SanaSprintPipeline.from_pretrained(out, text_encoder=bert, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        TRAIN_PROMPTS[:2], num_inference_steps=2, guidance_scale=4.5, height=IMAGE_SIZE, width=IMAGE_SIZE,
        generator=gens(), output_type="pt", use_resolution_binning=False, max_sequence_length=MAX_LENGTH,
        complex_human_instruction=None,
    ).images
    assert mine.shape == ref.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (mine - ref).abs().max() <= 1e-5
    assert ref.std() > 1e-3


def test_loss_terms_sum_to_the_generator_gradient(teacher_folder, text_encoder):
    """scripts/loss_balance.py's split: grad(total) == grad(sCM) + ladd_weight * grad(adv) for the same
    draws, and the script's norms are those of the two parts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import loss_balance

    method = _method(teacher_folder, text_encoder, loss="both", ladd_weight=3.0)
    with torch.no_grad():  # heads that give the student a non-zero adversarial gradient
        for p in method.disc.heads.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(2)))
    batch = train_batch(text_encoder)
    params = [p for p in method.student.parameters() if p.requires_grad]
    x0, e, m = method.prepare_batch(batch)
    method.gen.manual_seed(11)
    method.disc.eval().requires_grad_(False)
    terms = {}
    total, _ = method.generator_loss(x0, e, m, 50, terms=terms)
    g_total = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    g_scm = torch.autograd.grad(terms["scm"], params, retain_graph=True, allow_unused=True)
    g_adv = torch.autograd.grad(terms["adv"], params, allow_unused=True)
    zero = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    for p, a, b, c in zip(params, g_total, g_scm, g_adv):
        torch.testing.assert_close(zero(a, p), zero(b, p) + 3.0 * zero(c, p), rtol=1e-4, atol=1e-6)
    norm = lambda gs: float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))  # noqa: E731
    got = loss_balance.term_grad_norms(method, batch, 50, 11)
    assert got["scm"] == pytest.approx(norm(g_scm), rel=1e-6) and got["adv"] == pytest.approx(norm(g_adv), rel=1e-6)
    assert got["adv"] > 0 and got["adv_over_scm"] == pytest.approx(got["adv"] / got["scm"])


def test_lr_warmup_ramps_both_optimisers_linearly(teacher_folder, text_encoder):
    """lr_warmup N: update n of each optimiser runs at lr * min(1, (n + 1) / N); the step taken matches that lr."""
    method = _method(teacher_folder, text_encoder, loss="both", lr_warmup=3, lr=1e-3, lr_d=2e-3, grad_clip=0.0)
    assert _method(teacher_folder, text_encoder).schedulers() == {}  # default: constant LR, no scheduler state
    stepper = Stepper(method.optimizers(), method.schedulers(), method.cfg.grad_clip, "cpu")
    batch = train_batch(text_encoder)
    seen = []
    for step in range(4):
        seen.append((method.opt_g.param_groups[0]["lr"], method.opt_d.param_groups[0]["lr"]))
        p = method.student.transformer.proj_out.weight
        before = p.detach().clone()
        method.train_step(batch, step, stepper)
        if step == 0:  # Adam's first update moves every coordinate with a gradient by ~lr (|m / sqrt(v)| = 1)
            moved = (p.detach() - before).abs()
            assert moved.max().item() == pytest.approx(1e-3 / 3, rel=1e-3)
    want = [(1e-3 * min(1, (n + 1) / 3), 2e-3 * min(1, (n + 1) / 3)) for n in range(4)]
    np.testing.assert_allclose(seen, want, rtol=1e-12)
    with pytest.raises(ConfigError, match="lr_warmup"):
        DistillConfig(out="x", lr_warmup=-1).validate()


def test_prepare_only_builds_the_cache_and_trains_nothing(tmp_path, teacher_folder):
    from sana_sprint import cli
    from sana_sprint.data.latents import LatentDataset

    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["distill", "--teacher", str(teacher_folder), "--data", "shapes", "--cache", str(cache), "--cache-samples", "6",
            "--out", str(out), "--pairs", str(tmp_path / "not-yet"), "--regress-weight", "30", "--prepare-only"]
    assert cli.main(args) == 0
    ds = LatentDataset(str(cache))
    assert len(ds) == 6 and ds.latent_shape == tuple(LATENT)
    assert not (out / "checkpoints").exists() and not (out / "export").exists()
    first = sorted(p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file())
    assert cli.main(args) == 0  # a present cache is reused, not rebuilt
    assert sorted(p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()) == first
