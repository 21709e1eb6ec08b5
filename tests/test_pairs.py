"""Teacher noise -> image pairs (scripts/teacher_pairs.py, data/pairs.py) and distill's 1-step regression term."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, MAX_LENGTH, save_tiny_pipeline, tiny_transformer, tiny_vae, train_batch
from test_distill import _method

from sana_sprint.data.latents import LatentDataset, build_latent_cache
from sana_sprint.data.pairs import TeacherPairs
from sana_sprint.errors import UserError
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder
from sana_sprint.training.config import ConfigError
from sana_sprint.training.distill import DistillConfig
from sana_sprint.training.trainer import Stepper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import pairs_gap  # noqa: E402
import repair_eval  # noqa: E402
import teacher_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory, teacher_folder, tokenizer, bert):
    tmp = tmp_path_factory.mktemp("pairs")
    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    cache = build_latent_cache("shapes", tiny_vae(seed=6), te, 12, tmp / "cache", batch=6, size=IMAGE_SIZE,
                               progress=False)
    out = tmp / "pairs"
    args = ["--teacher", str(teacher_folder), "--cache", str(cache), "--n", "10", "--shard", "6", "--batch", "4",
            "--steps", "3", "--out", str(out)]
    assert teacher_pairs.main(args) == 0
    return out, args


def test_pairs_are_the_teacher_pipelines_samples_from_that_noise(pairs_folder, teacher_folder):
    out, _ = pairs_folder
    pairs = TeacherPairs(out)
    assert len(pairs) == 12 and sorted(p.name for p in out.glob("pairs-*.pt")) == ["pairs-00000.pt", "pairs-00001.pt"]
    assert set(pairs.w.tolist()) <= {4.0, 4.5, 5.0}
    cache = LatentDataset(pairs.meta["cache"])
    pipe = SprintPipeline.from_pretrained(teacher_folder)
    for i in (0, 7, 11):  # one at a time: an independent call of the public pipeline
        caption = cache.captions[int(pairs.caption_index[i])]
        ref = pipe(caption, steps=3, guidance_scale=float(pairs.w[i]), latents=pairs.noise[i:i + 1],
                   output_type="latent").latents
        torch.testing.assert_close(pairs.x0[i:i + 1], ref, rtol=0, atol=1e-5)
        assert ref.abs().max() > 0.1
    rows = pairs.batch(torch.tensor([3, 3, 9]))
    e = torch.from_numpy(np.array(cache.text_embeds[int(pairs.caption_index[9])]))
    torch.testing.assert_close(rows["embeds"][2], e.float())
    assert torch.equal(rows["x0"][0], rows["x0"][1]) and rows["mask"].dtype == torch.long


def test_pairs_rerun_skips_done_shards_and_refuses_other_settings(pairs_folder, capsys):
    out, args = pairs_folder
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("pairs-*.pt")}
    assert teacher_pairs.main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("pairs-*.pt")} == before
    changed = [a if a != "3" else "4" for a in args]  # --steps 4
    assert teacher_pairs.main(changed) == 2
    assert "other settings" in capsys.readouterr().err
    with pytest.raises(UserError, match="no teacher pairs"):
        TeacherPairs(out.parent)


def test_shard_ranges_made_apart_equal_the_folder_made_at_once(pairs_folder, tmp_path, capsys):
    """--shard-range: two processes filling one folder side by side write exactly the shards of a single run."""
    out, args = pairs_folder
    split = tmp_path / "split"
    base = [a if a != str(out) else str(split) for a in args]
    assert teacher_pairs.main([*base, "--shard-range", "1:2"]) == 0
    assert [p.name for p in split.glob("pairs-*.pt")] == ["pairs-00001.pt"]
    assert teacher_pairs.main([*base, "--shard-range", "0:1"]) == 0
    for name in ("pairs-00000.pt", "pairs-00001.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (out, split))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for bad in ("1:1", "0:3", "x", "2:1"):
        assert teacher_pairs.main([*base, "--shard-range", bad]) == 2
        assert "--shard-range" in capsys.readouterr().err


def test_refine_pairs_are_the_teachers_euler_repair_of_the_students_1_step_output(pairs_folder, teacher_folder,
                                                                                  tmp_path, text_encoder, capsys):
    """--refine-student: same noise / captions / w as the plain pairs; x0 = a float64 flow Euler with CFG (written
    out here, cond and uncond called apart) from (1 - sigma) u + sigma e, u the student's 1-step output."""
    out, args = pairs_folder
    student = save_tiny_pipeline(tmp_path / "student", text_encoder, tiny_transformer(guidance_embeds=True, seed=8),
                                 kind="student", vae_seed=6)
    ref_dir, t_r, steps = tmp_path / "refined", 0.9, 4
    base = [a if a != str(out) else str(ref_dir) for a in args]
    assert teacher_pairs.main([*base, "--refine-student", str(student), "--refine-time", str(t_r),
                               "--refine-steps", str(steps)]) == 0
    plain, refined = TeacherPairs(out), TeacherPairs(ref_dir)
    assert torch.equal(plain.noise, refined.noise) and torch.equal(plain.w, refined.w)
    assert torch.equal(plain.caption_index, refined.caption_index) and refined.meta["refine_time"] == t_r
    cache = LatentDataset(refined.meta["cache"])
    s_pipe, t_pipe = SprintPipeline.from_pretrained(student), SprintPipeline.from_pretrained(teacher_folder)
    sigma = math.sin(t_r) / (math.sin(t_r) + math.cos(t_r))
    grid = torch.linspace(sigma, 0.0, steps + 1, dtype=torch.float64)
    null_e, null_m = t_pipe.text_encoder.null_embedding()
    for i in (1, 8):  # shard 0 row 1, shard 1 row 2 (shards of 6)
        k, row = divmod(i, 6)
        g = torch.Generator().manual_seed(0 * 1_000_003 + k)  # the script's per-shard draws, in its order
        torch.randint(12, (6,), generator=g), torch.randint(3, (6,), generator=g)
        shape = refined.noise.shape[1:]
        torch.randn((6, *shape), generator=g)
        e = torch.randn((6, *shape), generator=g)[row:row + 1].double()
        caption, w = cache.captions[int(refined.caption_index[i])], float(refined.w[i])
        u = s_pipe(caption, steps=1, guidance_scale=w, latents=refined.noise[i:i + 1], output_type="latent").latents
        x = (1 - sigma) * u.double() + sigma * e
        emb, mask = t_pipe.text_encoder.encode([caption])
        with torch.no_grad():
            for a, b in zip(grid[:-1], grid[1:]):
                t = torch.full((1,), float(a))
                vc = t_pipe.model.flow_velocity(x.float(), t, emb, mask).double()
                vu = t_pipe.model.flow_velocity(x.float(), t, null_e, null_m).double()
                x = x + (b - a) * (vu + w * (vc - vu))
        torch.testing.assert_close(refined.x0[i:i + 1].double(), x, rtol=0, atol=2e-4)
        assert (refined.x0[i] - plain.x0[i]).abs().max() > 1e-2  # a different target from the plain pair's
    assert teacher_pairs.main([*base, "--refine-student", str(student), "--refine-time", "1.6"]) == 2
    assert teacher_pairs.main([*base, "--refine-student", str(tmp_path / "none")]) == 2
    assert "no student folder" in capsys.readouterr().err


def test_repair_eval_draws_the_students_own_noise_and_applies_the_teachers_repair(teacher_folder, tmp_path,
                                                                                 text_encoder):
    """scripts/repair_eval.py: with the generators the evaluation passes, the 1-step latent inside the repair is
    the student pipeline's own, and the output is teacher_pairs.refine of it with the generators' next draws."""
    folder = save_tiny_pipeline(tmp_path / "student", text_encoder, tiny_transformer(guidance_embeds=True, seed=8),
                                kind="student", vae_seed=6)
    student, teacher = SprintPipeline.from_pretrained(folder), SprintPipeline.from_pretrained(teacher_folder)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(3)]  # noqa: E731
    t_r, steps = 0.7, 3
    out = repair_eval.RepairPipe(student, teacher, t_r, steps)(prompts, guidance_scale=4.0, generator=gens(),
                                                               output_type="pt")
    own = student(prompts, steps=1, timesteps=[math.pi / 2], guidance_scale=4.0, generator=gens(),
                  output_type="latent").latents
    g = gens()
    noise = torch.stack([torch.randn(own.shape[1:], generator=x) for x in g])
    renoise = torch.stack([torch.randn(own.shape[1:], generator=x) for x in g])
    ref = teacher_pairs.refine(teacher, student, prompts, 4.0, noise, renoise, t_r, steps, "cpu")
    torch.testing.assert_close(out.latents, ref.latents, rtol=0, atol=1e-6)
    u = student(prompts, steps=1, timesteps=[math.pi / 2], guidance_scale=4.0, latents=noise,
                output_type="latent").latents
    torch.testing.assert_close(u, own, rtol=0, atol=1e-6)  # the noise drawn is the student's own
    assert out.images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and (out.latents - own).abs().max() > 1e-2
    assert repair_eval.main(["--student", str(tmp_path / "none"), "--out", str(tmp_path / "r.json")]) == 2


def test_pairs_gap_is_the_per_pair_1_step_mse_of_the_student(pairs_folder, tmp_path, text_encoder):
    out, _ = pairs_folder
    folder = save_tiny_pipeline(tmp_path / "student", text_encoder, tiny_transformer(guidance_embeds=True, seed=8),
                                kind="student", vae_seed=6)
    pipe = SprintPipeline.from_pretrained(folder)
    mean, se, n = pairs_gap.pairs_mse(pipe, out, n=11, batch=4)  # batches of 4 with mixed w, a partial last one
    pairs = TeacherPairs(out)
    cache = LatentDataset(pairs.meta["cache"])
    ref = []
    for i in range(11):  # one pair at a time through the public pipeline, float64 error
        x = pipe(cache.captions[int(pairs.caption_index[i])], steps=1, guidance_scale=float(pairs.w[i]),
                 latents=pairs.noise[i:i + 1], output_type="latent").latents
        ref.append(float((x.double() - pairs.x0[i:i + 1].double()).square().mean()))
    assert n == 11 and mean == pytest.approx(np.mean(ref), rel=1e-4)
    assert se == pytest.approx(np.std(ref, ddof=1) / np.sqrt(11), rel=1e-3) and mean > 0
    assert pairs_gap.main(["--model", str(out.parent), str(out)]) == 2  # not a pipeline folder: an error, no trace


def test_regress_settings_are_checked():
    for bad in ({"pairs": "x"}, {"regress_weight": 1.0}, {"pairs": "x", "regress_weight": -1.0}, {"loss": "regress"}):
        with pytest.raises(ConfigError):
            DistillConfig(out="unused", **bad).validate()


def _perturbed(method, seed: int = 3):
    with torch.no_grad():  # a student that is not the teacher (the guidance embedding matters)
        for p in method.student.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(seed)))
    return method


def _generator_terms(method, text_encoder):
    """(total, logs, terms) of one G-phase loss on the training batch, with fixed draws and frozen heads."""
    x0, e, m = method.prepare_batch(train_batch(text_encoder))
    method.gen.manual_seed(5)
    method.disc.eval().requires_grad_(False)
    terms = {}
    total, logs = method.generator_loss(x0, e, m, 10, terms=terms)
    return total, logs, terms


def test_regression_term_matches_a_float64_computation(pairs_folder, teacher_folder, text_encoder):
    """loss_regress = mean over pairs of mean((x0_hat / sd - x0_T)^2), x0_hat = cos(pi/2) x - sin(pi/2) sd F at
    x = sd z; and it enters the generator loss as + regress_weight * that, with its own embeddings and w."""
    out, _ = pairs_folder
    method = _perturbed(_method(teacher_folder, text_encoder, loss="both", pairs=str(out), regress_weight=2.5,
                                regress_batch=5))
    seen = []
    real_batch = method.pairs.batch
    method.pairs.batch = lambda idx: seen.append(idx.clone()) or real_batch(idx)
    total, logs, terms = _generator_terms(method, text_encoder)
    (idx,) = seen
    assert len(idx) == 5
    rows = real_batch(idx)
    s64 = copy.deepcopy(method.student).double()
    sd = method.sigma_data
    with torch.no_grad():
        F = s64((sd * rows["noise"].double()) / sd, torch.full((5,), math.pi / 2, dtype=torch.float64),
                rows["embeds"].double(), rows["mask"], guidance=rows["w"].double())
    s = torch.tensor(math.pi / 2, dtype=torch.float64)
    x0_hat = torch.cos(s) * sd * rows["noise"].double() - torch.sin(s) * sd * F
    ref = ((x0_hat / sd - rows["x0"].double()) ** 2).flatten(1).mean(1).mean()
    assert logs["loss_regress"] == pytest.approx(float(ref), rel=1e-5)
    assert float(total.detach()) == pytest.approx(float(terms["scm"] + method.cfg.ladd_weight * terms["adv"] + 2.5 * ref),
                                         rel=1e-5)


def test_regression_alone_pulls_the_1_step_output_onto_the_teacher_pairs(pairs_folder, teacher_folder, text_encoder):
    out, _ = pairs_folder
    method = _method(teacher_folder, text_encoder, loss="regress", pairs=str(out), regress_weight=50.0, regress_batch=12)
    stepper = Stepper(method.optimizers(), {}, method.cfg.grad_clip, "cpu")
    batch = train_batch(text_encoder)
    losses = []
    for step in range(25):
        method.gen.manual_seed(7)  # the same draws every step: only the weights change
        losses.append(method.train_step(batch, step, stepper)["loss_regress"])
    assert stepper.steps["generator"] == 25 and not stepper.skipped and "discriminator" not in stepper.steps
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    assert "scm/loss" not in method.train_step(batch, 25, stepper)


def test_cached_text_pairs_match_the_encoder_pairs_and_unknown_prompts_are_refused(pairs_folder, tmp_path, teacher_folder):
    """--cached-text: the cache's fp16 embeddings instead of the encoder (what distill trains on) give the
    same pairs up to that rounding; the stand-in encoder answers only for cached captions."""
    out, args = pairs_folder
    ref = TeacherPairs(out)
    cached = tmp_path / "cached"
    args2 = [a if a != str(out) else str(cached) for a in args] + ["--cached-text"]
    assert teacher_pairs.main(args2) == 0
    got = TeacherPairs(cached)
    assert got.meta["text"] == "cache" and torch.equal(got.noise, ref.noise) and torch.equal(got.w, ref.w)
    torch.testing.assert_close(got.x0, ref.x0, rtol=0, atol=2e-3)  # fp16 embeddings vs the encoder's fp32
    assert (got.x0 - ref.x0).abs().max() > 0  # really a different text path
    # an existing folder made with the encoder refuses a --cached-text rerun
    assert teacher_pairs.main(args + ["--cached-text"]) == 2

    cache = LatentDataset(ref.meta["cache"])
    te = cache.text_encoder()
    e, m = te.encode([cache.captions[2].upper(), cache.captions[0]])  # prompts are preprocessed like the encoder's
    torch.testing.assert_close(e[0], torch.from_numpy(np.asarray(cache.text_embeds[2]).astype(np.float32)))
    assert m.dtype == torch.long and torch.equal(m[1], torch.from_numpy(np.array(cache.text_masks[0])).long())
    with pytest.raises(UserError, match="not in the cache"):
        te.encode(["a prompt the cache never saw"])
    ne, nm = te.null_embedding()
    assert ne.shape == (1, *cache.meta["text_shape"]) and nm.shape == (1, cache.meta["text_shape"][0])


def _teacher_features64(teacher, blocks, x_scaled, s, ehs, mask):
    """Float64 teacher block outputs through hooks of its own (not the Discriminator's), as [B, N, C]."""
    t64 = copy.deepcopy(teacher).double()
    got = {}
    hooks = [t64.transformer.transformer_blocks[i].register_forward_hook(
        lambda mod, args, out, i=i: got.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in blocks]
    try:
        t64(x_scaled.double(), s.double(), ehs.double(), mask)
    finally:
        for h in hooks:
            h.remove()
    return [got[i] for i in blocks]


def test_feature_regression_matches_a_float64_computation_and_its_gradient(pairs_folder, teacher_folder, text_encoder):
    """loss = mean over hooked blocks of mean((phi(x_hat) - phi(x_T))^2) / mean(phi(x_T)^2), both re-noised at one
    s_D ~ arctan(exp(N(d_p_mean, d_p_std)) / sd) with the same noise (drawn s_D first, then z); its gradient in x_hat
    agrees with a float64 central finite difference; zero for x_hat = x_T."""
    from sana_sprint.losses import ladd as ladd_lib

    method = _method(teacher_folder, text_encoder, loss="both", pairs=str(pairs_folder[0]), regress_weight=1.0)
    disc, cfg, sd = method.disc.eval(), method.ladd_cfg, method.sigma_data
    b = train_batch(text_encoder)
    g = torch.Generator().manual_seed(11)
    x_t = sd * torch.randn(3, *method.latent_shape, generator=g)
    x_h = (x_t + 0.3 * sd * torch.randn(3, *method.latent_shape, generator=g)).requires_grad_(True)
    loss = ladd_lib.feature_regression_loss(disc, x_h, x_t, b["embeds"], b["mask"], cfg, torch.Generator().manual_seed(4))
    loss.backward()

    g = torch.Generator().manual_seed(4)
    tau = torch.randn(3, generator=g, dtype=torch.float32) * cfg.d_p_std + cfg.d_p_mean
    s = torch.atan(torch.exp(tau) / sd).double()
    z = sd * torch.randn(3, *method.latent_shape, generator=g).double()
    c, si = torch.cos(s)[:, None, None, None], torch.sin(s)[:, None, None, None]

    def ref(xh):
        ft = _teacher_features64(method.teacher, disc.block_indices, (c * x_t.double() + si * z) / sd, s, b["embeds"], b["mask"])
        fh = _teacher_features64(method.teacher, disc.block_indices, (c * xh + si * z) / sd, s, b["embeds"], b["mask"])
        return torch.stack([((h - t) ** 2).mean() / (t ** 2).mean() for h, t in zip(fh, ft)]).mean()

    with torch.no_grad():
        x64 = x_h.detach().double()
        assert float(loss) == pytest.approx(float(ref(x64)), rel=1e-4)
        assert float(loss) > 1e-3 and float(ref(x_t.double())) == 0.0
        v = torch.randn(x64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        eps = 1e-4
        fd = (ref(x64 + eps * v) - ref(x64 - eps * v)) / (2 * eps)
    assert float((x_h.grad.double() * v).sum()) == pytest.approx(float(fd), rel=2e-3)
    assert all(p.grad is None for p in method.teacher.parameters())


def test_feature_regression_enters_the_generator_loss_with_its_weight(pairs_folder, teacher_folder, text_encoder):
    out, _ = pairs_folder
    method = _method(teacher_folder, text_encoder, loss="both", pairs=str(out), regress_weight=2.5, regress_features=1.5)
    total, logs, terms = _generator_terms(method, text_encoder)
    assert logs["loss_regress_features"] == pytest.approx(float(terms["regress_features"]), rel=1e-6)
    assert logs["loss_regress_features"] > 0
    parts = terms["scm"] + method.cfg.ladd_weight * terms["adv"] + 2.5 * terms["regress"] + 1.5 * terms["regress_features"]
    assert float(total.detach()) == pytest.approx(float(parts.detach()), rel=1e-6)
    # features alone (no latent term) is a valid setting; a weight without pairs is not
    DistillConfig(out="unused", pairs="x", regress_features=1.0).validate()
    with pytest.raises(ConfigError, match="regress_features"):
        DistillConfig(out="unused", regress_features=1.0).validate()
    with pytest.raises(ConfigError, match="regress_features"):
        DistillConfig(out="unused", pairs="x", regress_features=-1.0).validate()


def test_refine_loss_matches_a_float64_computation_and_stops_the_gradient_at_its_target(teacher_folder, text_encoder):
    """refine = mean over samples of mean(((x0_hat - f(x_r, t_r)) / sd)^2), x_r = cos(t_r) x0_hat + sin(t_r) sd z,
    f(x, t) = cos(t) x - sin(t) sd F(x / sd, t) of the student itself; the gradient reaches x0_hat only through the
    first x0_hat (the target is a constant): d/dx0_hat = 2 (x0_hat - target) / (sd^2 D n)."""
    method = _perturbed(_method(teacher_folder, text_encoder, refine_weight=1.0, refine_time=0.7))
    b, sd = train_batch(text_encoder), method.sigma_data
    n = b["embeds"].shape[0]
    x0_hat = (sd * torch.randn(n, *method.latent_shape, generator=torch.Generator().manual_seed(8))).requires_grad_(True)
    w = torch.tensor([4.0, 4.5, 5.0][:n])
    loss = method.refine_loss(x0_hat, b["embeds"], b["mask"], w, torch.Generator().manual_seed(4))
    loss.backward()

    z = torch.randn(n, *method.latent_shape, generator=torch.Generator().manual_seed(4)).double()
    t = torch.full((n,), 0.7, dtype=torch.float64)
    c, si = math.cos(0.7), math.sin(0.7)
    s64 = copy.deepcopy(method.student).double()
    x64 = x0_hat.detach().double()
    with torch.no_grad():
        x_r = c * x64 + si * sd * z
        target = c * x_r - si * sd * s64(x_r / sd, t, b["embeds"].double(), b["mask"], guidance=w.double())
    ref = (((x64 - target) / sd) ** 2).flatten(1).mean(1).mean()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert float(ref) > 1e-3
    d = x64[0].numel()
    torch.testing.assert_close(x0_hat.grad.double(), 2 * (x64 - target) / (sd**2 * d * n), rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in method.student.parameters())


def test_teacher_repair_target_is_a_float64_flow_euler_of_the_teacher_with_cfg(teacher_folder, text_encoder):
    """refine_teacher_steps: the target is the teacher's flow Euler with CFG w (written out here in flow space,
    cond and uncond apart, float64) from x_r / (sd (cos t_r + sin t_r)) on a grid uniform in flow time; the loss
    is mean(((x0_hat - target) / sd)^2) with the same fresh noise as the student-target version."""
    t_r, steps = 1.2, 3
    method = _perturbed(_method(teacher_folder, text_encoder, refine_weight=1.0, refine_time=t_r,
                                refine_teacher_steps=steps))
    b, sd = train_batch(text_encoder), method.sigma_data
    n = b["embeds"].shape[0]
    x0_hat = sd * torch.randn(n, *method.latent_shape, generator=torch.Generator().manual_seed(8))
    w = torch.tensor([4.0, 4.5, 5.0][:n])
    loss = method.refine_loss(x0_hat, b["embeds"], b["mask"], w, torch.Generator().manual_seed(4))

    z = torch.randn(n, *method.latent_shape, generator=torch.Generator().manual_seed(4)).double()
    c, si = math.cos(t_r), math.sin(t_r)
    x64 = x0_hat.double()
    y = (c * x64 + si * sd * z) / (sd * (c + si))  # flow space, unit std
    sigma = si / (si + c)
    grid = torch.linspace(sigma, 0.0, steps + 1, dtype=torch.float64)
    t64 = copy.deepcopy(method.teacher).double()
    null_e, null_m = method.null
    with torch.no_grad():
        for a, b_ in zip(grid[:-1], grid[1:]):
            t = torch.full((n,), float(a), dtype=torch.float64)
            vc = t64.flow_velocity(y, t, b["embeds"].double(), b["mask"])
            vu = t64.flow_velocity(y, t, null_e.double().expand(n, -1, -1), null_m.expand(n, -1))
            y = y + (b_ - a) * (vu + w.double().view(-1, 1, 1, 1) * (vc - vu))
    target = sd * y
    ref = (((x64 - target) / sd) ** 2).flatten(1).mean(1).mean()
    assert float(loss) == pytest.approx(float(ref), rel=1e-4)
    # a different target from the student's own consistency step (the default)
    method.cfg.refine_teacher_steps = 0
    own = method.refine_loss(x0_hat, b["embeds"], b["mask"], w, torch.Generator().manual_seed(4))
    assert abs(float(own) - float(ref)) > 1e-3 * float(ref)
    with pytest.raises(ConfigError, match="refine_teacher_steps"):
        DistillConfig(out="unused", refine_teacher_steps=2).validate()
    with pytest.raises(ConfigError, match="refine_teacher_steps"):
        DistillConfig(out="unused", refine_weight=1.0, refine_teacher_steps=-1).validate()


def test_refine_term_enters_the_generator_loss_with_its_weight_and_batch(teacher_folder, text_encoder):
    """total = scm + ladd_weight * adv + refine_weight * refine; refine_batch may exceed the generator batch (captions
    reused in turn); the 1-step outputs it refines come from the student's gradient forward."""
    method = _perturbed(_method(teacher_folder, text_encoder, loss="both", refine_weight=3.0, refine_batch=5))
    calls = []
    real = method.refine_loss
    method.refine_loss = lambda x0_hat, *a: calls.append(x0_hat) or real(x0_hat, *a)
    total, logs, terms = _generator_terms(method, text_encoder)
    (x0_hat,) = calls
    assert x0_hat.shape == (5, *method.latent_shape) and x0_hat.requires_grad
    assert logs["loss_refine"] == pytest.approx(float(terms["refine"]), rel=1e-6) and logs["loss_refine"] > 0
    parts = terms["scm"] + method.cfg.ladd_weight * terms["adv"] + 3.0 * terms["refine"]
    assert float(total.detach()) == pytest.approx(float(parts.detach()), rel=1e-6)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())


@pytest.mark.parametrize("bad", [{"refine_time": 0.0}, {"refine_time": math.pi / 2}, {"refine_weight": -1.0},
                                 {"refine_batch": -2}])
def test_refine_settings_are_checked(bad):
    with pytest.raises(ConfigError, match="refine"):
        DistillConfig(out="unused", **{"refine_weight": 1.0, **bad}).validate()
