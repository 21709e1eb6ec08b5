"""Hugging Face "imagefolder" datasets: images + metadata.jsonl rows ``{"file_name", "text"}``.

Bad rows never crash a run: unreadable images, missing files and missing captions are skipped,
counted in ``ImageFolderDataset.skipped`` (reason -> count) and summarised in one warning.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana_sprint.data.shapes import ShapesDataset, is_shapes_spec, parse_shapes_spec, to_tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA = "metadata.jsonl"


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: centre crop to a square, then resize (Lanczos)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != size:
            im = im.resize((size, size), Image.LANCZOS)
        return np.array(im, dtype=np.uint8)  # a writable copy


class ImageFolderDataset(torch.utils.data.Dataset):
    """Map-style dataset yielding ``dict(image=float [3, size, size] in [-1, 1], caption=str)``.

    Every usable row is decoded once at construction (``verify=True``), so ``__getitem__`` only
    sees images known to open.
    """

    def __init__(self, root, size: int = 64, verify: bool = True):
        self.root, self.size = Path(root), int(size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        meta = self.root / METADATA
        if not meta.is_file():
            raise FileNotFoundError(f"{str(self.root)!r} has no {METADATA} (rows of {{\"file_name\", \"text\"}})")
        skipped: Counter = Counter()
        rows: list[tuple[Path, str]] = []
        described: set[str] = set()
        for line in meta.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
                continue
            name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(name, str) or not name:
                skipped["missing_file_name"] += 1
                continue
            described.add(name)
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                skipped["missing_caption"] += 1
                continue
            path = self.root / name
            if not path.is_file():
                skipped["missing_file"] += 1
                continue
            if verify:
                try:
                    load_image(path, 8)
                except Exception:  # any decoder failure means "unreadable", whatever PIL raises
                    skipped["unreadable_image"] += 1
                    continue
            rows.append((path, text))
        for p in self.root.rglob("*"):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.relative_to(self.root).as_posix() not in described:
                skipped["missing_caption"] += 1
        self.rows, self.skipped = rows, dict(skipped)
        if self.skipped:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            warnings.warn(f"{self.root}: kept {len(rows)} images, skipped {sum(skipped.values())} ({detail})",
                          stacklevel=2)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path, text = self.rows[i]
        return {"image": to_tensor(load_image(path, self.size)), "caption": text}


def make_dataset(spec: str, size: int = 64, seed: int = 0):
    """``"shapes"`` (or ``"shapes:TASK=WEIGHT,..."``) -> infinite ShapesDataset; a folder path -> ImageFolderDataset."""
    if is_shapes_spec(spec):
        return ShapesDataset(size=size, seed=seed, task_weights=parse_shapes_spec(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {spec!r}: not 'shapes' and no such folder. Pass 'shapes' or a folder "
                                f"with images and {METADATA} (Hugging Face imagefolder layout).")
    ds = ImageFolderDataset(path, size)
    if len(ds) == 0:
        raise ValueError(f"dataset folder {spec!r} has no usable image/caption pairs (skipped: {ds.skipped})")
    return ds
