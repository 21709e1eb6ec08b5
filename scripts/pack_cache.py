"""Pack a latent cache into one small int8 file for transport, and unpack it back into a cache folder.

A latent cache holds its text embeddings at capacity N rows (a sparse file) and fp16 latents; moving it to
a machine that cannot build it (no text encoder there, a size limit on what travels) needs it smaller.
``pack`` keeps only the used rows: latents as int8 with one scale per (row, channel), text embeddings of
the unique captions as int8 with one scale per token vector (padded positions, which every attention masks
out, set to zero), masks and captions as they are, compressed. ``unpack``
writes a normal cache folder (fp16 arrays) that ``LatentDataset`` reads; each value is within half a
quantisation step (scale / 2, scale = absmax / 127) of the original, and the report prints the errors.

    python scripts/pack_cache.py pack runs/cache/shapes-12000-r64 packed.npz [--rows N]
    python scripts/pack_cache.py unpack packed.npz runs/cache/shapes-12000-r64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def quantize(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales (absmax / 127 over ``axes``; 1 where the slice is all zero)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=axes, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(x / scale), -127, 127).astype(np.int8), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def pack(cache: Path, out: Path, rows: int | None = None) -> dict:
    """``rows``: keep only the first ``rows`` rows (and the captions they use, renumbered in order)."""
    from sana_sprint.data.latents import LatentDataset

    ds = LatentDataset(cache)  # raises on a missing or incomplete cache
    n = len(ds) if rows is None else int(rows)
    if not 1 <= n <= len(ds):
        raise ValueError(f"--rows must be in [1, {len(ds)}], got {rows}")
    cidx = np.asarray(ds.caption_index[:n], dtype=np.int64)
    used = np.unique(cidx)  # sorted: first-use order is kept for a prefix of the rows
    remap = np.full(len(ds.captions), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    meta = dict(ds.meta, n=n, done=n, n_unique=len(used))
    captions = [ds.captions[i] for i in used]
    lat = np.asarray(ds.latents[:n], dtype=np.float32)
    masks = np.asarray(ds.text_masks, dtype=np.uint8)[used]
    # padded token positions are masked out of every attention: zeroed, they compress to nothing
    emb = np.asarray(ds.text_embeds, dtype=np.float32)[used] * masks[..., None]
    lq, ls = quantize(lat, axes=tuple(range(2, lat.ndim)))  # per (row, channel)
    eq, es = quantize(emb, axes=(emb.ndim - 1,))  # per token vector
    np.savez_compressed(
        out,
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        captions=np.frombuffer(json.dumps(captions).encode(), dtype=np.uint8),
        latents_q=lq, latents_scale=ls, embeds_q=eq, embeds_scale=es,
        caption_index=remap[cidx].astype(np.int32),
        text_masks=masks,
        null_embed=np.load(cache / "null_embed.npy"), null_mask=np.load(cache / "null_mask.npy"),
    )
    err = {"latents": float(np.abs(dequantize(lq, ls) - lat).max() / np.abs(lat).max()),
           "embeds": float(np.abs(dequantize(eq, es) - emb).max() / np.abs(emb).max())}
    return {"rows": n, "unique_captions": len(used), "bytes": out.stat().st_size, "max_rel_error": err}


def unpack(packed: Path, out: Path) -> dict:
    z = np.load(packed)
    meta = json.loads(bytes(z["meta"]).decode())
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", dequantize(z["latents_q"], z["latents_scale"]).astype(np.float16))
    np.save(out / "text_embeds.npy", dequantize(z["embeds_q"], z["embeds_scale"]).astype(np.float16))
    for key in ("caption_index", "text_masks", "null_embed", "null_mask"):
        np.save(out / f"{key}.npy", z[key])
    (out / "captions.json").write_text(bytes(z["captions"]).decode())
    meta = dict(meta, packed_int8=True)  # a record that these values went through int8
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return {"rows": int(meta["done"]), "unique_captions": int(meta["n_unique"]), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="cache folder -> .npz")
    p.add_argument("cache")
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=None, help="keep only the first ROWS rows (a smaller file)")
    u = sub.add_parser("unpack", help=".npz -> cache folder")
    u.add_argument("packed")
    u.add_argument("out")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            res = pack(Path(args.cache), Path(args.out), args.rows)
        else:
            res = unpack(Path(args.packed), Path(args.out))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
