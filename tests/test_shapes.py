import re

import numpy as np
import pytest
import torch

from sana_sprint.data.shapes import (
    CLASSES,
    COLORS,
    NUMBER_WORDS,
    PLURALS,
    TASKS,
    ShapesDataset,
    ShapesWorld,
    relation_holds,
)
from sana_sprint.evaluation.geneval import relative_position


def test_sample_is_pure_function_of_seed_and_index():
    a, b = ShapesWorld(64), ShapesWorld(64)
    s1, s2 = a.sample(3, 17), b.sample(3, 17)
    assert np.array_equal(s1.image, s2.image) and s1.caption == s2.caption and s1.meta == s2.meta
    others = [a.sample(3, 18), a.sample(4, 17)]
    assert all(not np.array_equal(s1.image, o.image) or s1.caption != o.caption for o in others)


@pytest.mark.parametrize("size", [32, 64])
def test_image_format(size):
    s = ShapesWorld(size).sample(0, 5)
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    corner = s.image[0, 0].astype(int)
    assert corner.min() > 200 and corner.max() - corner.min() < 20  # light neutral background


def _box_px(o, size):
    h = o["size"] * size / 2
    return (o["cx"] * size - h, o["cy"] * size - h, o["cx"] * size + h, o["cy"] * size + h)


@pytest.mark.parametrize("index", range(60))
def test_caption_and_meta_describe_the_scene(index):
    size = 64
    s = ShapesWorld(size).sample(11, index)
    meta, objs = s.meta, s.objects
    assert meta["prompt"] == s.caption and meta["tag"] in TASKS
    assert set(meta) == {"tag", "include", "exclude", "prompt"}
    # the caption describes everything: object count = sum of include counts
    assert len(objs) == sum(c["count"] for c in meta["include"])
    assert 1 <= len(objs) <= 4
    for c in meta["include"]:
        mine = [o for o in objs if o["class"] == c["class"]]
        assert len(mine) == c["count"]
        if "color" in c:
            assert all(o["color"] == c["color"] for o in mine)
            assert c["color"] in s.caption
    if not any("color" in c for c in meta["include"]):
        assert not any(re.search(rf"\b{k}\b", s.caption) for k in COLORS)
    for c in meta["include"]:
        noun = c["class"] if c["count"] == 1 else PLURALS[c["class"]]
        assert re.search(rf"\b{noun}\b", s.caption)
    if meta["tag"] == "counting":
        (inc,) = meta["include"]
        assert 2 <= inc["count"] <= 4 and NUMBER_WORDS[inc["count"]] in s.caption.split()
        assert meta["exclude"] == [{"class": inc["class"], "count": inc["count"] + 1}]
    else:
        assert meta["exclude"] == []
    if meta["tag"] in ("colors", "color_attr"):
        assert all("color" in c for c in meta["include"])
    if meta["tag"] in ("two_object", "position", "color_attr"):
        assert len({c["class"] for c in meta["include"]}) == 2
    if meta["tag"] == "position":
        ref, sub = meta["include"]
        relation, target = sub["position"]
        assert target == 0 and "position" not in ref
        o_ref = next(o for o in objs if o["class"] == ref["class"])
        o_sub = next(o for o in objs if o["class"] == sub["class"])
        # independent check with GenEval's rule on pixel boxes
        assert relation in relative_position(_box_px(o_sub, size), _box_px(o_ref, size))
    # minimum size ~10 px, never out of the image, never touching
    for o in objs:
        assert o["size"] * size >= 10.0
        x0, y0, x1, y1 = _box_px(o, size)
        assert x0 >= 0 and y0 >= 0 and x1 <= size and y1 <= size
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            ax0, ay0, ax1, ay1 = _box_px(a, size)
            bx0, by0, bx1, by1 = _box_px(b, size)
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_all_tasks_classes_and_colours_occur():
    world = ShapesWorld(64)
    metas = [world.scene(1, i)[1] for i in range(300)]
    assert {m["tag"] for m in metas} == set(TASKS)
    objs = [o for i in range(100) for o in world.scene(1, i)[0]]
    assert {o["class"] for o in objs} == set(CLASSES) and {o["color"] for o in objs} == set(COLORS)
    assert len({m["prompt"] for m in metas}) > 150  # varied phrasing


@pytest.mark.parametrize("task", TASKS)
def test_forced_task(task):
    assert ShapesWorld(64).sample(0, 3, task=task).meta["tag"] == task


def test_render_pixels_match_the_scene():
    world = ShapesWorld(64)
    objs = [{"class": "square", "color": "red", "cx": 0.25, "cy": 0.25, "size": 0.25},
            {"class": "triangle", "color": "blue", "cx": 0.7, "cy": 0.7, "size": 0.3},
            {"class": "circle", "color": "green", "cx": 0.25, "cy": 0.75, "size": 0.25}]
    img = world.render(objs, background=(240, 240, 240)).astype(int)
    assert tuple(img[16, 16]) == (220, 30, 30)  # square centre
    assert tuple(img[0, 63]) == (240, 240, 240)
    # square fully covers its box, circle leaves the box corners, triangle is wider at the bottom
    assert tuple(img[9, 9]) == (220, 30, 30)
    assert tuple(img[48 - 7, 16 - 7]) == (240, 240, 240)
    tri = (img != 240).any(-1)[int(0.55 * 64):int(0.85 * 64), int(0.55 * 64):int(0.85 * 64)]
    widths = tri.sum(1)
    assert widths[2] < widths[-3]
    assert relation_holds(objs[2], objs[0], "below") and not relation_holds(objs[0], objs[2], "below")
    assert not relation_holds(objs[1], objs[0], "right of")  # diagonal: no dominant direction


def test_dataset_format_and_rank_striding():
    ds0 = ShapesDataset(size=32, seed=5, rank=0, world_size=2)
    ds1 = ShapesDataset(size=32, seed=5, rank=1, world_size=2)
    it0, it1 = iter(ds0), iter(ds1)
    a, b, c = next(it0), next(it1), next(it0)
    world = ShapesWorld(32)
    assert a["image"].shape == (3, 32, 32) and a["image"].dtype == torch.float32
    assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0
    assert [a["caption"], b["caption"], c["caption"]] == [world.sample(5, i).caption for i in (0, 1, 2)]
    ref = torch.from_numpy(world.sample(5, 2).image).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(c["image"], ref)


def test_dataset_workers_see_disjoint_indices():
    ds = ShapesDataset(size=32, seed=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = []
    for item in loader:
        got.append(item["caption"])
        if len(got) == 6:
            break
    world = ShapesWorld(32)
    # DataLoader alternates workers: worker 0 -> 0, 2, 4 ...; worker 1 -> 1, 3, 5 ...
    assert got == [world.sample(2, i).caption for i in range(6)]
