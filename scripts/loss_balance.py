"""Gradient norms of the generator loss terms of a distillation run: sCM, adversarial (LADD) and, with
``pairs``, the 1-step regression onto teacher samples (in latent space and, with ``regress_features``, in the
discriminator backbone's feature space).

The generator minimises ``L_sCM + ladd_weight * L_adv``. How much LADD steers the student depends on
the size of its gradient next to the sCM gradient, which depends on the model, the latent scale and
the sCM adaptive weighting, so the paper's ``ladd_weight`` 0.5 need not mean the same balance here.
For a few training batches this prints ``|grad L_sCM|``, ``|grad L_adv|`` (unweighted) and their
ratio over the student's trainable parameters, from one forward of the same draws (the two gradients
sum, with the weight, to the gradient the optimiser sees).

    python scripts/loss_balance.py --config configs/shapes-distill-v4.json \\
        --checkpoint runs/distill_v4/checkpoints/ckpt-0000500 --batches 3 --out runs/loss_balance_v4_500.json

Without ``--checkpoint`` the student is the config's fresh copy of the teacher (step 0), whose
adversarial gradient is not informative yet (untrained heads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def term_grad_norms(method, batch: dict, step: int, seed: int) -> dict[str, float]:
    """|grad| of the unweighted sCM and adversarial terms of one generator loss (same draws)."""
    params = [p for p in method.student.parameters() if p.requires_grad]
    x0, ehs, mask = method.prepare_batch(batch)
    method.gen.manual_seed(seed)
    terms: dict[str, torch.Tensor] = {}
    out = {}
    with method.generator_phase():
        method.generator_loss(x0, ehs, mask, step, terms=terms)
        for name in ("scm", "adv", "regress", "regress_features"):
            if name not in terms:
                continue
            grads = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
            out[name] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))
    for name in ("adv", "regress", "regress_features"):
        if "scm" in out and name in out:
            out[f"{name}_over_scm"] = out[name] / max(out["scm"], 1e-30)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the distill config of the run")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder of that run")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    from sana_sprint.errors import UserError
    from sana_sprint.training.checkpoint import load_checkpoint
    from sana_sprint.training.distill import DistillConfig, build

    try:
        if args.batches < 1:
            raise UserError("--batches: need at least 1")
        cfg = DistillConfig.from_dict({**json.loads(Path(args.config).read_text()), "progress": False})
        torch.set_num_threads(cfg.threads or 1)
        method, data = build(cfg, torch.device("cpu"))
        step = 10**9  # past the tangent warm-up
        if args.checkpoint is not None:  # the run's modules (student, logvar, heads, EMA); not its RNG
            load_checkpoint(args.checkpoint, modules=method.state_modules(), restore_rng=False)
    except (UserError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loader = iter(data.loader(cfg.batch, args.seed))
    rows = []
    for i in range(args.batches):
        row = term_grad_norms(method, next(loader), step, args.seed + i)
        rows.append(row)
        print(f"batch {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    result = {"config": args.config, "checkpoint": str(args.checkpoint), "ladd_weight": cfg.ladd_weight,
              "regress_weight": cfg.regress_weight, "regress_features": cfg.regress_features, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
