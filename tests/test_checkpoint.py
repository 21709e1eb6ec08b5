"""Checkpoints: full round trip (modules, optimisers, schedulers, RNGs), atomicity, keep-last-K."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from sana_sprint.training import checkpoint as ckpt


def _setup(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    gen = torch.Generator().manual_seed(123)
    return net, opt, sched, gen


def _train(net, opt, sched, gen, n):
    for _ in range(n):
        x = torch.randn(16, 4, generator=gen) + torch.randn(16, 4) + float(np.random.rand()) + random.random()
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _draws(gen):
    return (random.random(), float(np.random.rand()), torch.rand(3), torch.rand(3, generator=gen))


def test_round_trip_continues_exactly(tmp_path):
    net, opt, sched, gen = _setup()
    _train(net, opt, sched, gen, 3)
    ckpt.save_checkpoint(tmp_path, 3, modules={"net": net}, optimizers={"opt": opt}, schedulers={"s": sched},
                         generators={"g": gen}, extra={"counter": 7}, config={"lr": 1e-2})
    _train(net, opt, sched, gen, 2)
    ref_state = {k: v.clone() for k, v in net.state_dict().items()}
    ref_draws = _draws(gen)

    net2, opt2, sched2, gen2 = _setup(seed=99)  # different init, different RNG position
    torch.rand(5)
    out = ckpt.load_checkpoint(tmp_path / "ckpt-0000003", modules={"net": net2}, optimizers={"opt": opt2},
                               schedulers={"s": sched2}, generators={"g": gen2})
    assert out == {"step": 3, "extra": {"counter": 7}}
    assert sched2.last_epoch == 3
    _train(net2, opt2, sched2, gen2, 2)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    d2 = _draws(gen2)
    assert d2[0] == ref_draws[0] and d2[1] == ref_draws[1]
    assert torch.equal(d2[2], ref_draws[2]) and torch.equal(d2[3], ref_draws[3])
    assert ckpt.read_meta(tmp_path / "ckpt-0000003")["config"] == {"lr": 1e-2}


def test_dtypes_kept(tmp_path):
    m = torch.nn.Linear(3, 3)
    ckpt.save_checkpoint(tmp_path, 1, modules={"m": m})
    m2 = torch.nn.Linear(3, 3)
    ckpt.load_checkpoint(tmp_path / "ckpt-0000001", modules={"m": m2})
    assert m2.weight.dtype == torch.float32 and torch.equal(m2.weight, m.weight)


def test_keep_last_and_latest(tmp_path):
    m = torch.nn.Linear(2, 2)
    assert ckpt.latest_checkpoint(tmp_path) is None
    for s in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, s, modules={"m": m}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-0000030", "ckpt-0000040"]
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-0000040"
    ckpt.save_checkpoint(tmp_path, 40, modules={"m": m}, keep_last=2)  # re-save the same step
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-0000040"


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    m = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 1, modules={"m": m})

    def boom(*a, **k):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, modules={"m": m})
    monkeypatch.undo()
    assert (tmp_path / "ckpt-0000002.tmp").is_dir()
    assert not (tmp_path / "ckpt-0000002").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-0000001"
    # a directory with the right name but no meta.json (half copied by hand) is not a checkpoint either
    os.makedirs(tmp_path / "ckpt-0000009")
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-0000001"
    ckpt.save_checkpoint(tmp_path, 3, modules={"m": m})
    assert not (tmp_path / "ckpt-0000002.tmp").exists()  # the leftover is cleaned up


def test_missing_entries_are_errors(tmp_path):
    m = torch.nn.Linear(2, 2)
    g = torch.Generator()
    ckpt.save_checkpoint(tmp_path, 1, modules={"m": m})
    p = tmp_path / "ckpt-0000001"
    with pytest.raises(KeyError, match="other"):
        ckpt.load_checkpoint(p, modules={"other": m})
    with pytest.raises(KeyError, match="g"):
        ckpt.load_checkpoint(p, generators={"g": g})
    with pytest.raises(RuntimeError):  # wrong shapes: strict load
        ckpt.load_checkpoint(p, modules={"m": torch.nn.Linear(3, 2)})
