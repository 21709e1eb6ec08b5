"""``sana-sprint eval`` and ``evaluation.run.evaluate``: schema, GenEval folders, ground truth = 1.0, paired seeds, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import MAX_LENGTH, tiny_transformer, tiny_vae
from PIL import Image

from sana_sprint import cli
from sana_sprint.evaluation import run as R
from sana_sprint.evaluation.suite import load_suite, render_ground_truth, write_prompt_folder
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder

TAGS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, bert):
    root = tmp_path_factory.mktemp("eval")
    text = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    student = root / "student"
    teacher = root / "teacher"
    SprintPipeline(text, tiny_transformer(), tiny_vae(), {"kind": "student", "resolution": 32}).save_pretrained(student)
    SprintPipeline(text, tiny_transformer(guidance_embeds=False, seed=1), tiny_vae(),
                   {"kind": "teacher", "resolution": 32}).save_pretrained(teacher)
    return {"student": student, "teacher": teacher}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _eval(*args) -> int:
    return cli.main(["eval", "--no-progress", *map(str, args)])


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _scores(d: dict) -> dict:
    return {k: d[k] for k in ("overall", "tasks", "n_images")}


def _gt_folder(root, per_task=2, shuffle=False):
    """Ground-truth renders of the first prompts of each task in GenEval layout; ``shuffle``: each prompt gets
    the next prompt's picture (a negative control)."""
    suite = load_suite()
    keep = R.balanced_subset([r["tag"] for r in suite], per_task * 6)
    recs = [suite[i] for i in keep]
    images = [render_ground_truth(r, 64) for r in recs]
    if shuffle:
        images = images[1:] + images[:1]
    for i, rec, img in zip(keep, recs, images, strict=True):
        write_prompt_folder(root, i, rec, [img])
    return root


# --- the CLI end to end ---------------------------------------------------------------------------


def test_eval_writes_schema_and_grid(tmp_path, models, capsys):
    out = tmp_path / "res" / "student.json"
    code = _eval("--model", models["student"], "--limit", 6, "--images-per-prompt", 2, "--batch", 5, "--out", out)
    assert code == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    assert set(d) >= {"overall", "tasks", "n_images", "model", "steps", "guidance", "seed", "timesteps", "wall_s"}
    assert "fd_shapes" not in d
    assert set(d["tasks"]) == TAGS
    assert d["n_images"] == 12
    assert all(0.0 <= v <= 1.0 for v in d["tasks"].values())
    assert d["overall"] == pytest.approx(float(np.mean(list(d["tasks"].values()))))
    assert d["steps"] == 1 and d["timesteps"][-1] == 0.0 and len(d["timesteps"]) == 2  # the student's default
    assert d["guidance"] == 4.5 and d["seed"] == 0 and d["model"] == str(models["student"])
    assert d["wall_s"] > 0
    grid = Image.open(out.with_suffix(".png"))
    assert grid.width == 4 * 128 and grid.height > 3 * 128  # 12 tiles, 4 columns, caption strips below
    assert "overall=" in capsys.readouterr().out


def test_teacher_defaults_to_20_flow_steps(tmp_path, models):
    out = tmp_path / "t.json"
    # a single prompt and image keeps 20 steps cheap
    assert _eval("--model", models["teacher"], "--limit", 1, "--images-per-prompt", 1, "--guidance", 2, "--out", out) == 0
    d = json.loads(out.read_text())
    assert d["steps"] == 20 and len(d["timesteps"]) == 21 and d["n_images"] == 1
    assert d["guidance"] == 2.0 and list(d["tasks"]) == ["single_object"]


def test_save_images_then_images_gives_same_scores(tmp_path, models):
    folder = tmp_path / "geneval"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert _eval("--model", models["student"], "--limit", 6, "--images-per-prompt", 2, "--steps", 2,
                 "--save-images", folder, "--out", a) == 0
    subdirs = sorted(p.name for p in folder.iterdir())
    assert subdirs == [f"{i:05d}" for i in range(6)]  # the suite interleaves tasks: the first 6 lines, one per task
    suite = load_suite()
    for i, name in enumerate(subdirs):
        meta = json.loads((folder / name / "metadata.jsonl").read_text().splitlines()[0])
        assert meta["prompt"] == suite[i]["prompt"]
        assert sorted(p.name for p in (folder / name / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert _eval("--images", folder, "--out", b) == 0
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    assert _scores(da) == _scores(db)
    assert db["model"] is None and db["images"] == str(folder)
    assert b.with_suffix(".png").is_file()


def test_ground_truth_folder_scores_one(tmp_path):
    folder = _gt_folder(tmp_path / "gt")
    out = tmp_path / "gt.json"
    assert _eval("--images", folder, "--out", out) == 0
    d = json.loads(out.read_text())
    assert d["n_images"] == 12
    assert d["overall"] == 1.0 and d["tasks"] == {t: 1.0 for t in TAGS}
    # --limit on a folder: balanced over its tasks
    assert _eval("--images", folder, "--limit", 6, "--out", out) == 0
    d = json.loads(out.read_text())
    assert d["n_images"] == 6 and set(d["tasks"]) == TAGS


def test_mismatched_ground_truth_scores_below_one(tmp_path):
    # the negative control: the same pictures under the wrong prompts must lose points
    out = tmp_path / "bad.json"
    assert _eval("--images", _gt_folder(tmp_path / "gt", shuffle=True), "--out", out) == 0
    assert json.loads(out.read_text())["overall"] < 0.7


# --- seeds -----------------------------------------------------------------------------------------


class _Recorder:
    """A pipeline proxy that records the prompts and generator seeds of every call."""

    def __init__(self, pipe):
        self._pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompts, **kw):
        self.calls.extend(zip(prompts, [g.initial_seed() for g in kw["generator"]], strict=True))
        return self._pipe(prompts, **kw)


def test_teacher_and_student_get_the_same_seeds(models):
    suite = load_suite()
    keep = [3, 10, 17, 536]  # prompt numbers in the suite, as under --limit or --prompts subsets
    recs = [suite[i] for i in keep]
    seen = {}
    for kind, batch in (("student", 5), ("teacher", 3)):
        rec = _Recorder(SprintPipeline.from_pretrained(models[kind]))
        R.evaluate(rec, recs, steps=1, guidance=2.0, seed=7, images_per_prompt=2, batch=batch, indices=keep, progress=False)
        seen[kind] = rec.calls
    assert seen["student"] == seen["teacher"]
    expected = [(suite[i]["prompt"], R.sample_seed(7, i, k)) for i in keep for k in range(2)]
    assert seen["student"] == expected
    seeds = [s for _, s in expected]
    assert len(set(seeds)) == len(seeds)  # no two images share noise
    assert R.sample_seed(8, keep[0], 0) != R.sample_seed(7, keep[0], 0)


def test_same_initial_noise_for_two_models(models):
    from sana_sprint.sampling import randn

    # what the pipeline draws first from each generator: identical for two pipelines' generator lists
    g1 = R.sample_generators(3, [0, 5], 2)
    g2 = R.sample_generators(3, [0, 5], 2)
    assert g1 is not g2
    a, b = randn((4, 4, 8, 8), g1), randn((4, 4, 8, 8), g2)
    assert torch_equal(a, b)
    c = randn((4, 4, 8, 8), R.sample_generators(4, [0, 5], 2))
    assert not torch_equal(a, c)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_same_model_twice_is_identical_and_batch_invariant(tmp_path, models):
    res = []
    for n, batch in enumerate((6, 6, 1)):
        out = tmp_path / f"r{n}.json"
        assert _eval("--model", models["student"], "--limit", 6, "--steps", 2, "--images-per-prompt", 1, "--batch", batch,
                     "--seed", 3, "--save-images", tmp_path / f"img{n}", "--out", out) == 0
        d = json.loads(out.read_text())
        d.pop("wall_s")
        res.append(d)
    assert res[0] == res[1]
    pngs = sorted((tmp_path / "img0").rglob("*.png"))
    assert len(pngs) == 6
    for p in pngs:
        x0 = np.asarray(Image.open(p), dtype=int)
        x1 = np.asarray(Image.open(tmp_path / "img1" / p.relative_to(tmp_path / "img0")), dtype=int)
        x2 = np.asarray(Image.open(tmp_path / "img2" / p.relative_to(tmp_path / "img0")), dtype=int)
        assert np.array_equal(x0, x1)
        assert np.abs(x0 - x2).max() <= 1  # batch 1 vs 6: same noise, only float summation order differs


@pytest.mark.parametrize("mode", ["exact", "linear"])
def test_fast_paths_score_like_the_plain_pipeline(tmp_path, models, mode):
    """``--fast``: the same seeds through sana_sprint.fast; exact = same pixels (+-1), bf16 = close, recorded."""
    runs = {}
    for name in ("off", mode):
        out = tmp_path / f"{name}.json"
        assert _eval("--model", models["student"], "--limit", 6, "--steps", 2, "--images-per-prompt", 1, "--seed", 3,
                     "--fast", name, "--save-images", tmp_path / name, "--out", out) == 0
        runs[name] = json.loads(out.read_text())
    assert "fast" not in runs["off"] and runs[mode]["fast"]["bf16"] == ("off" if mode == "exact" else "linear")
    diffs = []
    for p in sorted((tmp_path / "off").rglob("*.png")):
        a = np.asarray(Image.open(p), dtype=int)
        b = np.asarray(Image.open(tmp_path / mode / p.relative_to(tmp_path / "off")), dtype=int)
        diffs.append(np.abs(a - b))
    assert len(diffs) == 6
    if mode == "exact":
        assert max(d.max() for d in diffs) <= 1
    else:  # bf16 products: the stated mean-image tolerance (images in [0, 1]), and really not the fp32 path
        from sana_sprint.fast import TOLERANCE

        mean = float(np.mean([d.mean() for d in diffs])) / 255
        assert 0 < mean <= TOLERANCE["bf16_image_mean"]


def test_balanced_subset():
    tags = ["a", "b", "c"] * 3 + ["a"]
    assert R.balanced_subset(tags, None) == list(range(10))
    assert R.balanced_subset(tags, 3) == [0, 1, 2]
    assert R.balanced_subset(tags, 4) == [0, 1, 2, 3]  # the remainder goes to the first tag
    assert R.balanced_subset(["a"] * 5 + ["b"], 4) == [0, 1, 5]  # b has only one prompt
    suite = load_suite()
    keep = R.balanced_subset([r["tag"] for r in suite], 60)
    assert len(keep) == 60 and {suite[i]["tag"] for i in keep} == TAGS
    assert all(sum(suite[i]["tag"] == t for i in keep) == 10 for t in TAGS)


# --- FD_shapes ---------------------------------------------------------------------------------------


@pytest.fixture
def fd_net_dir(tmp_path, monkeypatch):
    import torch

    from sana_sprint.evaluation import fd as FD

    torch.manual_seed(0)
    folder = FD.save_feature_net(FD.ShapesFeatureNet(width=8, feature_dim=16), tmp_path / "fdnet")
    monkeypatch.setenv(FD.NET_ENV, str(folder))
    return folder


def test_fd_shapes(tmp_path, models, fd_net_dir):
    out_model, out_gt = tmp_path / "m.json", tmp_path / "gt.json"
    assert _eval("--model", models["student"], "--limit", 12, "--images-per-prompt", 1, "--fd", "--fd-reference", 64,
                 "--out", out_model) == 0
    assert _eval("--images", _gt_folder(tmp_path / "gt"), "--fd", "--fd-reference", 64, "--out", out_gt) == 0
    fd_model = json.loads(out_model.read_text())["fd_shapes"]
    fd_gt = json.loads(out_gt.read_text())["fd_shapes"]
    assert math.isfinite(fd_model) and math.isfinite(fd_gt) and fd_gt >= 0
    assert fd_gt < fd_model  # ground truth is closer to the ground-truth reference than an untrained model
    assert list((tmp_path / "cache" / "sana_sprint" / "fd").glob("*.npz"))  # reference statistics cached


def test_fd_missing_net_is_a_user_error(tmp_path, models, capsys, monkeypatch):
    from sana_sprint.evaluation import fd as FD

    monkeypatch.setenv(FD.NET_ENV, str(tmp_path / "no-net"))
    line = _one_line_error(capsys, _eval("--model", models["student"], "--limit", 6, "--fd", "--out", tmp_path / "x.json"))
    assert "FD_shapes feature net" in line and "no-net" in line
    assert not (tmp_path / "x.json").exists()


# --- user mistakes -------------------------------------------------------------------------------------


def _bad_prompts(tmp_path):
    good = json.dumps(load_suite()[0])
    (tmp_path / "bad.jsonl").write_text(good + "\n" + "{not json\n")
    (tmp_path / "nokey.jsonl").write_text(good + "\n\n" + json.dumps({"tag": "x", "include": []}) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")


@pytest.mark.parametrize(
    "args,match",
    [
        (["--prompts", "{tmp}/missing.jsonl"], "prompts file not found"),
        (["--prompts", "{tmp}/bad.jsonl"], "bad.jsonl:2: invalid JSON"),
        (["--prompts", "{tmp}/nokey.jsonl"], "nokey.jsonl:3: missing key(s) prompt"),
        (["--prompts", "{tmp}/empty.jsonl"], "no prompts"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "x"], "steps"),
        (["--timesteps", "1.0,1.2"], "decreasing"),
        (["--limit", "0"], "--limit"),
        (["--images-per-prompt", "0"], "--images-per-prompt"),
        (["--batch", "-1"], "--batch"),
        (["--guidance", "nan"], "--guidance"),
        (["--model", "{tmp}/nope"], "model folder not found"),
        (["--images", "{tmp}/nope"], "image folder not found"),
        (["--images", "{tmp}", "--model", "{student}"], "cannot be combined with --model"),
        (["--images", "{tmp}"], "no samples"),
        (["--save-images", "{tmp}"], "not empty"),
        (["--images", "{tmp}", "--fast", "mixed"], "cannot be combined with --fast"),
        (["--images", "{tmp}", "--noise-scale", "0.8"], "cannot be combined with --noise-scale"),
        (["--noise-scale", "0"], "--noise-scale must be a finite number > 0"),
        (["--model", "{teacher}", "--sampler", "trigflow-euler", "--fast", "exact"], "--fast"),
    ],
)
def test_user_mistakes(tmp_path, models, capsys, args, match):
    _bad_prompts(tmp_path)
    args = [a.format(tmp=tmp_path, student=models["student"], teacher=models["teacher"]) for a in args]
    if "--model" not in args and "--images" not in args:
        args = ["--model", str(models["student"]), *args]
    line = _one_line_error(capsys, _eval(*args, "--limit" if "--limit" not in args else "--seed", 1,
                                         "--out", tmp_path / "r.json"))
    assert match in line, line
    assert not (tmp_path / "r.json").exists()


def test_out_must_be_json(tmp_path, models, capsys):
    line = _one_line_error(capsys, _eval("--model", models["student"], "--out", tmp_path / "r.png"))
    assert ".json" in line


def test_out_is_required(capsys):
    _one_line_error(capsys, _eval("--limit", 1))


def test_bad_folder_metadata(tmp_path, capsys):
    folder = _gt_folder(tmp_path / "gt", per_task=1)
    (folder / "00003" / "metadata.jsonl").write_text("{oops\n")
    line = _one_line_error(capsys, _eval("--images", folder, "--out", tmp_path / "r.json"))
    assert "00003/metadata.jsonl:1" in line
