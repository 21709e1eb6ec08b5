"""``sana-sprint bench``: our pipeline vs diffusers on the same weights, split into components.

For each step count (and the teacher at 20 steps when ``--teacher`` is given) and each batch size
(1 = latency, 10 = throughput) it times, in one process, median over ``--repeats`` runs after
``--warmup`` runs:

- **ours**: :class:`~sana_sprint.fast.FastSprintPipeline` with its default fast paths (inference mode,
  channels-last VAE, 1x1/patch convolutions as matmuls, padding-free text encoding, lean BERT / Sana
  block / DC-AE up-sampling forwards, the (time + CFG) embedding memoised by its exact inputs, and
  ``torch.compile`` (on a CPU: the transformer, inductor freezing) whenever ``--warmup`` >= 1, since it
  pays at steady state; ``--no-compile`` keeps it eager. ``--bf16`` and the ``--no-*`` flags change the
  rest. When compiling, the first warm-up call of each row (compilation, one per batch size) is reported
  separately as ``ours_first_call_ms`` / ``diffusers_first_call_ms`` and never enters the medians); the text encoder's prompt cache is cleared
  before every run, so text encoding is timed like diffusers' (``ours_cached_text_ms`` is the time
  without it: a repeated prompt);
- **diffusers**: ``SanaSprintPipeline`` (teacher: ``SanaPipeline`` + flow-match Euler, same shift) loaded
  from the same folder, with our text encoder and tokenizer passed in, ``max_sequence_length`` equal
  to ours, no prompt prefix (``complex_human_instruction=None``), ``use_resolution_binning=False``, and its
  fastest fair eager settings: its own modules, in fp32 and, where bf16 can pay (CUDA, or a CPU with
  native bf16 matmuls: AVX512-BF16 / AMX), also in bf16, the faster of the two per row being the
  baseline (``--diffusers-dtype`` picks; on an AVX2-only CPU bf16 convolutions are ~30x slower, so fp32
  only); ``--compile-diffusers`` compiles its transformer too (an extra comparison).

``--clock cpu`` times process CPU time instead of wall time: on a CPU shared with other jobs it
counts the work done, not the waiting (with ``--threads 1`` both agree on an idle machine). The runs are interleaved (each repeat times ours, diffusers and the optional plain pipeline once, in
rotating order), so load changes on a shared machine hit both sides alike.

Both sample the same schedule (2 steps: [1.5708, 1.3, 0], otherwise linspace(1.5708, 0, N+1), the
diffusers defaults) with the same per-image generators, and the row records the largest pixel
difference between the two outputs. Components: text encoding, transformer (all forward calls), VAE
decode, other (sampler arithmetic, noise, image conversion). Writes ``--out`` JSON and a markdown
table next to it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import DEFAULT_MODEL, command, model_search_dirs, pick_device, quiet_libraries, resolve_model
from .errors import UserError

TEACHER_STEPS = 20
GUIDANCE = 4.5
SPRINT_MAX_T = 1.5708  # diffusers SanaSprintPipeline max_timesteps
SPRINT_MID_T = 1.3  # diffusers' default intermediate timestep for 2 steps
PROMPTS = [
    "a red circle to the left of a blue square",
    "two yellow triangles",
    "a green square above a purple circle",
    "three orange circles",
    "a blue triangle below a red square",
    "one purple square",
    "a yellow circle to the right of a green triangle",
    "four red squares",
    "an orange triangle above a blue circle",
    "a green circle and a yellow square",
]
COMPONENTS = ("text_ms", "transformer_ms", "vae_ms", "other_ms")


def sprint_schedule(steps: int) -> list[float]:
    """The TrigFlow times diffusers' SanaSprintPipeline uses by default for ``steps`` steps."""
    if steps == 2:
        return [SPRINT_MAX_T, SPRINT_MID_T, 0.0]
    return [SPRINT_MAX_T * (1 - i / steps) for i in range(steps)] + [0.0]


# --- timing ---------------------------------------------------------------------------------------


@dataclass
class _Clock:
    """Accumulates wall time per component; synchronises CUDA so the split is real."""

    device: Any
    times: dict[str, float] = field(default_factory=dict)
    cpu: bool = False  # process CPU time instead of wall time (a shared, loaded CPU machine)

    def now(self) -> float:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.process_time() if self.cpu else time.perf_counter()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[name] = self.times.get(name, 0.0) + (self.now() - start) * 1000

        return timed


@contextlib.contextmanager
def _instrument(clock: _Clock, text_owner, text_attr: str, transformer, vae) -> Iterator[None]:
    """Time ``text_owner.<text_attr>``, every forward of ``transformer`` and ``vae.decode``."""
    import torch

    starts: list[float] = []

    @torch.compiler.disable
    def pre(module, args):
        starts.append(clock.now())

    @torch.compiler.disable
    def post(module, args, out):
        clock.times["transformer_ms"] = clock.times.get("transformer_ms", 0.0) + (clock.now() - starts.pop()) * 1000

    handles = [transformer.register_forward_pre_hook(pre), transformer.register_forward_hook(post)]
    setattr(text_owner, text_attr, clock.wrap("text_ms", getattr(text_owner, text_attr)))
    vae.decode = clock.wrap("vae_ms", vae.decode)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        delattr(text_owner, text_attr)
        del vae.decode


def _median(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(x[k] for x in samples), 3) for k in (*COMPONENTS, "total_ms")}


def _timed_run(run: Callable[[], Any], clock: _Clock, before: Callable) -> tuple[dict[str, float], Any]:
    before()
    clock.times = {}
    start = clock.now()
    out = run()
    total = (clock.now() - start) * 1000
    t = {k: clock.times.get(k, 0.0) for k in COMPONENTS[:3]}
    t["other_ms"] = max(0.0, total - sum(t.values()))
    t["total_ms"] = total
    return t, out


def _interleaved_runs(sides: list[tuple[Callable[[], Any], _Clock, Callable]], repeats: int, warmup: int):
    """[(median component times incl. total_ms, output of the last run, first warm-up call ms or None)] per side.

    Every repeat runs each side once, the order rotating from one repeat to the next, so a load change
    on a shared machine hits all sides alike (the ratio stays fair even when absolute times drift).
    """
    outs: list[Any] = [None] * len(sides)
    first: list[float | None] = [None] * len(sides)
    for w in range(warmup):
        for i, (run, clock, before) in enumerate(sides):
            before()
            start = clock.now()
            outs[i] = run()
            if w == 0:  # the first call of a case: includes torch.compile's (re)compilation when compiling
                first[i] = round((clock.now() - start) * 1000, 3)
    samples: list[list[dict[str, float]]] = [[] for _ in sides]
    for r in range(repeats):
        for j in range(len(sides)):
            i = (j + r) % len(sides)
            run, clock, before = sides[i]
            t, outs[i] = _timed_run(run, clock, before)
            samples[i].append(t)
    return [(_median(s), o, f) for s, o, f in zip(samples, outs, first)]


# --- the two pipelines ------------------------------------------------------------------------------


def load_diffusers(folder: Path, ours, device, dtype):
    """diffusers' pipeline for a Sprint folder (student) or ``SanaPipeline`` (teacher), our text encoder."""
    import diffusers
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    text = ours.text_encoder
    if ours.kind == "student":
        pipe = diffusers.SanaSprintPipeline.from_pretrained(folder, text_encoder=text.model, tokenizer=text.tokenizer)
    else:
        pipe = diffusers.SanaPipeline(
            tokenizer=text.tokenizer,
            text_encoder=text.model,
            vae=AutoencoderDC.from_pretrained(folder / "vae"),
            transformer=SanaTransformer2DModel.from_pretrained(folder / "transformer"),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=float(ours.config["flow_shift"])),
        )
    pipe.transformer.to(device, dtype)
    pipe.vae.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(n: int, device):
    import torch

    return [torch.Generator(device="cpu").manual_seed(i) for i in range(n)]


def _max_pixel_diff(a, b) -> float:
    import numpy as np

    return max(float(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()) for x, y in zip(a, b)) / 255


def bench_case(ours, theirs: dict, *, steps: int, batch: int, repeats: int, warmup: int, device, plain=None,
               cpu_clock: bool = False) -> dict:
    """One row: ours (+ optional plain SprintPipeline) vs diffusers at ``steps`` steps and ``batch`` images.

    ``theirs`` maps a dtype label ("fp32", "bf16") to a diffusers pipeline; all of them are timed, the
    fastest is the row's baseline (``diffusers_dtype``), ``diffusers_by_dtype`` keeps every median.
    """
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    size = int(ours.config["resolution"])
    teacher = ours.kind == "teacher"
    ours_kw: dict[str, Any] = dict(steps=steps, guidance_scale=GUIDANCE, height=size, width=size, output_type="pil")
    theirs_kw: dict[str, Any] = dict(
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        height=size,
        width=size,
        output_type="pil",
        use_resolution_binning=False,
        max_sequence_length=ours.text_encoder.max_length,
        complex_human_instruction=None,
    )
    if not teacher:
        ours_kw["timesteps"] = sprint_schedule(steps)
        if steps != 2:
            theirs_kw["intermediate_timesteps"] = None  # diffusers refuses other step counts otherwise

    row: dict[str, Any] = {"name": f"teacher-{steps}step" if teacher else f"sprint-{steps}step", "steps": steps, "batch": batch}
    labels = list(theirs)
    clocks = [_Clock(device, cpu=cpu_clock) for _ in range(len(labels) + 2)]
    sides = [(lambda: ours(prompts, generator=_generators(batch, device), **ours_kw).images, clocks[0],
              ours.text_encoder.clear_cache)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_instrument(clocks[0], ours.text_encoder, "encode", ours.transformer, ours.vae))
        for i, label in enumerate(labels, 1):
            pipe = theirs[label]
            stack.enter_context(_instrument(clocks[i], pipe, "encode_prompt", pipe.transformer, pipe.vae))
            sides.append((lambda pipe=pipe: pipe(prompts, generator=_generators(batch, device), **theirs_kw).images,
                          clocks[i], lambda: None))
        if plain is not None:
            stack.enter_context(_instrument(clocks[-1], plain.text_encoder, "encode", plain.transformer, plain.vae))
            sides.append((lambda: plain(prompts, generator=_generators(batch, device), **ours_kw).images,
                          clocks[-1], plain.text_encoder.clear_cache))
        results = _interleaved_runs(sides, repeats, warmup)
    mine, mine_out, mine_first = results[0]
    by_label = dict(zip(labels, results[1:]))
    fastest = min(labels, key=lambda k: by_label[k][0]["total_ms"])
    ref, _, ref_first = by_label[fastest]
    row.update(
        ours_ms=mine["total_ms"],
        diffusers_ms=ref["total_ms"],
        ratio=round(mine["total_ms"] / ref["total_ms"], 4),
        diffusers_dtype=fastest,
        diffusers_by_dtype={k: by_label[k][0]["total_ms"] for k in labels},
        ours_cached_text_ms=round(mine["total_ms"] - mine["text_ms"], 3),
        ours_img_s=round(batch * 1000 / mine["total_ms"], 3),
        diffusers_img_s=round(batch * 1000 / ref["total_ms"], 3),
        ours=mine,
        diffusers=ref,
        ours_first_call_ms=mine_first,
        diffusers_first_call_ms=ref_first,
    )
    # Same weights, schedule and generators: the outputs agree (students; the diffusers teacher feeds
    # the transformer 1000 t where ours feeds t, so only its cost is comparable). Compared with diffusers
    # in fp32 where it ran (the reference), else with the baseline.
    versus = "fp32" if "fp32" in by_label else fastest
    row["max_pixel_diff"] = None if teacher else round(_max_pixel_diff(mine_out, by_label[versus][1]), 5)
    row["max_pixel_diff_vs"] = None if teacher else f"diffusers {versus}"
    if plain is not None:
        row["ours_plain_ms"] = results[-1][0]["total_ms"]
    return row


def diffusers_dtypes(device, spec: str = "auto") -> tuple[str, ...]:
    """The dtypes diffusers runs in: ``spec`` "fp32", "bf16", "fp32,bf16" or "auto" (fp32, plus bf16 where
    bf16 can pay: CUDA, or a CPU with native bf16 matmuls); the bench keeps the faster per row."""
    from .fast import cpu_has_native_bf16

    if spec == "auto":
        return ("fp32", "bf16") if device.type == "cuda" or cpu_has_native_bf16() else ("fp32",)
    labels = tuple(dict.fromkeys(x.strip() for x in spec.split(",") if x.strip()))
    if not labels or any(x not in DTYPES for x in labels):
        raise UserError(f"--diffusers-dtype must be auto or a comma-separated list of fp32, bf16; got {spec!r}")
    return labels


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def run_bench(
    model: Path,
    teacher: Path | None = None,
    steps_list: tuple[int, ...] = (1, 2, 4),
    batches: tuple[int, ...] = (1, 10),
    repeats: int = 5,
    warmup: int = 2,
    device=None,
    fast_options: dict | None = None,
    compare_plain: bool = False,
    log=print,
    cpu_clock: bool = False,
    compile_diffusers: bool = False,
    diffusers_dtype: str = "auto",
) -> dict:
    """All rows for a student folder (and optionally a teacher folder); see the module docstring."""
    import diffusers
    import torch

    from . import fast
    from .pipeline import SprintPipeline, check_folder

    device = torch.device(device) if device is not None else pick_device()
    fast_options = dict(fast_options or {})
    rows = []
    settings: dict[str, Any] = {}
    for folder, cases in ((model, [(s, b) for s in steps_list for b in batches]),
                          (teacher, [(TEACHER_STEPS, b) for b in batches])):
        if folder is None:
            continue
        kind = check_folder(folder)["kind"]
        if kind != ("student" if folder == model else "teacher"):
            flag = "--model" if folder == model else "--teacher"
            raise UserError(f"{flag} {folder}: sprint_config kind is {kind!r}; --model takes a student, --teacher a teacher")
        ours = fast.optimize_pipeline(SprintPipeline.from_pretrained(folder, device=device), **fast_options)
        # Fastest fair eager settings for diffusers: every dtype that can pay, the faster one per row; compiled
        # only on request.
        labels = diffusers_dtypes(device, diffusers_dtype)
        theirs = {k: load_diffusers(folder, ours, device, getattr(torch, DTYPES[k])) for k in labels}
        if compile_diffusers:  # an extra comparison; the documented baseline is diffusers eager
            for pipe in theirs.values():
                if device.type == "cuda":
                    pipe.transformer.compile(mode="reduce-overhead" if ours.fast.cuda_graphs else None, dynamic=False)
                else:
                    pipe.transformer.compile(dynamic=False, options=fast.CPU_COMPILE_OPTIONS)
        plain = SprintPipeline.from_pretrained(folder, device=device) if compare_plain else None
        settings[ours.kind] = {"folder": str(folder), "ours": fast.describe(ours), "diffusers_dtypes": list(labels),
                               "diffusers_compiled": bool(compile_diffusers)}
        for steps, batch in cases:
            row = bench_case(ours, theirs, steps=steps, batch=batch, repeats=repeats, warmup=warmup, device=device,
                             plain=plain, cpu_clock=cpu_clock)
            log(f"{row['name']:>16} b={batch:<3} ours {row['ours_ms']:9.2f} ms  diffusers {row['diffusers_ms']:9.2f} ms "
                f"({row['diffusers_dtype']})  ratio {row['ratio']:.3f}")
            rows.append(row)
    return {
        "rows": rows,
        "settings": {
            **settings,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
            "clock": "process CPU time" if cpu_clock else "wall",
            "guidance": GUIDANCE,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Median of {s['repeats']} runs after {s['warmup']} warm-up ({s.get('clock', 'wall')} clock, runs interleaved), "
        f"device {s['device']}, {s['threads']} threads, "
        f"torch {s['torch']}, diffusers {s['diffusers']}. ratio = ours / diffusers (< 1: ours faster).",
        "",
        "| name | steps | batch | ours ms | diffusers ms | diffusers dtype | ratio | ours img/s | diffusers img/s "
        "| ours text / transformer / VAE / other ms | diffusers text / transformer / VAE / other ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        split = lambda d: " / ".join(f"{d[k]:.1f}" for k in COMPONENTS)  # noqa: E731
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['batch']} | {r['ours_ms']:.1f} | {r['diffusers_ms']:.1f} "
            f"| {_dtype_cell(r)} | {r['ratio']:.3f} "
            f"| {r['ours_img_s']:.2f} | {r['diffusers_img_s']:.2f} | {split(r['ours'])} | {split(r['diffusers'])} |"
        )
    if any(v.get("ours", {}).get("compile") or v.get("diffusers_compiled") for v in s.values() if isinstance(v, dict)):
        lines += ["", "torch.compile: the first warm-up call of each row (compilation / recompilation for the batch "
                  "size, not in the medians above):", ""]
        for r in result["rows"]:
            if r.get("ours_first_call_ms") is not None:
                lines.append(f"- {r['name']} batch {r['batch']}: ours {r['ours_first_call_ms'] / 1000:.1f} s, "
                             f"diffusers {r['diffusers_first_call_ms'] / 1000:.1f} s")
    return "\n".join(lines) + "\n"


def _dtype_cell(row: dict) -> str:
    """The baseline's dtype, with the other dtypes' medians when several ran."""
    by = row.get("diffusers_by_dtype") or {}
    others = ", ".join(f"{k} {v:.1f}" for k, v in by.items() if k != row.get("diffusers_dtype"))
    return f"{row.get('diffusers_dtype', '?')}" + (f" ({others})" if others else "")


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--{name} must be integers >= 1, got {text!r}")
    return values


@command("bench", help="latency/throughput of our pipeline vs diffusers' SanaSprintPipeline on the same weights")
def bench_command(p: argparse.ArgumentParser):
    p.add_argument("--model", default=DEFAULT_MODEL, help="student model folder or name in models/ (default: %(default)s)")
    p.add_argument("--teacher", default=None, help="teacher folder: adds rows at 20 steps")
    p.add_argument("--steps-list", default="1,2,4", help="student step counts (default: %(default)s)")
    p.add_argument("--batches", default="1,10", help="batch sizes: 1 = latency, 10 = throughput (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--bf16", default="auto", choices=("auto", "off", "linear", "mixed", "all"),
                   help="see sana_sprint.fast (auto: all on CUDA, mixed on a CPU with native bf16, else off)")
    p.add_argument("--compile", dest="compile", action="store_const", const="on", default="auto",
                   help="torch.compile ours (see sana_sprint.fast); default: on when --warmup >= 1 (the first "
                        "warm-up call absorbs compilation and is reported apart)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="eager only")
    p.add_argument("--compile-diffusers", action="store_true",
                   help="also torch.compile diffusers' transformer, with our options (default: diffusers eager)")
    p.add_argument("--diffusers-dtype", default="auto",
                   help="diffusers' dtypes: fp32, bf16 or both comma-separated, the faster one per row is the baseline "
                        "(default auto: fp32, plus bf16 on CUDA or a CPU with native bf16)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-inference-mode", action="store_true")
    p.add_argument("--no-linear-convs", action="store_true", help="keep the transformer's 1x1/patch convolutions")
    p.add_argument("--no-trim-text", action="store_true", help="encode and attend to prompts padded to max length")
    p.add_argument("--no-lean", action="store_true",
                   help="diffusers' own BERT / Sana block / DC-AE up-block forwards instead of the lean ones")
    p.add_argument("--no-cache-time", action="store_true", help="recompute the (time + CFG) embedding every call")
    p.add_argument("--compare-plain", action="store_true", help="also time a plain SprintPipeline (no fast paths)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="cpu: time the process's CPU time (robust on a shared, loaded CPU; not for CUDA)")
    p.add_argument("--out", required=True, help="JSON file; a markdown table is written next to it (.md)")

    def run(args: argparse.Namespace) -> int:
        steps_list = _int_list(args.steps_list, "steps-list")
        batches = _int_list(args.batches, "batches")
        if args.repeats < 1 or args.warmup < 0:
            raise UserError("--repeats must be >= 1 and --warmup >= 0")
        if args.threads is not None and args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        out = Path(args.out)
        if out.suffix.lower() != ".json":
            raise UserError(f"--out must be a .json file, got {out}")
        folders = []
        for flag, spec in (("--model", args.model), ("--teacher", args.teacher)):
            folder = None if spec is None else resolve_model(spec)
            if spec is not None and folder is None:
                raise UserError(f"{flag} folder not found: {spec} (looked in {', '.join(map(str, model_search_dirs()))})")
            folders.append(folder)
        quiet_libraries()
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from .fast import FastOptions

        device = pick_device(args.device)
        if args.clock == "cpu" and device.type != "cpu":
            raise UserError(f"--clock cpu times CPU work only: use it with --device cpu (got {device})")
        diffusers_dtypes(device, args.diffusers_dtype)  # a bad --diffusers-dtype is a usage error, before loading
        compile_ours = args.compile == "on" or (args.compile == "auto" and args.warmup >= 1)
        options = dict(
            bf16=args.bf16, compile=compile_ours, channels_last=not args.no_channels_last,
            inference_mode=not args.no_inference_mode, linear_convs=not args.no_linear_convs,
            trim_text=not args.no_trim_text, lean=not args.no_lean, cache_time=not args.no_cache_time,
        )
        try:
            FastOptions(**options).resolved(device)
        except ValueError as e:
            raise UserError(str(e)) from None
        result = run_bench(
            folders[0], folders[1], steps_list, batches, args.repeats, args.warmup, device, options,
            compare_plain=args.compare_plain, log=lambda m: print(m, file=sys.stderr), cpu_clock=args.clock == "cpu",
            compile_diffusers=args.compile_diffusers, diffusers_dtype=args.diffusers_dtype,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        print(f"wrote {out} and {out.with_suffix('.md')}")
        return 0

    return run
