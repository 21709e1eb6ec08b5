"""FSDP (``--fsdp``): shard the trained transformer's weights, gradients and optimiser state over the processes.

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``; works on CPU/gloo and CUDA/NCCL) wraps every
diffusers ``SanaTransformerBlock`` as its own unit and the sharded module itself as the root unit
(the transformer's embeddings, caption projection and output head; for distillation also the
student's logvar head). Each rank then keeps ``1/N`` of every parameter as
a ``DTensor`` (dim-0 shard); a unit's full weights exist only while it runs (all-gathered in its
forward and again in its backward), and the backward reduce-scatters the gradients (mean over
ranks), so each rank holds and updates only its shard of the weights, gradients and Adam moments.

What the rest of the infrastructure does with sharded modules (see ``trainer.py``, ``distributed.py``):

- The method names what to shard with ``fsdp_modules() -> {name: module}`` (the teacher: its
  transformer; distillation: the student wrapper = transformer + logvar head, while the frozen
  teacher and the discriminator heads stay replicated). A method without it refuses ``--fsdp`` with a
  :class:`UserError`. Every rank's copy is broadcast from rank 0 before sharding, and the method's
  optimisers are re-pointed at the sharded parameters (FSDP replaces the ``nn.Parameter`` objects);
  a param group may not mix shards and plain tensors (foreach kernels refuse such lists).
- ``Stepper.step``: the explicit gradient all-reduce skips sharded gradients (already averaged by
  the reduce-scatter); the global norm for the non-finite check and the clip sums every rank's
  shard (:func:`~sana_sprint.training.distributed.sharded_grad_norm`), so the clip is the 1-process
  clip of the global-batch gradient.
- Checkpoints stay in the 1-process format: :meth:`Sharded.full_state` gathers full (unsharded)
  weights and optimiser states (collective), the main process writes them; :meth:`Sharded.loaders`
  load a full checkpoint into the shards (a state module may be a part of a sharded module). A
  checkpoint written under FSDP resumes a plain run and vice versa.
- :func:`gathered` all-gathers a sharded module's full weights for a moment on every rank (the
  teacher's EMA update reads them); the EMA itself, sample grids and exports stay unsharded.
- A method that samples or exports a sharded module (distillation) defines ``fsdp_unsharded(keep)``:
  the trainer enters it on every rank around the main process's ``sample_grid`` / ``export``; it
  gathers a plain full-weight copy (:func:`unsharded_copy`: the original class, so the export is a
  normal ``SanaTransformer2DModel``) that only the main process keeps and uses.

Gradient checkpointing composes with it (FSDP re-gathers a unit for the recomputation).
With one process ``--fsdp`` is ignored (a warning): the run is the plain one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UserError

logger = logging.getLogger(__name__)


def block_classes() -> tuple[type, ...]:
    """Module classes that become their own FSDP unit (diffusers' Sana transformer block)."""
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    return (SanaTransformerBlock,)


def wrap_targets(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every outermost transformer block inside ``module``, in module order.

    These are wrapped first, then ``module`` itself (the root unit, holding everything else).
    """
    classes = block_classes()
    out: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if name and isinstance(m, classes) and not any(name.startswith(n + ".") for n, _ in out):
            out.append((name, m))
    return out


def shard_module(module: nn.Module, mesh) -> nn.Module:
    """FSDP2 in place: every block of :func:`wrap_targets` its own unit, then ``module`` as the root unit."""
    from torch.distributed.fsdp import fully_shard

    blocks = wrap_targets(module)
    if not blocks:
        raise UserError(f"--fsdp: {type(module).__name__} has no transformer block to shard")
    for _, block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Inside the block, an FSDP-sharded ``module`` holds its full weights as plain parameters.

    Collective: every rank must enter it at the same point. A module without FSDP units is left as is.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
    try:
        yield module
    finally:
        for u in units:
            u.reshard()


def unsharded_class(module: nn.Module) -> type:
    """The class ``module`` had before ``fully_shard`` (FSDP2 swaps it for a ``FSDP<Name>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` with every FSDP shard gathered to its full tensor (on the module's device).

    Collective (one all-gather per sharded tensor, in ``state_dict`` order); ranks without ``keep``
    drop each gathered tensor at once and get None.
    """
    state: dict[str, torch.Tensor] = {}
    for k, v in module.state_dict().items():
        full = _full(v).detach()
        if keep:
            state[k] = full
    return state if keep else None


def unsharded_copy(module: nn.Module, keep: bool = True) -> nn.Module | None:
    """A plain (non-FSDP) copy of an FSDP-sharded diffusers model, holding the full weights.

    Collective: every rank calls it at the same point (one all-gather per sharded tensor, in
    ``state_dict`` order); only ranks with ``keep`` build the copy (the others drop each gathered
    tensor at once and get None, so their peak is one full tensor). The copy is the model's original
    class (``save_pretrained`` writes e.g. ``SanaTransformer2DModel``, not ``FSDPSana...``), built from
    ``module.config`` and loaded strictly, on the module's device, in the module's training mode. It
    is a snapshot: it is not updated by later steps and its gradients go nowhere.
    """
    state = full_state_dict(module, keep)
    if state is None:
        return None
    cls = unsharded_class(module)
    config = getattr(module, "config", None)
    if config is None or not hasattr(cls, "from_config"):
        raise TypeError(f"unsharded_copy: {cls.__name__} is not a diffusers model (no config to rebuild it from)")
    first = next(iter(state.values()))
    copy = cls.from_config(config).to(first.device, first.dtype)
    copy.load_state_dict(state, strict=True)
    return copy.train(module.training)


class _FullState:
    """Stand-in for a module or optimiser in ``save_checkpoint``: ``state_dict()`` is a gathered dict."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class _ModuleLoader:
    """Stand-in for a sharded module in ``load_checkpoint``: loads a full state dict into the shards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return self.module.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        from torch.distributed.tensor import distribute_tensor

        own = self.module.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise RuntimeError(f"state dict mismatch for {type(self.module).__name__}: missing {missing}, "
                               f"unexpected {unexpected}")
        for k, cur in own.items():
            if k not in state:
                continue
            src = state[k]
            if tuple(src.shape) != tuple(cur.shape):
                raise RuntimeError(f"{k}: checkpoint shape {tuple(src.shape)} != model shape {tuple(cur.shape)}")
            if is_sharded(cur):  # every rank holds the full tensor: each keeps its own shard, no communication
                src = distribute_tensor(src.to(cur.device, cur.dtype), cur.device_mesh, cur.placements,
                                        src_data_rank=None)
                cur.to_local().copy_(src.to_local())
            else:
                cur.copy_(src.to(cur.device, cur.dtype))


class _OptimizerLoader:
    """Stand-in for an optimiser over sharded parameters: loads a full (1-process format) state dict."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        self.opt.load_state_dict(state)  # full-shape state tensors for sharded parameters: shard them
        for group in self.opt.param_groups:
            for p in group["params"]:
                if not is_sharded(p) or p not in self.opt.state:
                    continue
                st = self.opt.state[p]
                for k, v in list(st.items()):
                    if isinstance(v, torch.Tensor) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                        st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def _full(t: Any) -> Any:
    return t.full_tensor() if is_sharded(t) else t


class Sharded:
    """The modules :func:`shard_method` sharded, and the checkpoint conversions for them."""

    def __init__(self, modules: Mapping[str, nn.Module], mesh):
        self.modules = dict(modules)
        self.mesh = mesh
        # a sharded module or any module inside one (a state module may be a part of an FSDP root,
        # e.g. the distillation student's transformer and logvar head inside the sharded wrapper)
        self._inside = {id(sub) for m in self.modules.values() for sub in m.modules()}

    def _is_ours(self, module: Any) -> bool:
        return id(module) in self._inside

    def full_state(self, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
                   keep: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(modules, optimizers) for ``save_checkpoint``: sharded entries replaced by their full state.

        Collective (one all-gather per sharded tensor, the same order on every rank). Only ranks with
        ``keep`` hold the gathered tensors (the others drop each one at once).
        """
        mods: dict[str, Any] = {}
        for name, m in modules.items():
            if not self._is_ours(m):
                mods[name] = m
                continue
            sd = {}
            for k, v in m.state_dict().items():
                full = _full(v).detach()
                if keep:
                    sd[k] = full.to("cpu")
            mods[name] = _FullState(sd)
        opts: dict[str, Any] = {}
        for name, opt in optimizers.items():
            sharded = any(is_sharded(p) for g in opt.param_groups for p in g["params"])
            if not sharded:
                opts[name] = opt
                continue
            sd = opt.state_dict()
            state = {}
            for pid in sorted(sd["state"]):
                entry = {}
                for k in sorted(sd["state"][pid]):
                    full = _full(sd["state"][pid][k])
                    if keep:
                        entry[k] = full
                state[pid] = entry
            opts[name] = _FullState({"state": state, "param_groups": sd["param_groups"]} if keep else {})
        return mods, opts

    def loaders(self, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]
                ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(modules, optimizers) for ``load_checkpoint``: sharded entries load full state dicts into shards."""
        mods = {k: _ModuleLoader(m) if self._is_ours(m) else m for k, m in modules.items()}
        opts = {k: _OptimizerLoader(o) if any(is_sharded(p) for g in o.param_groups for p in g["params"]) else o
                for k, o in optimizers.items()}
        return mods, opts


def shard_method(method: Any, dist, device: torch.device) -> Sharded | None:
    """Shard ``method.fsdp_modules()`` with FSDP2 (blocks, then the root) and re-point its optimisers.

    Returns None (after a warning) for a 1-process run. Call before the first forward and before any
    optimiser step (the optimiser state must still be empty).
    """
    get = getattr(method, "fsdp_modules", None)
    if get is None:
        raise UserError(f"--fsdp: {type(method).__name__} does not support FSDP (supported: train-teacher, "
                        "finetune-teacher, distill); "
                        "run it without --fsdp (data parallel, --gradient-checkpointing saves memory)")
    targets = dict(get())
    if not dist.enabled:
        logger.warning("--fsdp with one process: nothing to shard, training unsharded")
        return None
    from torch.distributed.device_mesh import init_device_mesh

    for name, opt in method.optimizers().items():
        if opt.state:
            raise RuntimeError(f"shard_method: optimiser {name!r} already has state")
    dist.broadcast_modules(targets)  # identical full weights everywhere before each rank keeps its shard
    mesh = init_device_mesh(device.type, (dist.world_size,))
    old = {id(p): (mname, pname) for mname, m in targets.items() for pname, p in m.named_parameters()}
    for m in targets.values():
        shard_module(m, mesh)
    new = {(mname, pname): p for mname, m in targets.items() for pname, p in m.named_parameters()}
    for name, opt in method.optimizers().items():
        for group in opt.param_groups:
            group["params"] = [new[old[id(p)]] if id(p) in old else p for p in group["params"]]
            if len({is_sharded(p) for p in group["params"]}) > 1:  # foreach kernels refuse DTensor + Tensor lists
                raise RuntimeError(f"--fsdp: optimiser {name!r} mixes sharded and unsharded parameters in one "
                                   "param group; shard the module that holds the others too")
    n_full = sum(p.numel() for m in targets.values() for p in m.parameters())
    n_local = sum(p.to_local().numel() for m in targets.values() for p in m.parameters())
    logger.info("fsdp: sharded %s over %d processes (%d blocks): %d of %d parameters on this rank",
                ", ".join(targets), dist.world_size, sum(len(wrap_targets(m)) for m in targets.values()),
                n_local, n_full)
    return Sharded(targets, mesh)
