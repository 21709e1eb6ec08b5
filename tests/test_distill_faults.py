"""Numerical faults in distillation: a non-finite generator or discriminator loss or gradient skips that update.

The skipped update leaves its weights and optimiser state bit-identical, is counted per optimiser
(``skipped/generator``, ``skipped/discriminator`` in the metrics and in checkpoints), and the other
update of the same step and the following steps still train.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import LATENT, train_batch

from sana_sprint.losses import ladd as ladd_lib
from sana_sprint.text import TextEncoder
from sana_sprint.training import checkpoint as ckpt
from sana_sprint.training.distill import DistillConfig, DistillMethod, load_teacher_folder
from sana_sprint.training.trainer import Stepper, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _method(folder, te: TextEncoder, **overrides) -> DistillMethod:
    cfg = DistillConfig(**{"out": "unused", "loss": "both", "batch": 3, "lr": 1e-3, "lr_d": 1e-3, "grad_clip": 1.0,
                           "tangent_warmup": 0, "bf16": False, "progress": False, "sample_every": 0, **overrides})
    cfg.validate()
    teacher, vae, _ = load_teacher_folder(folder, "cpu")
    torch.manual_seed(0)
    return DistillMethod(cfg, teacher, scaling_factor=vae.config.scaling_factor, latent_shape=LATENT,
                         null=te.null_embedding())


def _params(method: DistillMethod, which: str) -> dict[str, torch.Tensor]:
    if which == "generator":
        mods = {"student": method.student.transformer, "logvar": method.student.logvar_linear}
    else:
        mods = {"heads": method.disc.heads}
    return {f"{m}.{k}": p.detach().clone() for m, mod in mods.items() for k, p in mod.named_parameters()}


def _opt_state(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _inject(method: DistillMethod, monkeypatch, target: str, fault: str):
    """Make the ``target`` update's loss (``nan_loss``, ``inf_loss``) or one of its gradients (``inf_grad``) non-finite."""
    if fault in ("nan_loss", "inf_loss"):
        bad = math.nan if fault == "nan_loss" else math.inf
        if target == "generator":
            inner = method.generator_loss

            def generator_loss(*a, **k):
                loss, logs = inner(*a, **k)
                return loss * bad, logs

            monkeypatch.setattr(method, "generator_loss", generator_loss)
        else:
            inner_d = ladd_lib.discriminator_loss

            def discriminator_loss(*a, **k):
                loss, logs = inner_d(*a, **k)
                return loss + bad, logs

            monkeypatch.setattr(ladd_lib, "discriminator_loss", discriminator_loss)
        return None
    opt = method.opt_g if target == "generator" else method.opt_d
    p = opt.param_groups[0]["params"][-1]
    return p.register_hook(lambda g: torch.full_like(g, math.inf))


@pytest.mark.parametrize("target", ["generator", "discriminator"])
@pytest.mark.parametrize("fault", ["nan_loss", "inf_loss", "inf_grad"])
def test_non_finite_update_is_skipped_and_state_untouched(teacher_folder, text_encoder, monkeypatch, target, fault):
    method = _method(teacher_folder, text_encoder)
    stepper = Stepper(method.optimizers(), {}, method.cfg.grad_clip, "cpu")
    batch = train_batch(text_encoder)
    method.train_step(batch, 0, stepper)  # a normal step first: both optimisers hold moment estimates
    other = "discriminator" if target == "generator" else "generator"
    opt, opt_other = method.optimizers()[target], method.optimizers()[other]
    before, before_other = _params(method, target), _params(method, other)
    state, state_other = _opt_state(opt), _opt_state(opt_other)

    with monkeypatch.context() as mp:
        hook = _inject(method, mp, target, fault)
        logs = method.train_step(batch, 1, stepper)
        if hook is not None:
            hook.remove()

    key = "skipped_g" if target == "generator" else "skipped_d"
    assert logs[key] == 1.0 and logs["skipped_d" if key == "skipped_g" else "skipped_g"] == 0.0
    assert stepper.skipped == {target: 1}
    assert stepper.steps == {target: 1, other: 2}
    after = _params(method, target)
    assert all(torch.equal(before[k], after[k]) for k in before), "skipped update changed weights"
    assert _same(state, _opt_state(opt)), "skipped update changed optimiser state"
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])  # no stale gradients left behind
    # the other update of the same step still trained
    after_other = _params(method, other)
    assert any(not torch.equal(before_other[k], after_other[k]) for k in before_other)
    assert not _same(state_other, _opt_state(opt_other))
    # and training goes on: the next step moves the target's weights again
    logs = method.train_step(batch, 2, stepper)
    assert logs[key] == 0.0 and stepper.steps[target] == 2
    assert any(not torch.equal(before[k], v) for k, v in _params(method, target).items())
    assert all(torch.isfinite(v).all() for v in _params(method, target).values())


def test_nan_batch_skips_both_updates(teacher_folder, text_encoder):
    """A batch with a NaN latent (bad data): both losses are NaN, both updates skipped, nothing moves."""
    method = _method(teacher_folder, text_encoder)
    stepper = Stepper(method.optimizers(), {}, method.cfg.grad_clip, "cpu")
    method.train_step(train_batch(text_encoder), 0, stepper)
    before = {w: _params(method, w) for w in ("generator", "discriminator")}
    states = {w: _opt_state(o) for w, o in method.optimizers().items()}
    bad = train_batch(text_encoder, seed=1)
    bad["latents"][1, 0, 2, 3] = math.nan
    logs = method.train_step(bad, 1, stepper)
    assert logs["skipped_g"] == logs["skipped_d"] == 1.0
    assert math.isnan(logs["loss"]) and math.isnan(logs["loss_d"])
    assert stepper.skipped == {"generator": 1, "discriminator": 1}
    for w, o in method.optimizers().items():
        now = _params(method, w)
        assert all(torch.equal(before[w][k], now[k]) for k in now), w
        assert _same(states[w], _opt_state(o)), w
    # spectral-norm power-iteration vectors advanced in the D forward but stay finite
    assert all(torch.isfinite(b).all() for b in method.disc.heads.buffers())


def test_skips_are_logged_checkpointed_and_training_continues(tmp_path, teacher_folder, text_encoder, monkeypatch):
    """Through the Trainer: a NaN generator loss at step 2 and an inf discriminator gradient at step 3."""
    method = _method(teacher_folder, text_encoder, out=str(tmp_path / "run"), steps=5, log_every=1, ckpt_every=5)
    inner_g, inner_d = method.generator_step, method.discriminator_step
    hooks = []

    def generator_step(x0, ehs, mask, step, opt):
        if step == 1:
            inner = method.generator_loss
            monkeypatch.setattr(method, "generator_loss", lambda *a, **k: (lambda lg: (lg[0] * math.nan, lg[1]))(inner(*a, **k)))
            try:
                return inner_g(x0, ehs, mask, step, opt)
            finally:
                monkeypatch.setattr(method, "generator_loss", inner)
        if step == 2:
            hooks.append(method.disc.heads[0].cls.parametrizations.weight.original.register_hook(
                lambda g: torch.full_like(g, math.inf)))
        return inner_g(x0, ehs, mask, step, opt)

    def discriminator_step(x0, ehs, mask, opt):
        try:
            return inner_d(x0, ehs, mask, opt)
        finally:
            while hooks:
                hooks.pop().remove()

    monkeypatch.setattr(method, "generator_step", generator_step)
    monkeypatch.setattr(method, "discriminator_step", discriminator_step)
    batch = train_batch(text_encoder)
    trainer = Trainer(method, iter(lambda: batch, None), method.cfg, torch.device("cpu"))
    assert trainer.fit() == 5
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["skipped_g"] for r in rows] == [0, 1, 0, 0, 0]
    assert [r["skipped_d"] for r in rows] == [0, 0, 1, 0, 0]
    assert [r.get("skipped/generator", 0) for r in rows] == [0, 1, 1, 1, 1]
    assert [r.get("skipped/discriminator", 0) for r in rows] == [0, 0, 1, 1, 1]
    assert math.isnan(rows[1]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 1)
    state = torch.load(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / "state.pt", weights_only=True)
    assert state["extra"]["stepper"] == {"skipped": {"generator": 1, "discriminator": 1},
                                         "steps": {"generator": 4, "discriminator": 4}}
    for w in ("generator", "discriminator"):
        assert all(torch.isfinite(v).all() for v in _params(method, w).values())
        assert all(torch.isfinite(t).all() for st in method.optimizers()[w].state.values() for t in st.values())
