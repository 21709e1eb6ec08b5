"""Helpers shared by the multi-process tests (test_multiprocess.py, test_fsdp.py): launching a worker
script on N CPU processes with ``accelerate launch`` (gloo) and reading what the runs wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script: Path, *args: str, num_processes: int = 2, timeout: float = 900) -> None:
    """Run ``script args`` on ``num_processes`` CPU processes (one thread each); assert it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(Path(script).resolve()), *map(str, args)]
    proc = subprocess.run(cmd, env=env, cwd=Path(script).resolve().parent, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def checkpoint_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every module tensor of a checkpoint directory, keyed ``module.param``."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((Path(ckpt_dir) / "modules").glob("*.safetensors")):
        out.update({f"{f.stem}.{k}": v for k, v in load_file(str(f)).items()})
    return out


def read_metrics(run: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path, key: str = "loss") -> list[float]:
    """``key`` of every row of a run's metrics.jsonl."""
    return [r[key] for r in read_metrics(run)]


def assert_logged_scalars_match(reference: list[dict], other: list[dict], steps: int, required: set[str],
                                rtol: float = 1e-4, atol: float = 1e-6) -> dict[str, float]:
    """Every logged scalar of two runs (except wall-clock keys) equal per step within rtol/atol; ``required``
    must be among them. Returns the worst relative deviation per key (printed by the callers)."""
    assert len(reference) == len(other) == steps
    keys = sorted(set(reference[0]) - {"time", "it_per_s"})
    assert keys == sorted(set(other[0]) - {"time", "it_per_s"})
    assert required <= set(keys)
    worst = {}
    for k in keys:
        a, b = np.array([r[k] for r in reference]), np.array([r[k] for r in other])
        worst[k] = float(np.max(np.abs(b - a) / np.maximum(np.abs(a), 1e-6)))
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=k)
    return worst
