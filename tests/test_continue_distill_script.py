"""scripts/gpu/continue_distill.sh's bookkeeping (the run a lent GPU gets), with a stand-in for the trainer: which
commands it starts, per seed with SEEDS, and what it packs into each run's tar."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import script_workdir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu" / "continue_distill.sh"

# Stands in for python: `-m sana_sprint.cli CMD ...` logs its arguments and writes a fake export where --export
# (or the config's export) points; everything else goes to the real interpreter.
FAKE_PY = """#!/usr/bin/env bash
if [ "$1" = -m ]; then
  exec "{py}" - "$@" <<'EOF'
import json, pathlib, sys
argv = sys.argv[1:]
cfg = json.load(open(argv[argv.index("--config") + 1]))
get = lambda flag, default: argv[argv.index(flag) + 1] if flag in argv else default
out, exp = get("--out", cfg["out"]), get("--export", cfg["export"])
(pathlib.Path(exp) / "transformer").mkdir(parents=True)
(pathlib.Path(exp) / "transformer" / "w.bin").write_text(get("--seed", "config"))
(pathlib.Path(exp) / "sprint_config.json").write_text("{{}}")
(pathlib.Path(out) / "metrics.jsonl").write_text("{{}}\\n")
with open("calls.log", "a") as f:
    f.write(" ".join(argv[2:]) + "\\n")
EOF
fi
exec "{py}" "$@"
"""


@pytest.fixture()
def work(tmp_path):
    script_workdir(tmp_path, FAKE_PY)
    cfg = {"teacher": "t", "out": "runs/c", "export": "runs/c/export", "seed": 0}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    return tmp_path


def run(work, **env):
    full = dict(os.environ, PY=str(work / "py"), CACHE_DIR=str(work / "cache"), NPAIRS="0", OUT="o", MARGIN="0", **env)
    res = subprocess.run(["bash", str(SCRIPT), "x.npz", "600", "c.json"], cwd=work, env=full, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return sorted((work / "calls.log").read_text().splitlines())


def read_tar(path):
    with tarfile.open(path) as tar:
        names = sorted(n.lstrip("./") for n in tar.getnames() if tar.getmember(n).isfile())
        weight = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("w.bin"))).read().decode()
    return names, weight


def test_one_run_per_config_without_seeds(work):
    calls = run(work)
    assert len(calls) == 1
    assert calls[0].startswith("distill --config c.json --max-minutes ")
    assert "--seed" not in calls[0]
    names, weight = read_tar(work / "o" / "c.tar")
    assert names == ["export/sprint_config.json", "export/transformer/w.bin", "metrics.jsonl"]
    assert weight == "config"


def test_seeds_start_one_run_per_seed_with_own_folders(work):
    calls = run(work, SEEDS="3 7")
    assert len(calls) == 2
    # The runs start side by side and --max-minutes shrinks with the clock, so match each call to its seed.
    by_seed = {call.split("--seed ")[1].split()[0]: call for call in calls}
    assert sorted(by_seed) == ["3", "7"]
    for seed, call in sorted(by_seed.items()):
        assert call.endswith(f"--seed {seed} --out runs/c-s{seed} --export runs/c-s{seed}/export")
        names, weight = read_tar(work / "o" / f"c-s{seed}.tar")
        assert "export/transformer/w.bin" in names and "metrics.jsonl" in names
        assert weight == seed  # each tar holds its own run's export, not another seed's
    assert not (work / "o" / "c.tar").exists()
