"""scripts/task_vector.py: student + alpha (new - old) against a float64 reference, name matching, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import task_vector  # noqa: E402

from sana_sprint.models.presets import student_key  # noqa: E402

TEACHER_TIME = "time_embed.emb.timestep_embedder.linear_1.weight"
STUDENT_TIME = "time_embed.timestep_embedder.linear_1.weight"
GUIDANCE = "time_embed.guidance_embedder.linear_1.weight"


def _teacher(seed: int, dtype=torch.float16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.w": torch.randn(6, 5, generator=g).to(dtype), TEACHER_TIME: torch.randn(4, 3, generator=g).to(dtype)}


def _student(old: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = {student_key(k): (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
         for k, v in old.items()}
    s[GUIDANCE] = torch.randn(4, 3, generator=g).to(torch.float16)
    return s


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, -0.3])
def test_matches_float64_arithmetic_and_leaves_student_only_weights(alpha):
    old, new = _teacher(0), _teacher(1)
    stud = _student(old, 2)
    out, stats = task_vector.apply_task_vector(stud, old, new, alpha)
    assert set(out) == set(stud) and torch.equal(out[GUIDANCE], stud[GUIDANCE])
    for k in old:
        sk = student_key(k)
        ref = stud[sk].double() + alpha * (new[k].double() - old[k].double())
        assert out[sk].dtype == stud[sk].dtype
        assert torch.allclose(out[sk].double(), ref, rtol=1e-3, atol=1e-3)  # one fp16 rounding
        if alpha == 0.0:
            assert torch.equal(out[sk], stud[sk])
    assert stats["student_only"] == [GUIDANCE]
    # the statistics against their definitions
    task = torch.cat([(new[k].double() - old[k].double()).flatten() for k in old])
    own = torch.cat([(stud[student_key(k)].double() - old[k].double()).flatten() for k in old])
    assert stats["task_norm"] == pytest.approx(float(task.norm()), rel=1e-12)
    assert stats["student_delta_norm"] == pytest.approx(float(own.norm()), rel=1e-12)
    assert stats["cosine"] == pytest.approx(float(task @ own / (task.norm() * own.norm())), rel=1e-10)


def test_a_student_equal_to_the_old_teacher_becomes_the_new_one():
    old, new = _teacher(0, torch.float32), _teacher(1, torch.float32)
    stud = {student_key(k): v.clone() for k, v in old.items()}
    out, stats = task_vector.apply_task_vector(stud, old, new, 1.0)
    for k in old:
        assert torch.allclose(out[student_key(k)], new[k], atol=1e-6)
    assert stats["student_delta_norm"] == 0.0 and stats["cosine"] == 0.0


def test_refuses_mismatched_weights():
    old, new = _teacher(0), _teacher(1)
    stud = _student(old, 2)
    with pytest.raises(ValueError, match="different parameters"):
        task_vector.apply_task_vector(stud, old, {**new, "extra": torch.zeros(1)}, 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        task_vector.apply_task_vector(stud, old, {**new, "blocks.0.w": torch.zeros(5, 6)}, 1.0)
    with pytest.raises(ValueError, match="lacks"):
        task_vector.apply_task_vector({GUIDANCE: stud[GUIDANCE]}, old, new, 1.0)


def _folder(root: Path, weights: dict) -> Path:
    (root / "transformer").mkdir(parents=True)
    save_file(weights, str(root / task_vector.WEIGHTS))
    (root / "sprint_config.json").write_text(json.dumps({"kind": "x"}))
    return root


def test_script_writes_a_full_folder_and_refuses_user_mistakes(tmp_path, capsys):
    old, new = _teacher(0), _teacher(1)
    stud = _student(old, 2)
    s, o, n = _folder(tmp_path / "s", stud), _folder(tmp_path / "o", old), _folder(tmp_path / "n", new)
    out = tmp_path / "out"
    assert task_vector.main(["--student", str(s), "--old", str(o), "--new", str(n), "--alpha", "0.5", "--out", str(out)]) == 0
    got = load_file(out / task_vector.WEIGHTS)
    ref, _ = task_vector.apply_task_vector(stud, old, new, 0.5)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert (out / "sprint_config.json").is_file()
    assert json.loads((out / "task_vector.json").read_text())["alpha"] == 0.5
    # the student folder itself is untouched
    assert all(torch.equal(load_file(s / task_vector.WEIGHTS)[k], stud[k]) for k in stud)
    capsys.readouterr()
    assert task_vector.main(["--student", str(s), "--old", str(o), "--new", str(n), "--out", str(s)]) == 2
    assert task_vector.main(["--student", str(s), "--old", str(o), "--new", str(n), "--out", str(n)]) == 2
    assert torch.equal(load_file(n / task_vector.WEIGHTS)["blocks.0.w"], new["blocks.0.w"])  # the teacher survives
    (tmp_path / "other").mkdir()
    assert task_vector.main(["--student", str(s), "--old", str(o), "--new", str(n), "--out", str(tmp_path / "other")]) == 2
    # an earlier output of the script is replaced
    assert task_vector.main(["--student", str(s), "--old", str(o), "--new", str(n), "--alpha", "1", "--out", str(out)]) == 0
    assert json.loads((out / "task_vector.json").read_text())["alpha"] == 1.0
    assert task_vector.main(["--student", str(tmp_path / "none"), "--old", str(o), "--out", str(out)]) == 2
    _folder(tmp_path / "bad", {**new, "blocks.0.w": torch.zeros(2, 2, dtype=torch.float16)})
    assert task_vector.main(["--student", str(s), "--old", str(o), "--new", str(tmp_path / "bad"), "--out",
                             str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "must differ from --student" in err and "must differ from --new" in err and "not overwriting" in err
    assert "no transformer" in err and "shape mismatch" in err
    assert not (tmp_path / "o2").exists()
