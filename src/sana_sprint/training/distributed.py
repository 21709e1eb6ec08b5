"""Multi-process data-parallel training: the process group (through accelerate), rank-sliced data, collectives.

Launch any training command on N processes with accelerate (CUDA: one GPU per process, NCCL; CPU: gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m sana_sprint.cli distill --batch 8 ...
    torchrun --nproc_per_node 2 -m sana_sprint.cli distill ...          # equivalent

(On a CPU-only machine keep ``--multi_gpu``: accelerate 1.x's ``--cpu --num_processes 2`` starts a
single process.)

``--batch`` is the **global** batch (it must divide by the number of processes; each process runs
``batch / num_processes`` rows), so one command means the same data schedule on any number of
processes. What the :class:`~sana_sprint.training.trainer.Trainer` does with more than one process:

- **Data**: every rank advances the same global loader (``batch`` indices per step, the same
  permutation everywhere) and reads only its own contiguous slice ``[rank*B, (rank+1)*B)`` with
  ``B = batch / world`` (:class:`RankShard`). Together the ranks see exactly the rows a 1-process
  run with the same ``batch`` sees, in the same order.
- **Gradients**: an explicit all-reduce (mean over ranks) inside ``Stepper.step`` after backward and
  *before* the non-finite check and the global-norm clip, so every rank clips the same averaged
  gradient and takes the same step; a non-finite loss or gradient on any rank skips the step on all
  ranks. Chosen over wrapping the networks in ``DistributedDataParallel`` because a distillation step
  calls the student several times per update (a ``torch.func.jvp`` under ``no_grad``, a doubled
  gradient forward, sampling without grad), runs G and D optimisers over different parameter sets
  and reads teacher features with forward hooks: DDP's reducer expects exactly one forward + one
  backward per wrapped module, does not run under functorch transforms, and needs
  ``find_unused_parameters`` for frozen sub-modules (e.g. the guidance embedder with
  ``cfg_embed=False``). One flattened all-reduce per optimiser step costs the same bandwidth as DDP
  without the overlap with backward (fine for the transformer sizes here; an overlap would be the
  next optimisation).
- **Weights**: every rank seeds identically before building (identical init) and the trainer then
  broadcasts every state module from rank 0 anyway (after a resume too).
- **Randomness**: rank 0 keeps the configured seeds (a 1-process run is unchanged); rank r > 0
  re-seeds the method's generators and the global RNGs with seeds derived from (seed, r), so ranks
  draw independent noise / times. Checkpoints store every rank's RNG state. A method may instead
  keep a generator identical on all ranks (``sync_generators``) and draw global-batch rows with
  :class:`RankDraws` (the distillation method does: exact equality with one process).
- **Files**: checkpoints, ``metrics.jsonl`` (scalars averaged over ranks), ``loss.png``, sample
  grids and exported folders are written by the main process only; every rank resumes from the
  same checkpoint.

Exact equivalence with a 1-process run of the same global batch therefore holds for the data, the
gradient reduction and the update, and for the losses whenever the method's random draws do not
depend on the rank. The distillation method makes its draws rank-independent with
:class:`RankDraws`: one generator, in the same state on every rank (:meth:`Distributed.sync_generators`),
draws every per-sample quantity (times, noise, guidance, max-time choices) for the *global* batch
and each rank keeps its own rows, so the union over ranks is the 1-process draw. Its batch-coupled
terms (the discriminator's virtual batch norm and the misaligned pairs) act on fixed groups of
``disc_group`` contiguous samples, which never cross a rank boundary because the per-rank batch
must be a multiple of ``disc_group``. A 2-process distillation run then equals the 1-process run
with the same global batch up to float rounding (tests/test_multiprocess.py measures it).

``--fsdp`` (``training/fsdp.py``) shards a method's transformer with FSDP2 on top of this: sharded
gradients are averaged by FSDP's reduce-scatter and skipped by the explicit all-reduce
(:meth:`Distributed.average_gradients`), the global norm sums the shards (:func:`sharded_grad_norm`),
sharded weights are not broadcast (:meth:`Distributed.broadcast_modules`; they are broadcast once,
whole, before sharding) and checkpoints hold full tensors. Supported for teacher training
(``train-teacher``) and distillation (``distill``, the student sharded, the sCM JVP runs through it);
``--controlnet`` runs and ``train-controlnet`` refuse it (see ``fsdp.py``). Gradient checkpointing
(``--gradient-checkpointing``) is the other memory lever; it is never active inside the sCM JVP
(``losses/scm.py`` turns it off and runs the JVP under ``no_grad``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """WORLD_SIZE set by ``accelerate launch`` / ``torchrun`` (1 when started directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def derive_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank`` from ``seed``: rank 0 keeps ``seed``; others get independent 63-bit seeds."""
    if rank == 0:
        return int(seed)
    ss = np.random.SeedSequence([int(seed) % 2**63, int(rank)])
    return int(ss.generate_state(1, np.uint64)[0] % 2**63)


class Distributed:
    """The trainer's view of the process group. With one process every collective is a no-op.

    Created by :func:`setup`; process-group creation is delegated to accelerate's ``PartialState``
    (which reads the launcher's environment and picks NCCL on CUDA, gloo on CPU).
    """

    def __init__(self, device: str = "auto"):
        self.world_size = launched_world_size()
        self.state = None
        if self.world_size > 1:
            from accelerate import PartialState

            want_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            self.state = PartialState(cpu=want_cpu)
            self.rank = int(self.state.process_index)
            self.local_rank = int(self.state.local_process_index)
            self.world_size = int(self.state.num_processes)
        else:
            self.rank, self.local_rank = 0, 0

    # --- identity ---

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def device(self, spec: str = "auto") -> torch.device:
        """The device of this process: ``cuda`` (any spelling without an index) becomes ``cuda:local_rank``."""
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(spec)
        if self.enabled and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    # --- collectives (no-ops for one process) ---

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_process_first(self):
        """Rank 0 runs the block first (e.g. builds a data cache), the others after it finished."""
        if not self.enabled:
            yield
            return
        if not self.is_main_process:
            self.barrier()
        yield
        if self.is_main_process:
            self.barrier()

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=op)
        return t

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is True on every rank."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        return bool(self._reduce(t, torch.distributed.ReduceOp.MIN).item() > 0.5)

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def _comm_device(self) -> torch.device:
        if self.enabled and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def mean_scalars(self, values: Mapping[str, float]) -> dict[str, float]:
        """Per-key mean over ranks (every rank must pass the same keys)."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        gathered = self.gather_object(keys)
        if any(k != keys for k in gathered):
            raise RuntimeError(f"ranks logged different keys: {gathered}")
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        self._reduce(t, torch.distributed.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace every ``p.grad`` by its mean over ranks (one flattened all-reduce per dtype/device).

        A parameter that has a gradient on some rank but not on this one takes part with zeros; one
        that has none on any rank keeps ``grad = None`` (the optimiser then skips it, as it would in
        a single process).
        """
        params = [p for p in params if not _is_dtensor(p)]  # FSDP shards: reduce-scattered (mean) in backward
        if not self.enabled or not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self._comm_device())
        self._reduce(has, torch.distributed.ReduceOp.MAX)
        live = []
        for p, h in zip(params, has.tolist()):
            if h > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                live.append(p)
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in live:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for (device, _), grads in sorted(groups.items(), key=lambda kv: str(kv[0])):
            flat = torch.cat([g.reshape(-1) for g in grads])
            comm = self._comm_device()
            buf = flat.to(comm) if flat.device != comm else flat
            self._reduce(buf, torch.distributed.ReduceOp.SUM)
            buf = buf.div_(self.world_size).to(device)
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(buf[offset : offset + n].view_as(g))
                offset += n

    def broadcast_modules(self, modules: Mapping[str, nn.Module], src: int = 0) -> None:
        """Copy every parameter and buffer of ``modules`` from rank ``src`` to all ranks."""
        if not self.enabled:
            return
        comm = self._comm_device()
        for name in sorted(modules):
            for t in list(modules[name].state_dict(keep_vars=True).values()):
                data = t.data if isinstance(t, nn.Parameter) else t
                if not isinstance(data, torch.Tensor) or _is_dtensor(data):  # FSDP shard: each rank owns its own
                    continue
                buf = data.detach().to(comm).contiguous() if data.device != comm else data.detach().contiguous()
                torch.distributed.broadcast(buf, src=src)
                if buf.data_ptr() != data.data_ptr():
                    data.copy_(buf.to(data.device))

    def reseed_rank(self, seed: int, generators: Mapping[str, torch.Generator]) -> None:
        """Rank r > 0: independent streams for the global RNGs and the method's generators."""
        if not self.enabled or self.rank == 0:
            return
        import random

        s = derive_seed(seed, self.rank)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        for g in generators.values():
            g.manual_seed(derive_seed(g.initial_seed(), self.rank))


    def sync_generators(self, generators: Mapping[str, torch.Generator]) -> None:
        """Give every rank rank 0's generator states (collective; call on all ranks at the same point)."""
        if not self.enabled or not generators:
            return
        states = self.gather_object({k: g.get_state() for k, g in generators.items()})[0]
        for k, g in generators.items():
            g.set_state(states[k])


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def has_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """True if any tensor is an FSDP shard (a ``DTensor``)."""
    return any(_is_dtensor(t) for t in tensors)


def sharded_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of gradients some of which are FSDP shards (collective over the shards' mesh).

    A shard contributes the squared norm of its local part, summed over ranks by one all-reduce;
    a plain (replicated, already averaged) gradient counts once. Float32, like the 1-process norm.
    """
    sharded = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    dev = sharded[0].to_local().device
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    for g in sharded:
        sq = sq + torch.linalg.vector_norm(g.to_local().detach().float()).square()
    torch.distributed.all_reduce(sq, group=sharded[0].device_mesh.get_group())
    for g in plain:
        sq = sq + torch.linalg.vector_norm(g.detach().float()).to(dev).square()
    return sq.sqrt()


class RankDraws:
    """Per-sample random draws made for the global batch, of which this rank keeps its own rows.

    ``generator`` must be in the same state on every rank. ``rows(fn, n)`` calls
    ``fn(n * world_size, generator)`` (a tensor whose rows are per-sample draws) and returns rows
    ``[rank*n, (rank+1)*n)``: every rank advances the generator identically and the ranks' rows
    together are exactly what one process with the global batch draws. With ``segments = k`` the
    local batch is k stacked blocks of ``n/k`` samples (e.g. [fakes; misaligned reals]) and the global
    draw is laid out the same way ([all ranks' fakes; all ranks' misaligned reals]). With one process
    ``rows`` is just ``fn(n, generator)``.
    """

    def __init__(self, generator: torch.Generator | None, rank: int = 0, world_size: int = 1):
        self.generator, self.rank, self.world_size = generator, int(rank), int(world_size)

    def rows(self, fn, n: int, segments: int = 1) -> torch.Tensor:
        if self.world_size == 1:
            return fn(n, self.generator)
        if n % segments:
            raise ValueError(f"{n} rows do not split into {segments} equal segments")
        t = fn(n * self.world_size, self.generator)
        m = n // segments
        return t.reshape(segments, self.world_size, m, *t.shape[1:])[:, self.rank].reshape(n, *t.shape[1:])


_CURRENT: Distributed | None = None


def setup(device: str = "auto") -> Distributed:
    """The process's :class:`Distributed` (created once; the process group lives until exit)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Distributed(device)
    return _CURRENT


def single() -> Distributed:
    """A one-process :class:`Distributed` regardless of the environment (for in-process tools)."""
    d = Distributed.__new__(Distributed)
    d.world_size, d.rank, d.local_rank, d.state = 1, 0, 0, None
    return d


class RankShard:
    """This rank's slice of a global-batch iterable: rows ``[rank*B, (rank+1)*B)`` of every batch.

    A loader with ``next_indices()`` and ``dataset.batch(indices)`` (``LatentLoader``) is sliced at
    the index level, so a rank reads only its own rows; any other iterable of batches (dicts of
    tensors / lists, tensors, tuples) is sliced after loading. ``state_dict`` / ``load_state_dict``
    pass through to the global loader, whose position is the same on every rank.
    """

    def __init__(self, data: Iterable, rank: int, world_size: int):
        self.data, self.rank, self.world_size = data, int(rank), int(world_size)
        self._it = None
        if hasattr(data, "state_dict"):
            self.state_dict = data.state_dict
            self.load_state_dict = data.load_state_dict

    def _slice(self, n: int) -> slice:
        if n % self.world_size:
            from ..errors import UserError

            raise UserError(f"batch {n} does not split evenly over {self.world_size} processes")
        b = n // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def _cut(self, batch: Any, sl: slice) -> Any:
        if isinstance(batch, torch.Tensor | np.ndarray | list):
            return batch[sl]
        if isinstance(batch, Mapping):
            return {k: self._cut(v, sl) for k, v in batch.items()}
        if isinstance(batch, tuple):
            return tuple(self._cut(v, sl) for v in batch)
        return batch

    @staticmethod
    def _rows(batch: Any) -> int:
        if isinstance(batch, Mapping):
            batch = next(v for v in batch.values() if isinstance(v, torch.Tensor | np.ndarray | list))
        elif isinstance(batch, tuple):
            batch = batch[0]
        return len(batch)

    def __iter__(self) -> RankShard:
        return self

    def __next__(self) -> Any:
        if hasattr(self.data, "next_indices") and hasattr(self.data, "dataset"):
            idx = self.data.next_indices()
            return self.data.dataset.batch(idx[self._slice(len(idx))])
        if self._it is None:
            self._it = iter(self.data)
        batch = next(self._it)
        return self._cut(batch, self._slice(self._rows(batch)))
