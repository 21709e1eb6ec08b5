"""Linear attention scaling: transformer forward time at 4x the tokens (issue 9; target <= 4.5x).

Builds the shapes transformer (``presets.shapes_teacher``, random weights, student config with the
CFG embedding) at two latent sizes (default 16x16 = 256 tokens and 32x32 = 1024 tokens), times one
forward pass (median of ``--repeats`` after ``--warmup``) and reports the time ratio. With linear
self-attention the cost is linear in the token count, so 4x tokens should cost about 4x (a little
less at small sizes, where per-call overhead is amortised). For contrast the same weights are also
timed with softmax self-attention swapped in (``--no-softmax`` skips it), whose attention cost grows
16x. Prints a summary and writes JSON.

    python benchmarks/linear_attention.py --out linear_attention.json
    python benchmarks/linear_attention.py --sizes 32,64 --batch 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

TARGET_RATIO = 4.5


def _time_forward(model, latent: int, batch: int, repeats: int, warmup: int, caption_len: int = 32) -> float:
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    e = torch.randn(batch, caption_len, cfg.caption_channels, generator=g)
    mask = torch.ones(batch, caption_len, dtype=torch.long)
    t = torch.full((batch,), 0.5)
    guidance = torch.full((batch,), 0.45) if cfg.guidance_embeds else None
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x, encoder_hidden_states=e, encoder_attention_mask=mask, timestep=t, guidance=guidance, return_dict=False)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class SoftmaxSelfAttention:
    """Softmax (SDPA) self-attention on the same projections and QK-norm as Sana's linear attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        import torch.nn.functional as F

        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        if attn.norm_q is not None:  # across heads: before the head split, as the linear processor does
            q, k = attn.norm_q(q), attn.norm_k(k)
        heads = lambda x: x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def _softmax_self_attention(model) -> None:
    for block in model.transformer_blocks:
        block.attn1.set_processor(SoftmaxSelfAttention())


def measure(sizes=(16, 32), batch: int = 1, repeats: int = 5, warmup: int = 2, softmax: bool = True) -> dict:
    import torch
    from diffusers import SanaTransformer2DModel

    from sana_sprint.models import presets

    cfg = presets.student_from_teacher_config(presets.shapes_teacher())
    result: dict = {"config": "presets.shapes_teacher (+ CFG embedding)", "batch": batch, "sizes": list(sizes), "rows": []}
    variants = [("linear", None)] + ([("softmax", _softmax_self_attention)] if softmax else [])
    for name, patch in variants:
        torch.manual_seed(0)
        model = SanaTransformer2DModel(**{**cfg, "sample_size": max(sizes)}).eval()
        if patch is not None:
            patch(model)
        ms = {s: _time_forward(model, s, batch, repeats, warmup) for s in sizes}
        small, large = min(sizes), max(sizes)
        token_ratio = (large / small) ** 2
        result["rows"].append(
            {
                "attention": name,
                "tokens": {str(s): s * s for s in sizes},
                "ms": {str(s): round(v, 3) for s, v in ms.items()},
                "token_ratio": token_ratio,
                "time_ratio": round(ms[large] / ms[small], 3),
            }
        )
    linear = result["rows"][0]
    result["target_ratio"] = TARGET_RATIO if linear["token_ratio"] == 4 else None
    result["passes"] = linear["time_ratio"] <= TARGET_RATIO if linear["token_ratio"] == 4 else None
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,32", help="two latent sides (default: %(default)s = 256 vs 1024 tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-softmax", action="store_true", help="skip the softmax-attention contrast")
    p.add_argument("--out", default="linear_attention.json")
    args = p.parse_args(argv)
    try:
        sizes = tuple(int(x) for x in args.sizes.split(","))
    except ValueError:
        p.error(f"--sizes must be two integers, got {args.sizes!r}")
    if len(sizes) != 2 or min(sizes) < 1 or sizes[0] == sizes[1]:
        p.error(f"--sizes must be two different positive integers, got {args.sizes!r}")
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(sizes, args.batch, args.repeats, args.warmup, softmax=not args.no_softmax)
    result.update(threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.processor() or platform.machine())
    for r in result["rows"]:
        a, b = (str(s) for s in sorted(sizes))
        print(
            f"{r['attention']:>8}: {r['tokens'][a]} tokens {r['ms'][a]:.2f} ms -> {r['tokens'][b]} tokens {r['ms'][b]:.2f} ms "
            f"= {r['time_ratio']:.2f}x for {r['token_ratio']:.0f}x tokens"
        )
    if result["passes"] is not None:
        print(f"linear attention at 4x tokens: {result['rows'][0]['time_ratio']:.2f}x (target <= {TARGET_RATIO}): "
              f"{'PASS' if result['passes'] else 'FAIL'}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
