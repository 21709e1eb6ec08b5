"""SANA-Sprint 1.6B at 1024 px on one GPU: time and peak memory of every training step kind + 1-step latency.

Random weights (no download), the real architectures: SanaTransformer2DModel 1.6B (20 layers, width
2240, 32x32x32 latents = 1024 tokens, Gemma-2 captions 300 x 2304) and AutoencoderDC f32c32.
Trainable weights fp32 + bf16 autocast (DESIGN.md trap 2); the frozen teacher is bf16.

    python benchmarks/gpu/bench_1p6b.py                  # H100/H200, < 10 minutes
    python benchmarks/gpu/bench_1p6b.py --tiny           # CPU smoke test of the same code path (seconds)
    python benchmarks/gpu/bench_1p6b.py --grad-checkpointing --batch 8 --compile --json out.json
    python benchmarks/gpu/bench_1p6b.py --device cpu --layers 2 --phases jvp --precision fp32   # real width on a CPU

Phases (each measured after one warm-up step, models of the previous phase freed):
  teacher_ft   flow-matching fwd + bwd + AdamW on the dense-time QK-norm teacher
  distill_G    teacher CFG forwards (cond + null), student JVP (torch.func.jvp in
               TrigFlowTransformer.jvp_mode: models/jvp.py's constant-weight rules), student fwd with logvar, LADD
               generator term (max-time student sample -> re-noise -> frozen teacher features ->
               heads), bwd, grad clip 0.1, AdamW
  distill_D    fake sample (no grad) + real, re-noised, frozen teacher features -> heads, hinge, AdamW
  jvp          the sCM JVP alone (no grad) vs a no-grad forward of the student and of the bf16 teacher, with
               the constant-weight rules (jvp) and with PyTorch's plain forward-AD formulas (jvp_plain)
  infer_1step  batch-1 student forward (bf16) + DC-AE decode to 1024x1024, median latency
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from torch import nn

from sana_sprint.models import presets
from sana_sprint.models.wrapper import TrigFlowTransformer

SD = 0.5  # sigma_data
HALF_PI = math.pi / 2
GUIDANCE = 4.5
LADD_WEIGHT = 0.5
GRAD_CLIP = 0.1
TEXT_TOKENS = 300
LOW = [torch.bfloat16]  # dtype of frozen weights and inputs; set by --precision


# --- configs ------------------------------------------------------------------------------------


def configs(tiny: bool, resolution: int, layers: int | None = None) -> dict:
    """Transformer (teacher + student), VAE, caption width and head blocks for the full or the tiny run;
    ``layers`` keeps the 1.6B block shape with fewer blocks (e.g. a CPU run of the JVP at real width)."""
    from sana_sprint.models.discriminator import feature_blocks
    from sana_sprint.realscale import dc_ae_f32c32_config

    if tiny:
        t = presets.tiny(latent_channels=4, caption_channels=24, sample_size=8, guidance_embeds=False)
        return {"teacher": t, "student": presets.student_from_teacher_config(t), "vae": presets.tiny_vae(4),
                "caption": 24, "tokens": 16, "resolution": 32, "head_blocks": [0, 1]}
    t = presets.sana_1600m(resolution, guidance_embeds=False)
    heads = [2, 8, 14, 19]
    if layers is not None:
        t = {**t, "num_layers": layers}
        heads = feature_blocks(layers, min(4, layers))
    return {"teacher": t, "student": presets.student_from_teacher_config(t), "vae": dc_ae_f32c32_config(),
            "caption": 2304, "tokens": TEXT_TOKENS, "resolution": resolution, "head_blocks": heads}


# --- discriminator heads (StyleGAN-T style, one logit per token; DESIGN.md section 5) -------------


class DiscHead(nn.Module):
    """Conv1d k=1 (spectral norm) -> BN -> LeakyReLU -> residual k=9 block -> Conv1d C->1 on [B, C, N]."""

    def __init__(self, channels: int):
        super().__init__()

        def block(k: int) -> nn.Sequential:
            return nn.Sequential(
                nn.utils.parametrizations.spectral_norm(nn.Conv1d(channels, channels, k, padding=k // 2)),
                nn.BatchNorm1d(channels),
                nn.LeakyReLU(0.2),
            )

        self.first, self.res, self.out = block(1), block(9), nn.Conv1d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        h = (h + self.res(h)) / math.sqrt(2)
        return self.out(h).flatten(1)


class Features:
    """Forward hooks that collect the token features [B, N, C] of chosen transformer blocks."""

    def __init__(self, transformer: SanaTransformer2DModel, blocks: list[int]):
        self.out: list[torch.Tensor] = []
        self.handles = [transformer.transformer_blocks[i].register_forward_hook(self._hook) for i in blocks]

    def _hook(self, module, args, output):
        self.out.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.out = self.out, []
        return out


def logits(heads: nn.ModuleList, feats: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([h(f.float().transpose(1, 2)) for h, f in zip(heads, feats)], dim=1)


# --- measurement ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int) -> dict:
    """Warm-up once, then ``repeats`` timed calls; peak memory over the timed calls (CUDA only)."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"time_s": statistics.median(times), "times_s": times}
    if device.type == "cuda":
        out["persistent_gib"] = base / 2**30
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build(cls, cfg: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random init directly on the device (a 1.6B CPU init alone would take minutes)."""
    with torch.device(device):
        model = cls(**cfg)
    return model.to(dtype)


# --- inputs -------------------------------------------------------------------------------------


def text(batch: int, cfg: dict, device, dtype):
    """Random caption embeddings with right-padded masks of varied lengths, and a null caption."""
    emb = torch.randn(batch, cfg["tokens"], cfg["caption"], device=device, dtype=dtype)
    lengths = torch.randint(8, cfg["tokens"] + 1, (batch,), device=device)
    mask = (torch.arange(cfg["tokens"], device=device)[None] < lengths[:, None]).long()
    null = torch.randn(batch, cfg["tokens"], cfg["caption"], device=device, dtype=dtype)
    null_mask = torch.zeros_like(mask)
    null_mask[:, 0] = 1
    return emb, mask, null, null_mask


def latents(batch: int, cfg: dict, device) -> torch.Tensor:
    c, s = cfg["teacher"]["in_channels"], cfg["teacher"]["sample_size"]
    return torch.randn(batch, c, s, s, device=device)


def trig_time(batch: int, device, p_mean: float = 0.2, p_std: float = 1.6) -> torch.Tensor:
    # s = arctan(exp(tau) / sd), tau ~ N(P_mean, P_std^2)  (sCM training distribution)
    return torch.atan(torch.exp(p_mean + p_std * torch.randn(batch, device=device)) / SD)


def bc(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


# --- phases -------------------------------------------------------------------------------------


def teacher_ft(cfg, args, device, amp) -> dict:
    model = TrigFlowTransformer(build(SanaTransformer2DModel, cfg["teacher"], device, torch.float32)).train()
    if args.grad_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    emb, mask, _, _ = text(args.batch, cfg, device, LOW[0])

    def step():
        x = latents(args.batch, cfg, device)
        t = torch.sigmoid(torch.randn(args.batch, device=device))  # logit-normal flow time
        eps = torch.randn_like(x)
        x_t = bc(1 - t) * x + bc(t) * eps  # x_t = (1-t) x + t eps, target eps - x
        with amp():
            v = model.flow_velocity(x_t, t, emb, mask)
        loss = (v.float() - (eps - x)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = measure(step, device, args.repeats)
    out["params"] = sum(p.numel() for p in model.parameters())
    return out  # the models die with this frame; main() empties the CUDA cache


def distill(cfg, args, device, amp) -> tuple[dict, dict, dict]:
    low = LOW[0]
    teacher = TrigFlowTransformer(build(SanaTransformer2DModel, cfg["teacher"], device, low)).eval().requires_grad_(False)
    student = TrigFlowTransformer(build(SanaTransformer2DModel, cfg["student"], device, torch.float32), logvar=True).to(device)
    student.train()
    if args.grad_checkpointing:
        student.transformer.enable_gradient_checkpointing()
        teacher.transformer.enable_gradient_checkpointing()  # the LADD generator term backprops through it
    width = cfg["teacher"]["num_attention_heads"] * cfg["teacher"]["attention_head_dim"]
    with torch.device(device):
        heads = nn.ModuleList(DiscHead(width) for _ in cfg["head_blocks"])
    feats = Features(teacher.transformer, cfg["head_blocks"])
    fused = device.type == "cuda"
    opt_g = torch.optim.AdamW(student.parameters(), lr=2e-6, fused=fused)
    opt_d = torch.optim.AdamW(heads.parameters(), lr=2e-6, fused=fused)
    emb, mask, null, null_mask = text(args.batch, cfg, device, low)
    B = args.batch
    w = torch.full((B,), GUIDANCE, device=device)

    def g_step():
        x0 = latents(B, cfg, device) * SD
        s = trig_time(B, device)
        x_s = bc(torch.cos(s)) * x0 + bc(torch.sin(s)) * torch.randn_like(x0) * SD
        with torch.no_grad(), amp():  # teacher CFG: one batched pass over (cond, null)
            F = teacher(torch.cat([x_s, x_s]) / SD, torch.cat([s, s]), torch.cat([emb, null]), torch.cat([mask, null_mask]))
            F_c, F_u = F.float().chunk(2)
            dxds = SD * (F_u + bc(w) * (F_c - F_u))
        cs = torch.cos(s) * torch.sin(s)
        with torch.no_grad(), student.jvp_mode(), amp():
            F_m, dF = torch.func.jvp(
                lambda x, t: student(x, t, emb, mask, guidance=w), (x_s / SD, s), (bc(cs) * dxds / SD, cs)
            )
        g = -bc(torch.cos(s) ** 2) * (SD * F_m.float() - dxds) - (bc(cs) * x_s + SD * dF.float())  # r = 1
        g = g / (bc(g.flatten(1).norm(dim=1)) + 0.1)
        with amp():
            F_th, logvar = student(x_s / SD, s, emb, mask, guidance=w, return_logvar=True)
        weight = 1 / (SD * torch.tan(s))
        l_scm = (bc(weight / logvar.exp()) * (F_th.float() - F_m.float() - g) ** 2 + bc(logvar)).mean()
        # LADD generator term: max-time student sample, re-noised, judged by heads on teacher features.
        z = torch.randn_like(x0) * SD
        s_g = torch.full((B,), HALF_PI, device=device)
        with amp():
            x0_hat = bc(torch.cos(s_g)) * z - bc(torch.sin(s_g)) * SD * student(z / SD, s_g, emb, mask, guidance=w).float()
        s_d = torch.atan(torch.exp(-0.6 + torch.randn(B, device=device)) / SD)
        x_d = bc(torch.cos(s_d)) * x0_hat + bc(torch.sin(s_d)) * torch.randn_like(x0) * SD
        feats.take()
        with amp():
            teacher(x_d / SD, s_d, emb, mask)
            l_adv = -logits(heads, feats.take()).mean()
        (l_scm + LADD_WEIGHT * l_adv).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)

    def d_step():
        x0 = latents(B, cfg, device) * SD
        z = torch.randn_like(x0) * SD
        s_g = torch.full((B,), HALF_PI, device=device)
        with torch.no_grad(), amp():
            fake = bc(torch.cos(s_g)) * z - bc(torch.sin(s_g)) * SD * student(z / SD, s_g, emb, mask, guidance=w).float()
        both = torch.cat([x0, fake])
        s_d = torch.atan(torch.exp(-0.6 + torch.randn(2 * B, device=device)) / SD)
        x_d = bc(torch.cos(s_d)) * both + bc(torch.sin(s_d)) * torch.randn_like(both) * SD
        feats.take()
        with torch.no_grad(), amp():
            teacher(x_d / SD, s_d, torch.cat([emb, emb]), torch.cat([mask, mask]))
        with amp():
            real, fake_l = logits(heads, feats.take()).chunk(2)
        loss = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake_l).mean())  # hinge
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), GRAD_CLIP)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    g = measure(g_step, device, args.repeats)
    d = measure(d_step, device, args.repeats)
    counts = {
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "head_params": sum(p.numel() for p in heads.parameters()),
    }
    return g, d, counts


def jvp_cost(cfg, args, device, amp) -> dict:
    """The sCM JVP (student output + tangent, no grad) in forward passes, with models/jvp.py's constant-weight
    rules (``jvp``) and with the plain forward-AD formulas (``jvp_plain``, explicit-softmax cross-attention only):
    timed against a no-grad forward of the same student (fp32 weights, bf16 autocast) and of the bf16 teacher."""
    low = LOW[0]
    teacher = TrigFlowTransformer(build(SanaTransformer2DModel, cfg["teacher"], device, low)).eval().requires_grad_(False)
    student = TrigFlowTransformer(build(SanaTransformer2DModel, cfg["student"], device, torch.float32), logvar=True).to(device)
    B = args.batch
    emb, mask, _, _ = text(B, cfg, device, low)
    w = torch.full((B,), GUIDANCE, device=device)
    x0 = latents(B, cfg, device) * SD
    s = trig_time(B, device)
    x_s = bc(torch.cos(s)) * x0 + bc(torch.sin(s)) * torch.randn_like(x0) * SD
    cs = torch.cos(s) * torch.sin(s)
    tangent = bc(cs) * torch.randn_like(x0)

    def student_forward():
        with torch.no_grad(), amp():
            student(x_s / SD, s, emb, mask, guidance=w)

    def teacher_forward():
        with torch.no_grad(), amp():
            teacher(x_s / SD, s, emb, mask)

    def jvp(fast: bool = True):
        with torch.no_grad(), student.jvp_mode(fast=fast), amp():
            return torch.func.jvp(lambda x, t: student(x, t, emb, mask, guidance=w), (x_s / SD, s), (tangent, cs))

    # the two JVP paths agree (models/jvp.py: the same JVP with less work)
    ref, got = jvp(fast=False), jvp()
    diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)) for a, b in zip(got, ref))
    out = {name: measure(fn, device, max(args.repeats, 5)) for name, fn in
           (("student_forward", student_forward), ("teacher_forward", teacher_forward), ("jvp", jvp),
            ("jvp_plain", lambda: jvp(fast=False)))}
    out["fast_vs_plain_max_rel_diff"] = diff
    for k in ("jvp", "jvp_plain"):
        out[f"{k}_in_student_forwards"] = out[k]["time_s"] / out["student_forward"]["time_s"]
        out[f"{k}_in_teacher_forwards"] = out[k]["time_s"] / out["teacher_forward"]["time_s"]
    return out


def inference(cfg, args, device) -> dict:
    low = LOW[0]
    student = TrigFlowTransformer(build(SanaTransformer2DModel, cfg["student"], device, low)).eval().requires_grad_(False)
    vae = build(AutoencoderDC, cfg["vae"], device, low).eval().requires_grad_(False)
    emb, mask, _, _ = text(1, cfg, device, low)
    s = torch.full((1,), HALF_PI, device=device)
    fwd, dec = student, vae.decode
    if args.compile:
        fwd, dec = torch.compile(student), torch.compile(vae.decode)
    sf = float(vae.config.scaling_factor)

    def transformer_only():
        with torch.inference_mode():
            z = torch.randn(1, *latents(1, cfg, device).shape[1:], device=device, dtype=low) * SD
            return SD * fwd(z / SD, s, emb, mask, guidance=GUIDANCE)

    def vae_only(x0=None):
        with torch.inference_mode():
            x0 = torch.randn(1, *latents(1, cfg, device).shape[1:], device=device) * SD if x0 is None else x0
            return dec((x0 / SD / sf).to(low)).sample

    def end_to_end():
        with torch.inference_mode():
            z = torch.randn(1, *latents(1, cfg, device).shape[1:], device=device) * SD
            x0 = -SD * fwd((z / SD).to(low), s, emb, mask, guidance=GUIDANCE).float()  # cos(pi/2)=0, sin=1
            img = dec((x0 / SD / sf).to(low)).sample
            assert img.shape[-1] == cfg["resolution"]
            return img

    t0 = time.perf_counter()
    end_to_end()  # compile (if any) happens here
    sync(device)
    compile_s = time.perf_counter() - t0
    reps = max(args.repeats, 5)
    out = {name: measure(fn, device, reps) for name, fn in
           (("transformer", transformer_only), ("vae_decode", vae_only), ("end_to_end", end_to_end))}
    out["first_call_s"] = compile_s
    out["vae_decoder_params"] = sum(p.numel() for p in vae.decoder.parameters())
    return out


# --- report -------------------------------------------------------------------------------------


def table(res: dict) -> str:
    rows = ["| phase | batch | time (s) | peak GiB | persistent GiB |", "|---|---|---|---|---|"]

    def row(name, r, b):
        if r.get("oom"):
            rows.append(f"| {name} | {b} | out of memory | - | - |")
            return
        pk = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        ps = f"{r['persistent_gib']:.1f}" if "persistent_gib" in r else "-"
        rows.append(f"| {name} | {b} | {r['time_s']:.3f} | {pk} | {ps} |")

    b = res["args"]["batch"]
    for key, name in (("teacher_ft", "teacher fine-tune step"), ("distill_G", "distill generator step (sCM + LADD)"),
                      ("distill_D", "distill discriminator step")):
        if key in res:
            row(name, res[key], b)
    if "jvp" in res:
        if res["jvp"].get("oom"):
            row("sCM JVP", res["jvp"], b)
        else:
            for k in ("student_forward", "teacher_forward", "jvp", "jvp_plain"):
                if k in res["jvp"]:
                    row(f"{k} (no grad)", res["jvp"][k], b)
    if "infer_1step" in res:
        for k in ("transformer", "vae_decode", "end_to_end"):
            row(f"1-step inference: {k}", res["infer_1step"][k], 1)
    out = "\n".join(rows)
    if "jvp" in res and not res["jvp"].get("oom"):
        j = res["jvp"]
        out += (f"\n\nJVP = {j['jvp_in_student_forwards']:.2f} student forwards = "
                f"{j['jvp_in_teacher_forwards']:.2f} teacher forwards (models/jvp.py constant-weight rules)")
        if "jvp_plain_in_student_forwards" in j:
            out += (f"\nplain torch.func.jvp (explicit cross-attention only): {j['jvp_plain_in_student_forwards']:.2f} student "
                    f"forwards = {j['jvp_plain_in_teacher_forwards']:.2f} teacher forwards; max relative difference "
                    f"{j['fast_vs_plain_max_rel_diff']:.1e}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of the code path")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 1: batch 4 needs ~103 GiB without --grad-checkpointing; tiny 2)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--layers", type=int, default=None, help="the 1.6B block shape with this many blocks (default 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the inference transformer and VAE decode")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="bf16: frozen weights bf16 + bf16 autocast (default on GPU); fp32 (default on CPU)")
    p.add_argument("--phases", default="train,jvp,infer",
                   help="comma-separated subset of train (teacher_ft, distill_G, distill_D), jvp, infer")
    p.add_argument("--json", default="bench_1p6b.json")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    LOW[0] = torch.bfloat16 if args.precision == "bf16" else torch.float32
    diffusers.utils.logging.set_verbosity_error()  # "modules kept in float32: []" on every cast
    args.batch = args.batch or (2 if args.tiny else 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    if args.layers is not None and (args.layers < 1 or args.tiny):
        p.error("--layers: an integer >= 1, not with --tiny")
    cfg = configs(args.tiny, args.resolution, args.layers)

    def amp():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    res = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    t0 = time.perf_counter()
    oom = {"oom": True}
    phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    if not phases or phases - {"train", "jvp", "infer"}:
        p.error(f"--phases: a comma-separated subset of train, jvp, infer; got {args.phases!r}")

    def guarded(fn, *keys):
        """Run a phase; one that runs out of memory is recorded as such under its keys and the run goes on."""
        try:
            out = fn()
            res.update(zip(keys, out if len(keys) > 1 else (out,)))
        except torch.OutOfMemoryError:
            res.update({k: oom for k in keys if k != "params"})
        free(device)

    if "train" in phases:
        guarded(lambda: teacher_ft(cfg, args, device, amp), "teacher_ft")
        guarded(lambda: distill(cfg, args, device, amp), "distill_G", "distill_D", "params")
    if "jvp" in phases:
        guarded(lambda: jvp_cost(cfg, args, device, amp), "jvp")
    if "infer" in phases:
        res["infer_1step"] = inference(cfg, args, device)
    res["total_s"] = time.perf_counter() - t0
    print(f"\n{res['device']}, torch {res['torch']}, batch {args.batch}, {args.precision}, grad checkpointing {args.grad_checkpointing}, "
          f"compile {args.compile}, {'TINY ' if args.tiny else ''}models\n")
    print(table(res))
    print(f"\nparams: {json.dumps(res.get('params'))}; total {res['total_s']:.0f} s")
    Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
