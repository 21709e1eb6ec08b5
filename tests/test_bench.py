"""``sana-sprint bench`` on tiny saved student/teacher folders: JSON + markdown, outputs equal diffusers'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import IMAGE_SIZE, MAX_LENGTH, tiny_transformer, tiny_vae

from sana_sprint import benchmarks, cli
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer, bert):
    root = tmp_path_factory.mktemp("bench")
    for kind, guidance in (("student", True), ("teacher", False)):
        SprintPipeline(
            TextEncoder(tokenizer, bert, max_length=MAX_LENGTH),
            tiny_transformer(guidance_embeds=guidance, seed=1),
            tiny_vae(seed=2),
            {"kind": kind, "resolution": IMAGE_SIZE},
        ).save_pretrained(root / kind)
    return root / "student", root / "teacher"


def test_schedule_matches_diffusers_defaults():
    assert benchmarks.sprint_schedule(2) == [1.5708, 1.3, 0.0]
    assert benchmarks.sprint_schedule(1) == [1.5708, 0.0]
    ts = benchmarks.sprint_schedule(4)
    assert len(ts) == 5 and ts[0] == 1.5708 and ts[-1] == 0 and abs(ts[2] - 1.5708 / 2) < 1e-12


def test_bench_cli_writes_rows_and_table(folders, tmp_path, capsys):
    student, teacher = folders
    out = tmp_path / "bench.json"
    code = cli.main(
        ["bench", "--model", str(student), "--steps-list", "1,2,4", "--batches", "1,2",
         "--repeats", "1", "--warmup", "0", "--bf16", "off", "--compare-plain", "--out", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["name"], r["steps"], r["batch"]) for r in rows] == [
        ("sprint-1step", 1, 1), ("sprint-1step", 1, 2), ("sprint-2step", 2, 1), ("sprint-2step", 2, 2),
        ("sprint-4step", 4, 1), ("sprint-4step", 4, 2),
    ]
    for r in rows:
        assert r["ours_ms"] > 0 and r["diffusers_ms"] > 0 and r["ours_plain_ms"] > 0
        assert r["ratio"] == pytest.approx(r["ours_ms"] / r["diffusers_ms"], rel=1e-3)
        for side in ("ours", "diffusers"):
            parts = r[side]
            assert all(parts[k] >= 0 for k in benchmarks.COMPONENTS)
            assert parts["transformer_ms"] > 0 and parts["vae_ms"] > 0 and parts["text_ms"] > 0
        if r["name"].startswith("sprint"):  # always here; teacher rows have None
            # Same weights, schedule and generators as diffusers: the same images (uint8 rounding).
            assert r["max_pixel_diff"] <= 1 / 255
    assert result["settings"]["student"]["ours"]["inference_mode"] is True
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| sprint-") == 6 and "| sprint-4step | 4 | 2 |" in table
    assert "wrote" in capsys.readouterr().out


def test_transformer_calls_are_counted(folders):
    """The component split sees every forward: 20 teacher steps with CFG cost more than 1 student step."""
    student, teacher = folders
    result = benchmarks.run_bench(student, teacher, steps_list=(1,), batches=(1,), repeats=1, warmup=0,
                                  device="cpu", fast_options={"bf16": "off"}, log=lambda m: None)
    one, twenty = result["rows"]
    assert twenty["name"] == "teacher-20step" and twenty["max_pixel_diff"] is None
    assert twenty["ours"]["transformer_ms"] > 3 * one["ours"]["transformer_ms"]
    assert twenty["diffusers"]["transformer_ms"] > 3 * one["diffusers"]["transformer_ms"]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--steps-list", "0"], "steps-list"),
        (["--steps-list", "a"], "steps-list"),
        (["--batches", ""], "batches"),
        (["--repeats", "0"], "repeats"),
        (["--out", "x.txt"], ".json"),
        (["--model", "/nonexistent/folder"], "not found"),
        (["--diffusers-dtype", "fp16"], "diffusers-dtype"),
    ],
)
def test_bench_argument_errors(capsys, tmp_path, folders, args, match):
    base = ["bench", "--model", str(folders[0]), "--out", str(tmp_path / "b.json")]
    code = cli.main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0]


def test_bench_refuses_swapped_kinds(capsys, tmp_path, folders):
    student, teacher = folders
    code = cli.main(["bench", "--model", str(teacher), "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "kind is 'teacher'" in err


def test_runs_are_interleaved_in_rotating_order():
    """Each repeat runs every side once and the first side rotates, so load drifts hit all sides alike."""
    import torch

    order = []

    def side(name):
        return (lambda: order.append(name) or name, benchmarks._Clock(torch.device("cpu")), lambda: None)

    out = benchmarks._interleaved_runs([side("a"), side("b"), side("c")], repeats=3, warmup=1)
    assert order == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [o for _, o, _ in out] == ["a", "b", "c"]
    assert all(med["total_ms"] >= 0 and set(benchmarks.COMPONENTS) <= set(med) for med, _, _ in out)
    assert all(first is not None and first >= 0 for _, _, first in out)  # the first warm-up call, timed apart
    assert all(first is None for _, _, first in benchmarks._interleaved_runs([side("a")], repeats=1, warmup=0))


def test_markdown_reports_compile_time_separately():
    row = {"name": "sprint-1step", "steps": 1, "batch": 1, "ours_ms": 10.0, "diffusers_ms": 20.0, "ratio": 0.5,
           "ours_img_s": 100.0, "diffusers_img_s": 50.0, "ours_first_call_ms": 31000.0, "diffusers_first_call_ms": 12000.0,
           **{side: dict.fromkeys(benchmarks.COMPONENTS, 1.0) for side in ("ours", "diffusers")}}
    settings = {"repeats": 3, "warmup": 1, "device": "cpu", "threads": 1, "torch": "x", "diffusers": "y"}
    plain = benchmarks.markdown({"rows": [row], "settings": {**settings, "student": {"ours": {"compile": False}}}})
    compiled = benchmarks.markdown({"rows": [row], "settings": {**settings, "student": {"ours": {"compile": True}}}})
    assert "torch.compile" not in plain
    assert "torch.compile" in compiled and "ours 31.0 s, diffusers 12.0 s" in compiled


def test_bench_fast_path_flags(folders, tmp_path):
    student, _ = folders
    settings = {}
    for flags in ([], ["--no-linear-convs", "--no-trim-text"]):
        out = tmp_path / f"b{len(flags)}.json"
        code = cli.main(["bench", "--model", str(student), "--steps-list", "1", "--batches", "1", "--repeats", "1",
                         "--warmup", "0", "--bf16", "off", *flags, "--out", str(out)])
        assert code == 0
        result = json.loads(out.read_text())
        settings[len(flags)] = result["settings"]["student"]["ours"]
        row = result["rows"][0]
        assert {"name", "steps", "batch", "ours_ms", "diffusers_ms", "ratio"} <= set(row)
        assert row["max_pixel_diff"] <= 1 / 255
    assert settings[0]["linear_convs"] is True and settings[0]["trim_text"] is True
    assert settings[2]["linear_convs"] is False and settings[2]["trim_text"] is False


@pytest.mark.parametrize(
    "flags,compiled",
    [([], True), (["--warmup", "0"], False), (["--no-compile"], False), (["--compile", "--warmup", "0"], True)],
)
def test_bench_compiles_by_default_when_warmup_absorbs_it(monkeypatch, folders, tmp_path, flags, compiled):
    seen = {}

    def fake_run_bench(model, teacher, steps_list, batches, repeats, warmup, device, options, **kw):
        seen.update(options, warmup=warmup, compile_diffusers=kw["compile_diffusers"])
        return {"rows": [], "settings": {"repeats": repeats, "warmup": warmup, "device": "cpu", "threads": 1,
                                         "torch": "x", "diffusers": "y"}}

    monkeypatch.setattr(benchmarks, "run_bench", fake_run_bench)
    code = cli.main(["bench", "--model", str(folders[0]), "--out", str(tmp_path / "b.json"), *flags])
    assert code == 0 and seen["compile"] is compiled and seen["compile_diffusers"] is False


def test_diffusers_in_both_dtypes_the_faster_is_the_baseline(folders):
    """With fp32 and bf16 diffusers both timed, the row's baseline is the faster; pixels compare with fp32."""
    student, _ = folders
    result = benchmarks.run_bench(student, None, steps_list=(1,), batches=(2,), repeats=2, warmup=1, device="cpu",
                                  fast_options={"bf16": "off", "compile": False}, log=lambda m: None,
                                  diffusers_dtype="fp32,bf16")
    (row,) = result["rows"]
    by = row["diffusers_by_dtype"]
    assert set(by) == {"fp32", "bf16"} and result["settings"]["student"]["diffusers_dtypes"] == ["fp32", "bf16"]
    assert row["diffusers_ms"] == min(by.values()) and by[row["diffusers_dtype"]] == row["diffusers_ms"]
    assert row["ratio"] == pytest.approx(row["ours_ms"] / row["diffusers_ms"], rel=1e-3)
    assert row["max_pixel_diff_vs"] == "diffusers fp32" and row["max_pixel_diff"] <= 1 / 255
    assert row["diffusers_dtype"] in benchmarks.markdown(result)


def test_diffusers_dtypes_auto(monkeypatch):
    import torch

    from sana_sprint import fast

    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: False)
    assert benchmarks.diffusers_dtypes(torch.device("cpu")) == ("fp32",)
    assert benchmarks.diffusers_dtypes(torch.device("cuda")) == ("fp32", "bf16")
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: True)
    assert benchmarks.diffusers_dtypes(torch.device("cpu")) == ("fp32", "bf16")
    assert benchmarks.diffusers_dtypes(torch.device("cpu"), "bf16, bf16") == ("bf16",)


def test_distill_cost_profile_reports_the_step_ops(tmp_path, capsys):
    """benchmarks/distill_cost.py --profile: the teacher forward is the unit, and the profiled G step's
    top ops are the model's own (matrix products), counted per call."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # spawned phases re-import it by name
    import distill_cost as mod
    out = tmp_path / "dc.json"
    assert mod.main(["--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "1", "--threads", "1",
                     "--device", "cpu", "--phases", "g_step_both", "--profile", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["teacher_forward"]["teacher_forwards"] == 1.0
    prof = res["g_step_both"]["profile"]
    assert prof["calls"] == 2 and prof["sort"] == "self_cpu_time_total" and len(prof["top"]) == 12
    ops = {r["op"]: r for r in prof["top"]}
    assert any(k in ops for k in ("aten::mm", "aten::addmm", "aten::bmm"))
    assert all(r["self_ms_per_call"] > 0 and r["count_per_call"] > 0 for r in prof["top"])
    assert "top ops by self_cpu_time_total" in capsys.readouterr().out
