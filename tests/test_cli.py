"""sana-sprint CLI: one-line errors with exit code 2 for user mistakes, and a working tiny generate."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from conftest import MAX_LENGTH, save_tiny_pipeline, tiny_transformer
from PIL import Image

from sana_sprint import cli
from sana_sprint.text import TextEncoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, bert):
    folder = tmp_path_factory.mktemp("cli") / "tiny-sprint"
    te = TextEncoder(tokenizer, bert, max_length=MAX_LENGTH)
    return save_tiny_pipeline(folder, te, tiny_transformer(), kind="student", vae_seed=0)


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


# Commands whose ``--help`` must not import torch (``distill``, ``prepare-data`` and ``train-controlnet``
# build their parsers from modules that import torch at top level).
LIGHT_HELP = [[], ["generate"], ["train-teacher"], ["train-vae"], ["finetune-teacher"], ["serve"], ["bench"],
              ["eval"], ["eval-control"]]


def test_help_does_not_import_torch():
    script = f"""
import sys
from sana_sprint import cli
for args in {LIGHT_HELP!r}:
    code = cli.main([*args, "--help"])
    heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
    print(args, code, heavy)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("[")]
    assert lines == [f"{args} 0 []" for args in LIGHT_HELP], r.stdout
    assert "train-controlnet" in r.stdout and "eval-control" in r.stdout  # every command is listed


def test_lazy_parser_matches_the_full_one():
    import importlib

    for module in cli.COMMAND_MODULES:
        importlib.import_module(module)
    # The source scan finds exactly what importing registers.
    declared = sorted(c for m in cli.COMMAND_MODULES for c in cli.declared_commands(m))
    registered = sorted((c.name, c.help) for c in cli.COMMANDS.values() if c.setup.__module__ in cli.COMMAND_MODULES)
    assert declared == registered and len(declared) >= 10

    def sub(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    full = cli.build_parser()
    assert cli.build_parser(["--help"]).format_help() == full.format_help()
    for name, p in sub(full).items():
        assert sub(cli.build_parser([name, "--help"]))[name].format_help() == p.format_help(), name
    assert cli.declared_commands("sana_sprint.errors") is None  # no commands: imported, never guessed


def test_bf16_mode_choices_follow_fast():
    """bench --bf16 and eval --fast spell the bf16 modes out (their --help must not import torch): same set as fast."""
    from sana_sprint.fast import BF16_MODES

    full = cli.build_parser()
    subs = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction)).choices

    def choices(command, flag):
        return set(next(a for a in subs[command]._actions if flag in a.option_strings).choices)

    assert choices("bench", "--bf16") == set(BF16_MODES)
    assert choices("eval", "--fast") == {"exact", *BF16_MODES}
