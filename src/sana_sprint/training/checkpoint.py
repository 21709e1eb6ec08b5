"""Atomic, self-contained training checkpoints (infrastructure only: no knowledge of any method).

A checkpoint is a directory ``ckpt-{step:07d}/`` holding

- ``modules/{name}.safetensors``: state dicts of the named modules, dtypes kept exactly (trainable
  weights are fp32 by design; nothing is down-cast, so resume is bit-exact),
- ``state.pt``: optimisers, LR schedulers, RNG states (python, numpy, torch CPU, CUDA, named
  ``torch.Generator`` objects; in a multi-process run one set per rank under ``rng_ranks``, written
  by the main process) and a JSON-able ``extra`` dict (step counters, data position, ...),
- ``meta.json``: step, file list and the run config (for humans and for ``latest_checkpoint``).

It is written into ``ckpt-{step:07d}.tmp/`` and renamed in one ``os.replace``: a run killed at any
moment leaves either the previous checkpoint or the new one, never a half-written directory under
the final name. Leftover ``*.tmp`` directories are ignored and removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")
STATE_FILE = "state.pt"
META_FILE = "meta.json"
MODULES_DIR = "modules"


def checkpoint_name(step: int) -> str:
    return f"ckpt-{int(step):07d}"


def list_checkpoints(ckpt_dir: str | Path, at_most: int | None = None) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir`` (of step <= ``at_most`` when given), oldest first (``*.tmp``
    leftovers are not checkpoints)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file() and (at_most is None or int(m.group(1)) <= at_most):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | Path, at_most: int | None = None) -> Path | None:
    """The newest complete checkpoint directory (of step <= ``at_most`` when given), or None."""
    ckpts = list_checkpoints(ckpt_dir, at_most)
    return ckpts[-1] if ckpts else None


# --- RNG state -------------------------------------------------------------------------------------


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a training step can touch, as tensors and plain Python values (``weights_only`` safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`rng_state`; every named generator must be present in ``state``."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint has no state for generator {name!r} (has: {sorted(saved)})")
        g.set_state(saved[name])


# --- save / load -----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: save independent contiguous copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def module_file(path: str | Path, name: str) -> Path:
    """Where checkpoint ``path`` keeps the tensors of its module ``name``."""
    return Path(path) / MODULES_DIR / f"{name}.safetensors"


def module_state(path: str | Path, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The saved tensors of one module of checkpoint ``path``, dtypes as saved (KeyError if it has none)."""
    f = module_file(path, name)
    if not f.is_file():
        raise KeyError(f"checkpoint {path} has no module {name!r}")
    return load_file(str(f), device=str(device))


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    *,
    modules: Mapping[str, torch.nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    extra: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    rank_rng: list[Mapping[str, Any]] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and return its directory; then keep only the last ``keep_last``.

    ``rank_rng``: the :func:`rng_state` of every rank of a multi-process run (rank order); the
    caller's own RNG state is saved as ``rng`` either way.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / MODULES_DIR).mkdir(parents=True)

    files = []
    for name, module in (modules or {}).items():
        path = module_file(tmp, name)
        save_file(_module_tensors(module), str(path))
        _fsync_file(path)
        files.append(f"{MODULES_DIR}/{path.name}")
    state = {
        "step": int(step),
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
        "rng": rng_state(generators),
        "extra": dict(extra or {}),
    }
    if rank_rng is not None:
        state["rng_ranks"] = [dict(r) for r in rank_rng]
    torch.save(state, tmp / STATE_FILE)
    _fsync_file(tmp / STATE_FILE)
    meta = {"step": int(step), "modules": sorted((modules or {}).keys()), "files": files + [STATE_FILE],
            "config": dict(config) if config is not None else None}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    _fsync_file(tmp / META_FILE)
    _fsync_dir(tmp)

    if final.exists():  # re-saving a step (e.g. the final checkpoint after a periodic one at the same step)
        old = ckpt_dir / (final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_dir)

    for p in ckpt_dir.iterdir():  # leftovers of killed saves
        if p.is_dir() and p.name.endswith((".tmp", ".old")) and p != tmp:
            shutil.rmtree(p, ignore_errors=True)
    if keep_last is not None and keep_last > 0:
        for p in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, torch.nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
    rank: int = 0,
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote into the given objects.

    Returns ``{"step", "extra"}``. ``rank`` picks the RNG state of that rank when the checkpoint
    holds per-rank states; rank 0 falls back to ``rng``; another rank of a checkpoint without its
    state restores no RNG (the caller re-seeds that rank).

    Every named module / optimiser / scheduler must be in the checkpoint (strict): a resumed run that
    silently re-initialises a network is worse than one that stops.
    """
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"not a complete checkpoint: {path}")
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    for name, module in (modules or {}).items():
        device = next(iter(module.state_dict().values()), torch.empty(0)).device
        module.load_state_dict(module_state(path, name, device), strict=True)
    for kind, objs in (("optimizers", optimizers), ("schedulers", schedulers)):
        for name, obj in (objs or {}).items():
            if name not in state[kind]:
                raise KeyError(f"checkpoint {path} has no {kind[:-1]} {name!r}")
            obj.load_state_dict(state[kind][name])
    if restore_rng:
        ranks = state.get("rng_ranks")
        if ranks is not None and rank < len(ranks):
            set_rng_state(ranks[rank], generators)
        elif rank == 0:
            set_rng_state(state["rng"], generators)
    return {"step": int(state["step"]), "extra": state["extra"]}


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text())
