"""scripts/gpu/repair_round.sh's bookkeeping (what a lent GPU runs), with stand-ins for the pair maker and the trainer:
the pairs it asks for, one run per seed with TF32 only where asked, the plain-pairs fallback, and which weights come
back; and scripts/gpu/pack_diffusers.py's choice of files."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import script_workdir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu" / "repair_round.sh"

# Stands in for python: `scripts/teacher_pairs.py` and `-m sana_sprint.cli distill` log their arguments (and the
# TF32 switch) and write what the real ones would; everything else goes to the real interpreter.
FAKE_PY = """#!/usr/bin/env bash
case "$1" in
  -m|scripts/teacher_pairs.py)
    exec "{py}" - "$@" <<'EOF'
import json, os, pathlib, sys
argv = sys.argv[1:]
get = lambda flag, default=None: argv[argv.index(flag) + 1] if flag in argv else default
if argv[0] == "-m":
    if "--resume" in argv:  # a run of an earlier call: its saved config names everything
        cfg = json.loads(pathlib.Path(get("--config")).read_text())
        seed, steps = cfg["seed"], json.loads(pathlib.Path(cfg["out"], "metrics.jsonl").read_text())["step"] + 1
    else:
        cfg, steps = {{"out": get("--out"), "export": get("--export"), "seed": get("--seed")}}, 1
        seed = cfg["seed"]
    exp, out = pathlib.Path(cfg["export"]), pathlib.Path(cfg["out"])
    (exp / "transformer").mkdir(parents=True, exist_ok=True)
    (exp / "transformer" / "diffusion_pytorch_model.safetensors").write_text(f"{{seed}} step {{steps}}")
    (out / "metrics.jsonl").write_text(json.dumps({{"step": steps}}) + "\\n")
    (out / "config.json").write_text(json.dumps(cfg))
    line = "distill " + " ".join(argv[3:]) + " tf32=" + os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "unset")
else:
    if get("--refine-student") and os.environ.get("FAIL_REFINE"):
        sys.exit("refine failed")
    out = pathlib.Path(get("--out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs-00000.pt").write_text("x")
    (out / "meta.json").write_text("{{}}")
    line = "pairs " + " ".join(argv[1:])
with open("calls.log", "a") as f:
    f.write(line + "\\n")
EOF
    ;;
esac
exec "{py}" "$@"
"""


@pytest.fixture()
def work(tmp_path):
    return script_workdir(tmp_path, FAKE_PY, "timeout")


def run(work, rc=0, **env):
    full = dict(os.environ, PY=str(work / "py"), CACHE=str(work / "cache"), OUT="o", ROOT="r", DEVICE="cpu",
                CONFIG="c.json", INIT="student", MARGIN="0", **env)
    res = subprocess.run(["bash", str(SCRIPT)], cwd=work, env=full, capture_output=True, text=True, timeout=120)
    assert res.returncode == rc, res.stderr
    log = work / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_repaired_pairs_then_one_run_per_seed(work):
    calls = run(work, SEEDS="3 7 9", TF32_SEEDS="7", PAIRS_SEED="5", T_REPAIR="1.1", NPAIRS="64", SHARD="32")
    pairs = [c for c in calls if c.startswith("pairs ")]
    assert len(pairs) == 1
    p = pairs[0].split()
    for flag, value in [("--refine-student", "student"), ("--refine-time", "1.1"), ("--seed", "5"), ("--n", "64"),
                        ("--shard", "32"), ("--out", "r/pairs"), ("--device", "cpu")]:
        assert p[p.index(flag) + 1] == value
    assert "--cached-text" in p
    runs = {c.split("--seed ")[1].split()[0]: c for c in calls if c.startswith("distill ")}
    assert sorted(runs) == ["3", "7", "9"]
    for seed, call in runs.items():
        a = call.split()
        assert a[a.index("--pairs") + 1] == "r/pairs" and a[a.index("--student-init") + 1] == "student"
        assert a[a.index("--out") + 1] == f"r/r{seed}" and a[a.index("--export") + 1] == f"r/r{seed}/export"
        assert float(a[a.index("--max-minutes") + 1]) > 0
        assert a[-1] == ("tf32=1" if seed == "7" else "tf32=0")
        assert (work / "o" / f"r{seed}.safetensors").read_text() == f"{seed} step 1"  # each run's own weights
    with tarfile.open(work / "o" / "logs.tar") as tar:
        names = set(tar.getnames())
    assert {"r/pairs.log", "r/r3.log", "r/r3/metrics.jsonl", "r/pairs/meta.json"} <= names


def test_falls_back_to_plain_pairs_when_the_repair_fails(work):
    calls = run(work, SEEDS="1", FAIL_REFINE="1")
    assert [c.split()[0] for c in calls] == ["pairs", "distill"]  # the failed repair logs nothing
    p = calls[0].split()
    assert "--refine-student" not in p and p[p.index("--out") + 1] == "r/pairs_plain"
    d = calls[1].split()
    assert d[d.index("--pairs") + 1] == "r/pairs_plain"


def test_resume_and_fetch_continue_the_runs_left_on_the_machine(work):
    """The two later calls of a round (MODE=resume, MODE=fetch): no new pairs, each run continued from its own
    config, and only the COPY runs' weights in $OUT, so one call stays under what the device tool brings back."""
    import shutil

    run(work, SEEDS="3 7", COPY="")
    assert not list((work / "o").glob("*.safetensors"))  # COPY="": no weights in this call's $OUT
    shutil.rmtree(work / "o")
    (work / "calls.log").unlink()
    calls = run(work, MODE="resume", SEEDS="3 7 8", COPY="3")
    assert [c.split()[0] for c in calls] == ["distill", "distill"]  # no pairs; seed 8 has no run to resume
    for seed in ("3", "7"):
        a = next(c for c in calls if f"r/r{seed}/config.json" in c).split()
        assert a[a.index("--config") + 1] == f"r/r{seed}/config.json" and "--resume" in a
        assert "--pairs" not in a and "--student-init" not in a and float(a[a.index("--max-minutes") + 1]) > 0
    assert sorted(p.name for p in (work / "o").glob("*.safetensors")) == ["r3.safetensors"]
    assert (work / "o" / "r3.safetensors").read_text() == "3 step 2"  # continued: one step past the first call
    shutil.rmtree(work / "o")
    (work / "calls.log").unlink()
    assert run(work, MODE="fetch", SEEDS="3 7", COPY="7") == []  # nothing runs
    assert [p.name for p in (work / "o").glob("*.safetensors")] == ["r7.safetensors"]
    assert (work / "o" / "r7.safetensors").read_text() == "7 step 2"
    run(work, rc=2, MODE="continue")


def test_pack_diffusers_keeps_what_we_import(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
    try:
        import pack_diffusers
    finally:
        sys.path.remove(str(ROOT / "scripts" / "gpu"))
    names = {
        "diffusers/__init__.py": True,
        "diffusers/models/transformers/sana_transformer.py": True,
        "diffusers/pipelines/__init__.py": True,
        "diffusers/pipelines/pipeline_utils.py": True,
        "diffusers/pipelines/sana/pipeline_sana_sprint.py": True,
        "diffusers/pipelines/pixart_alpha/pipeline_pixart_alpha.py": True,
        "diffusers/pipelines/flux/pipeline_flux.py": False,
        "diffusers/pipelines/deprecated/x/y.py": False,
        "diffusers/modular_pipelines/modular_pipeline.py": True,
        "diffusers/modular_pipelines/flux/encoders.py": False,
        "diffusers-0.42.1.dist-info/METADATA": True,
        "diffusers-0.42.1.dist-info/RECORD": False,
    }
    wheel = tmp_path / "d.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names:
            z.writestr(n, n)
    assert pack_diffusers.main([str(wheel), str(tmp_path / "out.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        assert sorted(z.namelist()) == sorted(n for n, k in names.items() if k)
        assert z.read("diffusers/pipelines/sana/pipeline_sana_sprint.py").decode() == (
            "diffusers/pipelines/sana/pipeline_sana_sprint.py")
    assert pack_diffusers.main([str(tmp_path / "missing.whl"), str(tmp_path / "o.zip")]) == 2
