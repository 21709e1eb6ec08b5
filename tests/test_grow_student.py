"""scripts/grow_student.py: appended blocks are the identity (float64, against the source model), still train,
and the CLI writes a loadable folder and refuses to overwrite what it did not write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_transformer
from diffusers import SanaTransformer2DModel
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import grow_student  # noqa: E402


def _inputs(model: SanaTransformer2DModel, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(3, c.in_channels, c.sample_size, c.sample_size, generator=g, dtype=torch.float64)
    text = torch.randn(3, 5, c.caption_channels, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.6, 1.5], dtype=torch.float64)
    return dict(hidden_states=x, encoder_hidden_states=text, timestep=t, guidance=torch.tensor([4.0, 4.5, 5.0]).double())


def _grown(model: SanaTransformer2DModel, add: int) -> SanaTransformer2DModel:
    state = grow_student.grow(model.state_dict(), model.config.num_layers, add)
    out = SanaTransformer2DModel(**{**dict(model.config), "num_layers": model.config.num_layers + add}).double()
    out.load_state_dict(state, strict=True)
    return out.eval()


@pytest.mark.parametrize("add", [1, 3])
def test_grown_student_computes_the_same_map_in_float64(add):
    src = tiny_transformer(seed=3).double()
    big = _grown(src, add)
    assert len(big.transformer_blocks) == len(src.transformer_blocks) + add
    inputs = _inputs(src)
    with torch.no_grad():
        want, got = src(**inputs).sample, big(**inputs).sample
    assert want.abs().mean() > 0.01
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # not vacuous: the new block is a copy of the last block (not zeros), and perturbing an output projection
    # changes the output, so identity comes from the zeroed residual outputs alone
    last, new = src.transformer_blocks[-1], big.transformer_blocks[-1]
    assert torch.equal(new.attn1.to_q.weight, last.attn1.to_q.weight) and new.attn1.to_q.weight.abs().sum() > 0
    with torch.no_grad():
        new.ff.conv_point.weight.normal_(0, 0.1)
        assert (big(**inputs).sample - want).abs().max() > 1e-3


def test_zeroed_outputs_receive_gradients():
    big = _grown(tiny_transformer(seed=4).double(), 2)
    big(**_inputs(big, 1)).sample.square().mean().backward()
    for block in big.transformer_blocks[-2:]:
        for p in (block.attn1.to_out[0].weight, block.attn2.to_out[0].weight, block.ff.conv_point.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_grow_refuses_bad_arguments():
    state = tiny_transformer(seed=1).state_dict()
    with pytest.raises(ValueError, match="must be >= 1"):
        grow_student.grow(state, 2, 0)
    with pytest.raises(ValueError, match="more than num_layers"):
        grow_student.grow(state, 1, 1)
    with pytest.raises(ValueError, match="no parameters"):
        grow_student.grow(state, 5, 1)


def test_cli_writes_a_loadable_folder_and_refuses_foreign_outputs(tmp_path, capsys):
    src = tmp_path / "student"
    model = tiny_transformer(seed=2).to(torch.float16)
    model.save_pretrained(src / "transformer")
    (src / "sprint_config.json").write_text(json.dumps({"kind": "student"}))
    out = tmp_path / "grown"
    assert grow_student.main([str(src), "--add", "2", "--out", str(out)]) == 0
    grown = SanaTransformer2DModel.from_pretrained(out / "transformer")
    assert grown.config.num_layers == model.config.num_layers + 2
    weights = load_file(str(out / grow_student.WEIGHTS))
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert json.loads((out / "grow_student.json").read_text())["num_layers"] == [2, 4]
    assert (out / "sprint_config.json").is_file()
    assert grow_student.main([str(src), "--add", "1", "--out", str(out)]) == 0  # its own output: replaced
    assert SanaTransformer2DModel.from_pretrained(out / "transformer").config.num_layers == 3

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    assert grow_student.main([str(src), "--out", str(foreign)]) == 2
    assert grow_student.main([str(src), "--out", str(src)]) == 2
    assert grow_student.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    (src / grow_student.CONFIG).write_text(json.dumps({"_class_name": "SanaTransformer2DModel"}))  # no num_layers
    assert grow_student.main([str(src), "--out", str(tmp_path / "z")]) == 2
    save_file({"a": torch.zeros(1)}, str(src / grow_student.WEIGHTS))  # weights that are not a Sana transformer
    assert grow_student.main([str(src), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()
    err = capsys.readouterr().err
    assert "must differ" in err and "not overwriting" in err and "no parameters" in err
