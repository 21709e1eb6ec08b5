"""Per-sample Gaussian noise: image i depends only on its own generator, never on the batch size."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generators: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    ``generators`` is one ``torch.Generator`` per sample (a list of length ``shape[0]``), a single
    generator for the whole batch, or None (global RNG). Draws happen on the generator's device and
    are then moved, in the same order and with the same shapes as diffusers' ``randn_tensor``, so the
    two are bit-identical for the same generators.
    """
    shape = tuple(int(n) for n in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generators, Sequence) and not isinstance(generators, torch.Generator):
        gens = list(generators)
        if len(gens) == 1:  # diffusers treats a one-element list as a single generator
            generators = gens[0]
        else:
            if len(gens) != shape[0]:
                raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
            draws = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens]
            return torch.cat(draws, dim=0).to(device)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generators, device=generators.device, dtype=dtype).to(device)
