import numpy as np
import pytest

from sana_sprint.data.shapes import TASKS
from sana_sprint.evaluation.geneval import evaluate_image, relative_position, summarize
from sana_sprint.evaluation.suite import SUITE_PATH, build_suite, load_suite


def det(cls, color, cx, cy, side=10.0, conf=0.9):
    h = side / 2
    return {"class": cls, "color": color, "box": (cx - h, cy - h, cx + h, cy + h), "confidence": conf}


def box(cx, cy, side=10.0):
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def test_relative_position_margin_is_relative_to_box_sizes():
    # margin m = 0.1 * (10 + 10) = 2 px; along an axis GenEval then needs (|d| - m) / |d| > 0.5, i.e. |d| > 2m
    assert relative_position(box(25, 30), box(30, 30)) == {"left of"}  # 5 px: (5 - 2) / 5 = 0.6
    assert relative_position(box(26.5, 30), box(30, 30)) == set()  # 3.5 px: 1.5 / 3.5 < 0.5
    assert relative_position(box(29, 30), box(30, 30)) == set()  # inside the margin
    assert relative_position(box(30, 20), box(30, 40)) == {"above"}
    assert relative_position(box(30, 40), box(30, 20)) == {"below"}
    assert relative_position(box(50, 30), box(30, 30)) == {"right of"}
    # bigger boxes -> bigger margin: the same 5 px offset is no relation for 20 px boxes
    assert relative_position(box(25, 30, 20), box(30, 30, 20)) == set()
    # diagonal: both directions; 20 deg off the axis: only the dominant one
    assert relative_position(box(20, 20), box(40, 40)) == {"left of", "above"}
    assert relative_position(box(10, 23), box(40, 30)) == {"left of"}


def test_counting_is_exact():
    meta = {"tag": "counting", "include": [{"class": "square", "count": 3}],
            "exclude": [{"class": "square", "count": 4}], "prompt": "three squares"}
    sq = [det("square", "red", 10 + 15 * i, 10) for i in range(4)]
    assert evaluate_image(sq[:3], meta)[0]
    assert not evaluate_image(sq[:2], meta)[0]
    ok, reason = evaluate_image(sq, meta)
    assert not ok and "square<4" in reason
    # other classes do not matter for counting
    assert evaluate_image(sq[:3] + [det("circle", "red", 50, 50)], meta)[0]


def test_colour_attribution():
    meta = {"tag": "color_attr", "include": [{"class": "square", "count": 1, "color": "red"},
                                             {"class": "circle", "count": 1, "color": "blue"}],
            "exclude": [], "prompt": "a red square and a blue circle"}
    assert evaluate_image([det("square", "red", 10, 10), det("circle", "blue", 40, 40)], meta)[0]
    assert not evaluate_image([det("square", "blue", 10, 10), det("circle", "red", 40, 40)], meta)[0]
    assert not evaluate_image([det("square", "red", 10, 10)], meta)[0]


def test_colour_check_uses_the_most_confident_objects():
    meta = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "exclude": [],
            "prompt": "a red square"}
    red, blue = det("square", "red", 10, 10, conf=0.9), det("square", "blue", 40, 40, conf=0.5)
    assert evaluate_image([blue, red], meta)[0]
    red["confidence"] = 0.3
    assert not evaluate_image([blue, red], meta)[0]  # GenEval checks the top-scoring square
    assert evaluate_image([blue, red], meta, min_confidence=0.4)[0] is False
    blue["confidence"] = 0.2
    assert evaluate_image([blue, red], meta, min_confidence=0.25)[0]


def test_position_rule():
    meta = {"tag": "position", "include": [{"class": "triangle", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}],
            "exclude": [], "prompt": "a circle to the left of a triangle"}
    assert evaluate_image([det("triangle", "red", 40, 30), det("circle", "blue", 15, 30)], meta)[0]
    assert not evaluate_image([det("triangle", "red", 15, 30), det("circle", "blue", 40, 30)], meta)[0]
    assert not evaluate_image([det("triangle", "red", 31, 30), det("circle", "blue", 30, 30)], meta)[0]
    # target clause unmatched -> the position clause fails too
    ok, reason = evaluate_image([det("circle", "blue", 15, 30)], meta)
    assert not ok and "no target" in reason


def test_exclude_clause():
    meta = {"tag": "single_object", "include": [{"class": "circle", "count": 1}],
            "exclude": [{"class": "square", "count": 1}], "prompt": "a circle"}
    assert evaluate_image([det("circle", "red", 10, 10)], meta)[0]
    assert not evaluate_image([det("circle", "red", 10, 10), det("square", "red", 40, 40)], meta)[0]


def test_summary_is_unweighted_mean_of_tasks():
    records = [("counting", True)] * 9 + [("counting", False)] + [("position", False)] * 2
    s = summarize(records)
    assert s["tasks"] == {"counting": 0.9, "position": 0.0}
    assert s["overall"] == pytest.approx(0.45) and s["n_images"] == 12


def test_committed_suite_matches_generator_and_is_balanced():
    suite = load_suite(SUITE_PATH)
    assert suite == build_suite()  # scripts/make_suite.py is deterministic and was rerun
    assert len(suite) >= 500
    counts = {t: sum(r["tag"] == t for r in suite) for t in TASKS}
    assert len(set(counts.values())) == 1
    for r in suite:
        assert {"tag", "include", "exclude", "prompt", "seed", "index", "objects"} <= set(r)
        assert len(r["objects"]) == sum(c["count"] for c in r["include"])
    assert np.mean([len({r["prompt"] for r in suite if r["tag"] == t}) for t in TASKS]) > 40
