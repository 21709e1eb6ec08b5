"""Cost of one distillation generator / discriminator step, in teacher-forward equivalents, and its memory.

    python benchmarks/distill_cost.py [--preset shapes|tiny | --teacher models/shapes-teacher] [--batch 8]
                                      [--repeats 5] [--no-bf16] [--device cpu|cuda] [--threads 1]
                                      [--phases jvp,g_step_both,...] [--json benchmarks/distill_cost.json]
                                      [--profile N]

``jvp`` times the sCM tangent's forward-mode JVP of the student alone (``scm.student_jvp``: the
stop-grad student output and its directional derivative in one ``torch.func.jvp``), so its cost in
teacher forwards is the "JVP <= 3 forwards" figure (with models/jvp.py's constant-weight rules, the
default); ``jvp_plain`` is the same JVP through the plain forward-AD formulas and ``jvp_compile`` those
under ``torch.compile`` (compiled during the warm-up calls). ``--teacher`` loads a real teacher folder's
transformer (and its ``max_sequence_length``) instead of a randomly initialised preset.

Time: median wall time of ``--repeats`` calls after ``--warmup`` calls, each phase exactly as
``DistillMethod`` runs it (bf16 autocast over fp32 weights, backward, clipping, AdamW step). The unit
is one teacher forward (no grad) at the same batch size; the SANA-Sprint target for a hybrid G step
is <= 12 of them (teacher CFG pass = 2, JVP ~ 2-3, student forward+backward ~ 3 twice for sCM and
LADD, teacher forward+backward to its input ~ 2-3).

``--profile N`` runs each phase N more times under ``torch.profiler`` and reports the ops with the most
self time per call and, on CUDA, the kernel launches per call (a step of small kernels is bound by them).

Memory: every phase runs in its own fresh process (spawn), so peaks do not leak between phases.
On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation after model construction. On CPU:
peak RSS of the process (``getrusage().ru_maxrss``) minus the RSS measured after model construction
and before the first step (``/proc/self/statm``); this counts activations, gradients and optimiser
state created by the step (tracemalloc cannot see torch's C allocations). The baseline is one
flow-matching *teacher training* step (forward + backward + AdamW) at the same batch size.

On a CPU shared with other jobs wall time is inflated by waiting for a core; each phase also records
its process CPU time per call (``cpu_ms``, ``time.process_time``), which with ``--threads 1`` is the
time the call would take on an idle core. Ratios are given for both (``teacher_forwards`` from wall
time, ``teacher_forwards_cpu`` from CPU time).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path

import torch

PHASES = ("teacher_forward", "teacher_forward_compile", "teacher_train_step", "jvp", "jvp_plain", "jvp_compile", "g_step_scm", "g_step_ladd", "g_step_both", "d_step")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _teacher_config(preset: str) -> dict:
    from sana_sprint.models import presets

    if preset == "tiny":
        return presets.tiny(latent_channels=4, caption_channels=32, sample_size=8, guidance_embeds=False)
    from sana_sprint.training.config import SHAPES_TEACHER_OVERRIDES

    return {**presets.shapes_teacher(latent_channels=16), **SHAPES_TEACHER_OVERRIDES}


def _phase(phase: str, args: dict, queue) -> None:
    """Build everything, then time ``phase`` and measure its memory; put a result dict on ``queue``."""
    from diffusers import SanaTransformer2DModel

    from sana_sprint.losses import scm as scm_lib
    from sana_sprint.losses.flow_matching import flow_matching_loss
    from sana_sprint.models.wrapper import TrigFlowTransformer
    from sana_sprint.training.distill import DistillConfig, DistillMethod
    from sana_sprint.training.trainer import Stepper

    torch.manual_seed(0)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    cuda = device.type == "cuda"
    if args.get("teacher"):
        teacher = SanaTransformer2DModel.from_pretrained(Path(args["teacher"]) / "transformer", torch_dtype=torch.float32)
        teacher = teacher.to(device)
        cfg_t = dict(teacher.config)
    else:
        cfg_t = _teacher_config(args["preset"])
        teacher = SanaTransformer2DModel(**cfg_t).to(device)
    b, L = args["batch"], args["max_length"]
    c, hw, d = cfg_t["in_channels"], cfg_t["sample_size"], cfg_t["caption_channels"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, c, hw, hw, generator=g).to(device)
    embeds = torch.randn(b, L, d, generator=g).to(device)
    mask = torch.ones(b, L, dtype=torch.long, device=device)
    null = (torch.randn(1, L, d, generator=g).to(device), torch.ones(1, L, dtype=torch.long, device=device))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["bf16"])  # noqa: E731

    if phase.startswith("teacher"):
        net = TrigFlowTransformer(teacher)
        if phase in ("teacher_forward", "teacher_forward_compile"):
            net.eval().requires_grad_(False)
            s = torch.full((b,), 1.0, device=device)
            call = torch.compile(net, dynamic=False) if phase == "teacher_forward_compile" else net

            def fn():
                with torch.no_grad(), autocast():
                    call(latents * 0.5 / 0.5, s, embeds, mask)
        else:
            opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
            stepper = Stepper({"t": opt}, {}, 1.0, device.type)

            def fn():
                with autocast():
                    loss, _ = flow_matching_loss(lambda x, t, e, m: net.flow_velocity(x, t, e, m), latents, embeds,
                                                 mask, *null, generator=g)
                    stepper.step(loss.mean(), "t")
    elif phase in ("jvp", "jvp_plain", "jvp_compile"):
        cfg = DistillConfig(out="unused", loss="scm", bf16=args["bf16"], batch=b, tangent_warmup=0)
        method = DistillMethod(cfg, teacher, scaling_factor=1.0, latent_shape=(c, hw, hw), null=null, device=device)
        method.student.train()  # as in the G step
        s = torch.rand(b, generator=g).to(device) * 1.5 + 0.05
        x_s = (torch.randn(b, c, hw, hw, generator=g) * 0.5).to(device)
        dxds = torch.randn(b, c, hw, hw, generator=g).to(device)
        w = torch.full((b,), 4.5, device=device)

        mode = {"jvp": "fast", "jvp_plain": "plain", "jvp_compile": "compile"}[phase]

        def fn():
            with autocast():
                scm_lib.student_jvp(method.student, x_s, s, dxds, embeds, mask, w, mode=mode)
    else:
        loss = {"g_step_scm": "scm", "g_step_ladd": "ladd"}.get(phase, "both")
        cfg = DistillConfig(out="unused", loss=loss, bf16=args["bf16"], batch=b, tangent_warmup=0)
        method = DistillMethod(cfg, teacher, scaling_factor=1.0, latent_shape=(c, hw, hw), null=null, device=device)
        stepper = Stepper(method.optimizers(), {}, cfg.grad_clip, device.type)
        x0 = latents * 0.5
        counter = [0]

        def fn():
            with autocast():
                if phase == "d_step":
                    method.discriminator_step(x0, embeds, mask, stepper)
                else:
                    method.generator_step(x0, embeds, mask, counter[0], stepper)
            counter[0] += 1

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = _rss_mb()
    times, cpu = [], []
    for i in range(args["warmup"] + args["repeats"]):
        if cuda:
            torch.cuda.synchronize()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = _peak_rss_mb() - base_rss
    res = {"phase": phase, "ms": 1000 * statistics.median(times), "ms_all": [1000 * t for t in times],
           "cpu_ms": 1000 * statistics.median(cpu), "cpu_ms_all": [1000 * t for t in cpu],
           "mem_mb": peak, "base_mb": base if cuda else base_rss, "load_avg_1min": os.getloadavg()[0]}
    if args.get("profile"):
        res["profile"] = _profile(fn, args["profile"], cuda)
    queue.put(res)


def _profile(fn, calls: int, cuda: bool, top: int = 12) -> dict:
    """``calls`` more calls under torch.profiler: per call, the ops with the most self time (device time on
    CUDA, CPU time otherwise), the number of CUDA kernels launched and the CPU-side time of the launches
    (where a launch-bound step spends its time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    out = {"calls": calls, "sort": key, "top": [
        {"op": e.key, "count_per_call": e.count / calls, "self_ms_per_call": getattr(e, key, 0) / 1000 / calls}
        for e in rows]}
    launches = [e for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")]
    out["kernel_launches_per_call"] = sum(e.count for e in launches) / calls
    out["launch_cpu_ms_per_call"] = sum(e.self_cpu_time_total for e in launches) / 1000 / calls
    return out


def measure(args: dict) -> dict:
    ctx = mp.get_context("spawn")
    results = {}
    phases = args.get("phases") or PHASES
    if "teacher_forward" not in phases or "teacher_train_step" not in phases:
        phases = ["teacher_forward", "teacher_train_step", *[p for p in phases if p not in ("teacher_forward", "teacher_train_step")]]
    for phase in phases:
        q = ctx.Queue()
        p = ctx.Process(target=_phase, args=(phase, args, q))
        p.start()
        results[phase] = q.get()
        p.join()
    fwd = results["teacher_forward"]["ms"]
    fwd_cpu = results["teacher_forward"]["cpu_ms"]
    mem_t = max(results["teacher_train_step"]["mem_mb"], 1e-9)
    for r in results.values():
        r["teacher_forwards"] = r["ms"] / fwd
        r["teacher_forwards_cpu"] = r["cpu_ms"] / fwd_cpu
        r["mem_vs_teacher_train"] = r["mem_mb"] / mem_t
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["shapes", "tiny"], default="shapes")
    ap.add_argument("--teacher", default=None, help="teacher pipeline folder (its transformer replaces --preset)")
    ap.add_argument("--phases", default=None, help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per phase (0 = torch default)")
    ap.add_argument("--json", default="benchmarks/distill_cost.json")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also run each phase N more times under torch.profiler and report its top ops and kernel launches")
    a = ap.parse_args(argv)
    phases = [p.strip() for p in a.phases.split(",")] if a.phases else list(PHASES)
    if any(p not in PHASES for p in phases):
        ap.error(f"--phases: choose from {', '.join(PHASES)}")
    max_length = a.max_length
    if a.teacher:
        sprint = Path(a.teacher) / "sprint_config.json"
        if not sprint.is_file() or not (Path(a.teacher) / "transformer").is_dir():
            ap.error(f"--teacher {a.teacher}: not a pipeline folder (needs sprint_config.json and transformer/)")
        max_length = int(json.loads(sprint.read_text()).get("max_sequence_length", max_length))
    args = {"preset": a.preset, "teacher": a.teacher, "batch": a.batch, "max_length": max_length, "repeats": a.repeats,
            "warmup": a.warmup, "bf16": a.bf16, "device": a.device, "threads": a.threads, "phases": phases,
            "profile": max(0, a.profile)}
    results = measure(args)
    mem_kind = "CUDA max_memory_allocated" if a.device.startswith("cuda") else "peak RSS delta"
    print(f"{a.teacher or 'preset=' + a.preset} batch={a.batch} L={max_length} bf16={a.bf16} device={a.device} "
          f"threads={a.threads or 'default'} memory={mem_kind}")
    print(f"{'phase':<20}{'ms':>9}{'cpu ms':>9}{'fwds':>7}{'fwds(cpu)':>10}{'mem MB':>9}{'x teacher train':>16}")
    for name, r in results.items():
        print(f"{name:<20}{r['ms']:>9.1f}{r['cpu_ms']:>9.1f}{r['teacher_forwards']:>7.2f}{r['teacher_forwards_cpu']:>10.2f}"
              f"{r['mem_mb']:>9.1f}{r['mem_vs_teacher_train']:>16.2f}")
    for name, r in results.items():
        if "profile" in r:
            pr = r["profile"]
            print(f"-- {name}: top ops by {pr['sort']} per call; {pr['kernel_launches_per_call']:.0f} kernel launches "
                  f"per call, {pr['launch_cpu_ms_per_call']:.1f} ms of CPU in launches")
            for row in pr["top"]:
                print(f"   {row['self_ms_per_call']:>9.2f} ms {row['count_per_call']:>7.1f}x  {row['op'][:80]}")
    for name, target in (("jvp", 3), ("g_step_both", 12)):
        if name in results:
            r = results[name]
            v = r["teacher_forwards_cpu"] if a.device == "cpu" else r["teacher_forwards"]
            print(f"{name} = {v:.2f} teacher forwards (target <= {target}): {'OK' if v <= target else 'OVER'}")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args, "memory_method": mem_kind, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
