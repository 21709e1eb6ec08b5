import json

import numpy as np
import pytest
import torch

from sana_sprint.data import ImageFolderDataset, ShapesDataset, ShapesWorld, export_imagefolder, make_dataset
from sana_sprint.data.shapes import to_tensor


@pytest.fixture
def folder(tmp_path):
    export_imagefolder(tmp_path, 6, seed=3, size=32, progress=False)
    return tmp_path


def test_export_layout(folder):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all((folder / r["file_name"]).is_file() for r in rows)
    assert [r["text"] for r in rows] == [ShapesWorld(32).sample(3, i).caption for i in range(6)]


def test_round_trip_skips_and_counts_bad_rows(folder):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / rows[1]["file_name"]).write_bytes(b"not a png")  # corrupted image
    rows[4]["text"] = ""  # missing caption
    del rows[2]["text"]  # missing caption
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    with pytest.warns(UserWarning, match="skipped 4"):
        ds = ImageFolderDataset(folder, 32)
    assert ds.skipped == {"unreadable_image": 1, "missing_caption": 2, "bad_json": 1}
    assert len(ds) == 3
    world = ShapesWorld(32)
    for item, i in zip(ds, (0, 3, 5)):
        s = world.sample(3, i)
        assert item["caption"] == s.caption
        assert torch.equal(item["image"], to_tensor(s.image))  # PNG is lossless


def test_resize_and_stray_image(folder):
    (folder / "extra.png").write_bytes((folder / "00000.png").read_bytes())  # image without a row
    with pytest.warns(UserWarning):
        ds = ImageFolderDataset(folder, 16)
    assert ds.skipped == {"missing_caption": 1}
    x = ds[0]["image"]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1


def test_make_dataset(folder, tmp_path_factory):
    assert isinstance(make_dataset("shapes", 32), ShapesDataset)
    ds = make_dataset(str(folder), 32)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 6
    with pytest.raises(FileNotFoundError, match="no such folder"):
        make_dataset(str(folder / "nope"), 32)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        make_dataset(str(empty), 32)
    (empty / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match="no usable"), pytest.warns(UserWarning):
        make_dataset(str(empty), 32)


def test_batches_with_dataloader(folder):
    ds = ImageFolderDataset(folder, 32)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    assert np.isfinite(batch["image"].numpy()).all()
