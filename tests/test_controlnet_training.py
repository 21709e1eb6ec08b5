"""ControlNet training (train-controlnet), the Sprint-ControlNet distillation path and eval-control, on tiny models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, MAX_LENGTH, tiny_transformer, tiny_vae
from PIL import Image

from sana_sprint.data import conditions
from sana_sprint.data.control_cache import ControlDataset, build_control_cache, condition_image
from sana_sprint.data.latents import build_latent_cache
from sana_sprint.data.shapes import ShapesWorld
from sana_sprint.errors import ModelFolderError
from sana_sprint.losses.flow_matching import FlowDraws, flow_matching_loss
from sana_sprint.models.controlnet import ControlledTrigFlow, SprintControlNet, encode_control
from sana_sprint.models.wrapper import TrigFlowTransformer
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder
from sana_sprint.training import checkpoint as ckpt
from sana_sprint.training.config import ConfigError
from sana_sprint.training.controlnet import ControlNetConfig, ControlNetMethod, control_samples_from
from sana_sprint.training.distill import DistillConfig, DistillMethod, SamplePrompts, load_teacher_folder
from sana_sprint.training.trainer import Stepper, Trainer

N_ROWS = 12


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # Loss-curve PNGs (matplotlib, seconds per checkpoint) are not under test here.
    monkeypatch.setattr("sana_sprint.training.trainer.plot_losses", lambda *a, **k: None)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, tokenizer, bert):
    pipe = SprintPipeline(TextEncoder(tokenizer, bert, max_length=MAX_LENGTH),
                          # 3 blocks: the 2-block ControlNet's first sample (added after block 1) reaches a hooked block
                          tiny_transformer(guidance_embeds=False, seed=5, num_layers=3), tiny_vae(seed=6),
                          {"kind": "teacher", "resolution": IMAGE_SIZE})
    folder = tmp_path_factory.mktemp("teacher")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory, teacher_folder, tokenizer, bert):
    """A 12-row shapes latent cache (the teacher's VAE + text encoder) and its scribble control cache."""
    root = tmp_path_factory.mktemp("caches")
    _, vae, _ = load_teacher_folder(teacher_folder, "cpu")
    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    lat = build_latent_cache("shapes", vae, te, N_ROWS, root / "lat", batch=6, size=IMAGE_SIZE, progress=False)
    ctrl = build_control_cache(lat, vae, root / "ctrl", "scribble", batch=5, progress=False)
    return ControlDataset(lat, ctrl)


def _snap(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


def _cn_method(teacher_folder, data, **overrides) -> ControlNetMethod:
    cfg = ControlNetConfig.from_dict({"out": "unused", "batch": 6, "lr": 3e-3, "warmup": 0, "sample_steps": 2,
                                      "sample_count": 2, "progress": False, "bf16": False, **overrides})
    base, vae, _ = load_teacher_folder(teacher_folder, "cpu")
    return ControlNetMethod(cfg, base, scaling_factor=data.scaling_factor, latent_shape=data.latent_shape,
                            null=data.null_embedding(), vae=vae, samples=control_samples_from(data, 2),
                            base_dir=teacher_folder)


# --- data -------------------------------------------------------------------------------------------


def test_control_cache_rows_are_the_encoded_scribbles_of_the_cached_images(data, teacher_folder, tmp_path):
    _, vae, _ = load_teacher_folder(teacher_folder, "cpu")
    world = ShapesWorld(IMAGE_SIZE)
    rows = [0, 7, 11]
    cond = np.stack([conditions.scribble(world.sample(0, i).image) for i in rows])
    assert all(c.max() == 255 for c in cond)  # every scene has edges (colour edges: yellow shapes too)
    ref = encode_control(vae, torch.stack([conditions.to_tensor(c) for c in cond])) / vae.config.scaling_factor
    b = data.batch([11, 0, 7])  # any order: rows come back in the asked order
    got = b["control"][[1, 2, 0]]
    torch.testing.assert_close(got, ref.half().float(), rtol=0, atol=0)
    assert b["latents"].shape == b["control"].shape
    # A control cache from other images (another world seed) than its latent cache is refused.
    other = tmp_path / "lat-seed1"
    shutil.copytree(data.path, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "seed": 1}))
    with pytest.raises(ValueError, match="do not reproduce"):
        build_control_cache(other, vae, tmp_path / "ctrl1", progress=False)


# --- train-controlnet -------------------------------------------------------------------------------


def test_training_step_changes_only_the_controlnet(teacher_folder, data):
    m = _cn_method(teacher_folder, data)
    stepper = Stepper(m.optimizers(), m.schedulers(), 1.0, "cpu")
    base, cn, ema = _snap(m.base.transformer), _snap(m.controlnet), _snap(m.ema.shadow)
    batch = data.batch(range(6))
    for step in range(2):  # step 1 moves after_proj off zero; step 2 then reaches the copied blocks
        m.train_step(batch, step, stepper)
    assert stepper.steps["controlnet"] == 2 and not stepper.skipped
    assert not _changed(base, _snap(m.base.transformer))  # the base is bit-identical
    moved = _changed(cn, _snap(m.controlnet))
    assert any(k.startswith("after_proj") for k in moved) and any(k.startswith("blocks") for k in moved)
    assert _changed(ema, _snap(m.ema.shadow))
    assert {id(p) for g in m.opt.param_groups for p in g["params"]} == {id(p) for p in m.controlnet.parameters()}


def _fixed_loss(m: ControlNetMethod, batch) -> float:
    """The flow-matching loss on fixed draws (t, noise, no dropout): only the weights vary."""
    g = torch.Generator().manual_seed(99)
    x = batch["latents"] * m.scaling_factor
    draws = FlowDraws(torch.rand(x.shape[0], generator=g) * 0.8 + 0.1, torch.randn(x.shape, generator=g),
                      torch.zeros(x.shape[0], dtype=torch.bool))
    c = batch["control"] * m.scaling_factor
    with torch.no_grad():
        loss, _ = flow_matching_loss(lambda xt, t, e, k: m.model.flow_velocity(xt, t, e, k, control=c), x,
                                     batch["embeds"], batch["mask"], *m.null, draws=draws)
    return float(loss.mean())


def test_short_run_lowers_loss_and_exports_a_loadable_controlnet(tmp_path, teacher_folder, data):
    m = _cn_method(teacher_folder, data, out=str(tmp_path / "run"), steps=20, log_every=10, ckpt_every=20,
                   sample_every=20, ema_decay=0.8, lr=5e-3)
    batch = data.batch(range(N_ROWS))
    before = _fixed_loss(m, batch)
    Trainer(m, data.loader(6, 0), m.cfg, torch.device("cpu")).fit()
    after = _fixed_loss(m, batch)
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "run" / "samples" / "step-0000020.png").is_file()
    out = m.export(tmp_path / "cn")
    cfg = json.loads((out / "controlnet_config.json").read_text())
    assert cfg["sprint"]["condition"] == "scribble" and cfg["sprint"]["kind"] == "teacher"
    base, _, _ = load_teacher_folder(teacher_folder, "cpu")
    loaded = SprintControlNet.from_pretrained(out, base=base)
    for k, v in m.ema.shadow.state_dict().items():  # EMA weights, fp16 on disk
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k


def test_resume_restores_exactly(tmp_path, teacher_folder, data):
    common = dict(log_every=1, ckpt_every=2, sample_every=0, keep_last=0, ema_decay=0.5)
    ref = _cn_method(teacher_folder, data, out=str(tmp_path / "a"), steps=4, **common)
    Trainer(ref, data.loader(6, 0), ref.cfg, torch.device("cpu")).fit()
    first = _cn_method(teacher_folder, data, out=str(tmp_path / "b"), steps=2, **common)
    Trainer(first, data.loader(6, 0), first.cfg, torch.device("cpu")).fit()
    assert sorted(ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints"))["modules"]) == ["controlnet", "ema"]
    resumed = _cn_method(teacher_folder, data, out=str(tmp_path / "b"), steps=4, resume=True, **common)
    with torch.no_grad():
        for p in resumed.controlnet.parameters():
            p.add_(1.0)
    loader = data.loader(6, 0)
    Trainer(resumed, loader, resumed.cfg, torch.device("cpu")).fit()
    for name, mod in ref.state_modules().items():
        got = resumed.state_modules()[name].state_dict()
        assert not _changed(mod.state_dict(), got), name
    a, b = ref.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert torch.equal(ref.gen.get_state(), resumed.gen.get_state())
    assert ref.sched.state_dict() == resumed.sched.state_dict()


def test_init_starts_from_a_trained_controlnet_and_refuses_a_mismatched_one(tmp_path, teacher_folder, data):
    """``init``: the run starts from the folder's weights (the same velocity as that ControlNet on the
    base, exactly), the export records it, and a ControlNet built for another architecture is refused."""
    base, _, _ = load_teacher_folder(teacher_folder, "cpu")
    trained = _teacher_controlnet(teacher_folder)
    trained.save_pretrained(tmp_path / "cn0", dtype=torch.float32, extra={"kind": "teacher"})
    saved = json.loads((tmp_path / "cn0" / "controlnet_config.json").read_text())
    saved["base_config"]["interpolation_scale"] = 1  # trained on a base that differed without weights
    (tmp_path / "cn0" / "controlnet_config.json").write_text(json.dumps(saved))
    m = _cn_method(teacher_folder, data, init=str(tmp_path / "cn0"))
    assert not _changed(trained.state_dict(), m.controlnet.state_dict())
    assert not _changed(trained.state_dict(), m.ema.shadow.state_dict())
    b = data.batch(range(4))
    x, t = torch.randn(b["latents"].shape, generator=torch.Generator().manual_seed(1)), torch.full((4,), 0.6)
    c = b["control"] * data.scaling_factor
    with torch.no_grad():
        got = m.model.flow_velocity(x, t, b["embeds"], b["mask"], control=c)
        ref = ControlledTrigFlow(TrigFlowTransformer(base), trained).flow_velocity(x, t, b["embeds"], b["mask"], control=c)
        plain = m.model.flow_velocity(x, t, b["embeds"], b["mask"], control=None)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert (got - plain).abs().max() > 1e-3  # the loaded ControlNet is not a zero start
    cfg = json.loads((m.export(tmp_path / "out") / "controlnet_config.json").read_text())
    assert cfg["sprint"]["init"] == str(tmp_path / "cn0")
    assert cfg["base_config"] == {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    assert cfg["base_config"]["interpolation_scale"] is None  # the base it was moved onto, not the init's
    other = SprintControlNet.from_base(tiny_transformer(guidance_embeds=False, seed=5, num_layers=3, attention_head_dim=4))
    other.save_pretrained(tmp_path / "cn_other", extra={"kind": "teacher"})
    with pytest.raises(ModelFolderError, match="does not fit"):
        _cn_method(teacher_folder, data, init=str(tmp_path / "cn_other"))


# --- distillation control path ----------------------------------------------------------------------


def _teacher_controlnet(teacher_folder, seed=3) -> SprintControlNet:
    """A 'trained' ControlNet teacher: projections moved off zero so the control changes the output."""
    base, _, _ = load_teacher_folder(teacher_folder, "cpu")
    net = SprintControlNet.from_base(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [net.before_proj, *net.after_proj]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
    return net


def _distill(teacher_folder, data, student_base=None, student_controlnet=None, **overrides) -> DistillMethod:
    cfg = DistillConfig(**{"out": "unused", "batch": 4, "lr": 1e-3, "lr_d": 1e-3, "grad_clip": 1.0, "tangent_warmup": 0,
                           "sample_count": 2, "sample_steps": [1], "progress": False, "bf16": False,
                           "controlnet": "unused", **overrides})
    cfg.validate()
    teacher, vae, _ = load_teacher_folder(teacher_folder, "cpu")
    s = control_samples_from(data, 2)
    torch.manual_seed(0)
    return DistillMethod(cfg, teacher, scaling_factor=data.scaling_factor, latent_shape=data.latent_shape,
                         null=data.null_embedding(), vae=vae, teacher_dir=teacher_folder,
                         prompts=SamplePrompts(s.embeds, s.masks, s.captions, control=s.control),
                         controlnet=_teacher_controlnet(teacher_folder), student_base=student_base,
                         student_controlnet=student_controlnet)


def test_distill_control_path_student_equals_teacher_at_step_0(teacher_folder, data):
    from sana_sprint.losses.scm import teacher_cfg_velocity

    m = _distill(teacher_folder, data)
    assert m.control_train == "all"
    b = data.batch(range(4))
    c = b["control"] * data.scaling_factor
    x = torch.randn(4, *data.latent_shape, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.2, 0.8, 1.3, 1.5707964])
    e, k = b["embeds"], b["mask"]
    with torch.no_grad():
        plain = m.teacher(x, s, e, k)  # nothing bound: the base alone
        with m.teacher.bind(c), m.student.bind(c):
            F_t = m.teacher(x, s, e, k)
            assert (F_t - plain).abs().max() > 1e-3  # the control matters
            for w in (1.0, 4.5, 7.0):
                assert torch.equal(m.student(x, s, e, k, guidance=w), F_t)
            # the sCM target sees the control in both CFG branches (doubled batch)
            w = torch.tensor([4.0, 4.5, 5.0, 4.5])
            dxds = teacher_cfg_velocity(m.teacher, x * 0.5, s, e, k, *m.null, w)
            F_c = m.teacher(x, s, e, k)
            F_u = m.teacher(x, s, *(t.expand(4, *t.shape[1:]) for t in m.null))
            torch.testing.assert_close(dxds, 0.5 * (F_u + w[:, None, None, None] * (F_c - F_u)), rtol=1e-5, atol=1e-5)
            feats = m.disc.features(x, s, e, k)
        # and the discriminator backbone too
        assert (feats[-1] - m.disc.features(x, s, e, k)[-1]).abs().max() > 1e-4
    trainable = {id(p) for g in m.opt_g.param_groups for p in g["params"]}
    assert all(id(p) in trainable for p in m.student.controlnet.parameters())
    assert all(id(p) in trainable for p in m.student.transformer.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_distill_control_train_step_with_frozen_student_base_and_export_to_serve(tmp_path, teacher_folder, data):
    from sana_sprint.models.presets import make_student
    from sana_sprint.serve.engine import Request, load_engine

    teacher, _, _ = load_teacher_folder(teacher_folder, "cpu")
    init = make_student(teacher)
    with torch.no_grad():  # a 'distilled' student that differs from the teacher
        for p in init.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    m = _distill(teacher_folder, data, student_base=init, student_init="unused")
    assert m.control_train == "controlnet" and "student_controlnet" in m.state_modules()
    base, cn, tcn = _snap(m.student.transformer), _snap(m.student.controlnet), _snap(m.teacher.controlnet)
    stepper = Stepper(m.optimizers(), {}, 1.0, "cpu")
    logs = m.train_step(data.batch(range(4)), 0, stepper)
    assert logs["skipped_g"] == 0 and logs["skipped_d"] == 0 and np.isfinite(logs["loss"])
    assert not _changed(base, _snap(m.student.transformer))  # frozen base
    assert _changed(cn, _snap(m.student.controlnet)) and not _changed(tcn, _snap(m.teacher.controlnet))
    m.sample_grid(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file()

    tcn_dir = tmp_path / "teacher_cn"  # a teacher ControlNet folder with its own training record
    m.teacher.controlnet.save_pretrained(tcn_dir, dtype=torch.float16, extra={
        "kind": "teacher", "condition": "scribble", "conditioning_scale": 0.7, "init": "elsewhere",
        "trained_steps": 1234, "default_steps": 20})
    m.cfg.controlnet = str(tcn_dir)
    out = m.export(tmp_path / "student")
    assert json.loads((out / "sprint_config.json").read_text())["controlnet"] == "controlnet"
    sprint = json.loads((out / "controlnet" / "controlnet_config.json").read_text())["sprint"]
    assert sprint["kind"] == "student" and sprint["base"] == "unused"  # the frozen --student-init, not the teacher
    assert sprint["condition"] == "scribble" and sprint["conditioning_scale"] == 0.7  # the control signal carries over
    assert "init" not in sprint and sprint["teacher_controlnet"] == str(tcn_dir)  # the teacher's record does not
    assert sprint["default_steps"] == m.cfg.default_steps and sprint.get("trained_steps") != 1234
    engine = load_engine(str(out), None, device="cpu")  # finds out/controlnet by itself
    assert engine.info["controlnet"] and not engine.info["random_controlnet"] and engine.info["kind"] == "student"
    for k, v in m.student.controlnet.state_dict().items():
        assert torch.equal(engine.controlled.controlnet.state_dict()[k], v.half().float()), k
    scribble = Image.fromarray(condition_image(ShapesWorld(IMAGE_SIZE).sample(0, 3).image))
    with_c = engine.generate(Request("a red circle", steps=1, seed=1, scribble=scribble))
    without = engine.generate(Request("a red circle", steps=1, seed=1))
    assert with_c.meta["controlled"] and not without.meta["controlled"] and with_c.png != without.png


def test_controlnet_init_continues_a_distilled_controlnet_on_a_new_base(tmp_path, teacher_folder, data):
    """``controlnet_init``: the student's ControlNet starts as the given distilled one (the teacher keeps its own),
    training moves a copy (the loaded module stays as it was), the export records the init, and the folder is
    found as a ControlNet folder or inside an exported student folder's controlnet/ (a misfit is refused)."""
    from sana_sprint.models.presets import make_student
    from sana_sprint.training.controlnet import load_controlnet_init

    teacher, _, _ = load_teacher_folder(teacher_folder, "cpu")
    distilled = _teacher_controlnet(teacher_folder, seed=9)  # stands in for a distilled Sprint-ControlNet
    distilled.save_pretrained(tmp_path / "scn", dtype=torch.float32, extra={"kind": "student"})
    shutil.copytree(tmp_path / "scn", tmp_path / "export" / "controlnet")
    before = _snap(distilled)
    for folder in (tmp_path / "scn", tmp_path / "export"):
        assert not _changed(before, _snap(load_controlnet_init(folder, teacher))), folder
    other = SprintControlNet.from_base(tiny_transformer(guidance_embeds=False, seed=5, num_layers=3, attention_head_dim=4))
    other.save_pretrained(tmp_path / "cn_other", extra={"kind": "student"})
    with pytest.raises(ModelFolderError, match="does not fit"):
        load_controlnet_init(tmp_path / "cn_other", teacher)

    m = _distill(teacher_folder, data, student_base=make_student(teacher), student_init="unused",
                 student_controlnet=load_controlnet_init(tmp_path / "export", teacher),
                 controlnet_init=str(tmp_path / "export"))
    assert not _changed(before, _snap(m.student.controlnet)) and _changed(before, _snap(m.teacher.controlnet))
    assert _changed(_snap(_distill(teacher_folder, data).student.controlnet), before)  # without it: the teacher's copy
    b = data.batch(range(4))
    c = b["control"] * data.scaling_factor
    x, s = torch.randn(4, *data.latent_shape, generator=torch.Generator().manual_seed(2)), torch.full((4,), 1.1)
    with torch.no_grad(), m.teacher.bind(c), m.student.bind(c):
        assert (m.student(x, s, b["embeds"], b["mask"], guidance=4.5) - m.teacher(x, s, b["embeds"], b["mask"])
                ).abs().max() > 1e-3  # the student's control now differs from the teacher's from step 0
    m.train_step(data.batch(range(4)), 0, Stepper(m.optimizers(), {}, 1.0, "cpu"))
    assert _changed(before, _snap(m.student.controlnet)) and not _changed(before, _snap(distilled))
    sprint = json.loads((m.export(tmp_path / "student") / "controlnet" / "controlnet_config.json").read_text())["sprint"]
    assert sprint["controlnet_init"] == str(tmp_path / "export")


def test_control_dropout_trains_base_and_controlnet_with_per_sample_control(tmp_path, teacher_folder, data):
    from sana_sprint.models.presets import make_student

    teacher, _, _ = load_teacher_folder(teacher_folder, "cpu")
    init = make_student(teacher)
    with torch.no_grad():
        for p in init.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    m = _distill(teacher_folder, data, student_base=init, student_init="unused", control_train="all",
                 control_dropout=0.5)
    assert m.control_train == "all"
    seen = []
    real_bind = m.teacher.bind

    def spy(c, scale=None):
        seen.append(scale.clone())
        return real_bind(c, scale)

    m.teacher.bind = spy
    base, cn = _snap(m.student.transformer), _snap(m.student.controlnet)
    stepper = Stepper(m.optimizers(), {}, 1.0, "cpu")
    torch.manual_seed(11)
    first = (torch.rand(4) >= 0.5).float()
    torch.manual_seed(11)
    for _ in range(3):
        logs = m.train_step(data.batch(range(4)), 0, stepper)
        assert logs["skipped_g"] == 0 and np.isfinite(logs["loss"])
    # one per-sample 0/1 scale per step, drawn first from the torch RNG (checkpointed: a resume replays it)
    assert len(seen) == 3 and torch.equal(seen[0], first)
    assert all(set(s.tolist()) <= {0.0, 1.0} for s in seen) and {0.0, 1.0} <= set(torch.cat(seen).tolist())
    assert _changed(base, _snap(m.student.transformer)) and _changed(cn, _snap(m.student.controlnet))
    out = m.export(tmp_path / "student")
    sprint = json.loads((out / "controlnet" / "controlnet_config.json").read_text())["sprint"]
    # the base trained with the ControlNet is the exported transformer, not the --student-init folder
    assert sprint["base"] == ".." and sprint["control_train"] == "all" and sprint["control_dropout"] == 0.5


def test_teacher_conditioning_scale_sets_the_teachers_strength_only(tmp_path, teacher_folder, data):
    """teacher_conditioning_scale 1.5: the distillation targets come from the ControlNet teacher at 1.5 (also
    per sample under control dropout: 0 or 1.5), the student runs its ControlNet at 1; the export records it."""
    from sana_sprint.training.controlnet import bind_control

    b = data.batch(range(4))
    c = b["control"] * data.scaling_factor
    x = torch.randn(4, *data.latent_shape, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.2, 0.8, 1.3, 1.5707964])
    e, k = b["embeds"], b["mask"]
    m = _distill(teacher_folder, data, teacher_conditioning_scale=1.5)
    with torch.no_grad():
        at = {w: m.teacher(x, s, e, k, control=c, conditioning_scale=w) for w in (0.0, 1.0, 1.5)}
        student_at_1 = m.student(x, s, e, k, 4.5, control=c, conditioning_scale=1.0)
        assert (at[1.5] - at[1.0]).abs().max() > 1e-4
        with bind_control(m, b):
            torch.testing.assert_close(m.teacher(x, s, e, k), at[1.5], rtol=0, atol=1e-6)
            torch.testing.assert_close(m.student(x, s, e, k, 4.5), student_at_1, rtol=0, atol=1e-6)
        md = _distill(teacher_folder, data, student_base=m.student.transformer, student_init="unused",
                      control_train="all", control_dropout=0.5, teacher_conditioning_scale=1.5)
        torch.manual_seed(11)
        keep = (torch.rand(4) >= 0.5).float()
        assert 0 < keep.sum() < 4
        torch.manual_seed(11)
        with bind_control(md, b):
            mixed = md.teacher(x, s, e, k)
        want = torch.where(keep[:, None, None, None] > 0, at[1.5], at[0.0])
        torch.testing.assert_close(mixed, want, rtol=0, atol=1e-6)
    out = m.export(tmp_path / "student")
    sprint = json.loads((out / "controlnet" / "controlnet_config.json").read_text())["sprint"]
    assert sprint["teacher_conditioning_scale"] == 1.5


@pytest.mark.parametrize("overrides, message", [
    ({"teacher_conditioning_scale": 0.0}, "finite number > 0"),
    ({"teacher_conditioning_scale": float("nan")}, "finite number > 0"),
    ({"teacher_conditioning_scale": 1.5, "controlnet": None}, "only with controlnet"),
    ({"control_dropout": 1.0}, "must be in"),
    ({"control_dropout": 0.3, "controlnet": None}, "only with controlnet"),
    ({"control_dropout": 0.3, "student_init": "x"}, "frozen base"),
    ({"control_dropout": 0.3, "control_train": "controlnet"}, "frozen base"),
    ({"controlnet_init": "x", "controlnet": None}, "only with controlnet"),
])
def test_control_dropout_config_errors(overrides, message):
    cfg = DistillConfig(**{"out": "unused", "controlnet": "unused", **overrides})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


# --- eval-control -----------------------------------------------------------------------------------


def test_eval_control_metric_ground_truth_blank_and_a_tiny_model(tmp_path, teacher_folder):
    from sana_sprint.cli import main
    from sana_sprint.evaluation.control import (
        blank_images,
        control_records,
        evaluate_control,
        ground_truth_images,
    )

    records = control_records(12)
    assert [r["tag"] for r in records[:6]] == [r["tag"] for r in records[6:]]  # task-balanced prefix
    assert all(r["seed"] != 0 for r in records)  # held out from the training seed
    gt = evaluate_control(ground_truth_images, records, size=64, progress=False)
    assert gt["edge_f1"] > 0.97 and gt["colors"] == 1.0 and gt["shapes_eval"] == 1.0
    blank = evaluate_control(blank_images, records, size=64, progress=False)
    assert blank["edge_f1"] == 0.0 and blank["colors"] == 0.0

    cn = tmp_path / "cn"
    _teacher_controlnet(teacher_folder).save_pretrained(cn, dtype=torch.float16, extra={"condition": "scribble"})
    out = tmp_path / "eval" / "r.json"
    code = main(["eval-control", "--model", str(teacher_folder), "--controlnet", str(cn), "--steps", "2", "--num", "6",
                 "--batch", "4", "--no-progress", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["n"] == 6 and res["steps"] == 2 and 0.0 <= res["edge_f1"] <= 1.0 and res["condition"] == "scribble"
    assert out.with_suffix(".png").is_file() and len(out.with_suffix(".jsonl").read_text().splitlines()) == 6
    assert main(["eval-control", "--reference", "blank", "--model", str(teacher_folder), "--out", str(out)]) == 2
