"""``make reproduce`` (scripts/reproduce.py) and the teacher ``--sampler`` of ``sana-sprint eval`` (paper Table 1).

Fast: the TrigFlow-Euler teacher against an independent reference loop and its convergence to flow Euler;
the plan (dedupe, exactly one switch per ablation, checked with the real distill parser); caching and
resume with a fake executor; tables and orderings from synthetic JSON whose means and spreads are
computed here with numpy. Slow: the whole ``--budget smoke`` pipeline on tiny random models.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MAX_LENGTH, tiny_transformer, tiny_vae

from sana_sprint import cli
from sana_sprint.evaluation import run as R
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.sampling import randn
from sana_sprint.text import TextEncoder

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod
    spec.loader.exec_module(mod)
    return mod


rp = _load_script()
BASE = json.loads((ROOT / "configs" / "shapes-distill.json").read_text())


# --- the TrigFlow-Euler teacher sampler -------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_pipe(tokenizer, bert):
    text = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    return SprintPipeline(text, tiny_transformer(guidance_embeds=False, seed=3), tiny_vae(),
                          {"kind": "teacher", "resolution": 32})


def _noise(pipe, n, seed=0):
    return randn((n, 4, 8, 8), [torch.Generator().manual_seed(seed + i) for i in range(n)])


def test_trigflow_euler_teacher_matches_an_independent_loop(teacher_pipe):
    """Reference: CFG on the raw velocity, Prop. 3.1 written out in float64, Euler in s."""
    pipe = R.with_sampler(teacher_pipe, "trigflow-euler")
    assert R.sampler_name(pipe) == "trigflow-euler" and R.sampler_name(teacher_pipe) == "flow-euler"
    prompts, w, steps = ["a red circle", "two blue squares"], 3.0, 5
    x_T = _noise(pipe, 2)
    got = pipe(prompts, steps=steps, guidance_scale=w, latents=x_T, output_type="latent").latents.double()

    e, m = teacher_pipe.text_encoder.encode(prompts)
    ne, nm = teacher_pipe.text_encoder.null_embedding()
    ne, nm = ne.expand(2, -1, -1), nm.expand(2, -1)
    tr, sd = teacher_pipe.transformer, 0.5
    shift = 3.0  # teacher schedule: t' = shift t / (1 + (shift - 1) t)
    t_sched = [shift * (1 - i / steps) / (1 + (shift - 1) * (1 - i / steps)) for i in range(steps + 1)]
    s_sched = [math.atan2(t, 1 - t) for t in t_sched]
    x = sd * x_T.double()
    with torch.no_grad():
        for i in range(steps):
            s = s_sched[i]
            t = math.sin(s) / (math.sin(s) + math.cos(s))
            k = math.sqrt(t * t + (1 - t) ** 2)
            x_fm = (x / sd) * k
            tt = torch.full((2,), t)
            vc = tr(x_fm.float(), encoder_hidden_states=e, encoder_attention_mask=m, timestep=tt, return_dict=False)[0]
            vu = tr(x_fm.float(), encoder_hidden_states=ne, encoder_attention_mask=nm, timestep=tt, return_dict=False)[0]
            v = (vu + w * (vc - vu)).double()
            F = ((1 - 2 * t) * x_fm + (1 - 2 * t + 2 * t * t) * v) / k
            x = x + (s_sched[i + 1] - s) * sd * F
    torch.testing.assert_close(got, x / sd, rtol=0, atol=2e-4)


def test_trigflow_euler_converges_to_flow_euler(teacher_pipe):
    """Same ODE, two discretisations: the gap shrinks about linearly with the step count (first order)."""
    trig = R.with_sampler(teacher_pipe, "trigflow-euler")
    assert R.with_sampler(teacher_pipe, "flow-euler") is teacher_pipe
    x_T = _noise(teacher_pipe, 3, seed=7)
    prompts = ["a red circle", "a green square", "three yellow triangles"]
    gaps = []
    for steps in (4, 16, 64):
        a = teacher_pipe(prompts, steps=steps, guidance_scale=4.5, latents=x_T, output_type="latent").latents
        b = trig(prompts, steps=steps, guidance_scale=4.5, latents=x_T, output_type="latent").latents
        gaps.append((a - b).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < gaps[0] / 6, gaps
    assert gaps[0] > 1e-3, gaps  # the discretisations really differ at few steps


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, tokenizer, bert):
    root = tmp_path_factory.mktemp("models")
    text = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    SprintPipeline(text, tiny_transformer(), tiny_vae(), {"kind": "student", "resolution": 32}).save_pretrained(root / "s")
    SprintPipeline(text, tiny_transformer(guidance_embeds=False, seed=1), tiny_vae(),
                   {"kind": "teacher", "resolution": 32}).save_pretrained(root / "t")
    return root


def test_eval_cli_sampler(tmp_path, model_folders, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    outs = {}
    for sampler in ("flow-euler", "trigflow-euler"):
        out = tmp_path / f"{sampler}.json"
        assert cli.main(["eval", "--no-progress", "--model", str(model_folders / "t"), "--steps", "3", "--limit", "2",
                         "--images-per-prompt", "1", "--sampler", sampler, "--out", str(out)]) == 0
        outs[sampler] = json.loads(out.read_text())
        assert outs[sampler]["sampler"] == sampler and outs[sampler]["kind"] == "teacher"
    assert outs["flow-euler"]["timesteps"] == outs["trigflow-euler"]["timesteps"]
    out = tmp_path / "s.json"
    assert cli.main(["eval", "--no-progress", "--model", str(model_folders / "s"), "--limit", "1",
                     "--images-per-prompt", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sampler"] == "consistency"
    capsys.readouterr()
    code = cli.main(["eval", "--no-progress", "--model", str(model_folders / "s"), "--sampler", "trigflow-euler",
                     "--limit", "1", "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "teacher models only" in err[0]
    assert not (tmp_path / "x.json").exists()


# --- the plan -----------------------------------------------------------------------------------------------


def _setup(tmp_path):
    return rp.Setup(tmp_path / "teacher", tmp_path / "student", ROOT / "configs" / "shapes-distill.json",
                    tmp_path / "out", tmp_path / "docs", [], [], [])


def _distill_config(argv: list[str]) -> dict:
    from sana_sprint.training.distill import DistillConfig, add_args

    assert argv[0] == "distill"
    p = argparse.ArgumentParser()
    add_args(p)
    args = p.parse_args(argv[1:])
    return DistillConfig.from_args(args, args.config).to_dict()


def test_plan_dedupes_and_changes_exactly_one_switch(tmp_path):
    b = rp.BUDGETS["full"]
    plan = rp.build_plan(b, _setup(tmp_path), BASE)
    assert len({e.name for e in plan}) == len(plan) and len({tuple(e.argv) for e in plan}) == len(plan)
    distills = [e for e in plan if e.argv[0] == "distill"]
    # 3 + 2 + 3 + 3 rows, four of them the shared baseline -> 8 configurations, per training seed
    assert len(distills) == 8 * len(b.seeds)
    switches = {"loss", "cfg_embed", "ladd_weight", "max_time_prob"}
    for seed in b.seeds:
        runs = {e.chain.rsplit("-seed", 1)[0]: _distill_config(e.argv) for e in distills if e.chain.endswith(f"seed{seed}")}
        base = runs.pop("baseline")
        assert base["seed"] == seed and base["steps"] == b.distill_steps and base["max_minutes"] == 0
        for k in switches:  # the baseline is the base config itself
            assert base[k] == BASE[k]
        changed_fields = set()
        for name, cfg in runs.items():
            diff = {k for k in cfg if cfg[k] != base[k] and k not in ("out", "export")}
            assert len(diff) == 1 and diff <= switches, (name, diff)
            changed_fields |= diff
        assert changed_fields == switches
        assert {(k, cfg[k]) for cfg in runs.values() for k in switches if cfg[k] != base[k]} == {
            ("loss", "scm"), ("loss", "ladd"), ("cfg_embed", False), ("ladd_weight", 1.0), ("ladd_weight", 0.1),
            ("max_time_prob", 0.0), ("max_time_prob", 0.7)}
    # each ablation student is evaluated at 1 and 2 steps with the same sampling seed, in its distill's chain
    for d in distills:
        evals = [e for e in plan if e.chain == d.chain and e.argv[0] == "eval"]
        assert [e.argv[e.argv.index("--steps") + 1] for e in evals] == ["1", "2"]
        assert all(e.argv[e.argv.index("--model") + 1] == str(d.output.parent) for e in evals)
        assert {e.argv[e.argv.index("--seed") + 1] for e in evals} == {"0"}
    # Table 1: the two samplers, otherwise identical commands
    t1 = [e.argv for e in plan if e.name.startswith("t1-")]
    assert len(t1) == 2 * len(b.eval_seeds)
    a, c = (x for x in t1 if "--seed" in x and x[x.index("--seed") + 1] == "0")
    strip = lambda v: [x for x in v if x not in ("flow-euler", "trigflow-euler") and not x.endswith(".json")]  # noqa: E731
    assert strip(a) == strip(c) and a[a.index("--steps") + 1] == "50"
    # the bench runs first and alone; fig3 calls the helper script
    assert plan[0].name == "bench" and plan[0].exclusive and sum(e.exclusive for e in plan) == 1
    assert plan[-1].argv[0] == rp.FIG3_SCRIPT and (ROOT / rp.FIG3_SCRIPT).is_file()
    # a base config whose weight is 1.0 makes "1 : 1" the baseline: still 8 unique configurations
    alt = rp.build_plan(b, _setup(tmp_path), {**BASE, "ladd_weight": 1.0})
    assert sum(e.argv[0] == "distill" for e in alt) == 8 * len(b.seeds)
    est = rp.estimate(plan, jobs=2)
    assert est["wall"] < est["total"] and abs(est["total"] - sum(e.est_s for e in plan)) < 1e-6


def test_skip_and_estimate_only(tmp_path, capsys):
    plan = rp.build_plan(rp.BUDGETS["full"], _setup(tmp_path), BASE, skip={"ablations", "fig3"})
    assert all(not e.name.startswith(("abl-", "distill-")) and e.name != "fig3" for e in plan)
    assert rp.main(["--budget", "full", "--estimate", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "sana-sprint distill" in out and not (tmp_path / "o").exists()


# --- running: cache, resume, failures --------------------------------------------------------------------------


def _fake_plan(tmp_path):
    mk = lambda name, chain, clean=None: rp.Experiment(  # noqa: E731
        name, ["eval", "--out", str(tmp_path / f"{name}.json")], tmp_path / f"{name}.json", 1.0, chain, clean=clean)
    return [mk("d1", "c1", clean=tmp_path / "run1"), mk("e1", "c1"), mk("d2", "c2"), mk("e2", "c2")]


def _fake_runner(plan, tmp_path, fail=()):
    calls = []
    runner = rp.Runner(plan, tmp_path / "out", in_process=True, env={}, log=lambda *a, **k: None)

    def execute(e, log_path):
        calls.append(e.name)
        if e.name in fail:
            return 1
        e.output.write_text("{}")
        return 0

    runner._execute = execute
    return runner, calls


def test_runner_reuses_finished_experiments_and_reruns_changed_ones(tmp_path):
    plan = _fake_plan(tmp_path)
    runner, calls = _fake_runner(plan, tmp_path, fail={"d2"})
    runner.run()
    assert calls == ["d1", "e1", "d2"] and runner.failed == ["d2", "e2"]  # e2 skipped after its distill failed
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "ckpt").write_text("partial")
    runner, calls = _fake_runner(plan, tmp_path)
    runner.run()
    assert calls == ["d2", "e2"] and not runner.failed  # d1, e1 cached; the failed chain is retried
    assert (tmp_path / "run1" / "ckpt").exists()  # same arguments: a partial run is kept (resumed)
    runner, calls = _fake_runner(plan, tmp_path)
    runner.run()
    assert calls == []
    plan[0].argv = plan[0].argv + ["--steps", "9"]  # changed arguments: rerun from scratch
    runner, calls = _fake_runner(plan, tmp_path)
    runner.run()
    assert calls == ["d1"] and not (tmp_path / "run1").exists()
    done = json.loads((tmp_path / "out" / "done" / "d1.done.json").read_text())
    assert done["argv"] == plan[0].argv and done["wall_s"] >= 0


def test_runner_parallel_chains_keep_their_order(tmp_path):
    plan = _fake_plan(tmp_path)
    runner, calls = _fake_runner(plan, tmp_path)
    runner.jobs = 2
    runner.run()
    assert sorted(calls) == ["d1", "d2", "e1", "e2"] and calls.index("d1") < calls.index("e1")
    assert calls.index("d2") < calls.index("e2") and not runner.failed


def test_interrupt_stops_the_run(tmp_path):
    plan = _fake_plan(tmp_path)
    runner, calls = _fake_runner(plan, tmp_path)
    runner._execute = lambda e, log_path: (calls.append(e.name), 130)[1]
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    assert calls == ["d1"]


# --- tables and orderings from synthetic results -------------------------------------------------------------


def _write_eval(path: Path, overall: float, fd: float, tasks: list[float]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"overall": overall, "fd_shapes": fd, "n_images": 8,
                                "tasks": dict(zip(rp.TASKS, tasks))}))


def _cells(md: str, first: str, second: str | None = None) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first and (second is None or cells[1] == second):
            return cells
    raise AssertionError(f"no row {first!r} {second!r} in\n{md}")


def _pm(cell: str) -> tuple[float, float]:
    m, sd = cell.split("±")
    return float(m), float(sd)


def test_report_tables_from_synthetic_results(tmp_path):
    b = rp.BUDGETS["full"]
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    truth: dict = {}
    for kind, steps_list in (("teacher", (20, 1, 2, 4)), ("student", (1, 2, 4))):
        for steps in steps_list:
            vals = []
            for seed in b.eval_seeds:
                v = (float(rng.uniform(0, 1)), float(rng.uniform(5, 50)), rng.uniform(0, 1, 6).tolist())
                _write_eval(out / "eval" / f"t2-{kind}-{steps}step-seed{seed}.json", *v)
                vals.append(v)
            truth[(kind, steps)] = vals
    # the paper's orders hold in Table 3 (both < scm < ladd, well separated); Table 6 reversed
    fd_of = {"baseline": 10.0, "loss-scm": 20.0, "loss-ladd": 30.0, "cfg_embed-false": 11.0,
             "ladd_weight-1.0": 10.5, "ladd_weight-0.1": 10.6, "max_time_prob-0.0": 5.0, "max_time_prob-0.7": 15.0}
    abl = {}
    for cname, fd in fd_of.items():
        for steps in b.ablation_eval_steps:
            xs = []
            for seed in b.seeds:
                v = (float(rng.uniform(0.2, 0.4)), fd + float(rng.normal(0, 0.3)), [0.3] * 6)
                _write_eval(out / "eval" / f"abl-{cname}-seed{seed}-{steps}step.json", *v)
                xs.append(v)
            abl[(cname, steps)] = xs
    (out / "bench").mkdir(parents=True)
    (out / "bench" / "bench.json").write_text(json.dumps({"rows": [
        {"name": "teacher-20step", "steps": 20, "batch": 1, "ours_ms": 800.0, "ours_img_s": 1.25},
        {"name": "sprint-1step", "steps": 1, "batch": 1, "ours_ms": 40.0, "ours_img_s": 25.0},
        {"name": "sprint-1step", "steps": 1, "batch": 10, "ours_ms": 200.0, "ours_img_s": 50.0}]}))

    res = rp.collect(b, out, BASE)
    plan = rp.build_plan(b, _setup(tmp_path), BASE)
    results_md = tmp_path / "docs" / "results.md"
    md = rp.render(res, b, BASE, plan, {"jobs": 1, "wall_s": 5, "ran": 3, "cached": 2, "total_measured_s": 9},
                   results_md, {"table2": None, "ablations": None}, None)

    for (kind, steps), vals in truth.items():
        row = _cells(md, kind, str(steps))
        overall = np.array([v[0] for v in vals])
        fd = np.array([v[1] for v in vals])
        m, sd = _pm(row[5])
        assert m == pytest.approx(overall.mean(), abs=6e-4) and sd == pytest.approx(overall.std(ddof=1), abs=6e-4)
        m, sd = _pm(row[4])
        assert m == pytest.approx(fd.mean(), abs=0.06) and sd == pytest.approx(fd.std(ddof=1), abs=0.06)
        for j, _t in enumerate(rp.TASKS):
            m, sd = _pm(row[6 + j])
            task = np.array([v[2][j] for v in vals])
            assert m == pytest.approx(task.mean(), abs=6e-3) and sd == pytest.approx(task.std(ddof=1), abs=6e-3)
    assert _cells(md, "teacher", "20")[2:4] == ["0.800", "—"] and _cells(md, "student", "1")[2:4] == ["0.040", "50.0"]
    assert _cells(md, "student", "2")[2] == "—"

    row = _cells(md, "sCM only", "loss-scm")
    for j, steps in enumerate(b.ablation_eval_steps):
        fd = np.array([v[1] for v in abl[("loss-scm", steps)]])
        m, sd = _pm(row[2 + 2 * j])
        assert m == pytest.approx(fd.mean(), abs=6e-3) and sd == pytest.approx(fd.std(ddof=1), abs=6e-3)
    assert _cells(md, "sCM + LADD", "baseline")[-1] == "8.11"
    # the baseline row is the same numbers in every table
    assert _cells(md, "50 %", "baseline")[2:6] == _cells(md, "1 : 0.5", "baseline")[2:6] == \
        _cells(md, "with CFG embedding", "baseline")[2:6]

    order = md.split("## Our orderings vs the paper's")[1].split("## Figure 3")[0]
    t3 = next(x for x in order.splitlines() if x.startswith("- **Table 3"))
    t6 = next(x for x in order.splitlines() if x.startswith("- **Table 6"))
    assert "agrees with the paper's" in t3 and "every gap exceeds the seed spread" in t3
    assert "differs from the paper's" in t6 and "beyond the seed spread" in t6 and rp.HYPOTHESES["table6"] in t6
    assert re.search(r"ours 0 % \(5\.\d\d\) < 50 % \(10\.\d\d\) < 70 % \(15\.\d\d\)", t6)
    assert "Table 1 has not finished yet" in md  # missing experiments are reported, not invented

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{rp.README_START}\nold\n{rp.README_END}\nrest\n")
    assert rp.update_readme(readme, rp.headline_md(res, b), results_md)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| student | 1 | 0.040 | 50.0 |" in text and "docs/results.md" in text
    readme.write_text("no markers\n")
    assert not rp.update_readme(readme, "x", results_md) and readme.read_text() == "no markers\n"


def test_mean_sd():
    xs = [0.25, 0.5, 0.125]
    m, sd, n = rp.mean_sd(xs)
    assert n == 3 and m == pytest.approx(np.mean(xs)) and sd == pytest.approx(np.std(xs, ddof=1))
    assert rp.mean_sd([1.0])[1] is None and rp.mean_sd([])[2] == 0 and rp.mean_sd([1.0, float("nan")])[2] == 1
    assert rp.fmt(rp.mean_sd([1.0, 2.0]), 2) == f"1.50 ± {math.sqrt(0.5):.2f}" and rp.fmt(None) == "—"


# --- the whole pipeline -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_budget_end_to_end(tmp_path):
    """Tiny random models through every experiment but Fig. 3 (its training stages are subprocesses: ~7 min on
    a busy 2-core box; ``python scripts/reproduce.py --budget smoke`` runs it too)."""
    out = tmp_path / "smoke"
    args = ["--budget", "smoke", "--out", str(out), "--skip", "fig3"]
    assert rp.main(args) == 0
    md = (out / "docs" / "results.md").read_text()
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Figure 3"):
        assert title in md
    for label, run in (("sCM only", "loss-scm"), ("LADD only", "loss-ladd"), ("without CFG embedding", "cfg_embed-false"),
                       ("1 : 0.1", "ladd_weight-0.1"), ("70 %", "max_time_prob-0.7"), ("50 %", "baseline")):
        assert "—" not in _cells(md, label, run)[2:6]
    assert "—" not in _cells(md, "flow Euler")[2:4] and "—" not in _cells(md, "TrigFlow Euler (transformed)")[2:4]
    assert "—" not in _cells(md, "student", "1")[2:6]
    for png in ("reproduce_table2.png", "reproduce_ablations.png"):
        assert (out / "docs" / png).stat().st_size > 1000
    first = (out / "eval" / "t2-student-1step-seed0.json").read_text()
    assert rp.main(args) == 0  # everything cached: nothing reruns
    assert (out / "eval" / "t2-student-1step-seed0.json").read_text() == first
    assert "(0 run, " in (out / "docs" / "results.md").read_text()


def test_rewriting_results_md_keeps_marked_blocks_and_backs_up_hand_written_files():
    rendered = rp.GENERATED_TITLE + "\n\nnew tables\n"
    # keep-marked blocks survive (with their markers, so the next rewrite keeps them again)
    prev = f"# old\n\nold table\n\n{rp.KEEP_START}\n## Position probe\nrow\n{rp.KEEP_END}\n\nx\n{rp.KEEP_START}\nB\n{rp.KEEP_END}\n"
    md, backup = rp.merge_results(rendered, prev)
    assert not backup and md.startswith(rendered.rstrip("\n")) and "old table" not in md
    assert rp.kept_blocks(md) == ["## Position probe\nrow", "B"]
    again, _ = rp.merge_results(rendered, md)
    assert again == md  # idempotent
    # a hand-written file without keep blocks is backed up, a generated one is simply replaced
    assert rp.merge_results(rendered, "# my notes\n") == (rendered, True)
    assert rp.merge_results(rendered, rendered) == (rendered, False)
    assert rp.merge_results(rendered, None) == (rendered, False)
    with pytest.raises(ValueError, match="without a matching"):
        rp.kept_blocks(f"{rp.KEEP_START}\nunterminated")
