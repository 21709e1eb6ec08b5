"""End to end on tiny random real-scale classes: Gemma-2 + AutoencoderDC + a legacy SanaTransformer2DModel.

Component folders on disk + an image folder with captions ->
``sana-sprint prepare-data`` -> ``sana-sprint finetune-teacher`` (dense time + QK-norm) ->
``sana-sprint distill`` (sCM + LADD) -> ``sana-sprint generate``; every stage's output must exist,
load and be finite, and the generated PNG must equal a direct ``SprintPipeline`` call.
Slow (~1-2 min on a shared 2-core CPU): run with ``-m slow``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, tiny_transformer, tiny_vae
from PIL import Image
from test_text_gemma import GEMMA_HIDDEN, tiny_gemma, tiny_gemma_tokenizer

from sana_sprint import cli, realscale
from sana_sprint.pipeline import SprintPipeline

CAPTIONS = ["a red circle", "two blue squares", "purple triangle left of a green square", "yellow",
            "an orange circle above a blue triangle", "three circles", "a square", "a green square"]
MAX_LENGTH = 16
COMMON = ["--device", "cpu", "--no-bf16", "--no-progress", "--threads", "1"]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def _finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    # 1. the three component folders, as a user would have them (random weights, real classes)
    tok = tiny_gemma_tokenizer()
    tiny_gemma(len(tok), seed=1).save_pretrained(root / "gemma" / "text_encoder")
    tok.save_pretrained(root / "gemma" / "tokenizer")
    tiny_vae(seed=2).save_pretrained(root / "vae")
    # a legacy SANA teacher: time fed as 1000 t, no QK-norm (what finetune-teacher converts)
    tiny_transformer(guidance_embeds=False, seed=3, caption_channels=GEMMA_HIDDEN, qk_norm=None,
                     timestep_scale=1000.0).save_pretrained(root / "transformer")
    # ... assembled into a teacher pipeline folder with the validated real-scale loaders
    parts = realscale.load_components(root / "transformer", root / "vae", root / "gemma", resolution=IMAGE_SIZE)
    te = realscale.load_gemma(root / "gemma", max_length=MAX_LENGTH)
    SprintPipeline(te, parts.transformer, parts.vae, {"kind": "teacher", "resolution": IMAGE_SIZE}).save_pretrained(
        root / "sana")
    # 2. an image folder with captions
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": caption})
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    sana, prep, ft, dist = root / "sana", root / "prep", root / "ft", root / "dist"
    assert cli.main(["prepare-data", "--data", str(images), "--vae", str(sana), "--text-encoder", str(sana),
                     "--out", str(prep), "--resolution", str(IMAGE_SIZE), "--max-length", str(MAX_LENGTH),
                     "--shard-size", "4", "--batch", "4", "--device", "cpu", "--no-progress"]) == 0
    assert cli.main(["finetune-teacher", "--teacher", str(sana), "--data", str(prep), "--out", str(ft),
                     "--steps", "2", "--batch", "4", "--warmup", "0", "--ckpt-every", "2", "--sample-count", "2",
                     *COMMON]) == 0
    assert cli.main(["distill", "--teacher", str(ft / "export"), "--data", str(prep), "--out", str(dist),
                     "--steps", "2", "--batch", "4", "--ckpt-every", "2", "--sample-every", "0", "--sample-count", "2",
                     "--tangent-warmup", "0", *COMMON]) == 0
    image = root / "img.png"
    assert cli.main(["generate", "a red circle", "--model", str(dist / "export"), "--out", str(image),
                     "--device", "cpu", "--seed", "3"]) == 0
    return {"root": root, "sana": sana, "prep": prep, "ft": ft, "dist": dist, "image": image}


def test_prepare_data_stage(chain):
    from sana_sprint.data.prepare import ShardedLatentDataset

    ds = ShardedLatentDataset(chain["prep"])
    assert len(ds) == len(CAPTIONS) and len(ds.meta["shards"]) == 2
    b = ds.batch(range(len(ds)))
    assert b["caption"] == CAPTIONS
    assert b["embeds"].shape == (len(CAPTIONS), MAX_LENGTH, GEMMA_HIDDEN)
    assert torch.isfinite(b["latents"]).all() and torch.isfinite(b["embeds"]).all()
    assert ds.scaling_factor == pytest.approx(0.41407)


def test_finetuned_teacher_stage(chain):
    legacy = SprintPipeline.from_pretrained(chain["sana"])
    pipe = SprintPipeline.from_pretrained(chain["ft"] / "export")
    assert pipe.kind == "teacher"
    cfg = pipe.transformer.config
    assert cfg.timestep_scale == 1.0 and cfg.qk_norm == "rms_norm_across_heads" and not cfg.guidance_embeds
    assert _finite(pipe.transformer)
    assert (chain["ft"] / "checkpoints" / "ckpt-0000002").is_dir()
    # trained: the (EMA) weights moved away from the converted legacy weights
    old, new = legacy.transformer.state_dict(), pipe.transformer.state_dict()
    assert any(not torch.equal(old[k].float(), new[k].float()) for k in old)
    out = pipe("a red circle", steps=2, seed=0, output_type="pt").images
    assert out.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(out).all()


def test_distilled_student_stage(chain):
    pipe = SprintPipeline.from_pretrained(chain["dist"] / "export")
    assert pipe.kind == "student" and pipe.transformer.config.guidance_embeds
    assert _finite(pipe.transformer)
    assert (chain["dist"] / "checkpoints" / "ckpt-0000002").is_dir()
    rows = [json.loads(x) for x in (chain["dist"] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(np.isfinite(r["loss"]) for r in rows)


def test_generate_matches_a_direct_pipeline_call(chain):
    pipe = SprintPipeline.from_pretrained(chain["dist"] / "export")
    direct = np.asarray(pipe("a red circle", seed=3, output_type="pil").images[0])
    written = np.asarray(Image.open(chain["image"]).convert("RGB"))
    assert written.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(written, direct)
    assert written.std() > 0  # not a blank image
