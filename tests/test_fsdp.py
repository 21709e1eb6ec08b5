"""``--fsdp`` (training/fsdp.py): FSDP2-sharded teacher training on CPU processes (gloo).

Fast tests (one process): the wrap policy picks exactly the transformer blocks, methods without
``fsdp_modules`` refuse ``--fsdp``, and ``--fsdp`` on one process is the plain run.

Slow tests (``-m slow``; two processes launched once with ``accelerate launch``, ~1-2 min): a tiny
teacher (the real ``TeacherMethod``: transformer + EMA + AdamW + LR schedule, gradient checkpointing
on, clip active) whose flow-matching draws are made per row from the row index (so they do not
depend on the rank), trained

1. on 2 processes x 4 rows with ``--fsdp`` against 1 process x 8 rows without it: every logged
   loss per step (relative 1e-5), the checkpointed transformer, EMA and Adam moments after 4 steps
   (abs 1e-5; float32 rounding only: different matmul batch shapes and reduction order);
2. FSDP stop after the step-2 checkpoint + resume == the uninterrupted FSDP run, bit for bit;
3. checkpoints are in the 1-process format: an FSDP checkpoint resumes a plain 1-process run and a
   1-process checkpoint resumes an FSDP run, both ending where the references end (abs 1e-5);
4. each rank really holds half of the weights, and the (unsharded) EMA is bit-identical on both.

Distillation (``distill --fsdp``; a second launch): the tiny sCM + LADD run of test_multiprocess.py
(misaligned pairs, gradient checkpointing, clip, sample grids every 2 steps, export at the end) with
the student transformer sharded by blocks, on 2 processes x 4 rows against 1 process x 8 rows without
FSDP:

5. every logged scalar per step (relative 1e-4, abs 1e-6), the student / logvar / head weights after
   4 steps (abs 1e-5; the pre-norm head biases, whose gradient is exactly 0, by 2 lr steps, as in
   test_multiprocess.py) and the generator's Adam moments (relative 1e-4);
6. the export loads as a plain ``SanaTransformer2DModel`` whose weights are the gathered checkpoint
   weights in fp16, bit for bit; the full-weight copy the main
   process samples with gives the sharded student's samples (all ranks sampling) to 1e-6;
7. FSDP stop after the step-2 checkpoint + resume == the uninterrupted FSDP run, bit for bit; the
   replicated parts (teacher, discriminator heads) are bit-identical on both ranks.

Run the workers by hand: ``accelerate launch --multi_gpu --num_processes 2 tests/test_fsdp.py OUT``
(teacher) and ``... tests/test_fsdp.py OUT distill TEACHER_FOLDER``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, LATENT_CHANNELS, TEXT_HIDDEN, tiny_transformer
from mp_launch import accelerate_launch, assert_logged_scalars_match, checkpoint_tensors, losses, read_metrics

STEPS = 4
BATCH = 8  # global: 4 rows per rank
CLIP = 0.05  # below the tiny teacher's gradient norms (~0.3-1): the clip acts on every step
LENGTH = 8


class TeacherData:
    """32 random latent rows with 4 captions' random embeddings: the parts of a LatentDataset the teacher reads."""

    scaling_factor = 0.8

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(11)
        self.latent_shape = (LATENT_CHANNELS, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
        self.latents = torch.randn(n, *self.latent_shape, generator=g)
        self.embeds = torch.randn(4, LENGTH, TEXT_HIDDEN, generator=g)
        self.mask = torch.ones(4, LENGTH, dtype=torch.long)
        self.mask[2, 5:] = 0
        self.null = (torch.randn(1, LENGTH, TEXT_HIDDEN, generator=g), torch.ones(1, LENGTH, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.latents)

    def null_embedding(self):
        return self.null

    def batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        c = idx % 4
        return {"latents": self.latents[idx], "embeds": self.embeds[c], "mask": self.mask[c],
                "caption": [f"caption {int(i)}" for i in c], "index": idx}


def index_draws(index: torch.Tensor, step: int, shape: tuple[int, ...], caption_dropout: float = 0.25):
    """Flow-matching draws of each row from a generator seeded by (step, row index): rank-independent."""
    from sana_sprint.losses.flow_matching import FlowDraws

    t, eps, drop = [], [], []
    for i in index.tolist():
        g = torch.Generator().manual_seed(1000 * step + i)
        t.append(torch.sigmoid(torch.randn((), generator=g)))
        eps.append(torch.randn(shape, generator=g))
        drop.append(bool(torch.rand((), generator=g) < caption_dropout))
    return FlowDraws(torch.stack(t), torch.stack(eps), torch.tensor(drop))


def teacher_method(cfg, data: TeacherData):
    """The real TeacherMethod; only its loss draws come from the row indices (see index_draws)."""
    from sana_sprint.training import teacher as teacher_mod

    class IndexDrawTeacher(teacher_mod.TeacherMethod):
        def train_step(self, batch, step, opt):
            draws = index_draws(batch["index"], step, self.latent_shape)
            real = teacher_mod.flow_matching_loss
            teacher_mod.flow_matching_loss = functools.partial(real, draws=draws)
            try:
                return super().train_step(batch, step, opt)
            finally:
                teacher_mod.flow_matching_loss = real

    return IndexDrawTeacher(cfg, data, torch.device("cpu"))


def teacher_run(out: Path, steps: int, fsdp: bool, resume: bool = False):
    from sana_sprint.data.latents import LatentLoader
    from sana_sprint.training.config import TeacherConfig
    from sana_sprint.training.trainer import Trainer, seed_everything

    cfg = TeacherConfig.from_dict(dict(
        out=str(out), steps=steps, batch=BATCH, preset="tiny", model={}, max_length=LENGTH, resolution=IMAGE_SIZE,
        lr=3e-3, warmup=2, lr_schedule="cosine", ema_decay=0.9, grad_clip=CLIP, log_every=1, ckpt_every=2,
        keep_last=0, sample_every=0, progress=False, device="cpu", bf16=False, resume=resume,
        gradient_checkpointing=True, fsdp=fsdp))
    data = TeacherData()
    seed_everything(cfg.seed)
    method = teacher_method(cfg, data)
    trainer = Trainer(method, LatentLoader(data, cfg.batch, cfg.seed), cfg)
    trainer.fit()
    return method, trainer


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    name = f"ckpt-{step:07d}"
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)


def jvp_under_fsdp(world_size: int) -> dict[str, float]:
    """The sCM student JVP (torch.func.jvp, training/losses/scm.py) and a checkpointed gradient forward of
    an FSDP-sharded student against the same student unsharded, on the same inputs: max |difference|."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from sana_sprint.losses.scm import student_jvp
    from sana_sprint.models.wrapper import TrigFlowTransformer
    from sana_sprint.training.distributed import has_sharded
    from sana_sprint.training.fsdp import shard_module

    ref = tiny_transformer(guidance_embeds=True, seed=1).train()
    sharded = shard_module(copy.deepcopy(ref), init_device_mesh("cpu", (world_size,)))
    assert has_sharded(list(sharded.parameters()))
    for m in (ref, sharded):
        m.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    shape = (3, LATENT_CHANNELS, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    x_s, dxds = torch.randn(shape, generator=g) * 0.5, torch.randn(shape, generator=g)
    s = torch.tensor([0.3, 0.9, 1.4])
    ehs, mask, w = torch.randn(3, LENGTH, TEXT_HIDDEN, generator=g), torch.ones(3, LENGTH, dtype=torch.long), torch.tensor([4.0, 4.5, 5.0])
    out = {}
    (F_a, dF_a), (F_b, dF_b) = (student_jvp(TrigFlowTransformer(m), x_s, s, dxds, ehs, mask, w) for m in (ref, sharded))
    out["jvp_F"], out["jvp_dF"] = (F_b - F_a).abs().max().item(), (dF_b - dF_a).abs().max().item()
    out["dF_scale"] = dF_a.abs().max().item()
    for m in (ref, sharded):
        TrigFlowTransformer(m)(x_s / 0.5, s, ehs, mask, guidance=w).square().mean().backward()
    grads = [(p.grad, q.grad.full_tensor()) for p, q in zip(ref.parameters(), sharded.parameters())]
    out["grad"] = max((b - a).abs().max().item() for a, b in grads)
    return out


# --- the worker (one per rank) --------------------------------------------------------------------


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    from sana_sprint.training import distributed

    dist = distributed.setup("cpu")
    assert dist.world_size == 2, dist.world_size
    method, trainer = teacher_run(out / "fsdp", STEPS, fsdp=True)
    assert trainer.fsdp is not None
    params = list(method.transformer.parameters())
    shards = {
        "sharded": all(distributed.has_sharded([p]) for p in params),
        "local": sum(p.to_local().numel() for p in params),
        "full": sum(p.numel() for p in params),
        "opt_sharded": all(distributed.has_sharded([s["exp_avg"]]) for s in method.opt.state.values()),
    }
    info = {"shards": dist.gather_object(shards), "ema": dist.gather_object(digest(method.ema)),
            "jvp": jvp_under_fsdp(dist.world_size)}
    teacher_run(out / "resumed", 2, fsdp=True)  # stops after its step-2 checkpoint
    teacher_run(out / "resumed", STEPS, fsdp=True, resume=True)
    teacher_run(out / "from1", STEPS, fsdp=True, resume=True)  # from a 1-process checkpoint (put there by the test)
    if dist.is_main_process:
        (out / "result.json").write_text(json.dumps(info))
    dist.barrier()


# --- fast tests -----------------------------------------------------------------------------------


def test_wrap_policy_picks_exactly_the_transformer_blocks():
    from sana_sprint.training.fsdp import wrap_targets

    net = tiny_transformer(guidance_embeds=False)
    names = [n for n, _ in wrap_targets(net)]
    assert names == [f"transformer_blocks.{i}" for i in range(net.config.num_layers)]
    assert [m for _, m in wrap_targets(net)] == list(net.transformer_blocks)
    # outside the blocks (the root unit): embeddings, caption projection, output head
    in_blocks = {id(p) for b in net.transformer_blocks for p in b.parameters()}
    rest = [n for n, p in net.named_parameters() if id(p) not in in_blocks]
    assert rest and all(not n.startswith("transformer_blocks.") for n in rest)
    assert wrap_targets(torch.nn.Linear(2, 2)) == []


def test_fsdp_needs_a_method_that_names_its_modules():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_multiprocess import toy_method

    from sana_sprint.errors import UserError
    from sana_sprint.training.config import TrainerConfig
    from sana_sprint.training.trainer import Trainer

    with pytest.raises(UserError, match="does not support FSDP"):
        Trainer(toy_method(), iter([]), TrainerConfig(out="unused", device="cpu", fsdp=True))


def test_fsdp_on_one_process_is_the_plain_run(tmp_path):
    torch.set_num_threads(1)
    teacher_run(tmp_path / "plain", 2, fsdp=False)
    _, trainer = teacher_run(tmp_path / "fsdp", 2, fsdp=True)
    assert trainer.fsdp is None
    assert losses(tmp_path / "fsdp") == losses(tmp_path / "plain")
    a = checkpoint_tensors(tmp_path / "plain" / "checkpoints" / "ckpt-0000002")
    b = checkpoint_tensors(tmp_path / "fsdp" / "checkpoints" / "ckpt-0000002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- slow tests (two processes) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1-process references (in this process) and the 2-process FSDP runs (launched once)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fsdp")
    one = tmp / "one"
    teacher_run(one, STEPS, fsdp=False)
    out = tmp / "two"
    copy_checkpoint(one, 2, out / "from1")
    accelerate_launch(Path(__file__), out)
    return {"one": one, "two": out, "tmp": tmp}


def _opt_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt / "state.pt", weights_only=True)["optimizers"]["transformer"]
    return {f"{pid}.{k}": v for pid, s in state["state"].items() for k, v in s.items()}


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_with_the_global_batch(runs):
    one, two = runs["one"], runs["two"] / "fsdp"
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == STEPS  # one metrics row per step: written by the main process only
    print(f"losses: max relative |fsdp - 1-process| {np.max(np.abs(np.array(l2) - l1) / np.abs(l1)):.3g}")
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    read = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    g1, g2 = [r["grad_norm/transformer"] for r in read(one)], [r["grad_norm/transformer"] for r in read(two)]
    np.testing.assert_allclose(g2, g1, rtol=1e-5)  # the sharded global norm == the 1-process norm
    assert min(g1) > CLIP  # the clip acted on every step (after the reduction)
    c1 = one / "checkpoints" / f"ckpt-{STEPS:07d}"
    c2 = two / "checkpoints" / f"ckpt-{STEPS:07d}"
    w0 = checkpoint_tensors(one / "checkpoints" / "ckpt-0000002")
    w1, w2 = checkpoint_tensors(c1), checkpoint_tensors(c2)
    assert w1.keys() == w2.keys() and {k.split(".")[0] for k in w1} == {"transformer", "ema"}
    assert all(w1[k].shape == w2[k].shape and w1[k].dtype == w2[k].dtype for k in w1)  # full tensors, same format
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1 if w1[k].is_floating_point())
    dev = max((w2[k] - w1[k]).abs().max().item() for k in w1)
    print(f"weights after {STEPS} steps: max |fsdp - 1-process| {dev:.3g}; max change from step 2: {moved:.3g}")
    assert moved > 1e-3  # the weights really train
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    o1, o2 = _opt_tensors(c1), _opt_tensors(c2)  # Adam moments: gathered full tensors, 1-process layout
    assert o1.keys() == o2.keys() and len(o1) > 0
    rel = max(((o2[k] - o1[k]).abs().max() / o1[k].abs().max().clamp_min(1e-30)).item() for k in o1)
    print(f"optimiser state: max |fsdp - 1-process| / max |1-process| per tensor {rel:.3g}")
    for k in o1:
        assert o1[k].shape == o2[k].shape, k
        torch.testing.assert_close(o2[k], o1[k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_the_scm_jvp_composes_with_fsdp(runs):
    """torch.func.jvp through FSDP2's hooks gives the unsharded JVP (distillation itself refuses --fsdp:
    its sampling and export run the student on the main process only)."""
    jvp = json.loads((runs["two"] / "result.json").read_text())["jvp"]
    print("sharded vs unsharded student:", jvp)
    assert jvp["dF_scale"] > 1e-3
    assert jvp["jvp_F"] <= 1e-6 and jvp["jvp_dF"] <= 1e-6 and jvp["grad"] <= 1e-6


@pytest.mark.slow
def test_fsdp_shards_and_resumes_exactly(runs):
    res = json.loads((runs["two"] / "result.json").read_text())
    for s in res["shards"]:
        assert s["sharded"] and s["opt_sharded"]
        assert s["local"] < 0.6 * s["full"]  # each rank holds about half of every parameter
    assert sum(s["local"] for s in res["shards"]) == res["shards"][0]["full"]
    assert res["ema"][0] == res["ema"][1]  # the unsharded EMA stays identical on both ranks
    u, r = runs["two"] / "fsdp", runs["two"] / "resumed"
    assert losses(r) == losses(u)
    for step in (2, STEPS):
        a = checkpoint_tensors(u / "checkpoints" / f"ckpt-{step:07d}")
        b = checkpoint_tensors(r / "checkpoints" / f"ckpt-{step:07d}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        oa = _opt_tensors(u / "checkpoints" / f"ckpt-{step:07d}")
        ob = _opt_tensors(r / "checkpoints" / f"ckpt-{step:07d}")
        assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert not any(p.name.endswith((".tmp", ".old")) for p in (u / "checkpoints").iterdir())


@pytest.mark.slow
def test_fsdp_checkpoints_cross_load_with_one_process(runs):
    """FSDP ckpt -> 1-process resume, and 1-process ckpt -> FSDP resume: both end at the references."""
    torch.set_num_threads(1)
    ref = checkpoint_tensors(runs["one"] / "checkpoints" / f"ckpt-{STEPS:07d}")
    from2 = runs["tmp"] / "from2"
    copy_checkpoint(runs["two"] / "fsdp", 2, from2)
    teacher_run(from2, STEPS, fsdp=False, resume=True)
    from1 = runs["two"] / "from1"
    for run in (from2, from1):
        got = checkpoint_tensors(run / "checkpoints" / f"ckpt-{STEPS:07d}")
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=lambda m, k=k, run=run: f"{run.name} {k}: {m}")
        np.testing.assert_allclose(losses(run), losses(runs["one"])[2:], rtol=1e-5)


# --- distillation (distill --fsdp) ----------------------------------------------------------------


def distill_run(out: Path, steps: int, fsdp: bool, teacher_dir: Path, resume: bool = False, export: bool = True):
    """test_multiprocess.py's tiny sCM + LADD run (global batch 8, disc_group 2, checkpointing, clip),
    plus sample grids every 2 steps and the export (the parts that need every rank under FSDP)."""
    from test_multiprocess import DISC_GROUP, DISTILL_BATCH, DistillData

    from sana_sprint.data.latents import LatentLoader
    from sana_sprint.training.distill import DistillConfig, DistillMethod, SamplePrompts
    from sana_sprint.training.trainer import Trainer, seed_everything

    cfg = DistillConfig(out=str(out), steps=steps, batch=DISTILL_BATCH, log_every=1, ckpt_every=2, keep_last=0,
                        sample_every=2, sample_steps=[1, 2], progress=False, device="cpu", bf16=False, lr=1e-3,
                        lr_d=1e-3, grad_clip=1.0, tangent_warmup=0, resume=resume, gradient_checkpointing=True,
                        disc_group=DISC_GROUP, fsdp=fsdp, export=str(out / "export"))
    data = DistillData()
    seed_everything(cfg.seed)
    method = DistillMethod(cfg, tiny_transformer(guidance_embeds=False, seed=5), scaling_factor=0.41407,
                           latent_shape=(LATENT_CHANNELS, IMAGE_SIZE // 4, IMAGE_SIZE // 4), null=data.null,
                           prompts=SamplePrompts(data.embeds[:2], data.mask[:2], ["p0", "p1"]), teacher_dir=teacher_dir)
    trainer = Trainer(method, LatentLoader(data, cfg.batch, cfg.seed), cfg)
    if export:
        trainer.fit_and_export()
    else:
        trainer.fit()
    return method, trainer


def distill_worker(out: Path, teacher_dir: Path) -> None:
    torch.set_num_threads(1)
    from sana_sprint.training import distributed

    dist = distributed.setup("cpu")
    assert dist.world_size == 2, dist.world_size
    method, trainer = distill_run(out / "fsdp", STEPS, fsdp=True, teacher_dir=teacher_dir)
    assert trainer.fsdp is not None
    params = list(method.student.parameters())
    info = {
        "sharded": dist.gather_object(all(distributed.has_sharded([p]) for p in params)),
        "local": dist.gather_object(sum(p.to_local().numel() for p in params)),
        "full": sum(p.numel() for p in params),
        "class": type(method.student).__name__,
        "replicated": dist.gather_object(digest_all({"teacher": method.teacher.transformer, "heads": method.disc.heads})),
    }
    # The sharded student sampled by every rank vs the main process's full-weight copy alone.
    e, m = method.prompts.embeds[:2], method.prompts.masks[:2]
    sharded = method.sample(e, m, [3, 4], steps=2)
    with method.fsdp_unsharded(keep=dist.is_main_process) as student:
        if dist.is_main_process:
            assert type(student.transformer).__name__ == "SanaTransformer2DModel"
            plain = method.sample(e, m, [3, 4], steps=2)
            info["sample_diff"] = (plain - sharded).abs().max().item()
            info["sample_scale"] = sharded.abs().max().item()
    assert type(method.student).__name__.startswith("FSDP")  # the sharded student is back
    distill_run(out / "resumed", 2, fsdp=True, teacher_dir=teacher_dir, export=False)  # stops after step 2
    distill_run(out / "resumed", STEPS, fsdp=True, teacher_dir=teacher_dir, resume=True, export=False)
    if dist.is_main_process:
        (out / "result.json").write_text(json.dumps(info))
    dist.barrier()


def digest_all(modules) -> str:
    return hashlib.sha256("".join(digest(modules[k]) for k in sorted(modules)).encode()).hexdigest()


def test_distill_fsdp_refuses_the_controlnet_path():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_multiprocess import _tiny_distill

    from sana_sprint.errors import UserError

    torch.set_num_threads(1)
    method, _ = _tiny_distill(8)
    assert method.fsdp_modules() == {"student": method.student}
    method.control_train = "controlnet"  # what --controlnet sets (training/controlnet.py)
    with pytest.raises(UserError, match="--controlnet"):
        method.fsdp_modules()
    from sana_sprint.training.distill import DistillConfig

    with pytest.raises(UserError, match="fsdp: not supported with controlnet"):  # refused before any work
        DistillConfig.from_dict({**DistillConfig().to_dict(), "fsdp": True, "controlnet": "models/cn"})


def test_unsharded_copy_of_a_plain_model_is_an_equal_plain_copy():
    from diffusers import SanaTransformer2DModel

    from sana_sprint.training.fsdp import unsharded_copy

    net = tiny_transformer(guidance_embeds=True, seed=2).train()
    copy = unsharded_copy(net)
    assert type(copy) is SanaTransformer2DModel and copy is not net and copy.training
    a, b = net.state_dict(), copy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].data_ptr() != b[k].data_ptr() for k in a)
    assert unsharded_copy(net, keep=False) is None


@pytest.fixture(scope="module")
def distill_runs(tmp_path_factory):
    """A tiny teacher folder (for the export), the 1-process reference and the 2-process FSDP runs."""
    from conftest import MAX_LENGTH, save_tiny_pipeline, tiny_bert, tiny_tokenizer

    from sana_sprint.text import TextEncoder

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fsdp_distill")
    tok = tiny_tokenizer()
    teacher = save_tiny_pipeline(tmp / "teacher", TextEncoder(tok, tiny_bert(len(tok)), max_length=MAX_LENGTH),
                                 tiny_transformer(guidance_embeds=False, seed=5))
    one = tmp / "one"
    distill_run(one, STEPS, fsdp=False, teacher_dir=teacher)
    out = tmp / "two"
    accelerate_launch(Path(__file__), out, "distill", teacher)
    return {"one": one, "two": out, "teacher": teacher}


@pytest.mark.slow
def test_distill_fsdp_matches_one_process_with_the_global_batch(distill_runs):
    import re

    one, two = distill_runs["one"], distill_runs["two"] / "fsdp"
    r1, r2 = read_metrics(one), read_metrics(two)
    worst = assert_logged_scalars_match(
        r1, r2, STEPS, {"loss", "loss_scm", "loss_adv_g", "loss_d", "grad_norm/generator", "grad_norm/discriminator"})
    print("max relative deviation per logged key:", json.dumps(worst, indent=1))
    assert all(r["grad_norm/generator"] > 0 for r in r1)
    w0 = checkpoint_tensors(one / "checkpoints" / "ckpt-0000002")
    w1 = checkpoint_tensors(one / "checkpoints" / f"ckpt-{STEPS:07d}")
    w2 = checkpoint_tensors(two / "checkpoints" / f"ckpt-{STEPS:07d}")
    assert w1.keys() == w2.keys() and {k.split(".")[0] for k in w1} == {"student", "logvar", "disc_heads"}
    assert all(w1[k].shape == w2[k].shape and w1[k].dtype == w2[k].dtype for k in w1)  # full tensors
    pre_norm = re.compile(r"disc_heads\.\d+\.main\.(0|1\.fn)\.0\.bias")  # see test_multiprocess.py
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    dev = {bias: max((w2[k] - w1[k]).abs().max().item() for k in w1 if bool(pre_norm.fullmatch(k)) == bias)
           for bias in (False, True)}
    student = max((w2[k] - w1[k]).abs().max().item() for k in w1 if k.startswith("student."))
    print(f"weights after {STEPS} steps: max |fsdp - 1-process| {dev[False]:.3g} (student {student:.3g}; "
          f"pre-norm head biases {dev[True]:.3g}); max change from step 2: {moved:.3g}")
    assert moved > 1e-4
    for k in w1:
        atol = 2 * 1e-3 * STEPS if pre_norm.fullmatch(k) else 1e-5
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    ckpt = lambda run: torch.load(run / "checkpoints" / f"ckpt-{STEPS:07d}" / "state.pt", weights_only=True)  # noqa: E731
    o1, o2 = ckpt(one)["optimizers"]["generator"]["state"], ckpt(two)["optimizers"]["generator"]["state"]
    assert o1.keys() == o2.keys() and len(o1) > 0  # the sharded generator's Adam moments, gathered, 1-process layout
    rel = max(((o2[i][k] - o1[i][k]).abs().max() / o1[i][k].abs().max().clamp_min(1e-30)).item()
              for i in o1 for k in ("exp_avg", "exp_avg_sq"))
    print(f"generator Adam moments: max |fsdp - 1-process| / max |1-process| per tensor {rel:.3g}")
    for i in o1:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o2[i][k], o1[i][k], rtol=1e-4, atol=1e-7, msg=lambda m, i=i, k=k: f"{i}.{k}: {m}")
    for run in (one, two):  # the main process wrote the sample grids (every rank took part under FSDP)
        assert all((run / "samples" / f"step-{s:07d}.png").is_file() for s in (2, STEPS))


@pytest.mark.slow
def test_distill_fsdp_exports_a_plain_student_and_samples_like_the_shards(distill_runs):
    from diffusers import SanaTransformer2DModel
    from safetensors.torch import load_file

    two = distill_runs["two"] / "fsdp"
    res = json.loads((distill_runs["two"] / "result.json").read_text())
    print("sharded student sampled by both ranks vs the main process's full copy:", res["sample_diff"],
          "scale", res["sample_scale"])
    assert res["class"].startswith("FSDP")  # the trained student really was an FSDP module
    assert res["sample_scale"] > 1e-2 and res["sample_diff"] <= 1e-6
    export = two / "export"
    config = json.loads((export / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SanaTransformer2DModel"
    assert json.loads((export / "sprint_config.json").read_text())["kind"] == "student"
    loaded = SanaTransformer2DModel.from_pretrained(export / "transformer")
    assert type(loaded) is SanaTransformer2DModel
    saved = load_file(str(export / "transformer" / "diffusion_pytorch_model.safetensors"))
    ckpt = checkpoint_tensors(two / "checkpoints" / f"ckpt-{STEPS:07d}")
    student = {k.removeprefix("student."): v for k, v in ckpt.items() if k.startswith("student.")}
    assert saved.keys() == student.keys() == loaded.state_dict().keys()
    for k, v in student.items():  # the export is the gathered weights (fp16), bit for bit
        assert saved[k].dtype == torch.float16 and torch.equal(saved[k], v.to(torch.float16)), k
        assert torch.equal(loaded.state_dict()[k].to(torch.float16), saved[k]), k


@pytest.mark.slow
def test_distill_fsdp_shards_the_student_and_resumes_exactly(distill_runs):
    res = json.loads((distill_runs["two"] / "result.json").read_text())
    assert res["sharded"] == [True, True]
    assert all(n < 0.6 * res["full"] for n in res["local"]) and sum(res["local"]) == res["full"]
    assert res["replicated"][0] == res["replicated"][1]  # teacher and heads identical on both ranks
    u, r = distill_runs["two"] / "fsdp", distill_runs["two"] / "resumed"
    assert losses(r) == losses(u) and len(losses(u)) == STEPS and all(np.isfinite(losses(u)))
    for step in (2, STEPS):
        a = checkpoint_tensors(u / "checkpoints" / f"ckpt-{step:07d}")
        b = checkpoint_tensors(r / "checkpoints" / f"ckpt-{step:07d}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        sa = torch.load(u / "checkpoints" / f"ckpt-{step:07d}" / "state.pt", weights_only=True)["optimizers"]
        sb = torch.load(r / "checkpoints" / f"ckpt-{step:07d}" / "state.pt", weights_only=True)["optimizers"]
        for name in ("generator", "discriminator"):
            for pid, st in sa[name]["state"].items():
                assert all(torch.equal(v, sb[name]["state"][pid][k]) for k, v in st.items() if torch.is_tensor(v))
    assert not any(p.name.endswith((".tmp", ".old")) for p in (u / "checkpoints").iterdir())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if len(sys.argv) > 2 and sys.argv[2] == "distill":
        distill_worker(Path(sys.argv[1]), Path(sys.argv[3]))
    else:
        worker(Path(sys.argv[1]))
