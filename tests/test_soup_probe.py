"""scripts/soup_probe.py: the group-wise midpoint against a float64 reference, and its refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import soup_probe  # noqa: E402
import weight_average  # noqa: E402


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"time_embed.timestep_embedder.linear_1.weight": torch.randn(4, 3, generator=g).to(torch.float16),
            "transformer_blocks.0.attn1.to_q.weight": torch.randn(3, 3, generator=g).to(torch.bfloat16),
            "transformer_blocks.0.ff.conv_inverted.weight": torch.randn(5, generator=g)}


def test_mix_replaces_only_the_picked_group_by_the_float64_midpoint():
    a, b = _state(0), _state(1)
    for name, picked in [("time_embed.timestep_embedder.linear_1", {"time_embed.timestep_embedder.linear_1.weight"}),
                         ("blocks: attn1", {"transformer_blocks.0.attn1.to_q.weight"}),
                         ("blocks: ff", {"transformer_blocks.0.ff.conv_inverted.weight"}), ("none", set()), ("all", set(a))]:
        got = soup_probe.mix(a, weight_average.average([a, b]), soup_probe.GROUPS[name])
        for k in a:
            assert got[k].dtype == a[k].dtype
            ref = ((a[k].double() + b[k].double()) / 2).to(a[k].dtype) if k in picked else a[k]
            torch.testing.assert_close(got[k], ref, rtol=0, atol=0)
        assert sum(not torch.equal(got[k], a[k]) for k in a) == len(picked)


def test_refuses_missing_or_mismatched_folders(tmp_path, capsys):
    for name, state in [("a", _state(0)), ("b", {**_state(1), "extra": torch.zeros(1)})]:
        (tmp_path / name / "transformer").mkdir(parents=True)
        save_file(state, str(tmp_path / name / soup_probe.WEIGHTS))
    assert soup_probe.main(["--base", str(tmp_path / "a"), "--other", str(tmp_path / "b"), "--work", str(tmp_path / "w")]) == 2
    assert "other parameters" in capsys.readouterr().err
    assert soup_probe.main(["--base", str(tmp_path / "a"), "--other", str(tmp_path / "nope"), "--work", str(tmp_path / "w")]) == 2
    assert "no transformer" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
