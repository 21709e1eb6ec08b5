"""scripts/position_probe.py helpers: caption swaps and reading a training checkpoint's weights."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import position_probe  # noqa: E402

from sana_sprint.training.checkpoint import save_checkpoint  # noqa: E402
from sana_sprint.training.ema import EMA  # noqa: E402


def test_swaps():
    assert position_probe.swap_relation("a red circle to the left of a blue circle") == \
        "a red circle to the right of a blue circle"
    assert position_probe.swap_relation("a square under a triangle") == "a square above a triangle"
    with pytest.raises(ValueError):
        position_probe.swap_relation("a red circle and a blue square")
    assert position_probe.swap_colours("a red circle above a blue circle") == "a blue circle above a red circle"
    assert position_probe.swap_colours("a circle above a square") is None


def test_checkpoint_weights_reads_raw_and_ema(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)  # shadow = 0.5 * old + 0.5 * new: differs from both
    ckpt = save_checkpoint(tmp_path, 7, modules={"transformer": net, "ema": ema})
    raw = position_probe.checkpoint_weights(ckpt, "raw")
    avg = position_probe.checkpoint_weights(ckpt, "ema")
    assert set(raw) == set(avg) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(raw[k], v)
        assert torch.equal(avg[k], ema.shadow.state_dict()[k]) and not torch.equal(avg[k], v)


def test_opposite_relation_folder(tmp_path):
    """The copy's position clauses are flipped, the rest byte-identical; a relation checker agrees."""
    import json

    import opposite_relation

    from sana_sprint.evaluation.geneval import relative_position

    src = tmp_path / "imgs"
    metas = [{"tag": "position", "prompt": "a circle left of a square",
              "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]},
             {"tag": "single_object", "prompt": "a circle", "include": [{"class": "circle", "count": 1}]}]
    for i, m in enumerate(metas):
        (src / f"{i:05d}" / "samples").mkdir(parents=True)
        (src / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(m) + "\n")
        (src / f"{i:05d}" / "samples" / "0000.png").write_bytes(b"png")
    assert opposite_relation.main([str(src), str(tmp_path / "out")]) == 0
    out = [json.loads((tmp_path / "out" / f"{i:05d}" / "metadata.jsonl").read_text()) for i in range(2)]
    rel = out[0]["include"][1]["position"][0]
    assert rel == "right of" and out[1] == metas[1]
    assert (tmp_path / "out" / "00000" / "samples" / "0000.png").read_bytes() == b"png"
    # a circle box left of the square box satisfies the original relation, not the swapped one
    boxes = relative_position((0, 20, 10, 30), (40, 20, 50, 30))
    assert "left of" in boxes and rel not in boxes
    assert opposite_relation.main([str(src), str(tmp_path / "out")]) == 2  # never overwrites
    assert opposite_relation.main([str(tmp_path / "out" / "00000" / "samples"), str(tmp_path / "x")]) == 2


def test_side_report_on_ground_truth_renders(tmp_path, capsys):
    """Rendered position scenes satisfy their relation: the report puts them under "true", and under
    "opposite" once the records are swapped; a blank image falls under "objects"."""
    import json

    import numpy as np
    import opposite_relation
    from PIL import Image

    from sana_sprint.data.shapes import ShapesWorld

    world, src = ShapesWorld(64), tmp_path / "imgs"
    relations = []
    for i in range(16):
        objects, meta, bg = world.scene(3, i, task="position")
        relations.append(meta["include"][1]["position"][0])
        folder = src / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        Image.fromarray(world.render(objects, background=bg)).save(folder / "samples" / "0000.png")
        if i == 0:  # a second image of the first prompt with nothing in it
            Image.fromarray(np.full((64, 64, 3), 240, np.uint8)).save(folder / "samples" / "0001.png")
    report = opposite_relation.side_report(src)
    assert set(report) == set(relations) and len(set(relations)) >= 3
    total = {k: sum(r[k] for r in report.values()) for k in opposite_relation.SIDE_OUTCOMES}
    assert sum(total.values()) == 17 and total["objects"] >= 1
    assert total["true"] >= 14 and total["opposite"] == 0, report  # the detector may miss a tiny object

    assert opposite_relation.main([str(src), str(tmp_path / "opp")]) == 0
    flipped = opposite_relation.side_report(tmp_path / "opp")
    back = {k: sum(r[k] for r in flipped.values()) for k in opposite_relation.SIDE_OUTCOMES}
    assert back["opposite"] == total["true"] and back["true"] == 0 and back["objects"] == total["objects"]
    assert opposite_relation.main([str(src), "--sides"]) == 0
    assert "| relation | images | true | opposite | neither | objects |" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # both or neither of DST / --sides
        opposite_relation.main([str(src), str(tmp_path / "x"), "--sides"])
