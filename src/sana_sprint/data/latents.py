"""Latent + text caching: encode a dataset once with the VAE and the text encoder, then train from memmaps.

Cache directory layout (all arrays are ``.npy`` files, opened memory-mapped)::

    meta.json          shapes, counts, source, VAE scaling factor, text encoder; ``done`` = rows written
    latents.npy        float16 [N, C, h, w]  raw VAE latents (NOT multiplied by the scaling factor)
    caption_index.npy  int32   [N]           row -> unique caption id
    text_embeds.npy    float16 [N, L, D]     embeddings of the unique captions (first n_unique rows used)
    text_masks.npy     uint8   [N, L]
    captions.json      the unique captions, in id order
    null_embed.npy     float16 [1, L, D] and null_mask.npy uint8 [1, L]: the empty prompt (CFG's null)

Building is resumable: rows are written in chunks and ``meta.json`` (atomically replaced) records how
many are complete; a killed build continues from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError

CACHE_VERSION = 1
META = "meta.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_latent_cache(path: str | Path) -> bool:
    return (Path(path) / META).is_file() and (Path(path) / "latents.npy").is_file()


def _items(dataset_spec: Any, size: int, seed: int, start: int) -> Iterator[dict]:
    """Samples start, start+1, ... of a dataset spec ("shapes", a folder, or a dataset object)."""
    from .imagefolder import make_dataset
    from .shapes import ShapesDataset, is_shapes_spec, parse_shapes_spec

    if isinstance(dataset_spec, str | Path):
        if is_shapes_spec(str(dataset_spec)):
            yield from ShapesDataset(size=size, seed=seed, start=start, task_weights=parse_shapes_spec(str(dataset_spec)))
            return
        ds = make_dataset(str(dataset_spec), size=size, seed=seed)
    else:
        ds = dataset_spec
    if hasattr(ds, "__getitem__") and hasattr(ds, "__len__"):
        for i in range(start, len(ds)):
            yield ds[i]
        return
    it = iter(ds)
    for _ in range(start):
        next(it)
    yield from it


def _encode_latents(vae, images: torch.Tensor, autocast: bool) -> torch.Tensor:
    device = next(vae.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = vae.encode(images.to(device))
    lat = out.latent if hasattr(out, "latent") else out.latent_dist.mode()
    return lat.float().cpu()


def build_latent_cache(
    dataset_spec: Any,
    vae,
    text_encoder,
    n: int,
    out_dir: str | Path,
    batch: int = 64,
    *,
    size: int = 64,
    seed: int = 0,
    autocast: bool = False,
    progress: bool = True,
) -> Path:
    """Encode the first ``n`` samples of ``dataset_spec`` into ``out_dir`` (resumes a partial cache).

    ``vae``: an AutoencoderDC-like module (``encode(img).latent``); ``text_encoder``: an object with
    ``encode(list[str]) -> (embeds [B, L, D], mask [B, L])`` and ``null_embedding()``. A folder dataset
    with fewer than ``n`` usable rows gives a cache of that many rows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    source = str(dataset_spec) if isinstance(dataset_spec, str | Path) else type(dataset_spec).__name__
    null_e, null_m = text_encoder.null_embedding()
    L, D = int(null_e.shape[1]), int(null_e.shape[2])

    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["n"] != n or meta["source"] != source or meta["seed"] != seed or meta["size"] != size:
            raise ValueError(
                f"{out} holds a cache of {meta['n']} rows of {meta['source']!r} (seed {meta['seed']}, size {meta['size']}); "
                f"asked for {n} of {source!r} (seed {seed}, size {size}): use another directory"
            )
        if meta.get("complete"):
            return out
        uniques: list[str] = json.loads((out / "captions.json").read_text())[: meta["n_unique"]]
        lat = np.load(out / "latents.npy", mmap_mode="r+")
    else:
        first = next(_items(dataset_spec, size, seed, 0))
        shape = tuple(_encode_latents(vae, first["image"][None], autocast).shape[1:])
        meta = {
            "version": CACHE_VERSION, "n": n, "done": 0, "n_unique": 0, "complete": False,
            "source": source, "seed": seed, "size": size, "latent_shape": list(shape),
            "text_shape": [L, D], "scaling_factor": float(getattr(vae.config, "scaling_factor", 1.0)),
            "text_encoder": getattr(text_encoder, "spec", None), "max_length": L,
        }
        uniques = []
        lat = np.lib.format.open_memmap(out / "latents.npy", mode="w+", dtype=np.float16, shape=(n, *shape))
        np.lib.format.open_memmap(out / "caption_index.npy", mode="w+", dtype=np.int32, shape=(n,))
        # Capacity n for the unique embeddings: untouched pages of a sparse file cost no disk.
        np.lib.format.open_memmap(out / "text_embeds.npy", mode="w+", dtype=np.float16, shape=(n, L, D))
        np.lib.format.open_memmap(out / "text_masks.npy", mode="w+", dtype=np.uint8, shape=(n, L))
        np.save(out / "null_embed.npy", null_e.detach().cpu().float().numpy().astype(np.float16))
        np.save(out / "null_mask.npy", null_m.detach().cpu().numpy().astype(np.uint8))
        _atomic_write_text(out / "captions.json", "[]")
        _atomic_write_text(meta_path, json.dumps(meta, indent=1))
    cidx = np.load(out / "caption_index.npy", mmap_mode="r+")
    temb = np.load(out / "text_embeds.npy", mmap_mode="r+")
    tmask = np.load(out / "text_masks.npy", mmap_mode="r+")
    ids = {c: i for i, c in enumerate(uniques)}

    done = int(meta["done"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=done, desc="latent cache", dynamic_ncols=True)
    items = _items(dataset_spec, size, seed, done)
    exhausted = False
    while done < n and not exhausted:
        chunk = []
        for item in items:
            chunk.append(item)
            if len(chunk) == min(batch, n - done):
                break
        else:
            exhausted = True
        if not chunk:
            break
        images = torch.stack([c["image"] for c in chunk])
        lat[done : done + len(chunk)] = _encode_latents(vae, images, autocast).numpy().astype(np.float16)
        new = list(dict.fromkeys(c["caption"] for c in chunk if c["caption"] not in ids))
        if new:
            e, m = text_encoder.encode(new)
            k = len(uniques)
            temb[k : k + len(new)] = e.detach().cpu().float().numpy().astype(np.float16)
            tmask[k : k + len(new)] = m.detach().cpu().numpy().astype(np.uint8)
            for c in new:
                ids[c] = len(uniques)
                uniques.append(c)
        cidx[done : done + len(chunk)] = [ids[c["caption"]] for c in chunk]
        for a in (lat, cidx, temb, tmask):
            a.flush()
        done += len(chunk)
        _atomic_write_text(out / "captions.json", json.dumps(uniques))
        meta.update(done=done, n_unique=len(uniques))
        _atomic_write_text(meta_path, json.dumps(meta, indent=1))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    meta.update(complete=True, n=done)  # a short folder dataset: the cache holds what exists
    _atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return out


class CacheMeta:
    """Accessors shared by latent-cache readers: needs ``self.path`` (folder) and ``self.meta`` (its meta.json)."""

    @property
    def scaling_factor(self) -> float:
        return float(self.meta["scaling_factor"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["latent_shape"])

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [1, L, D] float32, mask [1, L] long) of the empty prompt, as cached."""
        e = torch.from_numpy(np.load(self.path / "null_embed.npy").astype(np.float32))
        m = torch.from_numpy(np.load(self.path / "null_mask.npy").astype(np.int64))
        return e, m


class LatentDataset(CacheMeta):
    """Read-only view of a latent cache (memory-mapped). ``ds[i]`` / ``ds.batch(indices)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_latent_cache(self.path):
            raise FileNotFoundError(f"{self.path} is not a latent cache (no {META} / latents.npy)")
        self.meta = json.loads((self.path / META).read_text())
        if not self.meta.get("complete"):
            raise ValueError(f"latent cache {self.path} is incomplete ({self.meta['done']}/{self.meta['n']} rows): rebuild to finish it")
        n, u = int(self.meta["done"]), int(self.meta["n_unique"])
        self.latents = np.load(self.path / "latents.npy", mmap_mode="r")[:n]
        self.caption_index = np.load(self.path / "caption_index.npy", mmap_mode="r")[:n]
        self.text_embeds = np.load(self.path / "text_embeds.npy", mmap_mode="r")[:u]
        self.text_masks = np.load(self.path / "text_masks.npy", mmap_mode="r")[:u]
        self.captions: list[str] = json.loads((self.path / "captions.json").read_text())[:u]

    @staticmethod
    def is_complete(path: str | Path) -> bool:
        return is_latent_cache(path) and bool(json.loads((Path(path) / META).read_text()).get("complete"))

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, indices) -> dict[str, Any]:
        """Rows ``indices`` as float32 latents (raw, unscaled), float32 embeds, long mask, captions."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to the page cache
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        lat = np.asarray(self.latents[idx[order]])[inv]
        cid = np.asarray(self.caption_index[idx]).astype(np.int64)
        return {
            "latents": torch.from_numpy(lat.astype(np.float32)),
            "embeds": torch.from_numpy(np.asarray(self.text_embeds[cid]).astype(np.float32)),
            "mask": torch.from_numpy(np.asarray(self.text_masks[cid]).astype(np.int64)),
            "caption": [self.captions[c] for c in cid],
            "index": torch.from_numpy(idx),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        b = self.batch([i])
        return {k: (v[0] if not isinstance(v, list) else v[0]) for k, v in b.items()}

    def loader(self, batch_size: int, seed: int = 0) -> LatentLoader:
        return LatentLoader(self, batch_size, seed)

    def text_encoder(self) -> CachedTextEncoder:
        """A stand-in for the text encoder that answers with this cache's embeddings (its captions only)."""
        return CachedTextEncoder(self)


class CachedTextEncoder:
    """The part of :class:`~sana_sprint.text.TextEncoder` a pipeline uses, read from a latent cache.

    ``encode`` returns the cached embeddings of captions the cache holds (the same values the training
    steps see) and raises ``UserError`` for any other prompt; ``null_embedding`` is the cached empty
    prompt. For running a pipeline where the text encoder's weights are not available (a GPU machine
    that gets only the cache). Not savable with a pipeline.
    """

    spec = "cache"

    def __init__(self, dataset: LatentDataset, device="cpu"):
        from ..text import preprocess

        self.dataset = dataset
        self.max_length = int(dataset.meta["text_shape"][0])
        self._ids = {preprocess(c): i for i, c in enumerate(dataset.captions)}
        self._preprocess = preprocess
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> CachedTextEncoder:
        self._device = torch.device(device)
        return self

    def clear_cache(self) -> None:
        pass

    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        keys = [self._preprocess(p) for p in prompts]
        missing = [p for p, k in zip(prompts, keys, strict=True) if k not in self._ids]
        if missing:
            raise UserError(f"{len(missing)} prompt(s) not in the cache {self.dataset.path} (its text encoder is not "
                            f"loaded here, only its cached captions can be encoded), e.g. {missing[0]!r}")
        cid = np.asarray([self._ids[k] for k in keys], dtype=np.int64)
        e = torch.from_numpy(np.asarray(self.dataset.text_embeds[cid]).astype(np.float32))
        m = torch.from_numpy(np.asarray(self.dataset.text_masks[cid]).astype(np.int64))
        return e.to(self._device), m.to(self._device)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        e, m = self.dataset.null_embedding()
        return e.to(self._device), m.to(self._device)


class LatentLoader:
    """Endless shuffled batches: epoch e visits the rows in ``permutation(seed, e)``; batches may span epochs.

    The position (epoch, offset) is the whole state, so ``state_dict``/``load_state_dict`` make a
    resumed run draw exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        out = []
        need = self.batch_size
        while need:
            perm = self.permutation(self.epoch)
            take = perm[self.pos : self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= len(perm):
                self.epoch, self.pos = self.epoch + 1, 0
        return np.concatenate(out)

    def __iter__(self) -> LatentLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        return self.dataset.batch(self.next_indices())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, d: dict[str, int]) -> None:
        if int(d["seed"]) != self.seed:
            raise ValueError(f"data loader seed {self.seed} differs from the checkpoint's {d['seed']}")
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
