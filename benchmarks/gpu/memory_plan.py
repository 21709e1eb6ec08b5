"""Per-GPU memory plan for SANA-Sprint 1.6B at 1024 px, from meta-device models (no GPU, no weights).

Parameter counts come from the real architectures built on the meta device; activation sizes come
from one forward on the meta device with autograd's saved-tensor hooks counting every tensor kept
for backward (bf16 activations, as under bf16 autocast). Prints a markdown table (GiB).

    python benchmarks/gpu/memory_plan.py [--batch 4] [--resolution 1024] [--json plan.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_1p6b import TEXT_TOKENS, DiscHead  # noqa: E402

from sana_sprint.models import presets  # noqa: E402
from sana_sprint.realscale import count_params, dc_ae_f32c32_config, gemma2_2b_config, meta_model  # noqa: E402

GIB = 2**30
ADAMW_BYTES = 4 + 4 + 8  # fp32 weight + fp32 grad + two fp32 moments, per trainable parameter
HEAD_BLOCKS = 4  # official: blocks [2, 8, 14, 19] of 20


def saved_activation_bytes(cfg: dict, batch: int, dtype=torch.bfloat16) -> dict:
    """Bytes autograd saves for backward in one transformer forward (total, per block, block input)."""
    with torch.device("meta"):
        model = SanaTransformer2DModel(**cfg).to(dtype)
    side = cfg["sample_size"]
    x = torch.randn(batch, cfg["in_channels"], side, side, device="meta", dtype=dtype)
    emb = torch.randn(batch, TEXT_TOKENS, cfg["caption_channels"], device="meta", dtype=dtype)
    mask = torch.ones(batch, TEXT_TOKENS, device="meta", dtype=torch.long)
    t = torch.rand(batch, device="meta")
    g = torch.full((batch,), 0.45, device="meta") if cfg["guidance_embeds"] else None
    seen: dict[int, int] = {}
    marks = []

    def pack(tensor):
        # Parameters (and their casts) are counted with the weights, not as activations.
        if not isinstance(tensor, torch.nn.Parameter):  # views share a storage: count it once
            storage = tensor.untyped_storage()
            seen.setdefault(storage._cdata, storage.nbytes())
        return tensor

    blocks = model.transformer_blocks
    blocks[0].register_forward_pre_hook(lambda m, a: marks.append(sum(seen.values())))
    blocks[-1].register_forward_hook(lambda m, a, o: marks.append(sum(seen.values())))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t, guidance=g, return_dict=False)
    total = sum(seen.values())
    per_block = (marks[1] - marks[0]) / len(blocks)
    block_input = batch * (side // cfg["patch_size"]) ** 2 * cfg["num_attention_heads"] * cfg["attention_head_dim"] * 2
    return {"total": total, "per_block": per_block, "block_input": block_input, "layers": len(blocks)}


def plan(batch: int, resolution: int) -> dict:
    teacher_cfg = presets.sana_1600m(resolution, guidance_embeds=False)
    student_cfg = presets.student_from_teacher_config(teacher_cfg)
    width = teacher_cfg["num_attention_heads"] * teacher_cfg["attention_head_dim"]
    p_t = count_params(meta_model(SanaTransformer2DModel, teacher_cfg))
    p_s = count_params(meta_model(SanaTransformer2DModel, student_cfg)) + width + 1  # + logvar head
    with torch.device("meta"):
        p_h = HEAD_BLOCKS * count_params(DiscHead(width))
    vae = meta_model(AutoencoderDC, dc_ae_f32c32_config())
    from transformers import Gemma2Config, Gemma2Model

    with torch.device("meta"):
        p_gemma = count_params(Gemma2Model(Gemma2Config(**gemma2_2b_config())))
    act_t = saved_activation_bytes(teacher_cfg, batch)
    act_s = saved_activation_bytes(student_cfg, batch)

    def ckpt(a):  # diffusers checkpoints every block: keep block inputs, recompute one block at a time
        return a["total"] - a["layers"] * a["per_block"] + a["layers"] * a["block_input"] + a["per_block"]

    rows = {
        "teacher fine-tune": {
            "weights + grads + AdamW (fp32)": p_t * ADAMW_BYTES,
            "bf16 weight casts kept for backward (autocast)": p_t * 2,
            "activations": act_t["total"],
            "activations, grad checkpointing": ckpt(act_t),
        },
        "distillation": {
            "student weights + grads + AdamW (fp32)": p_s * ADAMW_BYTES,
            "student bf16 weight casts (autocast)": p_s * 2,
            "teacher, frozen (bf16)": p_t * 2,
            "discriminator heads + grads + AdamW (fp32)": p_h * ADAMW_BYTES,
            # G step: student fwd with grad twice (sCM F_theta, LADD sample) + teacher fwd with grad to its input.
            "activations (G step)": 2 * act_s["total"] + act_t["total"],
            "activations (G step), grad checkpointing": 2 * ckpt(act_s) + ckpt(act_t),
        },
        "inference (bf16)": {
            "student transformer": p_s * 2,
            "DC-AE decoder": count_params(vae.decoder) * 2,
        },
        "not on the training GPU (prepare-data caches them)": {
            "Gemma-2 2B text encoder (bf16)": p_gemma * 2,
            "DC-AE encoder (bf16)": count_params(vae.encoder) * 2,
        },
    }
    for phase in ("teacher fine-tune", "distillation"):
        r = rows[phase]
        fixed = sum(v for k, v in r.items() if "activations" not in k)
        acts = [k for k in r if k.startswith("activations")]
        r["total"] = fixed + r[acts[0]]
        r["total, grad checkpointing"] = fixed + r[acts[1]]
    return {
        "batch": batch,
        "resolution": resolution,
        "params": {"teacher": p_t, "student (+logvar)": p_s, "discriminator heads": p_h,
                   "dc-ae encoder": count_params(vae.encoder), "dc-ae decoder": count_params(vae.decoder),
                   "gemma-2-2b": p_gemma},
        "activation_bytes": {"teacher": act_t, "student": act_s},
        "rows_bytes": rows,
    }


def markdown(p: dict) -> str:
    out = ["Parameters: " + ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in p["params"].items()), "",
           f"| phase | item | GiB (batch {p['batch']}, {p['resolution']} px) |", "|---|---|---|"]
    for phase, items in p["rows_bytes"].items():
        for k, v in items.items():
            bold = "**" if k.startswith("total") else ""
            out.append(f"| {phase} | {bold}{k}{bold} | {bold}{v / GIB:.1f}{bold} |")
    a = p["activation_bytes"]["student"]
    out += ["", f"Student activations saved for backward per forward: {a['total'] / GIB:.2f} GiB "
                f"({a['per_block'] / GIB:.3f} GiB per block x {a['layers']} blocks; block input {a['block_input'] / GIB:.4f} GiB)."]
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1, help="per-GPU batch")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    p = plan(args.batch, args.resolution)
    print(markdown(p))
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=1))
    return p


if __name__ == "__main__":
    main(sys.argv[1:])
