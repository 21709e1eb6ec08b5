"""``sana-sprint eval``: score a model (or a GenEval-layout image folder) on ShapesEval, optionally FD_shapes.

Python API::

    from sana_sprint.evaluation.run import evaluate, load_prompts
    result = evaluate(pipe, load_prompts(), steps=None, guidance=None, seed=0, images_per_prompt=4, batch=32)

Seed pairing: image ``k`` of prompt ``i`` (``i`` = the prompt's line number in the prompts file, 0-based,
also under ``--limit``) is sampled with its own ``torch.Generator`` seeded by :func:`sample_seed`
``(seed, i, k)``. The pipeline draws the initial noise (and, for multistep students, the re-noising)
from that generator only, so every model sees the same initial noise for the same prompt and image,
whatever the batch size: teacher-vs-student comparisons are paired.

Teacher ODE solver (``--sampler``, paper Table 1): ``flow-euler`` (the pipeline's own: Euler on the flow
velocity) or ``trigflow-euler`` (Euler on the TrigFlow PF-ODE ``dx_s/ds = sd F`` where ``F`` is the
teacher turned into a TrigFlow model by the training-free transform of the wrapper), on the same time
points, the same real CFG and the same initial noise. :func:`with_sampler` gives such a pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sana_sprint.cli import (
    DEFAULT_MODEL,
    command,
    model_search_dirs,
    parse_timesteps,
    pick_device,
    resolve_model,
)
from sana_sprint.errors import UserError

GRID_IMAGES = 32  # images shown in the PNG next to the JSON
GRID_TILE = 128  # tiles are upscaled (nearest) to at least this many pixels so captions fit
DEFAULT_FD_REFERENCE = 2000  # ground-truth renders in the FD_shapes reference set
REQUIRED_KEYS = ("tag", "prompt", "include")
TEACHER_SAMPLERS = ("flow-euler", "trigflow-euler")


# --- prompts ------------------------------------------------------------------------------------


def load_prompts(path=None) -> list[dict]:
    """Records of a GenEval metadata JSONL (default: the ShapesEval suite); bad lines -> UserError naming the line."""
    from sana_sprint.evaluation.suite import SUITE_PATH

    path = Path(path) if path is not None else SUITE_PATH
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            records.append(check_record(rec, f"{path}:{lineno}"))
    if not records:
        raise UserError(f"{path}: no prompts")
    return records


def check_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
    if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
        raise UserError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(rec["tag"], str):
        raise UserError(f"{where}: 'tag' must be a string")
    for key in ("include", "exclude"):
        clauses = rec.get(key, [])
        if not isinstance(clauses, list) or not all(isinstance(c, dict) and "class" in c and "count" in c for c in clauses):
            raise UserError(f"{where}: {key!r} must be a list of {{class, count, ...}} objects")
    return rec


def balanced_subset(tags: Sequence[str], limit: int | None) -> list[int]:
    """Indices of the first ``limit`` items, balanced over tags (limit // n_tags each, the remainder to the
    first tags in order of appearance); original order kept. ``None`` -> all."""
    if limit is None:
        return list(range(len(tags)))
    order = list(dict.fromkeys(tags))
    quota = {t: limit // len(order) + (1 if j < limit % len(order) else 0) for j, t in enumerate(order)}
    keep = []
    for i, t in enumerate(tags):
        if quota[t] > 0:
            quota[t] -= 1
            keep.append(i)
    return keep


# --- seeds --------------------------------------------------------------------------------------


def sample_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of image ``image_index`` of prompt ``prompt_index`` (a 63-bit hash of the three numbers)."""
    a, b = np.random.SeedSequence([int(seed) % 2**64, int(prompt_index), int(image_index)]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


def sample_generators(seed: int, prompt_indices: Sequence[int], images_per_prompt: int):
    import torch

    return [torch.Generator().manual_seed(sample_seed(seed, i, k)) for i in prompt_indices for k in range(images_per_prompt)]


# --- FD_shapes ----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sana_sprint" / "fd"


def load_fd_net(path=None):
    """The FD_shapes feature net; missing weights -> UserError saying how to get them."""
    from sana_sprint.evaluation import fd as fd_lib

    try:
        return fd_lib.load_feature_net(path)
    except FileNotFoundError as e:
        raise UserError(f"--fd needs the FD_shapes feature net: {e} (or set ${fd_lib.NET_ENV})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load the FD_shapes feature net: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


class _FDAccumulator:
    def __init__(self, net, n_ref: int, cache_dir):
        self.net, self.n_ref, self.cache_dir = net, n_ref, cache_dir
        self.features: list[np.ndarray] = []
        self.size: int | None = None

    def add(self, images: list[np.ndarray]) -> None:
        from sana_sprint.evaluation import fd as fd_lib

        if not images:
            return
        self.size = images[0].shape[1] if self.size is None else self.size
        self.features.append(fd_lib.extract_features(np.stack(images), self.net))

    def value(self) -> float:
        from sana_sprint.evaluation import fd as fd_lib

        feats = np.concatenate(self.features) if self.features else np.zeros((0, 1))
        if len(feats) < 2:
            raise UserError(f"FD_shapes needs at least 2 images, got {len(feats)}")
        cache = self.cache_dir
        try:
            ref = fd_lib.reference_stats(self.n_ref, size=self.size, net=self.net, cache_dir=cache)
        except OSError:  # unwritable cache: compute without it
            ref = fd_lib.reference_stats(self.n_ref, size=self.size, net=self.net, cache_dir=None)
        return fd_lib.frechet_distance(*fd_lib.feature_stats(feats), *ref)


# --- the grid -----------------------------------------------------------------------------------


def caption_grid(images: Sequence[np.ndarray], captions: Sequence[str], correct: Sequence[bool] | None = None):
    """PIL grid of images, each with its caption in a strip below (green: scored correct, red: wrong)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h0, w0 = images[0].shape[:2]
    scale = max(1, math.ceil(GRID_TILE / max(h0, w0)))
    w, h = w0 * scale, h0 * scale
    font = ImageFont.load_default()
    chars = max(8, w // 6)
    lines = [textwrap.wrap(c, chars)[:4] or [""] for c in captions]
    line_h = 11
    strip = line_h * max(len(x) for x in lines) + 4
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, img in enumerate(images):
        x, y = (j % cols) * w, (j // cols) * (h + strip)
        tile = Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((w, h), Image.NEAREST)
        grid.paste(tile, (x, y))
        colour = (0, 0, 0) if correct is None else ((0, 120, 0) if correct[j] else (190, 0, 0))
        for li, text in enumerate(lines[j]):
            draw.text((x + 2, y + h + 2 + li * line_h), text, fill=colour, font=font)
    return grid


# --- teacher samplers ---------------------------------------------------------------------------


def save_grid(path, images: Sequence[np.ndarray], captions: Sequence[str], correct: Sequence[bool] | None = None) -> None:
    """Write :func:`caption_grid` of the images to ``path`` (a PNG), creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    caption_grid(images, captions, correct).save(path)


# --- results of the evaluation commands (``eval``, ``eval-control``) ---------------------------


def result_path(value: str) -> Path:
    """``--out`` of an evaluation command: a ``.json`` path (the PNG grid and per-image JSONL go next to it)."""
    out = Path(value)
    if out.suffix.lower() != ".json":
        raise UserError(f"--out must be a .json file, got {out}")
    return out


def check_positive(name: str, value: int | None) -> None:
    """``--name`` must be None (its default) or >= 1."""
    if value is not None and value < 1:
        raise UserError(f"--{name} must be >= 1, got {value}")


def check_guidance(value: float | None) -> None:
    """``--guidance`` must be None (the model's default) or a finite number >= 0."""
    if value is not None and (not math.isfinite(value) or value < 0):
        raise UserError(f"--guidance must be a finite number >= 0, got {value}")


def write_results(out: Path, result: dict, rows: Sequence[dict] | None = None) -> list[Path]:
    """Write ``result`` as indented JSON to ``out`` and, given ``rows``, one JSON line per row next to it
    (``out.with_suffix(".jsonl")``). Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if rows is None:
        return [out]
    jsonl = out.with_suffix(".jsonl")
    with open(jsonl, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return [out, jsonl]


def _trigflow_euler_teacher_cls():
    from sana_sprint.pipeline import SprintPipeline

    class TrigFlowEulerTeacher(SprintPipeline):
        """A teacher pipeline that solves the TrigFlow PF-ODE (Euler in s) instead of the flow ODE (Euler in t).

        The network call goes through :class:`~sana_sprint.models.wrapper.TrigFlowTransformer` ``forward``,
        i.e. the flow -> TrigFlow transform (paper Prop. 3.1); CFG is applied to ``F`` (``F`` is affine in
        the velocity at fixed input, so this equals the transform of the guided velocity). Same schedule
        (``s_i = trig_time(t_i)``), same initial noise (``x_s = sd * eps`` at ``s_0 = pi/2``).
        """

        sampler = "trigflow-euler"

        def _sample_teacher(self, x_T, schedule, embeds, mask, w):
            from sana_sprint.sampling import cfg_batched, trigflow_euler

            dtype, sd = self.dtype, self.sigma_data
            guidance = w if self.model.has_guidance else None

            def F(x_scaled, s, cond):
                e, m = cond
                return self.model(x_scaled.to(dtype), s, e, m, guidance=guidance).float()

            if w == 1.0 or self.model.has_guidance:
                fn = lambda x, s: F(x, s, (embeds, mask))  # noqa: E731
            else:
                null_e, null_m = self.text_encoder.null_embedding()
                n = embeds.shape[0]
                uncond = (null_e.to(embeds).expand(n, -1, -1), null_m.to(mask.device).expand(n, -1))
                fn = cfg_batched(F, (embeds, mask), uncond, w)
            return trigflow_euler(fn, x_T * sd, schedule, sigma_data=sd)  # training space, as flow Euler's

    return TrigFlowEulerTeacher


def with_sampler(pipe, sampler: str | None):
    """``pipe`` sampling with the named teacher ODE solver (``None`` or ``flow-euler``: unchanged).

    Students sample with consistency steps: any ``sampler`` other than None -> UserError.
    """
    if sampler is None:
        return pipe
    if sampler not in TEACHER_SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(TEACHER_SAMPLERS)}, got {sampler!r}")
    if pipe.kind != "teacher":
        raise UserError("--sampler applies to teacher models only (students sample with consistency steps)")
    if sampler == "flow-euler":
        return pipe
    return _trigflow_euler_teacher_cls()(pipe.text_encoder, pipe.model, pipe.vae, pipe.config)


def sampler_name(pipe) -> str:
    """What ``pipe`` samples with: ``consistency`` (students), ``flow-euler`` or ``trigflow-euler`` (teachers)."""
    if pipe.kind != "teacher":
        return "consistency"
    return getattr(pipe, "sampler", "flow-euler")


# --- evaluation ---------------------------------------------------------------------------------


def _fd_accumulator(fd_net, fd_reference: int, cache_dir) -> _FDAccumulator:
    """FD_shapes accumulator for ``fd_net``: a loaded net, or a folder / None (:func:`load_fd_net`)."""
    net = fd_net if (fd_net is not None and not isinstance(fd_net, str | Path)) else load_fd_net(fd_net)
    return _FDAccumulator(net, fd_reference, cache_dir)


def _finish(state: dict, fd_acc, t0: float, results: list | None, grid_path) -> dict:
    from sana_sprint.evaluation.geneval import summarize

    out = summarize((r["tag"], r["correct"]) for r in state["rows"])
    if fd_acc is not None:
        out["fd_shapes"] = fd_acc.value()
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    if results is not None:
        results.extend(state["rows"])
    if grid_path is not None and state["grid"]:
        imgs, caps, ok = zip(*state["grid"], strict=True)
        save_grid(grid_path, imgs, caps, ok)
    return out


def _score_batch(state: dict, detector, metas: list[dict], images: list[np.ndarray], tags: list[tuple]) -> None:
    from sana_sprint.evaluation.geneval import evaluate_image

    for meta, img, (i, k) in zip(metas, images, tags, strict=True):
        ok, reason = evaluate_image(detector.detect(img), meta)
        state["rows"].append({"index": i, "sample": k, "tag": meta["tag"], "prompt": meta["prompt"],
                              "correct": bool(ok), "reason": reason})
        if len(state["grid"]) < GRID_IMAGES:
            state["grid"].append((img, meta["prompt"], bool(ok)))


def evaluate(pipe, records: Sequence[dict], steps: int | None = None, guidance: float | None = None, seed: int = 0,
             images_per_prompt: int = 4, batch: int = 32, timesteps: Sequence[float] | None = None, fd: bool = False,
             save_dir=None, *, indices: Sequence[int] | None = None, fd_net=None, fd_reference: int = DEFAULT_FD_REFERENCE,
             cache_dir=None, detector=None, results: list | None = None, grid_path=None, progress: bool = True,
             noise_scale: float = 1.0) -> dict:
    """Generate ``images_per_prompt`` images per record with ``pipe`` and score them.

    Returns ``{"overall", "tasks", "n_images", ["fd_shapes"], "steps", "guidance", "seed", "timesteps", "wall_s"}``
    (``steps``/``timesteps``/``guidance`` as actually used: the model's defaults where None).
    ``indices``: each record's prompt number for seeds and folder names (default 0..n-1).
    ``fd``: also FD_shapes against ``fd_reference`` ground-truth renders (``fd_net``: a loaded net or its folder).
    ``save_dir``: also write GenEval's folder layout there. ``results``: receives one row per image.
    ``grid_path``: a PNG of the first images with their prompts. ``noise_scale``: the pipeline's sampling
    temperature (initial noise times it; 1 = the plain sampler), recorded in the result when not 1.
    """
    import torch
    from tqdm.auto import tqdm

    from sana_sprint.evaluation.detector import ShapesDetector
    from sana_sprint.evaluation.suite import write_prompt_folder

    records = list(records)
    indices = list(range(len(records))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(records):
        raise ValueError(f"got {len(indices)} indices for {len(records)} records")
    for name, v in (("images_per_prompt", images_per_prompt), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be an integer >= 1, got {v!r}")
    schedule = pipe._schedule(steps, timesteps)  # validates steps/timesteps before any work
    w = float(pipe.config["default_guidance"] if guidance is None else guidance)
    if not math.isfinite(w) or w < 0:
        raise UserError(f"guidance must be a finite number >= 0, got {guidance!r}")
    fd_acc = _fd_accumulator(fd_net, fd_reference, cache_dir) if fd else None

    detector = detector or ShapesDetector()
    t0 = time.perf_counter()
    # Flatten to (prompt, sample) jobs, prompt-major; one generator per image.
    jobs = [(j, k) for j in range(len(records)) for k in range(images_per_prompt)]
    pending: dict[int, list[np.ndarray]] = {}
    state: dict = {"rows": [], "grid": []}
    bar = tqdm(total=len(jobs), desc="eval", unit="img", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            gens = [torch.Generator().manual_seed(sample_seed(seed, indices[j], k)) for j, k in chunk]
            out = pipe([records[j]["prompt"] for j, _ in chunk], steps=steps, timesteps=timesteps, guidance_scale=w,
                       generator=gens, num_images_per_prompt=1, output_type="pil", noise_scale=noise_scale)
            images = [np.asarray(im.convert("RGB")) for im in out.images]
            _score_batch(state, detector, [records[j] for j, _ in chunk], images, [(indices[j], k) for j, k in chunk])
            if fd_acc is not None:
                fd_acc.add(images)
            if save_dir is not None:
                for (j, _k), img in zip(chunk, images, strict=True):
                    pending.setdefault(j, []).append(img)
                    if len(pending[j]) == images_per_prompt:
                        write_prompt_folder(save_dir, indices[j], records[j], pending.pop(j))
            bar.update(len(chunk))
    finally:
        bar.close()
    result = _finish(state, fd_acc, t0, results, grid_path)
    result = {**result, "steps": len(schedule) - 1, "guidance": w, "seed": int(seed),
              "timesteps": [float(s) for s in schedule]}
    if noise_scale != 1.0:
        result["noise_scale"] = float(noise_scale)
    return result


def _folder_items(root) -> list[tuple[int, dict, list[Path]]]:
    """(prompt number, metadata, sample paths) of a GenEval-layout folder, sorted by folder name."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "metadata.jsonl").is_file()):
        where = str(folder / "metadata.jsonl")
        lines = [x for x in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        try:
            meta = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError as e:
            raise UserError(f"{where}:1: invalid JSON ({e.msg})") from None
        if meta is None:
            raise UserError(f"{where}: empty")
        check_record(meta, where)
        paths = sorted((folder / "samples").glob("*.png"))
        number = int(folder.name) if folder.name.isdigit() else len(items)
        items.append((number, meta, paths))
    if not any(paths for _, _, paths in items):
        raise UserError(f"no samples in {root} (expected {root}/00000/metadata.jsonl and {root}/00000/samples/0000.png)")
    return items


def evaluate_folder(folder, limit: int | None = None, fd: bool = False, *, fd_net=None,
                    fd_reference: int = DEFAULT_FD_REFERENCE, cache_dir=None, detector=None,
                    results: list | None = None, grid_path=None, progress: bool = True) -> dict:
    """Score an existing GenEval-layout folder (any generator's output): ``{"overall", "tasks", "n_images", ...}``."""
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    from sana_sprint.evaluation.detector import ShapesDetector

    items = _folder_items(folder)
    items = [items[i] for i in balanced_subset([m["tag"] for _, m, _ in items], limit)]
    fd_acc = _fd_accumulator(fd_net, fd_reference, cache_dir) if fd else None
    detector = detector or ShapesDetector()
    t0 = time.perf_counter()
    state: dict = {"rows": [], "grid": []}
    size = None
    for number, meta, paths in tqdm(items, desc="score", unit="prompt", disable=not progress, dynamic_ncols=True, file=sys.stderr):
        images = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    img = np.asarray(im.convert("RGB"))
            except (OSError, UnidentifiedImageError):
                raise UserError(f"cannot read image {p}") from None
            if fd_acc is not None and size is not None and img.shape != size:
                raise UserError(f"--fd needs images of one size: {p} is {img.shape[1]}x{img.shape[0]}, others {size[1]}x{size[0]}")
            size = img.shape
            images.append(img)
        _score_batch(state, detector, [meta] * len(images), images, [(number, k) for k in range(len(images))])
        if fd_acc is not None:
            fd_acc.add(images)
    return _finish(state, fd_acc, t0, results, grid_path)


# --- the command --------------------------------------------------------------------------------


@command("eval", help="score a model (or an image folder) on ShapesEval (GenEval protocol), optionally FD_shapes")
def eval_command(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help=f"teacher or student model folder, or a name in models/ (default: {DEFAULT_MODEL})")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's; teachers 20)")
    p.add_argument("--timesteps", default=None, help="explicit TrigFlow times, e.g. 1.5708,1.3 (0 appended)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (default: the model's)")
    p.add_argument("--sampler", default=None, choices=TEACHER_SAMPLERS,
                   help="teacher ODE solver: flow-euler (default) or trigflow-euler (through the flow->TrigFlow transform)")
    p.add_argument("--prompts", default=None, help="GenEval metadata JSONL (default: the ShapesEval suite)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default: %(default)s, as GenEval)")
    p.add_argument("--seed", type=int, default=0, help="image k of prompt i uses a seed derived from (seed, i, k)")
    p.add_argument("--batch", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts, balanced over tasks")
    p.add_argument("--fd", action="store_true", help="also FD_shapes against ground-truth world renders")
    p.add_argument("--fd-net", default=None, help="FD_shapes feature net folder (default: models/shapes-fd or $SANA_SPRINT_FD_NET)")
    p.add_argument("--fd-reference", type=int, default=DEFAULT_FD_REFERENCE, help="reference renders for FD (default: %(default)s)")
    p.add_argument("--save-images", default=None, metavar="DIR", help="also write GenEval's folder layout to DIR")
    p.add_argument("--images", default=None, metavar="DIR", help="score this GenEval-layout folder instead of a model")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--noise-scale", type=float, default=1.0,
                   help="sampling temperature: the initial noise times this (default 1, the plain sampler; < 1 trades "
                        "diversity and FD for prompt adherence, as truncation in GANs)")
    p.add_argument("--fast", default="off", choices=("off", "exact", "auto", "linear", "mixed", "all"),
                   help="sample through sana_sprint.fast's inference paths, as serve / bench do: exact = the fp32 "
                        "fast paths, auto / linear / mixed / all = with that bf16 mode (default: off, the plain "
                        "fp32 pipeline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="result JSON (a PNG grid of samples is written next to it)")

    def run(args: argparse.Namespace) -> int:
        out = result_path(args.out)
        for name in ("steps", "images_per_prompt", "batch", "limit", "fd_reference"):
            check_positive(name.replace("_", "-"), getattr(args, name))
        if args.fd and args.fd_reference < 2:
            raise UserError(f"--fd-reference must be >= 2, got {args.fd_reference}")
        check_guidance(args.guidance)
        if not (math.isfinite(args.noise_scale) and args.noise_scale > 0):
            raise UserError(f"--noise-scale must be a finite number > 0, got {args.noise_scale}")
        timesteps = parse_timesteps(args.timesteps)
        fd_net = load_fd_net(args.fd_net) if args.fd else None  # fail before any generation
        grid = out.with_suffix(".png")
        common = dict(fd=args.fd, fd_net=fd_net, fd_reference=args.fd_reference, cache_dir=default_cache_dir(),
                      grid_path=grid, progress=not args.no_progress)

        if args.images is not None:
            given = [f"--{n.replace('_', '-')}" for n in ("model", "steps", "timesteps", "guidance", "prompts", "save_images",
                                                          "sampler")
                     if getattr(args, n) is not None] + (["--fast"] if args.fast != "off" else []) + (
                     ["--noise-scale"] if args.noise_scale != 1.0 else [])
            if given:
                raise UserError(f"--images scores an existing folder; it cannot be combined with {', '.join(given)}")
            result = evaluate_folder(args.images, limit=args.limit, **common)
            result = {**result, "model": None, "images": str(args.images), "steps": None, "guidance": None,
                      "seed": None, "timesteps": None}
        else:
            records = load_prompts(args.prompts)
            keep = balanced_subset([r["tag"] for r in records], args.limit)
            save_dir = Path(args.save_images) if args.save_images else None
            if save_dir is not None and save_dir.exists():
                if not save_dir.is_dir():
                    raise UserError(f"--save-images must be a folder, got a file: {save_dir}")
                if any(save_dir.iterdir()):
                    raise UserError(f"--save-images folder is not empty: {save_dir} (old samples would mix in)")
            spec = args.model or DEFAULT_MODEL
            folder = resolve_model(spec)
            if folder is None:
                raise UserError(f"model folder not found: {spec} (looked in {', '.join(map(str, model_search_dirs()))})")
            from sana_sprint.cli import quiet_libraries
            from sana_sprint.pipeline import SprintPipeline

            quiet_libraries()
            pipe = SprintPipeline.from_pretrained(folder, device=pick_device(args.device))
            pipe = with_sampler(pipe, args.sampler)  # before any generation: a student + --sampler is a user error
            if args.fast != "off":
                if sampler_name(pipe) == "trigflow-euler":
                    raise UserError("--fast samples with the model's own sampler; it cannot be combined with "
                                    "--sampler trigflow-euler")
                from sana_sprint.fast import describe, optimize_pipeline

                pipe = optimize_pipeline(pipe, bf16="off" if args.fast == "exact" else args.fast)
            result = evaluate(pipe, [records[i] for i in keep], steps=args.steps, guidance=args.guidance, seed=args.seed,
                              images_per_prompt=args.images_per_prompt, batch=args.batch, timesteps=timesteps,
                              save_dir=save_dir, indices=keep, noise_scale=args.noise_scale, **common)
            result = {**result, "model": str(folder), "kind": pipe.kind, "sampler": sampler_name(pipe)}
            if args.fast != "off":
                result["fast"] = describe(pipe)
        order = ["overall", "tasks", "n_images", "fd_shapes", "model", "kind", "sampler", "images", "steps", "guidance",
                 "seed", "timesteps", "wall_s"]
        result = {k: result[k] for k in order if k in result} | {k: v for k, v in result.items() if k not in order}
        write_results(out, result)
        tasks = " ".join(f"{t}={v:.3f}" for t, v in result["tasks"].items())
        fd_txt = f" fd_shapes={result['fd_shapes']:.3f}" if "fd_shapes" in result else ""
        print(f"overall={result['overall']:.4f} ({result['n_images']} images) {tasks}{fd_txt}")
        print(f"wrote {out} and {grid}")
        return 0

    return run
