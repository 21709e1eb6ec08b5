"""Teacher noise -> image pairs (``scripts/teacher_pairs.py``) for the student's 1-step regression term.

A folder of shards ``pairs-NNNNN.pt`` (noise, x0, caption_index, w) and a ``meta.json`` naming the
latent cache whose captions the pairs used; the caption embeddings are read from that cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .latents import LatentDataset


class TeacherPairs:
    """All shards of a pairs folder in memory; ``batch(idx)`` gives the rows with their caption embeddings."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        meta_path = folder / "meta.json"
        shards = sorted(folder.glob("pairs-*.pt"))
        if not meta_path.is_file() or not shards:
            raise UserError(f"{folder} holds no teacher pairs (meta.json and pairs-*.pt; make them with "
                            "scripts/teacher_pairs.py)")
        self.meta = json.loads(meta_path.read_text())
        parts = [torch.load(p, map_location="cpu", weights_only=True) for p in shards]
        self.noise = torch.cat([p["noise"] for p in parts]).float()
        self.x0 = torch.cat([p["x0"] for p in parts]).float()
        self.caption_index = torch.cat([p["caption_index"] for p in parts]).long()
        self.w = torch.cat([p["w"] for p in parts]).float()
        try:
            cache = LatentDataset(self.meta["cache"])
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{folder}: the pairs' latent cache is not usable: {e}") from None
        self._embeds, self._masks = cache.text_embeds, cache.text_masks
        self.captions = cache.captions  # the unique captions, indexed by caption_index
        self.scaling_factor = cache.scaling_factor
        if int(self.caption_index.max()) >= len(self._embeds):
            raise UserError(f"{folder}: caption indices beyond the {len(self._embeds)} captions of {self.meta['cache']}")

    def __len__(self) -> int:
        return len(self.x0)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[1:])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx``: unit noise, unit-std teacher latents x0, float32 embeds, long masks, guidance w."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        cid = self.caption_index[idx].numpy()
        return {
            "noise": self.noise[idx], "x0": self.x0[idx], "w": self.w[idx],
            "embeds": torch.from_numpy(np.asarray(self._embeds[cid]).astype(np.float32)),
            "mask": torch.from_numpy(np.asarray(self._masks[cid]).astype(np.int64)),
        }
