"""Resume is exact: a run SIGKILLed after a checkpoint and resumed ends bit-identical to a straight run.

Teacher: the real TeacherMethod (tiny preset, bf16 autocast, EMA, LR schedule, caption dropout, sample
grids) in subprocesses; this file is also the worker (``python test_resume.py WORKER_ARGS``).

Distillation: the real ``sana-sprint distill`` entry point (``distill.main --config``: teacher folder,
latent cache, sCM + LADD, both optimisers, sample grids, export) in forked children (no second torch
import), one of them SIGKILLed between its generator and discriminator updates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

STEPS, CKPT_EVERY, KILL_AT = 8, 4, 6


def _worker(cache: str, out: str, resume: bool, kill_at: int) -> None:
    torch.set_num_threads(1)
    from sana_sprint.data.latents import LatentDataset
    from sana_sprint.training.config import TeacherConfig
    from sana_sprint.training.teacher import TeacherMethod
    from sana_sprint.training.trainer import Trainer, seed_everything

    cfg = TeacherConfig.from_dict(dict(
        out=out, preset="tiny", model={}, steps=STEPS, batch=4, lr=1e-3, warmup=3, ckpt_every=CKPT_EVERY,
        log_every=1, sample_every=3, sample_steps=2, sample_count=2, progress=False, resume=resume, seed=7,
        caption_dropout=0.3, ema_decay=0.9, bf16=True,  # the autocast path, even where bf16 is slow
    ))
    data = LatentDataset(cache)
    seed_everything(cfg.seed)
    method = TeacherMethod(cfg, data, torch.device("cpu"))
    if kill_at >= 0:
        inner = method.train_step

        def train_step(batch, step, opt):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return inner(batch, step, opt)

        method.train_step = train_step
    Trainer(method, data.loader(cfg.batch, cfg.seed), cfg).fit()


def _run(cache, out, resume=False, kill_at=-1):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, __file__, str(cache), str(out), str(int(resume)), str(kill_at)],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def cache(tmp_path, vae, text_encoder):
    from conftest import IMAGE_SIZE

    from sana_sprint.data.latents import build_latent_cache

    return build_latent_cache("shapes", vae, text_encoder, 16, tmp_path / "cache", batch=8, size=IMAGE_SIZE,
                              progress=False)


def _final_state(run: Path):
    ck = run / "checkpoints" / f"ckpt-{STEPS:07d}"
    mods = {name: load_file(str(ck / "modules" / f"{name}.safetensors")) for name in ("transformer", "ema")}
    state = torch.load(ck / "state.pt", weights_only=True)
    return mods, state


def _assert_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _losses(run: Path):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_sigkill_and_resume_is_bit_identical(tmp_path, cache):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = _run(cache, straight)
    assert r.returncode == 0, r.stderr

    r = _run(cache, killed, kill_at=KILL_AT)
    assert r.returncode == -signal.SIGKILL, r.stderr
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == [f"ckpt-{CKPT_EVERY:07d}"]
    assert len(_losses(killed)) == KILL_AT  # logged past the checkpoint before dying

    r = _run(cache, killed, resume=True)
    assert r.returncode == 0, r.stderr

    mods_a, state_a = _final_state(straight)
    mods_b, state_b = _final_state(killed)
    _assert_equal(mods_a, mods_b, "modules")
    _assert_equal(state_a["optimizers"], state_b["optimizers"], "optimizers")
    _assert_equal(state_a["schedulers"], state_b["schedulers"], "schedulers")
    _assert_equal(state_a["rng"]["generators"], state_b["rng"]["generators"], "generators")
    _assert_equal(state_a["extra"]["data"], state_b["extra"]["data"], "data position")
    assert _losses(straight) == _losses(killed)  # metrics after the checkpoint were dropped, then re-logged
    # the weights really moved (the comparison is not vacuous)
    first = load_file(str(killed / "checkpoints" / f"ckpt-{STEPS:07d}" / "modules" / "transformer.safetensors"))
    assert any(not torch.equal(v, mods_a["ema"]["shadow." + k]) for k, v in first.items())


# --- distillation ----------------------------------------------------------------------------------

D_STEPS, D_CKPT_EVERY, D_KILL_AT = 6, 3, 5


def _distill_child(config: Path, kill_at: int = -1) -> int:
    """Run ``distill.main(["--config", config])`` in a forked child; its exit code (-9 = SIGKILL).

    With ``kill_at >= 0`` the child SIGKILLs itself inside trainer step ``kill_at``: after the generator
    update (the student and its optimiser have moved in memory), before the discriminator update.
    """
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            from sana_sprint.training import distill

            if kill_at >= 0:
                inner = distill.DistillMethod.generator_step

                def generator_step(self, x0, ehs, mask, step, opt):
                    logs = inner(self, x0, ehs, mask, step, opt)
                    if step == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return logs

                distill.DistillMethod.generator_step = generator_step
            code = distill.main(["--config", str(config)])
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def distill_setup(tmp_path, cache, vae, tokenizer, bert):
    """(teacher folder, cache) for a tiny distillation: a random tiny teacher saved as a pipeline folder."""
    import matplotlib
    from conftest import IMAGE_SIZE, MAX_LENGTH, tiny_transformer

    from sana_sprint.pipeline import SprintPipeline
    from sana_sprint.text import TextEncoder

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported once here, not in every forked child's first save)

    from sana_sprint.training import distill  # noqa: F401

    folder = tmp_path / "teacher"
    SprintPipeline(TextEncoder(tokenizer, bert, max_length=MAX_LENGTH), tiny_transformer(guidance_embeds=False, seed=5),
                   vae, {"kind": "teacher", "resolution": IMAGE_SIZE}).save_pretrained(folder)
    return folder, cache


def _distill_config(path: Path, teacher: Path, cache: Path, out: Path, resume: bool = False) -> Path:
    path.write_text(json.dumps(dict(
        out=str(out), teacher=str(teacher), data=str(cache), loss="both", steps=D_STEPS, batch=4, lr=1e-3, lr_d=1e-3,
        grad_clip=1.0, tangent_warmup=4,  # r changes every step: the restored step counter matters
        ckpt_every=D_CKPT_EVERY, keep_last=0, log_every=1, sample_every=2, sample_steps=[1, 2], sample_count=2,
        progress=False, resume=resume, seed=3, bf16=False, threads=1, export=str(out / "export"),
    )))
    return path


def _distill_final(run: Path):
    ck = run / "checkpoints" / f"ckpt-{D_STEPS:07d}"
    mods = {name: load_file(str(ck / "modules" / f"{name}.safetensors")) for name in ("student", "logvar", "disc_heads")}
    return mods, torch.load(ck / "state.pt", weights_only=True)


def test_distill_sigkill_mid_step_and_resume_is_bit_identical(tmp_path, distill_setup):
    teacher, cache = distill_setup
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _distill_child(_distill_config(tmp_path / "a.json", teacher, cache, straight)) == 0

    assert _distill_child(_distill_config(tmp_path / "b.json", teacher, cache, killed), kill_at=D_KILL_AT) == -signal.SIGKILL
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == [f"ckpt-{D_CKPT_EVERY:07d}"]
    assert len(_losses(killed)) == D_KILL_AT  # logged past the checkpoint before dying
    assert not (killed / "export").exists()

    assert _distill_child(_distill_config(tmp_path / "c.json", teacher, cache, killed, resume=True)) == 0

    mods_a, state_a = _distill_final(straight)
    mods_b, state_b = _distill_final(killed)
    _assert_equal(mods_a, mods_b, "modules")  # student, logvar head, discriminator heads
    assert sorted(state_a["optimizers"]) == ["discriminator", "generator"]
    _assert_equal(state_a["optimizers"], state_b["optimizers"], "optimizers")
    _assert_equal(state_a["rng"], state_b["rng"], "rng")  # python, numpy, torch and the distill generator
    _assert_equal(state_a["extra"]["data"], state_b["extra"]["data"], "data position")
    _assert_equal(state_a["extra"]["stepper"], state_b["extra"]["stepper"], "stepper counters")
    assert state_b["extra"]["stepper"]["steps"] == {"generator": D_STEPS, "discriminator": D_STEPS}
    assert state_a["step"] == state_b["step"] == D_STEPS
    rows_a = [json.loads(r) for r in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in (killed / "metrics.jsonl").read_text().splitlines()]
    keys = [k for k in rows_a[0] if k.startswith(("loss", "scm/", "ladd/", "grad_norm/"))]
    assert {"loss", "loss_scm", "loss_adv_g", "loss_d"} <= set(keys)
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
    exp_a = load_file(str(straight / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    exp_b = load_file(str(killed / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    _assert_equal(exp_a, exp_b, "export")
    # not vacuous: the student left the teacher and the heads moved after the checkpoint
    t = load_file(str(teacher / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(v.float(), mods_a["student"][k]) for k, v in t.items())
    mid = load_file(str(killed / "checkpoints" / f"ckpt-{D_CKPT_EVERY:07d}" / "modules" / "disc_heads.safetensors"))
    assert any(not torch.equal(v, mods_a["disc_heads"][k]) for k, v in mid.items())


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], bool(int(sys.argv[3])), int(sys.argv[4]))


def test_plain_distill_continues_from_a_student_folder(tmp_path, distill_setup):
    """student_init without a ControlNet: the student starts as the folder's transformer (as exported),
    the teacher stays the target; a folder that is not a matching student is refused."""
    from sana_sprint.errors import ModelFolderError
    from sana_sprint.training.distill import DistillConfig, build

    teacher, cache = distill_setup
    base = dict(teacher=str(teacher), data=str(cache), batch=4, progress=False, threads=1, sample_count=2)
    cfg = DistillConfig(out=str(tmp_path / "a"), **base)
    cfg.validate()
    method, _ = build(cfg, torch.device("cpu"))
    with torch.no_grad():
        for p in method.student.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = method.export(tmp_path / "student")
    saved = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))

    cfg2 = DistillConfig(out=str(tmp_path / "b"), student_init=str(folder), **base)
    cfg2.validate()
    cont, _ = build(cfg2, torch.device("cpu"))
    got = cont.student.transformer.state_dict()
    assert set(saved) == set(got)
    for k, v in saved.items():
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=0)
    teacher_sd = cont.teacher.transformer.state_dict()
    shared = [k for k in teacher_sd if k in got and got[k].shape == teacher_sd[k].shape]
    moved = [k for k in shared if not torch.equal(teacher_sd[k], got[k])]
    assert len(shared) > 10 and len(moved) > len(shared) // 2  # the target is still the teacher, not the student
    assert {id(p) for g in cont.opt_g.param_groups for p in g["params"]} >= {id(p) for p in cont.student.transformer.parameters()}

    out = cont.export(tmp_path / "continued")
    assert json.loads((out / "sprint_config.json").read_text())["distill"]["student_init"] == str(folder)

    with pytest.raises(ModelFolderError, match="expected a distilled 'student'"):
        build(DistillConfig(out=str(tmp_path / "c"), student_init=str(teacher), **base), torch.device("cpu"))


def test_distill_continues_from_a_grown_student_and_refuses_a_shallower_one(tmp_path, distill_setup):
    """A student with more blocks than the teacher (scripts/grow_student.py) starts from its own weights and
    exports its own depth; one with fewer blocks than the teacher is refused."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import grow_student

    from sana_sprint.errors import ModelFolderError
    from sana_sprint.training.distill import DistillConfig, build, load_student_base

    teacher, cache = distill_setup
    base = dict(teacher=str(teacher), data=str(cache), batch=4, progress=False, threads=1, sample_count=2)
    method, _ = build(DistillConfig(out=str(tmp_path / "a"), **base), torch.device("cpu"))
    folder = method.export(tmp_path / "student")
    assert grow_student.main([str(folder), "--add", "1", "--out", str(tmp_path / "grown")]) == 0
    grown = load_file(str(tmp_path / "grown" / grow_student.WEIGHTS))

    cont, _ = build(DistillConfig(out=str(tmp_path / "b"), student_init=str(tmp_path / "grown"), **base),
                    torch.device("cpu"))
    layers = cont.teacher.transformer.config.num_layers
    assert len(cont.student.transformer.transformer_blocks) == layers + 1
    got = cont.student.transformer.state_dict()
    assert set(got) == set(grown)
    for k, v in grown.items():
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=0)
    out = cont.export(tmp_path / "continued")
    assert json.loads((out / "transformer" / "config.json").read_text())["num_layers"] == layers + 1

    deeper_teacher = SimpleNamespace(config={**dict(cont.teacher.transformer.config), "num_layers": layers + 2})
    with pytest.raises(ModelFolderError, match="num_layers"):
        load_student_base(tmp_path / "grown", deeper_teacher)
