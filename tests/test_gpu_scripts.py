"""The GPU benchmark scripts (benchmarks/gpu/) on tiny random models on the CPU: the code path a lent GPU runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(GPU_DIR))
    import bench_1p6b
    import latency_1p6b

    yield latency_1p6b, bench_1p6b
    sys.path.remove(str(GPU_DIR))


def test_word_tokenizer_prepends_bos_and_pads_right(scripts):
    latency, _ = scripts
    tok = latency.word_tokenizer({"red", "circle"})
    enc = tok(["red circle", "circle"], padding="max_length", max_length=5, return_tensors="pt")
    bos, pad = tok.bos_token_id, tok.pad_token_id
    assert enc.input_ids[:, 0].tolist() == [bos, bos]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert enc.input_ids[1, 2:].tolist() == [pad] * 3
    assert tok("blue circle").input_ids[1] == tok.unk_token_id  # unknown words map to <unk>, never fail


def test_latency_script_tiny_matches_diffusers(scripts, tmp_path):
    """Tiny Gemma-2 + Sana student + DC-AE, fp32 on the CPU: ours (eager fast path) and diffusers'
    SanaSprintPipeline on the same weights give the same pixels; every component is timed."""
    latency, _ = scripts
    out = tmp_path / "lat.json"
    res = latency.main(["--tiny", "--no-compile", "--repeats", "1", "--warmup", "1", "--json", str(out)])
    assert json.loads(out.read_text())["rows"].keys() == {"eager"} == res["rows"].keys()
    row = res["rows"]["eager"]
    assert row["steps"] == 1 and row["batch"] == 1 and row["diffusers_dtype"] == "fp32"
    assert row["max_pixel_diff"] <= 1 / 255  # same weights, same schedule and noise
    for side in ("ours", "diffusers"):
        assert row[side]["transformer_ms"] > 0 and row[side]["vae_ms"] > 0 and row[side]["text_ms"] > 0
    assert row["ratio_by_diffusers"] == {"fp32": pytest.approx(row["ours_ms"] / row["diffusers_ms"], rel=1e-3)}


def test_training_bench_tiny(scripts, tmp_path):
    _, bench = scripts
    out = tmp_path / "b.json"
    res = bench.main(["--tiny", "--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    for phase in ("teacher_ft", "distill_G", "distill_D"):
        assert saved[phase]["time_s"] > 0 and not saved[phase].get("oom")
    assert res["params"]["student_params"] > res["params"]["teacher_params"]  # + CFG embedding and logvar head
    assert set(res["infer_1step"]) >= {"transformer", "vae_decode", "end_to_end"}
    jvp = saved["jvp"]
    assert jvp["jvp_in_student_forwards"] == pytest.approx(jvp["jvp"]["time_s"] / jvp["student_forward"]["time_s"])
    assert "JVP =" in bench.table(res) and "plain torch.func.jvp" in bench.table(res)
    assert jvp["fast_vs_plain_max_rel_diff"] < 1e-5  # fp32 on the CPU: the two JVP paths agree
    assert jvp["jvp_plain_in_student_forwards"] > 0
    only = bench.main(["--tiny", "--repeats", "1", "--phases", "jvp", "--json", str(tmp_path / "j.json")])
    assert "jvp" in only and "teacher_ft" not in only and "infer_1step" not in only


def test_training_bench_layers_keeps_the_1p6b_block_shape(scripts):
    _, bench = scripts
    full, two = bench.configs(False, 1024), bench.configs(False, 1024, layers=2)
    assert full["teacher"]["num_layers"] == 20 and full["head_blocks"] == [2, 8, 14, 19]
    assert two["teacher"]["num_layers"] == 2 and two["head_blocks"] == [0, 1]
    same = {k: v for k, v in full["teacher"].items() if k != "num_layers"}
    assert {k: two["teacher"][k] for k in same} == same
    assert two["student"]["num_layers"] == 2 and two["student"]["guidance_embeds"]
