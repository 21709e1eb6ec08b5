"""Latent + text cache: contents match direct encoding, resume, dedup, seeded endless shuffling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE

from sana_sprint.data.latents import LatentDataset, build_latent_cache
from sana_sprint.data.shapes import ShapesWorld, to_tensor

N = 10


@pytest.fixture
def cache(tmp_path, vae, text_encoder):
    return build_latent_cache("shapes", vae, text_encoder, N, tmp_path / "cache", batch=4, size=IMAGE_SIZE,
                              seed=5, progress=False)


def test_cache_matches_direct_encoding(cache, vae, text_encoder):
    ds = LatentDataset(cache)
    assert len(ds) == N and ds.latents.dtype == np.float16
    world = ShapesWorld(IMAGE_SIZE)
    samples = [world.sample(5, i) for i in range(N)]
    imgs = torch.stack([to_tensor(s.image) for s in samples])
    with torch.no_grad():
        ref = vae.encode(imgs).latent  # raw latent, not scaled
    b = ds.batch(list(range(N)))
    torch.testing.assert_close(b["latents"], ref.half().float(), rtol=0, atol=0)
    assert b["caption"] == [s.caption for s in samples]
    e, m = text_encoder.encode([s.caption for s in samples])
    torch.testing.assert_close(b["embeds"], e.half().float(), rtol=0, atol=0)
    assert torch.equal(b["mask"], m.long())
    ne, nm = ds.null_embedding()
    e0, m0 = text_encoder.null_embedding()
    torch.testing.assert_close(ne, e0.half().float(), rtol=0, atol=0)
    assert torch.equal(nm, m0.long())
    assert ds.scaling_factor == pytest.approx(vae.config.scaling_factor)
    # random access agrees with batches, in any order
    b2 = ds.batch([7, 2, 7])
    assert torch.equal(b2["latents"][0], b["latents"][7]) and torch.equal(b2["latents"][1], b["latents"][2])
    assert ds[3]["caption"] == samples[3].caption


def test_resume_after_interrupted_build(tmp_path, cache, vae, text_encoder):
    full = LatentDataset(cache).batch(list(range(N)))
    meta_path = cache / "meta.json"
    meta = json.loads(meta_path.read_text())
    # pretend the build died after 4 rows: progress says 4, later rows hold garbage
    lat = np.load(cache / "latents.npy", mmap_mode="r+")
    lat[4:] = 0
    lat.flush()
    meta.update(done=4, complete=False, n_unique=len(set(full["caption"][:4])))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="incomplete"):
        LatentDataset(cache)
    build_latent_cache("shapes", vae, text_encoder, N, cache, batch=3, size=IMAGE_SIZE, seed=5, progress=False)
    again = LatentDataset(cache).batch(list(range(N)))
    assert torch.equal(again["latents"], full["latents"]) and again["caption"] == full["caption"]
    assert torch.equal(again["embeds"], full["embeds"])
    with pytest.raises(ValueError, match="another directory"):
        build_latent_cache("shapes", vae, text_encoder, N, cache, size=IMAGE_SIZE, seed=6, progress=False)


class _Repeating(torch.utils.data.Dataset):
    def __init__(self):
        world = ShapesWorld(IMAGE_SIZE)
        self.items = [{"image": to_tensor(world.sample(0, i % 3).image), "caption": f"caption {i % 3}"} for i in range(9)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_unique_captions_are_deduplicated(tmp_path, vae, text_encoder):
    path = build_latent_cache(_Repeating(), vae, text_encoder, 9, tmp_path / "c", batch=4, size=IMAGE_SIZE,
                              progress=False)
    ds = LatentDataset(path)
    assert ds.meta["n_unique"] == 3 and len(ds.text_embeds) == 3
    b = ds.batch(list(range(9)))
    assert b["caption"] == [f"caption {i % 3}" for i in range(9)]
    assert torch.equal(b["embeds"][0], b["embeds"][3]) and not torch.equal(b["embeds"][0], b["embeds"][1])


def test_loader_epochs_are_seeded_permutations_and_resumable(cache):
    ds = LatentDataset(cache)
    ld = ds.loader(batch_size=4, seed=1)
    idx = np.concatenate([ld.next_indices() for _ in range(5)])  # 20 = two full epochs
    assert sorted(idx[:N]) == list(range(N)) and sorted(idx[N:]) == list(range(N))
    assert not np.array_equal(idx[:N], idx[N:])  # each epoch reshuffled (seeded by (seed, epoch))
    ld_same = ds.loader(batch_size=4, seed=1)
    assert np.array_equal(np.concatenate([ld_same.next_indices() for _ in range(5)]), idx)
    ld_other = ds.loader(batch_size=4, seed=2)
    assert not np.array_equal(np.concatenate([ld_other.next_indices() for _ in range(5)]), idx)

    a = ds.loader(4, seed=1)
    for _ in range(3):
        next(a)  # stops mid-epoch (12 rows of 10)
    state = a.state_dict()
    expected = [next(a)["index"] for _ in range(3)]
    b = ds.loader(4, seed=1)
    b.load_state_dict(state)
    assert all(torch.equal(next(b)["index"], e) for e in expected)
    batch = next(b)
    assert batch["latents"].dtype == torch.float32 and batch["latents"].shape == (4, *ds.latent_shape)
    assert batch["mask"].dtype == torch.long
