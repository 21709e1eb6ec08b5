"""sana-sprint CLI: one-line errors with exit code 2 for user mistakes, and a working tiny generate."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from conftest import MAX_LENGTH, tiny_transformer, tiny_vae
from PIL import Image

from sana_sprint import cli
from sana_sprint.pipeline import SprintPipeline
from sana_sprint.text import TextEncoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, bert):
    folder = tmp_path_factory.mktemp("cli") / "tiny-sprint"
    SprintPipeline(
        TextEncoder(tokenizer, bert, max_length=MAX_LENGTH), tiny_transformer(), tiny_vae(), {"kind": "student", "resolution": 32}
    ).save_pretrained(folder)
    return folder


def _one_line_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--steps", "0"], "steps"),
        (["--steps", "abc"], "steps"),
        (["--timesteps", "1.0,1.2"], "decreasing"),
        (["--timesteps", "2.0,1.0"], "outside"),
        (["--timesteps", "a,b"], "timesteps"),
        (["--num", "0"], "num"),
        (["--height", "-8"], "height"),
    ],
)
def test_argument_mistakes(capsys, args, match):
    line = _one_line_error(capsys, cli.main(["generate", "a red circle", *args]))
    assert match in line


def test_missing_model(capsys, tmp_path):
    line = _one_line_error(capsys, cli.main(["generate", "x", "--model", str(tmp_path / "nope")]))
    assert "not found" in line


def test_incomplete_model(capsys, tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "transformer" / "config.json").unlink()
    line = _one_line_error(capsys, cli.main(["generate", "x", "--model", str(broken)]))
    assert "transformer/config.json" in line


def test_bad_size(capsys, model_dir):
    line = _one_line_error(capsys, cli.main(["generate", "x", "--model", str(model_dir), "--height", "30"]))
    assert "multiple of 4" in line


def test_unknown_command(capsys):
    _one_line_error(capsys, cli.main(["nope"]))


def test_generate_grid(tmp_path, model_dir, capsys):
    out = tmp_path / "grid.png"
    code = cli.main(["generate", "a red circle", "--model", str(model_dir), "--num", "4", "--steps", "2", "--out", str(out)])
    assert code == 0
    assert Image.open(out).size == (64, 64)  # 2x2 grid of 32px images
    one = tmp_path / "one.png"
    assert cli.main(["generate", "a red circle", "--model", str(model_dir), "--timesteps", "1.5708,1.0", "--out", str(one)]) == 0
    assert Image.open(one).size == (32, 32)


def test_model_name_resolves_in_cwd_models(tmp_path, model_dir, monkeypatch):
    import shutil

    shutil.copytree(model_dir, tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_model("mine") == tmp_path / "models" / "mine"
    assert cli.resolve_model("absent") is None


def test_command_registry():
    assert "generate" in cli.COMMANDS
    calls = []

    @cli.command("_probe", help="test only")
    def probe(parser: argparse.ArgumentParser):
        parser.add_argument("--n", type=int, default=1)
        return lambda args: calls.append(args.n) or 0

    try:
        assert cli.main(["_probe", "--n", "3"]) == 0 and calls == [3]
        with pytest.raises(ValueError):
            cli.command("_probe", help="dup")(probe)
    finally:
        cli.COMMANDS.pop("_probe")


def test_random_demo_model_subprocess(tmp_path):
    # What `make demo` runs before a trained model ships: a random model, said loudly, still an image.
    out = tmp_path / "demo.png"
    r = subprocess.run(
        [sys.executable, "-m", "sana_sprint.cli", "generate", "a red circle", "--model", "shapes-sprint", "--num", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    if (cli.repo_root() / "models" / "shapes-sprint").is_dir():
        assert r.returncode == 0
        return
    assert r.returncode == 0, r.stderr
    assert "RANDOM UNTRAINED" in r.stderr
    assert Image.open(out).size == (128, 64)
