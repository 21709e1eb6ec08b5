"""scripts/weight_average.py: the weighted mean against a float64 reference, dtypes, the folder copy, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import weight_average  # noqa: E402


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a.w": torch.randn(5, 3, generator=g).to(torch.float16), "b.bias": torch.randn(7, generator=g).to(torch.bfloat16)}


def _folder(root: Path, name: str, state: dict) -> Path:
    f = root / name
    (f / "transformer").mkdir(parents=True)
    save_file(state, str(f / weight_average.WEIGHTS))
    (f / "sprint_config.json").write_text(json.dumps({"kind": "student", "name": name}))
    return f


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_weighted_mean_matches_float64(weights):
    states = [_state(i) for i in range(3)]
    got = weight_average.average(states, weights)
    w = [1.0, 1.0, 1.0] if weights is None else weights
    for k in states[0]:
        ref = sum(torch.tensor(wi, dtype=torch.float64) * s[k].double() for wi, s in zip(w, states)) / sum(w)
        assert got[k].dtype == states[0][k].dtype
        torch.testing.assert_close(got[k], ref.to(states[0][k].dtype), rtol=0, atol=0)
        assert not torch.equal(got[k], states[0][k])


def test_cli_writes_a_full_folder_and_refuses_mistakes(tmp_path, capsys):
    a, b = _folder(tmp_path, "a", _state(0)), _folder(tmp_path, "b", _state(1))
    out = tmp_path / "soup"
    assert weight_average.main([str(a), str(b), "--out", str(out)]) == 0
    got = load_file(out / weight_average.WEIGHTS)
    ref = weight_average.average([_state(0), _state(1)])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert json.loads((out / "sprint_config.json").read_text())["name"] == "a"
    assert json.loads((out / "weight_average.json").read_text())["folders"] == [str(a), str(b)]
    assert weight_average.main([str(a), str(b), "--out", str(out)]) == 0  # its own output may be replaced
    other = dict(_state(2))
    other["c"] = torch.zeros(1)
    c = _folder(tmp_path, "c", other)
    for args, msg in [([str(a), str(c)], "other parameters"), ([str(a)], "at least two"),
                      ([str(a), str(tmp_path / "nope")], "no transformer"), ([str(a), str(b), "--weights", "1,x"], "--weights"),
                      ([str(a), str(b), "--weights", "1,2,3"], "one weight")]:
        assert weight_average.main([*args, "--out", str(tmp_path / "o2")]) == 2
        assert msg in capsys.readouterr().err
    assert weight_average.main([str(a), str(b), "--out", str(a)]) == 2  # never overwrite an input
    assert weight_average.main([str(a), str(b), "--out", str(tmp_path)]) == 2  # nor a folder it did not write
