import re

import numpy as np
import pytest
import torch

from sana_sprint.data.shapes import (
    CLASSES,
    COLORS,
    EXTRA_TASKS,
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


def test_task_mix_spec_changes_task_frequencies_deterministically():
    from collections import Counter

    from sana_sprint.data.imagefolder import make_dataset
    from sana_sprint.data.shapes import is_shapes_spec, parse_shapes_spec

    assert parse_shapes_spec("shapes") is None
    w = parse_shapes_spec("shapes:position=3,counting=0")
    assert w == {**dict.fromkeys(TASKS, 1.0), **dict.fromkeys(EXTRA_TASKS, 0.0), "position": 3.0, "counting": 0.0}
    assert is_shapes_spec("shapes:position=2") and not is_shapes_spec("shapes_folder") and not is_shapes_spec(3)
    for bad in ("shapes:", "shapes:posiiton=2", "shapes:position", "shapes:position=x", "shapes:position=-1",
                "shapes:position=inf", "shapes:" + ",".join(f"{t}=0" for t in TASKS), "shape:position=2"):
        with pytest.raises(ValueError):
            parse_shapes_spec(bad)
    world = ShapesWorld(32)
    n = 3000
    tags = Counter(world.scene(0, i, task_weights=w)[1]["tag"] for i in range(n))
    p = 3 / 7  # position weight 3 of a total 1 + 1 + 0 + 1 + 3 + 1
    assert tags["counting"] == 0
    assert abs(tags["position"] / n - p) < 4 * (p * (1 - p) / n) ** 0.5  # binomial, 4 sigma
    for t in ("single_object", "two_object", "colors", "color_attr"):
        assert abs(tags[t] / n - 1 / 7) < 4 * ((1 / 7) * (6 / 7) / n) ** 0.5, t
    # a pure function of (seed, index, weights); the default world is unchanged by the option
    a, b = world.sample(0, 17, task_weights=w), world.sample(0, 17, task_weights=dict(w))
    assert a.caption == b.caption and np.array_equal(a.image, b.image)
    assert world.sample(0, 17).caption == world.sample(0, 17, task_weights=None).caption
    ds = iter(make_dataset("shapes:position=1,single_object=0,two_object=0,counting=0,colors=0,color_attr=0", size=32))
    assert all(" left of " in c or " right of " in c or " above " in c or " below " in c or " under " in c
               for c in (next(ds)["caption"] for _ in range(20)))


@pytest.mark.parametrize("index", range(40))
def test_twin_position_scenes(index):
    """Training-only family: one class twice, both colours named and different, the relation holds."""
    size = 64
    s = ShapesWorld(size).sample(5, index, task="twin_position")
    ref, sub = s.meta["include"]
    assert s.meta["tag"] == "twin_position" and ref["class"] == sub["class"] and ref["color"] != sub["color"]
    relation, target = sub["position"]
    assert target == 0 and "position" not in ref
    words = s.caption.split(" ")
    assert words.index(sub["color"]) < words.index(ref["color"])  # "a red circle left of a blue circle"
    (o_ref,) = [o for o in s.objects if o["color"] == ref["color"]]
    (o_sub,) = [o for o in s.objects if o["color"] == sub["color"]]
    assert o_ref["class"] == o_sub["class"] == ref["class"] and len(s.objects) == 2
    assert relation in relative_position(_box_px(o_sub, size), _box_px(o_ref, size))


def test_extra_tasks_only_join_the_draw_when_weighted():
    from collections import Counter

    from sana_sprint.data.shapes import parse_shapes_spec

    world = ShapesWorld(32)
    old = parse_shapes_spec("shapes:position=5")
    explicit = parse_shapes_spec("shapes:position=5,twin_position=0")
    assert old == explicit and old["twin_position"] == 0.0
    # no extra family weighted: the draw is over TASKS exactly as before the extras existed
    for i in range(50):
        rng = np.random.default_rng([0, i, 0x5A4E])
        w = np.array([old[t] for t in TASKS])
        assert world.scene(0, i, task_weights=old)[1]["tag"] == TASKS[int(rng.choice(len(TASKS), p=w / w.sum()))]
    n = 2000
    mix = parse_shapes_spec("shapes:position=2,twin_position=3")
    tags = Counter(world.scene(0, i, task_weights=mix)[1]["tag"] for i in range(n))
    assert abs(tags["twin_position"] / n - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    assert set(tags) == set(TASKS) | {"twin_position"}
    assert all(world.scene(0, i)[1]["tag"] in TASKS for i in range(200))  # never in the default world
