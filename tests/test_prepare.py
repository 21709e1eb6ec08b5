"""prepare-data end to end: tiny Gemma-2 + AutoencoderDC folders -> sharded latents -> mmap reader."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, LATENT_CHANNELS, tiny_vae
from PIL import Image
from test_realscale import save_gemma

from sana_sprint import realscale
from sana_sprint.data.imagefolder import ImageFolderDataset
from sana_sprint.data.prepare import ShardedLatentDataset, main, prepare_dataset, run, text_length
from sana_sprint.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:.*unreadable_image=1")  # the deliberately broken image

CAPTIONS = ["a red circle", "two blue squares", "a red circle", "purple triangle left of a green square",
            "yellow", "an orange circle above a blue triangle", "three circles", "a square"]


def make_image_folder(root, n: int = 8):
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.integers(0, 256, (IMAGE_SIZE + 8, IMAGE_SIZE + 4, 3), dtype=np.uint8)  # non-square: cropped
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": CAPTIONS[i]})
    (root / "broken.png").write_bytes(b"not an image")
    rows.insert(3, {"file_name": "broken.png", "text": "skipped"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    tiny_vae().save_pretrained(root / "vae")
    save_gemma(root / "gemma")
    make_image_folder(root / "images")
    return root


def argv(folders, out, *extra):
    return ["--data", str(folders / "images"), "--vae", str(folders / "vae"), "--text-encoder", str(folders / "gemma"),
            "--out", str(out), "--shard-size", "3", "--batch", "2", "--resolution", str(IMAGE_SIZE),
            "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def prepared(folders):
    out = folders / "out"
    with pytest.warns(UserWarning, match="unreadable_image=1"):
        assert main(argv(folders, out)) == 0
    return out


@pytest.fixture(scope="module")
def direct(folders):
    """The same rows encoded directly, without the shard writer."""
    with pytest.warns(UserWarning):
        ds = ImageFolderDataset(folders / "images", size=IMAGE_SIZE)
    vae = realscale.load_vae(folders / "vae")
    te = realscale.load_gemma(folders / "gemma")
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        lat = vae.encode(images).latent
    e, m = te.encode([ds[i]["caption"] for i in range(len(ds))])
    return {"latents": lat, "embeds": e, "mask": m, "null": te.null_embedding(), "caption": [r[1] for r in ds.rows]}


def test_shards_match_a_direct_encode(prepared, direct):
    ds = ShardedLatentDataset(prepared)
    assert len(ds) == 8 and [s["n"] for s in ds.meta["shards"]] == [3, 3, 2]
    assert ds.latent_shape == (LATENT_CHANNELS, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert ds.scaling_factor == pytest.approx(0.41407)
    order = [7, 0, 4, 3, 1, 6, 2, 5]  # across shards, unsorted
    b = ds.batch(order)
    assert set(b) == {"latents", "embeds", "mask", "caption", "index"}
    assert b["latents"].dtype == torch.float32 and b["mask"].dtype == torch.long
    assert b["caption"] == [direct["caption"][i] for i in order] and b["index"].tolist() == order
    torch.testing.assert_close(b["latents"], direct["latents"][order], atol=2e-3, rtol=1e-3)  # stored as fp16
    assert torch.equal(b["mask"], direct["mask"][order])
    valid = b["mask"].bool()
    assert valid.sum() > 0 and (~valid).sum() > 0
    torch.testing.assert_close(b["embeds"][valid], direct["embeds"][order][valid], atol=5e-3, rtol=2e-3)
    assert not b["embeds"][~valid].any()  # padding is not stored: zeros the cross-attention never reads
    ne, nm = ds.null_embedding()
    torch.testing.assert_close(ne, direct["null"][0], atol=5e-3, rtol=2e-3)
    assert torch.equal(nm, direct["null"][1])
    # Trimming stored only up to the last valid token of each shard.
    stored = [np.load(prepared / s["name"] / "embeds.npy", mmap_mode="r").shape[1] for s in ds.meta["shards"]]
    assert max(stored) < 300 and max(stored) == int(direct["mask"].sum(1).max())
    item = ds[5]
    assert item["latents"].shape == ds.latent_shape and item["caption"] == direct["caption"][5]


def test_loader_and_bounds(prepared):
    ds = ShardedLatentDataset(prepared)
    loader = ds.loader(batch_size=5, seed=1)
    seen = np.concatenate([next(loader)["index"].numpy() for _ in range(8)])  # 40 rows = 5 epochs
    assert sorted(seen.tolist()) == sorted(list(range(8)) * 5)
    with pytest.raises(IndexError):
        ds.batch([8])


def test_resume_skips_finished_shards_and_redoes_partial_ones(folders, prepared, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    keep = out / "shard-00000" / "latents.npy"
    before = os.stat(keep).st_mtime_ns
    ref = ShardedLatentDataset(prepared).batch(range(8))
    shutil.rmtree(out / "shard-00001")
    (out / "shard-00002.tmp").mkdir()  # a run killed while writing shard 2 ...
    shutil.rmtree(out / "shard-00002")
    (out / "shard-00002.tmp" / "latents.npy").write_bytes(b"half")
    meta = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(UserError, match="incomplete"):
        ShardedLatentDataset(out)
    assert main(argv(folders, out)) == 0
    assert os.stat(keep).st_mtime_ns == before  # shard 0 was not rewritten
    assert not list(out.glob("*.tmp"))
    got = ShardedLatentDataset(out).batch(range(8))
    for k in ("latents", "embeds", "mask"):
        assert torch.equal(got[k], ref[k])


def test_other_settings_are_refused(folders, prepared, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    import argparse

    from sana_sprint.data.prepare import add_args

    args = add_args(argparse.ArgumentParser()).parse_args(argv(folders, out, "--shard-size", "4"))
    with pytest.raises(UserError, match="shard_size: 3 -> 4"):
        run(args)
    with pytest.raises(SystemExit) as e:  # the CLI turns UserError into exit status 2
        main(argv(folders, tmp_path / "y", "--resolution", str(IMAGE_SIZE + 2)))
    assert e.value.code == 2


def test_text_length_handles_any_mask():
    assert text_length(np.array([[1, 1, 0, 0], [1, 0, 0, 0]])) == 2
    assert text_length(np.array([[0, 0, 1, 0]])) == 3  # left padding keeps everything up to the last token
    assert text_length(np.zeros((2, 4))) == 1


def test_prepare_dataset_takes_any_text_encoder(tmp_path, text_encoder, vae):
    """The shard writer works with the BERT TextEncoder of the shapes world too."""

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"image": torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1, "caption": f"shape {i}"}

    prepare_dataset(Tiny(), vae, text_encoder, tmp_path, resolution=IMAGE_SIZE, shard_size=2, progress=False)
    b = ShardedLatentDataset(tmp_path).batch([2])
    e, m = text_encoder.encode(["shape 2"])
    torch.testing.assert_close(b["embeds"][0][m[0].bool()], e[0][m[0].bool()], atol=5e-3, rtol=2e-3)


def test_registered_with_the_cli_group(folders, prepared, tmp_path, capsys):
    import sana_sprint.cli as cli

    assert "prepare-data" in cli.COMMANDS
    out = tmp_path / "via_cli"
    shutil.copytree(prepared, out)  # complete: the group command only verifies and rewrites the index
    with pytest.warns(UserWarning):
        assert cli.main(["prepare-data", *argv(folders, out)]) == 0
    assert "wrote 8 rows in 3 shards" in capsys.readouterr().out
    assert cli.main(["prepare-data", *argv(folders, tmp_path / "z", "--shard-size", "0")]) == 2
