"""The generic training loop: infrastructure only (devices, autocast, stepping, checkpoints, logging).

The algorithm lives in a :class:`Method` (after NVIDIA FastGen's Trainer / Method split). The trainer
never sees a loss formula: it hands each batch to ``method.train_step(batch, step, opt)`` and the
method calls ``opt.step(loss, "name")`` once per optimiser update it wants (a GAN-style method
alternates ``opt.step(loss_g, "generator")`` and ``opt.step(loss_d, "discriminator")``). The
:class:`Stepper` does backward, the non-finite check, clipping, the optimiser and LR-scheduler step.

Run directory layout::

    config.json        the config this run used (written at start)
    metrics.jsonl      one JSON object per log interval (window means of the method's scalars)
    loss.png           loss curves, redrawn at every checkpoint
    samples/           step-XXXXXXX.png grids from method.sample_grid
    checkpoints/       ckpt-XXXXXXX/ (see checkpoint.py)

Multi-process runs (``accelerate launch`` / ``torchrun``): see ``distributed.py``. Each rank reads its
slice of the global batch, gradients are averaged across ranks in :class:`Stepper` before the
non-finite check and the clip, and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed
from .config import TrainerConfig

logger = logging.getLogger(__name__)


# --- the Method protocol ---------------------------------------------------------------------------


class Method:
    """What a training algorithm provides to :class:`Trainer`. Subclass and override.

    Required:
      ``state_modules()``  name -> module: everything with weights that must survive a restart
                           (trainable networks, EMA copies, discriminator heads). Not frozen teachers.
      ``optimizers()``     name -> optimiser; the names used in ``opt.step(loss, name)``.
      ``train_step(batch, step, opt) -> dict``  one iteration; returns scalars to log (floats or
                           0-d tensors; keys starting with ``loss`` are plotted).
    Optional (defaults are empty / no-ops):
      ``schedulers()``     name -> LR scheduler, stepped after each successful step of the optimiser
                           with the same name.
      ``generators()``     name -> torch.Generator the method draws from (checkpointed with the RNGs).
      ``extra_state()`` / ``load_extra_state(d)``  small JSON-able counters (e.g. generator steps).
      ``sample_grid(path)``  write a PNG of samples (called with RNG state saved and restored, so
                           sampling never changes training).
      ``export(out_dir)``  write a shippable model folder.
      ``fsdp_modules()``   name -> module that ``--fsdp`` shards (training/fsdp.py); without it the
                           method refuses ``--fsdp``.
      ``fsdp_unsharded(keep)``  context manager entered by every rank (collective) around the main
                           process's ``sample_grid`` / ``export`` under ``--fsdp``; on ranks with ``keep``
                           the method uses full-weight copies of its sharded modules inside.
    """

    trained_steps: int | None = None  # set by Trainer.fit_and_export before export: the steps actually run

    def state_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def train_step(self, batch: Any, step: int, opt: Stepper) -> dict[str, Any]:
        raise NotImplementedError

    def schedulers(self) -> dict[str, Any]:
        return {}

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def sample_grid(self, path: Path) -> None:
        pass

    def export(self, out_dir: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not export a model")


# --- device / RNG helpers --------------------------------------------------------------------------


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` = cuda if available else cpu; under a multi-process launch ``cuda`` is this rank's GPU."""
    if distributed.launched_world_size() > 1:
        return distributed.setup(spec).device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU + CUDA). Call before building the method: init draws from them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    if distributed.has_sharded(grads):  # --fsdp: sums every rank's shard (collective)
        return distributed.sharded_grad_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


# --- optimiser stepping ----------------------------------------------------------------------------


class Stepper:
    """Backward + non-finite check + clip + optimiser/scheduler step, for named optimisers.

    A step whose loss or gradient norm is not finite is skipped: gradients are dropped, the weights,
    the optimiser state and the scheduler are untouched, and ``skipped[name]`` is incremented.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
                 grad_clip: float, device_type: str, dist: distributed.Distributed | None = None):
        self.dist = dist or distributed.single()
        self.optimizers = dict(optimizers)
        self.schedulers = dict(schedulers)
        self.grad_clip = float(grad_clip)
        self.device_type = device_type
        self.skipped: dict[str, int] = defaultdict(int)
        self.steps: dict[str, int] = defaultdict(int)
        self.last_grad_norm: dict[str, float] = {}

    def _params(self, name: str) -> list[torch.Tensor]:
        return [p for g in self.optimizers[name].param_groups for p in g["params"] if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        """The single place gradients are computed (an accelerator would scale/sync here)."""
        with torch.autocast(self.device_type, enabled=False):
            loss.backward()

    def step(self, loss: torch.Tensor, name: str, clip: float | None = None) -> bool:
        """Update optimiser ``name`` with ``loss`` (a scalar). Returns False if the step was skipped.

        With several processes: the step is skipped on every rank if the loss is not finite on any
        rank, and the gradients are averaged across ranks before the norm check and the clip (so all
        ranks take the identical update).
        """
        if name not in self.optimizers:
            raise KeyError(f"no optimiser named {name!r} (have: {sorted(self.optimizers)})")
        if loss.ndim != 0:
            raise ValueError(f"loss for {name!r} must be a scalar, got shape {tuple(loss.shape)}")
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        if not self.dist.all_true(bool(torch.isfinite(loss.detach()).item())):
            return self._skip(name, "loss")
        self.backward(loss)
        params = self._params(name)
        self.dist.average_gradients(params)
        grads = [p.grad for p in params if p.grad is not None]
        norm = _grad_norm(grads)
        if not torch.isfinite(norm).item():
            opt.zero_grad(set_to_none=True)
            return self._skip(name, "gradient")
        clip = self.grad_clip if clip is None else float(clip)
        if clip > 0 and grads:
            # clip the global norm: g <- g * min(1, clip / (||g|| + 1e-6))
            scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, scale.to(grads[0].device))
        opt.step()
        if name in self.schedulers:
            self.schedulers[name].step()
        opt.zero_grad(set_to_none=True)
        self.steps[name] += 1
        self.last_grad_norm[name] = float(norm)
        return True

    def _skip(self, name: str, what: str) -> bool:
        self.skipped[name] += 1
        logger.warning("non-finite %s for optimiser %r: step skipped (%d so far)", what, name, self.skipped[name])
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped), "steps": dict(self.steps)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.skipped = defaultdict(int, d.get("skipped", {}))
        self.steps = defaultdict(int, d.get("steps", {}))


# --- logging ---------------------------------------------------------------------------------------


def _scalar(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return rows


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Curves of every ``loss*`` key in the metrics log (log-scale y when all values are positive)."""
    rows = read_metrics(metrics_path)
    keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    if not keys:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=k)
            positive &= min(ys) > 0
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)


# --- the loop --------------------------------------------------------------------------------------


def enable_gradient_checkpointing(method: Method) -> list[str]:
    """Turn on gradient checkpointing in every trained network that supports it; returns their names.

    A method may define ``enable_gradient_checkpointing()`` itself; otherwise every state module with
    diffusers' ``enable_gradient_checkpointing`` (the transformers) gets it. The sCM JVP switches it
    off around ``torch.func.jvp`` and runs under no_grad, where diffusers never checkpoints.
    """
    if hasattr(method, "enable_gradient_checkpointing"):
        return list(method.enable_gradient_checkpointing() or [])
    names = []
    for name, module in method.state_modules().items():
        if hasattr(module, "enable_gradient_checkpointing") and getattr(module, "_supports_gradient_checkpointing", False):
            module.enable_gradient_checkpointing()
            names.append(name)
    if not names:
        logger.warning("gradient_checkpointing: no network of %s supports it", type(method).__name__)
    return names


class Trainer:
    """Runs ``config.steps`` iterations of ``method`` on ``data`` (an iterable of batches, endless or not).

    ``data`` may implement ``state_dict()`` / ``load_state_dict()`` (e.g. :class:`LatentLoader`): its
    position is then checkpointed; otherwise a resumed run fast-forwards by drawing and discarding the
    batches already consumed (exact for deterministic iterables).
    """

    def __init__(self, method: Method, data: Iterable, config: TrainerConfig, device: torch.device | None = None,
                 dist: distributed.Distributed | None = None):
        self.method = method
        self.config = config
        self.dist = dist or distributed.setup(config.device)
        self.device = device or self.dist.device(config.device)
        # With several processes ``data`` yields *global* batches; each rank keeps its 1/world slice.
        self.data = distributed.RankShard(data, self.dist.rank, self.dist.world_size) if self.dist.enabled else data
        self.run_dir = Path(config.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.stepper = Stepper(method.optimizers(), method.schedulers(), config.grad_clip, self.device.type, self.dist)
        self.step = 0
        self.batches_drawn = 0
        self.fsdp = None  # --fsdp: the sharded modules (training/fsdp.py); None for a plain run
        if getattr(config, "fsdp", False):
            from .fsdp import shard_method

            self.fsdp = shard_method(method, self.dist, self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(method)

    @property
    def is_main_process(self) -> bool:
        return self.dist.is_main_process

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    # --- checkpoints ---

    def save(self) -> Path:
        extra = {
            "batches_drawn": self.batches_drawn,
            "stepper": self.stepper.state_dict(),
            "method": self.method.extra_state(),
        }
        if hasattr(self.data, "state_dict"):
            extra["data"] = self.data.state_dict()
        rank_rng = None
        if self.dist.enabled:  # every rank's RNG; optimiser states are identical on all ranks
            extra["world_size"] = self.dist.world_size
            rank_rng = self.dist.gather_object(ckpt.rng_state(self.method.generators()))
        path = self.ckpt_dir / ckpt.checkpoint_name(self.step)
        modules, optimizers = self.method.state_modules(), self.method.optimizers()
        if self.fsdp is not None:  # collective: full weights / optimiser states, held by the main process
            modules, optimizers = self.fsdp.full_state(modules, optimizers, keep=self.is_main_process)
        if self.is_main_process:
            path = ckpt.save_checkpoint(
                self.ckpt_dir,
                self.step,
                modules=modules,
                optimizers=optimizers,
                schedulers=self.method.schedulers(),
                generators=self.method.generators(),
                extra=extra,
                config=self.config.to_dict(),
                keep_last=self.config.keep_last or None,
                rank_rng=rank_rng,
            )
            plot_losses(self.metrics_path, self.run_dir / "loss.png")
        self.dist.barrier()  # no rank runs ahead of (or resumes from) a half-written checkpoint
        return path

    def restore(self, path: Path) -> None:
        modules, optimizers = self.method.state_modules(), self.method.optimizers()
        if self.fsdp is not None:  # full checkpoint tensors -> this rank's shards
            modules, optimizers = self.fsdp.loaders(modules, optimizers)
        state = ckpt.load_checkpoint(
            path,
            modules=modules,
            optimizers=optimizers,
            schedulers=self.method.schedulers(),
            generators=self.method.generators(),
            rank=self.dist.rank,
        )
        extra = state["extra"]
        saved_world = int(extra.get("world_size", 1))
        if saved_world != self.dist.world_size:
            logger.warning("checkpoint %s was written by %d process(es), resuming on %d: the data position is "
                           "kept, the global batch and the per-rank random streams change", path, saved_world,
                           self.dist.world_size)
        if self.dist.rank >= saved_world:  # a rank the checkpoint has no RNG state for
            self.dist.reseed_rank(self.config.seed + int(state["step"]), self.method.generators())
        self.step = state["step"]
        self.batches_drawn = int(extra.get("batches_drawn", 0))
        self.stepper.load_state_dict(extra.get("stepper", {}))
        self.method.load_extra_state(extra.get("method", {}))
        if "data" in extra and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(extra["data"])
        # Metrics logged after the checkpoint will be logged again: drop them.
        if self.is_main_process:
            rows = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= self.step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        logger.info("resumed from %s at step %d", path, self.step)

    # --- loop ---

    def _sample(self) -> None:
        path = self.run_dir / "samples" / f"step-{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = ckpt.rng_state(self.method.generators())
        try:
            self.method.sample_grid(path)
        finally:
            ckpt.set_rng_state(saved, self.method.generators())

    def _write_config(self) -> None:
        if not self.is_main_process:
            return
        (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    def _lrs(self) -> dict[str, float]:
        return {f"lr/{k}": float(o.param_groups[0]["lr"]) for k, o in self.method.optimizers().items()}

    def export_folder(self) -> Path:
        """Where the trained model is exported: ``config.export``, else ``<out>/export``."""
        return Path(self.config.export) if getattr(self.config, "export", None) else Path(self.config.out) / "export"

    def _unsharded(self):
        """--fsdp with a method that samples / exports its sharded modules: every rank enters (collective
        gather), the main process gets full weights inside (``method.fsdp_unsharded``). Else nothing."""
        if self.fsdp is not None and hasattr(self.method, "fsdp_unsharded"):
            return self.method.fsdp_unsharded(keep=self.is_main_process)
        return contextlib.nullcontext()

    def fit_and_export(self) -> Path | None:
        """:meth:`fit`, then ``method.export(export_folder())`` on the main process; None on the other ranks."""
        self.fit()
        out = self.export_folder()
        with self._unsharded():
            if not self.is_main_process:  # multi-process run: only the main process exports
                return None
            self.method.trained_steps = self.step
            self.method.export(out)
        return out

    def fit(self) -> int:
        """Train to ``config.steps`` (resuming first when ``config.resume``); returns the final step.

        The loop also stops (after a checkpoint) once ``config.max_minutes`` of wall time have passed,
        or at step ``config.stop_at`` (learning-rate schedules still run to ``steps``); ``--resume``
        continues towards ``steps``.
        """
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # with stop_at, resume from the newest checkpoint at or before it, so `--resume --stop-at N` restores
        # (and exports) the step-N weights of a run that went further, instead of silently its last ones
        last = ckpt.latest_checkpoint(self.ckpt_dir, at_most=cfg.stop_at or None) if cfg.resume else None
        if last is not None and cfg.stop_at and self.is_main_process:
            newest = ckpt.latest_checkpoint(self.ckpt_dir)
            if newest != last:
                logger.info("--resume with stop_at=%d: restoring %s (the newer %s is left as it is)",
                            cfg.stop_at, last.name, newest.name)
        if self.dist.enabled:  # every rank resumes from the checkpoint the main process sees
            last = self.dist.gather_object(last)[0]
        if cfg.resume and last is None:
            logger.info("--resume: no checkpoint in %s, starting fresh", self.ckpt_dir)
        if last is not None:
            self.restore(last)
        else:
            self.dist.reseed_rank(cfg.seed, self.method.generators())
        self.dist.broadcast_modules(self.method.state_modules())  # identical weights on every rank
        self._write_config()

        it: Iterator = iter(self.data)
        if not hasattr(self.data, "state_dict"):
            for _ in range(self.batches_drawn):  # fast-forward a position-less iterable
                next(it)

        bar = None
        if cfg.progress and self.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, dynamic_ncols=True, smoothing=0.1)
        window: dict[str, list[float]] = defaultdict(list)
        t_window, n_window = 0.0, 0  # seconds spent in data + train_step (it/s excludes sampling, saving)
        saved_at = self.step if cfg.resume else -1
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        end = cfg.stop_at or cfg.steps
        while self.step < end:
            t0 = time.perf_counter()
            batch = to_device(next(it), self.device)
            self.batches_drawn += 1
            with self.autocast():
                logs = self.method.train_step(batch, self.step, self.stepper)
            self.step += 1
            n_window += 1
            t_window += time.perf_counter() - t0
            for k, v in (logs or {}).items():
                window[k].append(_scalar(v))
            if bar is not None:
                bar.update(1)
                if "loss" in window:
                    bar.set_postfix(loss=f"{window['loss'][-1]:.4f}", refresh=False)

            last = self.step == end
            if self.step % cfg.log_every == 0 or last:
                dt = t_window
                # window means, averaged over ranks (= the global-batch value for per-sample means)
                means = self.dist.mean_scalars({k: float(np.mean(v)) for k, v in window.items()})
                row = {"step": self.step, **means}
                row.update(self._lrs())
                row.update({f"grad_norm/{k}": v for k, v in self.stepper.last_grad_norm.items()})
                row.update({f"skipped/{k}": v for k, v in self.stepper.skipped.items()})
                row["it_per_s"] = n_window / dt if dt > 0 else float("nan")
                row["time"] = time.time()
                if self.is_main_process:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                window.clear()
                t_window, n_window = 0.0, 0
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                with self._unsharded():
                    if self.is_main_process:
                        self._sample()
            if self.step % cfg.ckpt_every == 0 or last:
                self.save()
                saved_at = self.step
            if cfg.max_minutes and self.dist.any_true(time.monotonic() > deadline):  # all ranks stop together
                logger.info("max_minutes=%g reached at step %d: stopping", cfg.max_minutes, self.step)
                break
        if saved_at != self.step:  # e.g. resumed at the end already
            self.save()
        if bar is not None:
            bar.close()
        return self.step
