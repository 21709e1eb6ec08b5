"""scripts/shape_fill.py: the detector's fill ratio per requested class, on ground-truth world renders."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana_sprint.evaluation.detector import SHAPE_PROTOTYPES
from sana_sprint.evaluation.run import load_prompts
from sana_sprint.evaluation.suite import render_ground_truth

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import shape_fill  # noqa: E402


class _RenderPipe:
    """Stands in for a pipeline: returns the exact world render of each record, in call order."""

    def __init__(self, records, images: int):
        self.queue = [r for r in records for _ in range(images)]
        self.calls = 0

    def __call__(self, prompts, **kw):
        out = [self.queue.pop(0) for _ in prompts]
        assert [r["prompt"] for r in out] == list(prompts)
        self.calls += 1
        return type("Out", (), {"images": [Image.fromarray(render_ground_truth(r)) for r in out]})()


def test_world_renders_give_each_class_its_prototype_fill_and_the_right_class():
    records = [r for r in load_prompts(None) if r["tag"] == "single_object"][:24]
    fills = shape_fill.model_fills(_RenderPipe(records, 2), records, steps=1, images=2, seed=0, guidance=4.5, batch=16)
    summary = shape_fill.summarize(fills)
    asked = {c: sum(r["include"][0]["class"] == c for r in records) for c in shape_fill.CLASSES}
    for cls, row in summary.items():
        assert row["n"] == 2 * asked[cls] > 0
        assert row["class_accuracy"] == 1.0
        assert row["fill_mean"] == pytest.approx(np.mean(fills[cls]["fill"]))
        assert abs(row["fill_q25_q50_q75"][1] - SHAPE_PROTOTYPES[cls][0]) < 0.06


def test_summarize_counts_missing_detections_as_wrong_and_leaves_them_out_of_the_fill():
    fills = {"square": {"fill": [0.9, float("nan"), 0.8, 1.0], "found": ["square", "none", "circle", "square"]},
             "circle": {"fill": [], "found": []}, "triangle": {"fill": [0.5], "found": ["triangle"]}}
    s = shape_fill.summarize(fills)
    assert s["square"]["n"] == 4 and s["square"]["detected"] == 3
    assert s["square"]["fill_mean"] == pytest.approx(0.9)
    assert s["square"]["fill_q25_q50_q75"] == pytest.approx([0.85, 0.9, 0.95])
    assert s["square"]["class_accuracy"] == 0.5
    assert s["circle"]["fill_mean"] is None and s["circle"]["class_accuracy"] is None


def test_a_bad_model_spec_is_a_clear_error(capsys, tmp_path):
    assert shape_fill.main(["models/shapes-sprint:x", "--out", str(tmp_path / "f.json")]) == 2
    assert "FOLDER:STEPS" in capsys.readouterr().err
