import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from sana_sprint.data.shapes import TASKS, ShapesWorld
from sana_sprint.evaluation.detector import ShapesDetector
from sana_sprint.evaluation.geneval import evaluate_image
from sana_sprint.evaluation.suite import (
    iter_folder,
    load_suite,
    render_ground_truth,
    score_folder,
    score_images,
    write_prompt_folder,
)

DET = ShapesDetector()


def _gt_boxes(objects, size):
    return sorted((o["class"], o["color"], o["cx"] * size, o["cy"] * size, o["size"] * size) for o in objects)


@pytest.mark.parametrize("size, n", [(64, 40), (32, 20)])
def test_recovers_classes_colours_counts_and_boxes(size, n):
    world = ShapesWorld(size)
    for i in range(n):
        s = world.sample(7, i)
        dets = DET.detect(s.image)
        assert sorted((d.cls, d.color) for d in dets) == sorted((o["class"], o["color"]) for o in s.objects)
        for o in s.objects:
            d = min((d for d in dets if (d.cls, d.color) == (o["class"], o["color"])),
                    key=lambda d: abs((d.box[0] + d.box[2]) / 2 - o["cx"] * size))
            assert np.allclose([(d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2],
                               [o["cx"] * size, o["cy"] * size], atol=1.0)
            assert abs((d.box[2] - d.box[0]) - o["size"] * size) <= 1.5


def test_each_class_and_colour_in_isolation():
    world = ShapesWorld(64)
    for cls in ("circle", "square", "triangle"):
        for color in ("red", "green", "blue", "yellow", "purple", "orange"):
            img = world.render([{"class": cls, "color": color, "cx": 0.5, "cy": 0.5, "size": 0.17}])
            (d,) = DET.detect(img)
            assert (d.cls, d.color) == (cls, color)


def test_robust_to_blur_and_jpeg():
    world = ShapesWorld(64)
    for i in range(15):
        s = world.sample(9, i)
        want = sorted((o["class"], o["color"]) for o in s.objects)
        blurred = np.clip(np.rint(ndimage.gaussian_filter(s.image.astype(float), (0.7, 0.7, 0))), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, format="JPEG", quality=75)
        for img in (blurred.astype(np.uint8), np.asarray(Image.open(buf))):
            assert sorted((d.cls, d.color) for d in DET.detect(img)) == want


def test_noise_and_blank_give_nothing():
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert DET.detect(np.clip(rng.normal(127.5, 64, (64, 64, 3)), 0, 255).astype(np.uint8)) == []
    assert DET.detect(np.full((64, 64, 3), 235, np.uint8)) == []
    assert DET.detect(np.zeros((32, 32, 3), np.uint8)) == []


def test_accepts_tensors():
    s = ShapesWorld(64).sample(1, 2)
    x = torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1
    assert [(d.cls, d.color) for d in DET.detect(x)] == [(d.cls, d.color) for d in DET.detect(s.image)]


def test_scorer_on_gt_and_on_wrong_images():
    suite = load_suite()[:60]
    assert all(evaluate_image(DET.detect(render_ground_truth(r)), r)[0] for r in suite)
    # recolouring every object breaks exactly the prompts that name colours
    for r in suite[:24]:
        other = [{**o, "color": "blue" if o["color"] != "blue" else "red"} for o in r["objects"]]
        ok = evaluate_image(DET.detect(ShapesWorld(64).render(other, background=r["background"])), r)[0]
        assert ok == (not any("color" in c for c in r["include"]))


def test_score_folder_round_trip(tmp_path):
    suite = load_suite()
    records = [next(r for r in suite if r["tag"] == t) for t in TASKS]
    blank = np.full((64, 64, 3), 235, np.uint8)
    for i, r in enumerate(records):
        write_prompt_folder(tmp_path, i, r, [render_ground_truth(r), blank])
    assert (tmp_path / "00000" / "samples" / "0001.png").is_file()
    assert len(list(iter_folder(tmp_path))) == 12
    s = score_folder(tmp_path, results_path=tmp_path / "results.jsonl")
    assert s["n_images"] == 12 and s["tasks"] == {t: 0.5 for t in TASKS} and s["overall"] == 0.5
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 12
    assert score_images([(records[0], blank)])["overall"] == 0.0
