"""SANA-Sprint Fig. 3a/3b at small scale: sCM tangent and gradient norms with and without the teacher changes.

Stages (each is a ``sana-sprint`` command, skipped when its output already exists, so a rerun continues):

1. ``train-teacher`` a small LEGACY teacher (time fed as 1000 t, no QK-norm) for ``--teacher-steps``;
2. the baseline continues the same legacy run for ``--finetune-steps`` more steps (equal training);
3. ``finetune-teacher`` converts the stage-1 teacher and fine-tunes it for ``--finetune-steps``:
   dense time + QK-norm ("both"), and with ``--variants`` the single changes ("dense", "qknorm");
4. ``distill --loss scm`` from every teacher with the same seed, data and settings, logging every
   generator step: ``scm/tangent_norm`` (batch mean of the raw ||g|| before normalisation, DESIGN
   section 4 step 4-5) and ``grad_norm/generator`` (student gradient norm before clipping).

Writes ``<out>/fig3_numbers.json`` and ``docs/fig3_tangent_grad_norms.png`` (+ a copy of the JSON in
docs/) and prints a table. One command::

    nice -n 19 python scripts/fig3_teacher_changes.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Small legacy teacher: 4 heads x 32 = width 128, 3 layers, 4x4 tokens (patch 2 on 8x8 latents).
SMALL_MODEL = {"patch_size": 2, "num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 3,
               "num_cross_attention_heads": 2, "cross_attention_head_dim": 64, "cross_attention_dim": 128}
LABELS = {
    "legacy": "legacy (1000t, no QK-norm)",
    "both": "dense time + QK-norm (fine-tuned)",
    "dense": "dense time only (fine-tuned)",
    "qknorm": "QK-norm only (fine-tuned)",
}


def cli(args: list[str], log: Path, threads: int) -> None:
    """Run one ``sana-sprint`` command in this process (one import of torch/diffusers for all stages)."""
    import torch

    from sana_sprint.cli import main as sprint_main

    torch.set_num_threads(threads)
    line = "sana-sprint " + " ".join(a if " " not in a else f"'{a}'" for a in args)
    print("$ " + line, flush=True)
    with open(log, "a") as f:
        f.write(f"$ {line}\n")
    t0 = time.time()
    rc = sprint_main(args)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if rc != 0:
        raise SystemExit(f"command failed with exit code {rc}")


def teacher_args(out: Path, cache: str, vae: str, steps: int, a) -> list[str]:
    return ["train-teacher", "--out", str(out), "--data", cache, "--vae", vae, "--steps", str(steps),
            "--model", json.dumps(SMALL_MODEL), "--timestep-scale", "1000", "--no-qk-norm",
            "--batch", str(a.batch), "--lr", str(a.teacher_lr), "--lr-schedule", "constant", "--warmup", "50",
            "--ema-decay", str(a.ema_decay), "--sample-every", "0", "--ckpt-every", "100", "--log-every", "25",
            "--threads", str(a.threads), "--seed", str(a.seed), "--no-progress", "--max-minutes", str(a.max_minutes)]


def stats(xs: list[float]) -> dict[str, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    n = len(s)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    return {"n": n, "mean": sum(s) / n, "median": med, "max": s[-1], "min": s[0]}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/fig3")
    p.add_argument("--cache", default="runs/cache/shapes-12000-r64", help="latent cache (read only)")
    p.add_argument("--vae", default="models/shapes-vae")
    p.add_argument("--teacher-steps", type=int, default=500)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--distill-steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--distill-batch", type=int, default=16)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--ema-decay", type=float, default=0.98)
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                   help="also the dense-time-only and QK-norm-only teachers")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=12.0, help="wall-time cap per training stage")
    p.add_argument("--plot", default="docs/fig3_tangent_grad_norms.png")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(a.threads))

    out = (ROOT / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    t_start = time.time()

    # 1. legacy teacher, and 2. the legacy baseline trained as long as the fine-tuned teachers.
    legacy_short = out / "teacher_legacy" / "export"
    if not (legacy_short / "sprint_config.json").is_file():  # --resume: continues a killed run
        cli(teacher_args(out / "teacher_legacy", a.cache, a.vae, a.teacher_steps, a)
            + ["--resume", "--export", str(legacy_short)], log, a.threads)
    legacy_steps = read_rows(out / "teacher_legacy" / "metrics.jsonl")[-1]["step"]  # < teacher_steps if capped
    legacy_long = out / "teacher_legacy_cont" / "export"
    if not (legacy_long / "sprint_config.json").is_file():
        run_dir = out / "teacher_legacy_cont"
        if not (run_dir / "checkpoints").is_dir():
            shutil.copytree(out / "teacher_legacy", run_dir, ignore=shutil.ignore_patterns("export"))
        cli(teacher_args(run_dir, a.cache, a.vae, legacy_steps + a.finetune_steps, a)
            + ["--resume", "--export", str(legacy_long)], log, a.threads)
    teachers = {"legacy": legacy_long}

    # 3. converted + fine-tuned teachers (same trainer / TeacherMethod, via finetune-teacher).
    variants = {"both": []}
    if a.variants:
        variants.update(dense=["--no-qk-norm"], qknorm=["--timestep-scale", "1000"])
    for name, extra in variants.items():
        export = out / f"teacher_{name}" / "export"
        if not (export / "sprint_config.json").is_file():
            cli(["finetune-teacher", "--teacher", str(legacy_short), "--out", str(out / f"teacher_{name}"),
                 "--data", a.cache, "--steps", str(a.finetune_steps), "--lr", str(a.finetune_lr), "--warmup", "20",
                 "--ema-decay", str(a.ema_decay), "--batch", str(a.batch), "--log-every", "25",
                 "--ckpt-every", "100000", "--threads", str(a.threads), "--seed", str(a.seed), "--no-progress",
                 "--max-minutes", str(a.max_minutes), *extra], log, a.threads)
        teachers[name] = export

    # 4. the same short sCM distillation from each teacher.
    results: dict[str, dict] = {}
    for name, folder in teachers.items():
        run_dir = out / f"distill_{name}"
        metrics = run_dir / "metrics.jsonl"
        done = metrics.is_file() and any(r.get("step") == a.distill_steps for r in read_rows(metrics))
        if not done:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cli(["distill", "--teacher", str(folder), "--data", a.cache, "--out", str(run_dir), "--loss", "scm",
                 "--steps", str(a.distill_steps), "--batch", str(a.distill_batch), "--lr", str(a.distill_lr),
                 "--tangent-warmup", "0", "--log-every", "1", "--sample-every", "0",
                 "--ckpt-every", str(a.distill_steps), "--export", str(run_dir / "export"), "--threads", str(a.threads),
                 "--seed", str(a.seed), "--no-progress", "--max-minutes", str(a.max_minutes)], log, a.threads)
        rows = [r for r in read_rows(metrics) if "scm/tangent_norm" in r]
        teacher_rows = read_rows(folder.parent / "metrics.jsonl") if (folder.parent / "metrics.jsonl").is_file() else []
        results[name] = {
            "label": LABELS[name],
            "teacher": str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder),
            "teacher_final_flow_loss": teacher_rows[-1].get("loss") if teacher_rows else None,
            "steps": [r["step"] for r in rows],
            "tangent_norm": [r["scm/tangent_norm"] for r in rows],
            "grad_norm": [r.get("grad_norm/generator", float("nan")) for r in rows],
            "loss_scm": [r.get("loss_scm", float("nan")) for r in rows],
            "skipped": rows[-1].get("skipped/generator", 0) if rows else None,
        }
        results[name]["tangent_norm_stats"] = stats(results[name]["tangent_norm"])
        results[name]["grad_norm_stats"] = stats(results[name]["grad_norm"])

    summary = {
        "what": "sCM raw tangent norm ||g|| (batch mean, before g/(||g||+0.1)) and student gradient norm "
                "(before clipping) per generator step of `distill --loss scm` from each teacher",
        "settings": {k: v for k, v in vars(a).items() if k != "plot"} | {"small_model": SMALL_MODEL},
        "command": "nice -n 19 python scripts/fig3_teacher_changes.py",
        "legacy_teacher_steps": legacy_steps,
        "wall_minutes_this_invocation": round((time.time() - t_start) / 60, 2),
        "results": results,
    }
    (out / "fig3_numbers.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_path = ROOT / a.plot if not Path(a.plot).is_absolute() else Path(a.plot)
    plot(results, plot_path)
    docs_json = plot_path.with_suffix(".json")
    docs_json.write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\n{'teacher':36s} {'tangent mean':>12s} {'median':>9s} {'max':>9s} | {'grad mean':>9s} {'median':>9s} "
          f"{'max':>9s} | teacher flow loss")
    for r in results.values():
        t, g = r["tangent_norm_stats"], r["grad_norm_stats"]
        fl = r["teacher_final_flow_loss"]
        print(f"{r['label']:36s} {t['mean']:12.4g} {t['median']:9.4g} {t['max']:9.4g} | {g['mean']:9.4g} "
              f"{g['median']:9.4g} {g['max']:9.4g} | {fl if fl is None else f'{fl:.4f}'}")
    print(f"\nwrote {plot_path}, {docs_json} and {out / 'fig3_numbers.json'}")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"legacy": ("tab:red", "-"), "both": ("tab:blue", "-"), "dense": ("tab:orange", "--"),
              "qknorm": ("tab:green", "--")}
    for name, r in results.items():
        c, ls = styles[name]
        axes[0].plot(r["steps"], r["tangent_norm"], color=c, ls=ls, label=r["label"])
        axes[1].plot(r["steps"], r["grad_norm"], color=c, ls=ls, label=r["label"])
    axes[0].set_title("(a) sCM tangent norm ||g|| before normalisation")
    axes[1].set_title("(b) student gradient norm (before clipping)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
