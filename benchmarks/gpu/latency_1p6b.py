"""SANA-Sprint 1.6B, 1 step at 1024 px, batch 1 on one GPU: end-to-end latency, ours vs diffusers.

Random weights (nothing to download), the real architectures: Gemma-2-2B text encoder (26 layers, width
2304), the SANA-Sprint 1.6B student transformer (20 layers, width 2240, CFG embedding, 32x32 latent
tokens) and the DC-AE f32c32 decoder, all in bf16 on the GPU. The prompts are tokenised by a small
word-level tokenizer built here (Gemma's tokenizer cannot be downloaded); token ids index the random
256k-row embedding like real ones, and the token counts are those of short prompts (5-11 with BOS).

Sides, timed in one process with :func:`sana_sprint.benchmarks.bench_case` (per component: text encoding,
transformer, VAE decode, other = sampler, noise, image conversion; PIL output, median of ``--repeats``
interleaved runs after ``--warmup``):

- ``ours-eager``: ``optimize_pipeline(bf16="all", compile=False)`` (padding-free text encoding, lean
  blocks, time-embedding cache, sub-pixel / lean DC-AE decoder blocks, channels-last VAE);
- ``ours-compiled``: ``optimize_pipeline(bf16="all", compile=True)``: transformer, VAE decoder and the
  text encoder's model (token counts bucketed to multiples of 64) under ``torch.compile`` with CUDA graphs
  (mode ``reduce-overhead``);
- ``diffusers``: ``SanaSprintPipeline`` on copies of the same weights in bf16, eager (its default), with
  ``max_sequence_length=300`` (what SANA-Sprint uses: Gemma runs on 300 padded tokens) and no
  complex-human-instruction prefix; with ``--compile-diffusers`` the compiled stage also times it with
  its transformer and VAE decoder compiled with CUDA graphs (``bf16-compiled``).

Stages: ``eager`` (ours eager vs diffusers eager) and ``compiled`` (ours compiled vs diffusers eager and,
optionally, compiled); each row keeps every diffusers total (``diffusers_by_dtype``) and the ratio to each
(``ratio_by_diffusers``).

    python benchmarks/gpu/latency_1p6b.py --json latency.json            # H100/H200: a few minutes
    python benchmarks/gpu/latency_1p6b.py --tiny --json /tmp/tiny.json   # CPU smoke test, seconds

The JSON is rewritten after every stage, so a run stopped by a time limit keeps what it measured.
Goal (issue 9): <= 50 ms end to end on an H100 (paper: 0.1 s for SANA-Sprint 1.6B on an H100).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

PROMPTS_NOTE = "sana_sprint.benchmarks.PROMPTS"
MAX_LENGTH = 300  # SANA / SANA-Sprint max_sequence_length


def word_tokenizer(words: set[str]):
    """A word-level fast tokenizer (BOS prepended, right padding) over ``words``: a stand-in for Gemma's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(special + sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                      special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def configs(tiny: bool) -> dict:
    from sana_sprint.models import presets
    from sana_sprint.realscale import dc_ae_f32c32_config, gemma2_2b_config

    if tiny:
        gemma = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, max_position_embeddings=512)
        return {"gemma": gemma, "transformer": presets.tiny(latent_channels=4, caption_channels=32, sample_size=8),
                "vae": presets.tiny_vae(4), "resolution": 32}
    return {"gemma": gemma2_2b_config(), "transformer": presets.sana_1600m(1024, guidance_embeds=True),
            "vae": dc_ae_f32c32_config(), "resolution": 1024}


def build(cfg: dict, device: torch.device, dtype: torch.dtype):
    """(tokenizer, Gemma2Model, student transformer, AutoencoderDC): random init directly on ``device``."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from sana_sprint.benchmarks import PROMPTS

    tok = word_tokenizer({w for p in PROMPTS for w in p.lower().split()} | {""})
    torch.manual_seed(0)
    with torch.device(device):
        gemma = Gemma2Model(Gemma2Config(**cfg["gemma"], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
        transformer = SanaTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderDC(**cfg["vae"])
    return tok, gemma.to(dtype).eval().requires_grad_(False), transformer.to(dtype).eval(), vae.to(dtype).eval()


def ours_pipeline(tok, gemma, transformer, vae, resolution: int, compile: bool, bf16: str):
    from sana_sprint.fast import optimize_pipeline
    from sana_sprint.pipeline import SprintPipeline
    from sana_sprint.text_gemma import GemmaPromptEncoder

    text = GemmaPromptEncoder(tok, gemma, max_length=MAX_LENGTH)
    pipe = SprintPipeline(text, transformer, vae, {"kind": "student", "resolution": resolution,
                                                   "max_sequence_length": MAX_LENGTH, "text_encoder": "gemma-2-2b (random)"})
    return optimize_pipeline(pipe, bf16=bf16, compile=compile)


def diffusers_pipeline(tok, gemma, transformer, vae, compile: bool):
    from diffusers import SanaSprintPipeline, SCMScheduler

    pipe = SanaSprintPipeline(tokenizer=tok, text_encoder=gemma, vae=vae, transformer=transformer,
                              scheduler=SCMScheduler(sigma_data=0.5))
    pipe.set_progress_bar_config(disable=True)
    if compile:
        pipe.transformer.compile(mode="reduce-overhead", dynamic=False)
        pipe.vae.decoder.compile(mode="reduce-overhead", dynamic=False)
    return pipe


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models on the CPU: a smoke test of the code path")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled stage")
    p.add_argument("--compile-diffusers", action="store_true", help="also time diffusers with its transformer and "
                   "VAE decoder compiled (CUDA graphs)")
    p.add_argument("--json", default="latency_1p6b.json")
    args = p.parse_args(argv)

    import diffusers

    from sana_sprint.benchmarks import bench_case

    diffusers.utils.logging.set_verbosity_error()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = configs(args.tiny)
    res: dict = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "diffusers": diffusers.__version__, "dtype": str(dtype),
                 "prompts": PROMPTS_NOTE, "rows": {}, "stage_s": {}}
    out = Path(args.json)

    def save():
        out.write_text(json.dumps(res, indent=1))

    t0 = time.perf_counter()
    tok, gemma, transformer, vae = build(cfg, device, dtype)
    res["params"] = {name: sum(q.numel() for q in m.parameters())
                     for name, m in (("text_encoder", gemma), ("transformer", transformer), ("vae_decoder", vae.decoder))}
    res["stage_s"]["build"] = round(time.perf_counter() - t0, 1)
    print(f"{res['device']}: built {res['params']} in {res['stage_s']['build']} s", flush=True)

    label = "bf16" if dtype == torch.bfloat16 else "fp32"

    def stage(name: str, ours_compile: bool, diffusers_variants: tuple[bool, ...]):
        """One bench_case row: ours vs diffusers eager (and compiled); every diffusers total is kept, the
        components are the fastest diffusers variant's."""
        t = time.perf_counter()
        try:
            ours = ours_pipeline(tok, gemma, copy.deepcopy(transformer), copy.deepcopy(vae), cfg["resolution"],
                                 ours_compile, "all" if dtype == torch.bfloat16 else "off")
            theirs = {label + ("-compiled" if c else ""): diffusers_pipeline(tok, gemma, copy.deepcopy(transformer),
                                                                            copy.deepcopy(vae), c)
                      for c in diffusers_variants}
            row = bench_case(ours, theirs, steps=1, batch=1, repeats=args.repeats, warmup=args.warmup, device=device)
        except Exception as e:  # keep the other stages' numbers (a time-limited run on a lent GPU)
            import traceback

            res.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            save()
            return
        row["ratio_by_diffusers"] = {k: round(row["ours_ms"] / v, 4) for k, v in row["diffusers_by_dtype"].items()}
        res["rows"][name] = row
        res["stage_s"][name] = round(time.perf_counter() - t, 1)
        o, d = row["ours"], row["diffusers"]
        print(f"{name}: ours {row['ours_ms']:.2f} ms (text {o['text_ms']:.2f}, transformer {o['transformer_ms']:.2f}, "
              f"vae {o['vae_ms']:.2f}, other {o['other_ms']:.2f}; cached text {row['ours_cached_text_ms']:.2f}) | "
              f"diffusers {row['diffusers_by_dtype']} ms, fastest {row['diffusers_dtype']} (text {d['text_ms']:.2f}, "
              f"transformer {d['transformer_ms']:.2f}, vae {d['vae_ms']:.2f}, other {d['other_ms']:.2f}) | ratios "
              f"{row['ratio_by_diffusers']} | first calls {row['ours_first_call_ms']:.0f} / {row['diffusers_first_call_ms']:.0f} ms "
              f"| max pixel diff {row['max_pixel_diff']} | {res['stage_s'][name]} s", flush=True)
        if device.type == "cuda":
            res.setdefault("peak_gib", {})[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        save()
        del ours, theirs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    stage("eager", False, (False,))
    if not args.no_compile:
        stage("compiled", True, (False, True) if args.compile_diffusers else (False,))
    res["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps({k: {"ours_ms": r["ours_ms"], "diffusers_ms": r["diffusers_by_dtype"], "ratio": r["ratio_by_diffusers"]}
                      for k, r in res["rows"].items()}, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
