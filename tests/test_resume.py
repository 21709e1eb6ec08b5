"""Resume is exact: a teacher run SIGKILLed after a checkpoint and resumed ends bit-identical to a straight run.

Runs the real TeacherMethod (tiny preset, bf16 autocast, EMA, LR schedule, caption dropout, sample
grids) in subprocesses; this file is also the worker (``python test_resume.py WORKER_ARGS``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], bool(int(sys.argv[3])), int(sys.argv[4]))
