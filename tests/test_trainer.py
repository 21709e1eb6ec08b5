"""Trainer infrastructure: EMA closed form, non-finite skip, clipping, multi-optimiser methods, run outputs, configs."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from sana_sprint.training.config import ConfigError, TeacherConfig, TrainerConfig
from sana_sprint.training.ema import EMA
from sana_sprint.training.trainer import Method, Stepper, Trainer, seed_everything


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    s0 = copy.deepcopy(net.state_dict())
    d = 0.9
    ema = EMA(net, d)
    seq = []
    for _ in range(7):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        seq.append(copy.deepcopy(net.state_dict()))
        ema.update(net)
    n = len(seq)
    for k in s0:
        # shadow_n = d^n s0 + sum_k (1 - d) d^(n - k) p_k
        ref = d**n * s0[k] + sum((1 - d) * d ** (n - 1 - i) * seq[i][k] for i in range(n))
        torch.testing.assert_close(ema.shadow.state_dict()[k], ref, rtol=1e-12, atol=1e-12)
    assert int(ema.num_updates) == n
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def test_ema_warmup_matches_product_form_and_forgets_a_zero_start():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    s0 = copy.deepcopy(net.state_dict())
    d = 0.95
    ema = EMA(net, d, warmup=True)
    seq = []
    for _ in range(200):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        seq.append(copy.deepcopy(net.state_dict()))
        ema.update(net)
    decays = [min(d, (1 + i) / (10 + i)) for i in range(len(seq))]
    assert decays[0] == 0.1 and decays[-1] == d  # warm-up reaches the cap inside the run
    for k in s0:
        # independent recursion in float64: s_{i+1} = d_i s_i + (1 - d_i) p_i
        ref = s0[k].clone()
        for di, state in zip(decays, seq):
            ref = di * ref + (1 - di) * state[k]
        torch.testing.assert_close(ema.shadow.state_dict()[k], ref, rtol=1e-12, atol=1e-12)
    # the start's weight is prod(d_i); with a fixed 0.999 it would be 0.999^700 ~ 0.50
    warm = EMA(torch.nn.Linear(1, 1), 0.999, warmup=True)
    weight_of_start = 1.0
    for _ in range(700):
        weight_of_start *= warm.current_decay()
        warm.num_updates += 1
    assert weight_of_start < 0.01 < 0.999**700


class ToyMethod(Method):
    """Linear regression with optional NaN injection: step -> "loss" or "grad"."""

    def __init__(self, inject=None, lr=0.1, optim="adam"):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.ema = EMA(self.net, 0.5)
        cls = torch.optim.Adam if optim == "adam" else torch.optim.SGD
        self.opt = cls(self.net.parameters(), lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + s))
        self.inject = inject or {}
        self.gen = torch.Generator().manual_seed(0)
        self.samples = 0

    def state_modules(self):
        return {"net": self.net, "ema": self.ema}

    def optimizers(self):
        return {"net": self.opt}

    def schedulers(self):
        return {"net": self.sched}

    def generators(self):
        return {"g": self.gen}

    def train_step(self, batch, step, opt):
        x, y = batch
        keep = torch.randperm(len(x))[:6]  # global RNG and the method's generator both shape the update
        x, y = x[keep], y[keep] + 0.1 * torch.randn(6, generator=self.gen)
        loss = (self.net(x).squeeze(-1) - y).pow(2).mean()
        kind = self.inject.get(step)
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":
            self.net.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        if opt.step(loss, "net"):
            self.ema.update(self.net)
        if kind == "grad":
            self.net.weight._backward_hooks.clear()
        return {"loss": loss.detach()}

    def sample_grid(self, path):
        self.samples += 1
        torch.rand(100)  # must not change training randomness
        torch.rand(100, generator=self.gen)
        path.write_bytes(b"png")


def _data():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, generator=g)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield x, x @ w


def _snapshot(method):
    return (copy.deepcopy(method.net.state_dict()), copy.deepcopy(method.opt.state_dict()),
            copy.deepcopy(method.ema.state_dict()), method.sched.last_epoch)


def _equal_states(a, b):
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, list | tuple):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return eq(a, b)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_state_untouched(tmp_path, kind):
    cfg = TrainerConfig(out=str(tmp_path), steps=3, progress=False, log_every=1, ckpt_every=100, sample_every=0, bf16=False)
    m = ToyMethod(inject={3: kind})
    tr = Trainer(m, _data(), cfg)
    tr.fit()
    before = _snapshot(m)
    tr.config = cfg.replace(steps=4)
    tr.fit()  # step index 3 is poisoned
    after = _snapshot(m)
    assert _equal_states(before, after)
    assert tr.stepper.skipped["net"] == 1 and tr.stepper.steps["net"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped/net"] == 1
    tr.config = cfg.replace(steps=5)
    tr.fit()  # and training goes on normally afterwards
    assert not _equal_states(after, _snapshot(m)) and tr.stepper.steps["net"] == 4


def test_gradient_clipping_bounds_the_update():
    net = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    st = Stepper({"n": opt}, {}, grad_clip=0.5, device_type="cpu")
    w0 = net.weight.detach().clone()
    loss = 100 * net(torch.ones(1, 3)).sum()  # grad = 100 * ones, norm 173
    assert st.step(loss, "n")
    assert st.last_grad_norm["n"] == pytest.approx(100 * 3**0.5, rel=1e-5)
    assert float((net.weight.detach() - w0).norm()) == pytest.approx(0.5, rel=1e-4)
    w1 = net.weight.detach().clone()
    assert st.step(1e-3 * net(torch.ones(1, 3)).sum(), "n")  # small grads are not scaled up
    assert float((net.weight.detach() - w1).norm()) == pytest.approx(1e-3 * 3**0.5, rel=1e-4)
    with pytest.raises(ValueError, match="scalar"):
        st.step(net(torch.ones(2, 3)).squeeze(-1), "n")


class GanLikeMethod(Method):
    """Two optimisers stepped alternately in one train_step: each must only move its own network."""

    def __init__(self):
        torch.manual_seed(0)
        self.g, self.d = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        self.og = torch.optim.SGD(self.g.parameters(), lr=0.1)
        self.od = torch.optim.SGD(self.d.parameters(), lr=0.1)

    def state_modules(self):
        return {"g": self.g, "d": self.d}

    def optimizers(self):
        return {"generator": self.og, "discriminator": self.od}

    def train_step(self, batch, step, opt):
        if step % 2 == 0:
            loss = -self.d(self.g(batch)).mean()  # grads reach d too; only g may move
            opt.step(loss, "generator")
        else:
            loss = (self.d(self.g(batch).detach()) - 1).pow(2).mean()
            opt.step(loss, "discriminator")
        return {"loss": loss}


def test_alternating_optimisers_only_move_their_own_weights(tmp_path):
    m = GanLikeMethod()
    d0, g0 = copy.deepcopy(m.d.state_dict()), copy.deepcopy(m.g.state_dict())
    data = iter(lambda: torch.ones(4, 2), None)
    tr = Trainer(m, data, TrainerConfig(out=str(tmp_path), steps=1, progress=False, sample_every=0))
    tr.fit()
    assert _equal_states(d0, m.d.state_dict()) and not _equal_states(g0, m.g.state_dict())
    g1 = copy.deepcopy(m.g.state_dict())
    tr.config = tr.config.replace(steps=2)
    tr.fit()
    assert _equal_states(g1, m.g.state_dict()) and not _equal_states(d0, m.d.state_dict())
    assert dict(tr.stepper.steps) == {"generator": 1, "discriminator": 1}


def test_run_directory_outputs(tmp_path):
    cfg = TrainerConfig(out=str(tmp_path / "run"), steps=6, progress=True, log_every=2, ckpt_every=2,
                        keep_last=2, sample_every=3, seed=3)
    m = ToyMethod()
    Trainer(m, _data(), cfg).fit()
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all({"loss", "lr/net", "it_per_s", "grad_norm/net"} <= r.keys() for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-0000004", "ckpt-0000006"]
    assert m.samples == 2


def test_sampling_does_not_change_training(tmp_path):
    a, b = ToyMethod(), ToyMethod()
    seed_everything(0)
    Trainer(a, _data(), TrainerConfig(out=str(tmp_path / "a"), steps=5, progress=False, sample_every=1)).fit()
    seed_everything(0)
    Trainer(b, _data(), TrainerConfig(out=str(tmp_path / "b"), steps=5, progress=False, sample_every=0)).fit()
    assert a.samples == 5 and _equal_states(a.net.state_dict(), b.net.state_dict())


# --- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("steps", 0), ("lr", -1.0), ("batch", 0), ("caption_dropout", 1.0), ("ema_decay", 1.5), ("lr_schedule", "linear"),
     ("resolution", 60), ("model", {"num_layerz": 3}), ("device", "tpu"), ("steps", "many"), ("bf16", "maybe")],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TeacherConfig.from_dict({field: value})


def test_unknown_field_and_json_file(tmp_path):
    with pytest.raises(ConfigError, match="stepz"):
        TeacherConfig.from_dict({"stepz": 3})
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 7, "lr": 1e-3}))
    cfg = TeacherConfig.from_json(f, {"lr": 2e-3})
    assert cfg.steps == 7 and cfg.lr == 2e-3 and cfg.batch == TeacherConfig().batch


def test_cli_flags_override_file_and_dry_run(tmp_path, capsys):
    from sana_sprint.training import teacher

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 7, "lr": 1e-3, "batch": 32}))
    p = argparse.ArgumentParser()
    teacher.add_args(p)
    args = p.parse_args(["--config", str(f), "--lr", "3e-4", "--no-bf16", "--model", '{"num_layers": 4}', "--dry-run"])
    assert teacher.run(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["lr"] == 3e-4 and printed["batch"] == 32
    assert printed["bf16"] is False and printed["model"] == {"num_layers": 4}
    with pytest.raises(ConfigError, match="lr"):
        teacher.run(p.parse_args(["--lr", "0", "--dry-run"]))


def test_time_limit_stops_with_a_checkpoint_and_resume_continues(tmp_path):
    cfg = TrainerConfig(out=str(tmp_path), steps=50, progress=False, sample_every=0, ckpt_every=100,
                        max_minutes=1e-9)
    tr = Trainer(ToyMethod(), _data(), cfg)
    assert tr.fit() == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt-0000001"]
    tr2 = Trainer(ToyMethod(), _data(), cfg.replace(max_minutes=0.0, resume=True, steps=3))
    assert tr2.fit() == 3


def test_stop_at_checkpoints_at_that_step_and_resume_matches_one_uninterrupted_run(tmp_path):
    full = ToyMethod()
    Trainer(full, _data(), TrainerConfig(out=str(tmp_path / "a"), steps=30, progress=False, sample_every=0,
                                         ckpt_every=100)).fit()
    cfg = TrainerConfig(out=str(tmp_path / "b"), steps=30, stop_at=12, progress=False, sample_every=0, ckpt_every=100)
    first = ToyMethod()
    assert Trainer(first, _data(), cfg).fit() == 12
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["ckpt-0000012"]
    assert first.sched.last_epoch == 12
    second = ToyMethod()
    assert Trainer(second, _data(), cfg.replace(stop_at=0, resume=True)).fit() == 30
    assert _equal_states(_snapshot(second), _snapshot(full))
    with pytest.raises(ConfigError, match="stop_at"):
        TrainerConfig(out="x", steps=10, stop_at=11).validate()


def test_resume_with_an_earlier_stop_at_restores_that_checkpoint_not_the_newest(tmp_path, caplog):
    # one run to step 30 with checkpoints at 10, 20, 30; a second run stopped at 20 from scratch is the reference
    cfg = TrainerConfig(out=str(tmp_path / "a"), steps=30, progress=False, sample_every=0, ckpt_every=10)
    Trainer(ToyMethod(), _data(), cfg).fit()
    at20 = ToyMethod()
    Trainer(at20, _data(), cfg.replace(out=str(tmp_path / "b"), stop_at=20)).fit()
    again = ToyMethod()
    with caplog.at_level("INFO", logger="sana_sprint.training.trainer"):
        assert Trainer(again, _data(), cfg.replace(stop_at=20, resume=True)).fit() == 20
    assert _equal_states(_snapshot(again), _snapshot(at20))
    assert "restoring ckpt-0000020" in caplog.text and "ckpt-0000030" in caplog.text
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names == ["ckpt-0000010", "ckpt-0000020", "ckpt-0000030"]  # nothing rewritten or pruned
    # without stop_at the newest one still wins; a stop_at before every checkpoint starts fresh
    later = ToyMethod()
    assert Trainer(later, _data(), cfg.replace(resume=True)).fit() == 30
    early = ToyMethod()  # (each method is made right before its run: a run draws from the global RNG)
    assert Trainer(early, _data(), cfg.replace(resume=True, stop_at=5)).fit() == 5
    ref5 = ToyMethod()
    Trainer(ref5, _data(), cfg.replace(out=str(tmp_path / "c"), stop_at=5)).fit()
    assert _equal_states(_snapshot(early), _snapshot(ref5))
