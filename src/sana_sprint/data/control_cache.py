"""Control-latent cache: the ControlNet condition of every row of a latent cache, VAE-encoded once.

A control cache sits next to a latent cache (``<latent cache>-<condition>`` by default) and holds, for
row ``i`` of that cache, the VAE latent of ``condition(image_i)`` (``conditions.scribble`` or the thin
``conditions.edge_map``). The images are re-read in the latent cache's own order (the shapes world is a
pure function of (seed, index); an image folder is read in its row order), so training never renders.
Layout::

    meta.json      {"condition", "source_cache", "n", "done", "complete", "latent_shape", "scaling_factor", ...}
    control.npy    float16 [N, C, h, w]  raw VAE latents of the condition images (NOT scaled)

Building is resumable in chunks, as the latent cache's. Before writing anything the first chunk's
*images* are encoded too and compared with the cached latents: a control cache built from other
images than its latent cache (another seed, size or folder) is refused instead of silently pairing
conditions with the wrong latents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import conditions
from .latents import LatentDataset

Condition = Literal["scribble", "edges"]
CONDITIONS: tuple[str, ...] = ("scribble", "edges")
META = "meta.json"
CONTROL = "control.npy"
# Re-encoded images must reproduce the cached latents to this fraction of their std (fp16 storage,
# another device or thread count move them by ~1e-3 of the std; other images by ~1).
MATCH_TOLERANCE = 0.05


def condition_image(image: np.ndarray, condition: Condition = "scribble") -> np.ndarray:
    """uint8 [H, W, 3] image -> uint8 [H, W, 3] condition (white on black)."""
    if condition == "scribble":
        return conditions.scribble(image)
    if condition == "edges":
        return np.repeat((conditions.edge_map(image).astype(np.uint8) * 255)[..., None], 3, axis=-1)
    raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")


def _uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3] (the world's own rendering is uint8: this round trip is exact)."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def default_control_dir(latent_cache: str | Path, condition: Condition) -> Path:
    p = Path(latent_cache)
    return p.with_name(f"{p.name}-{condition}")


def is_control_cache(path: str | Path) -> bool:
    return (Path(path) / META).is_file() and (Path(path) / CONTROL).is_file()


def _encode(vae, images: torch.Tensor) -> np.ndarray:
    param = next(vae.parameters())
    with torch.no_grad():
        lat = vae.encode(images.to(param.device, param.dtype)).latent
    return lat.float().cpu().numpy()


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


def build_control_cache(
    latent_cache: str | Path,
    vae,
    out_dir: str | Path | None = None,
    condition: Condition = "scribble",
    batch: int = 128,
    progress: bool = True,
) -> Path:
    """Encode the condition of every row of ``latent_cache`` into ``out_dir`` (resumes a partial build)."""
    from .latents import _items

    data = LatentDataset(latent_cache)
    out = Path(out_dir) if out_dir is not None else default_control_dir(latent_cache, condition)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    src = data.meta
    n = len(data)
    want = {"condition": condition, "source": src["source"], "seed": src["seed"], "size": src["size"], "n": n}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} != want:
            raise ValueError(f"{out} holds a control cache for {({k: meta.get(k) for k in want})}, not {want}: use another directory")
        if meta.get("complete"):
            return out
        ctrl = np.load(out / CONTROL, mmap_mode="r+")
    else:
        meta = {**want, "version": 1, "done": 0, "complete": False, "source_cache": str(Path(latent_cache).resolve()),
                "latent_shape": list(data.latent_shape), "scaling_factor": data.scaling_factor}
        ctrl = np.lib.format.open_memmap(out / CONTROL, mode="w+", dtype=np.float16, shape=(n, *data.latent_shape))
        _write_meta(meta_path, meta)
    done = int(meta["done"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=done, desc=f"control cache ({condition})", dynamic_ncols=True)
    items = _items(src["source"], int(src["size"]), int(src["seed"]), done)
    checked = done > 0
    while done < n:
        chunk = [next(items) for _ in range(min(batch, n - done))]
        images = torch.stack([c["image"] for c in chunk])
        if not checked:
            check_images_match(_encode(vae, images), np.asarray(data.latents[done : done + len(chunk)], np.float32), out)
            checked = True
        conds = torch.stack([conditions.to_tensor(condition_image(_uint8(im), condition)) for im in images])
        ctrl[done : done + len(chunk)] = _encode(vae, conds).astype(np.float16)
        ctrl.flush()
        done += len(chunk)
        meta["done"] = done
        _write_meta(meta_path, meta)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    meta["complete"] = True
    _write_meta(meta_path, meta)
    return out


def check_images_match(encoded: np.ndarray, cached: np.ndarray, where: Path) -> None:
    err = float(np.abs(encoded - cached).max()) / (float(cached.std()) + 1e-8)
    if not err < MATCH_TOLERANCE:
        raise ValueError(f"{where}: re-read images do not reproduce the latent cache (max error {err:.3g} std): "
                         "the control cache must be built from the same images, in the same order")


class ControlDataset(LatentDataset):
    """A :class:`LatentDataset` whose batches also carry ``"control"``: raw VAE latents of the rows' conditions."""

    def __init__(self, latent_cache: str | Path, control_cache: str | Path):
        super().__init__(latent_cache)
        self.control_path = Path(control_cache)
        if not is_control_cache(self.control_path):
            raise FileNotFoundError(f"{self.control_path} is not a control cache (no {META} / {CONTROL})")
        self.control_meta = json.loads((self.control_path / META).read_text())
        if not self.control_meta.get("complete"):
            raise ValueError(f"control cache {self.control_path} is incomplete: rebuild to finish it")
        if int(self.control_meta["n"]) != len(self) or tuple(self.control_meta["latent_shape"]) != self.latent_shape:
            raise ValueError(f"control cache {self.control_path} does not match latent cache {self.path}")
        self.condition: str = self.control_meta["condition"]
        self.control = np.load(self.control_path / CONTROL, mmap_mode="r")[: len(self)]

    def batch(self, indices) -> dict[str, Any]:
        out = super().batch(indices)
        idx = out["index"].numpy()
        order = np.argsort(idx, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        out["control"] = torch.from_numpy(np.asarray(self.control[idx[order]])[inv].astype(np.float32))
        return out
