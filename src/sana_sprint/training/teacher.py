"""Teacher training method: a dense-time, QK-normed SANA transformer trained by flow matching.

``TeacherMethod`` plugs into :class:`~sana_sprint.training.trainer.Trainer`; ``add_args`` / ``run``
implement ``sana-sprint train-teacher``. The transformer is fed continuous t in [0, 1]
(``timestep_scale`` 1.0) through :meth:`TrigFlowTransformer.flow_velocity`, trains in fp32 under bf16
autocast, and is exported from its EMA weights as a teacher pipeline folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import SanaTransformer2DModel

from ..data.latents import LatentDataset, build_latent_cache, is_latent_cache
from ..data.shapes import DEFAULT_TASK_WEIGHTS, parse_shapes_spec, relation_phrases, swap_relation
from ..losses.flow_matching import flow_matching_loss
from ..losses.relation import relation_contrast_loss
from ..models import presets
from ..models.wrapper import TrigFlowTransformer
from ..sampling import cfg_batched, flow_euler, randn
from ..timesteps import flow_schedule, logit_normal_flow_time
from .config import ConfigError, TeacherConfig
from .ema import EMA
from .fsdp import gathered
from .trainer import Method, Stepper, Trainer, resolve_device, seed_everything

logger = logging.getLogger(__name__)

GRID_COLUMNS = 4


def teacher_model_config(cfg: TeacherConfig, latent_channels: int, sample_size: int, caption_channels: int) -> dict:
    """Preset + overrides, with shapes fixed by the data; no CFG embedding. Dense time and QK-norm unless
    ``cfg.timestep_scale`` / ``cfg.qk_norm`` ask for a legacy teacher (1000 t, no QK-norm)."""
    if cfg.preset == "tiny":
        base = presets.tiny(latent_channels, caption_channels, sample_size, guidance_embeds=False)
    else:
        base = presets.shapes_teacher(latent_channels=latent_channels)
    model = {**base, **cfg.model}
    model.update(in_channels=latent_channels, out_channels=latent_channels, sample_size=sample_size,
                 caption_channels=caption_channels, guidance_embeds=False, timestep_scale=float(cfg.timestep_scale),
                 qk_norm=presets.QK_NORM if cfg.qk_norm else None)
    return model


def lr_lambda(cfg: TeacherConfig):
    """Linear warm-up to 1, then constant or cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""

    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int = GRID_COLUMNS) -> None:
    """images float [N, 3, H, W] in [-1, 1] -> one PNG."""
    from PIL import Image

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = x.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = x[i]
    Image.fromarray(grid).save(path)


@dataclass
class RelationTable:
    """Relation-swapped captions of a latent cache: ``row[caption]`` indexes ``embeds`` [S, L, C] / ``masks``."""

    row: dict[str, int]
    embeds: torch.Tensor
    masks: torch.Tensor

    @classmethod
    def build(cls, data, text_encoder, cfg: TeacherConfig, device: torch.device, chunk: int = 256) -> RelationTable:
        """Every cached caption with exactly one relation phrase, its swapped caption encoded by ``text_encoder``."""
        captions = getattr(data, "captions", None)
        if captions is None:
            raise ConfigError("relation_weight: needs a latent cache with a caption table (not prepare-data shards)")
        if text_encoder is None:
            raise ValueError("relation_weight > 0 needs the text encoder (the swapped captions are encoded once)")
        pairs = [(c, swap_relation(c)) for c in dict.fromkeys(captions) if len(relation_phrases(c)) == 1]
        if not pairs:
            raise ConfigError(f"relation_weight: the data ({cfg.data}) has no caption with a relation phrase")
        swapped = list(dict.fromkeys(s for _, s in pairs))
        embeds, masks = [], []
        for i in range(0, len(swapped), chunk):
            e, m = text_encoder.encode(swapped[i : i + chunk])
            embeds.append(e.float().cpu())
            masks.append(m.long().cpu())
        text_encoder.clear_cache()
        where = {s: j for j, s in enumerate(swapped)}
        logger.info("relation contrast: %d captions with a relation, %d swapped captions encoded", len(pairs), len(swapped))
        return cls({c: where[s] for c, s in pairs}, torch.cat(embeds).to(device), torch.cat(masks).to(device))


class TeacherMethod(Method):
    """Flow matching on cached latents; EMA; sample grids with flow Euler + CFG; export."""

    def __init__(self, cfg: TeacherConfig, data: LatentDataset, device: torch.device, vae=None, text_encoder=None):
        self.cfg = cfg
        self.device = device
        self.vae = vae
        self.text_encoder = text_encoder  # only for export (training reads cached embeddings)
        self.scaling_factor = data.scaling_factor
        c, h, w = data.latent_shape
        null_e, null_m = data.null_embedding()
        self.model_config = teacher_model_config(cfg, c, h, int(null_e.shape[-1]))
        self.transformer = SanaTransformer2DModel(**self.model_config).to(device)  # fp32 master weights
        self.net = TrigFlowTransformer(self.transformer)
        self.ema = EMA(self.transformer, cfg.ema_decay)
        self.ema_net = TrigFlowTransformer(self.ema.shadow)
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # loss draws (t, noise, dropout)
        self.null = (null_e.to(device), null_m.to(device))
        # Fixed sample-grid prompts: captions spread over the cache, with their cached embeddings.
        if hasattr(data, "text_embeds"):
            k = min(cfg.sample_count, len(data.captions))
            pick = np.linspace(0, len(data.captions) - 1, k).round().astype(int)
            self.sample_captions = [data.captions[i] for i in pick]
            self.sample_embeds = torch.from_numpy(np.asarray(data.text_embeds[pick]).astype(np.float32)).to(device)
            self.sample_masks = torch.from_numpy(np.asarray(data.text_masks[pick]).astype(np.int64)).to(device)
        else:  # prepare-data shards (no unique-caption table): rows spread over the dataset
            rows = data.batch(np.linspace(0, len(data) - 1, min(cfg.sample_count, len(data))).round().astype(int))
            self.sample_captions = list(rows["caption"])
            self.sample_embeds, self.sample_masks = rows["embeds"].to(device), rows["mask"].to(device)
        self.latent_shape = (c, h, w)
        self.relation: RelationTable | None = None
        if cfg.relation_weight > 0:
            self.relation = RelationTable.build(data, text_encoder, cfg, device)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    # --- Method protocol ---

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "ema": self.ema}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"transformer": self.opt}

    def schedulers(self) -> dict[str, Any]:
        return {"transformer": self.sched}

    def generators(self) -> dict[str, torch.Generator]:
        return {"loss": self.gen}

    def fsdp_modules(self) -> dict[str, torch.nn.Module]:
        """What ``--fsdp`` shards: the trained transformer (the EMA, sampling and export stay whole)."""
        return {"transformer": self.transformer}

    def train_step(self, batch: dict, step: int, opt: Stepper) -> dict[str, Any]:
        x = batch["latents"].float() * self.scaling_factor  # unit-std flow space
        self.transformer.train()

        def velocity(x_t, t, embeds, mask):
            return self.net.flow_velocity(x_t, t, embeds, mask)

        loss, terms = flow_matching_loss(
            velocity, x, batch["embeds"], batch["mask"], *self.null, generator=self.gen,
            caption_dropout=self.cfg.caption_dropout, logit_mean=self.cfg.logit_mean, logit_std=self.cfg.logit_std,
            high_t_prob=self.cfg.high_t_prob, high_t_logit_mean=self.cfg.high_t_logit_mean,
            high_t_logit_std=self.cfg.high_t_logit_std,
        )
        total = loss.mean()
        if self.relation is not None:
            rel, rel_terms = self._relation_loss(x, batch, velocity)
            if rel is not None:
                total = total + self.cfg.relation_weight * rel
                terms.update(rel_terms)
        if opt.step(total, "transformer"):
            with gathered(self.transformer):  # --fsdp: full weights for the (unsharded) EMA; else a no-op
                self.ema.update(self.transformer)
        return terms

    def _relation_loss(self, x: torch.Tensor, batch: dict, velocity) -> tuple[torch.Tensor | None, dict]:
        """Relation contrast (losses/relation.py) on the batch's first ``relation_rows`` captions that hold one
        relation, at times from the high-t logit-normal; (None, {}) when the batch has none. The draws come
        from the loss generator after the flow loss's (so a resumed run repeats them)."""
        cfg, table = self.cfg, self.relation
        rows = [i for i, c in enumerate(batch["caption"]) if c in table.row][: cfg.relation_rows]
        if not rows:
            return None, {}
        idx = torch.tensor(rows, device=x.device)
        swap = torch.tensor([table.row[batch["caption"][i]] for i in rows], device=x.device)
        t = logit_normal_flow_time(len(rows), cfg.high_t_logit_mean, cfg.high_t_logit_std, generator=self.gen)
        eps = torch.randn((len(rows), *x.shape[1:]), generator=self.gen, dtype=torch.float32)
        loss, terms = relation_contrast_loss(
            velocity, x[idx], batch["embeds"][idx], batch["mask"][idx], table.embeds[swap], table.masks[swap],
            t.to(x.device), eps.to(x.device), cfg.relation_temperature,
        )
        return loss.mean(), {**terms, "rel_rows": torch.tensor(float(len(rows)))}

    @torch.no_grad()
    def sample(self, embeds: torch.Tensor, mask: torch.Tensor, seeds: list[int], steps: int | None = None,
               guidance: float | None = None, shift: float | None = None, ema: bool = True) -> torch.Tensor:
        """Flow-Euler + CFG samples in unit-std latent space (x0 * scaling_factor)."""
        net = self.ema_net if ema else self.net
        net.eval()
        b = embeds.shape[0]
        null_e, null_m = self.null
        fn = cfg_batched(lambda x, t, c: net.flow_velocity(x, t, *c), (embeds, mask),
                         (null_e.expand(b, -1, -1), null_m.expand(b, -1)),
                         self.cfg.sample_guidance if guidance is None else guidance)
        x_T = randn((b, *self.latent_shape), [torch.Generator().manual_seed(s) for s in seeds], device=self.device)
        ts = flow_schedule(steps or self.cfg.sample_steps, self.cfg.flow_shift if shift is None else shift)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            return flow_euler(fn, x_T, ts)

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        x = self.sample(self.sample_embeds, self.sample_masks, list(range(len(self.sample_captions))))
        if self.vae is not None:
            images = self.vae.decode(x.to(next(self.vae.parameters()).dtype) / self.scaling_factor).sample
        else:  # no decoder: show the first three latent channels
            images = (x[:, :3] / 2).clamp(-1, 1)
        save_image_grid(images, path)
        Path(path).with_suffix(".txt").write_text("\n".join(self.sample_captions) + "\n")

    def export(self, out_dir: Path, text_encoder=None) -> Path:
        """Pipeline folder: EMA transformer + VAE in fp16 safetensors, sprint_config kind "teacher".

        ``text_encoder`` defaults to the method's own, else ``cfg.text_encoder``: a package encoder is only
        named in the folder (its weights are not needed, nor loaded), a local one is loaded and saved into it.
        """
        import copy

        from ..pipeline import SprintPipeline
        from ..text import PACKAGE_ENCODERS, NamedTextEncoder, load_text_encoder

        if self.vae is None:
            raise ValueError("export needs the VAE")
        te = text_encoder or self.text_encoder
        if te is None:
            spec = self.cfg.text_encoder
            te = (NamedTextEncoder(spec, self.cfg.max_length) if spec in PACKAGE_ENCODERS
                  else load_text_encoder(spec, self.cfg.max_length))
        transformer = SanaTransformer2DModel(**self.model_config)
        transformer.load_state_dict(self.ema.shadow.state_dict())
        config = {
            "kind": "teacher", "flow_shift": self.cfg.flow_shift, "default_steps": self.cfg.sample_steps,
            "default_guidance": self.cfg.sample_guidance, "resolution": self.cfg.resolution,
            "max_sequence_length": self.cfg.max_length,
        }
        vae = copy.deepcopy(self.vae).to("cpu", torch.float16)
        SprintPipeline(te, transformer.to(torch.float16), vae, config).save_pretrained(out_dir)
        return Path(out_dir)


# --- CLI ------------------------------------------------------------------------------------------


def add_args(parser: argparse.ArgumentParser) -> None:
    """The ``train-teacher`` flags (also registered as a subcommand by ``training/cli.py``)."""
    from .cli import train_teacher_command

    train_teacher_command(parser)


def default_cache_dir(cfg: TeacherConfig) -> Path:
    if cfg.cache:
        return Path(cfg.cache)
    if cfg.data.startswith("shapes:"):  # a task mix: its own cache ("shapes-position3-counting2-...")
        slug = "-".join(["shapes"] + [f"{t}{w:g}" for t, w in parse_shapes_spec(cfg.data).items()
                                  if w != DEFAULT_TASK_WEIGHTS[t]] + ["mix"])
    else:
        slug = "shapes" if cfg.data == "shapes" else Path(cfg.data).resolve().name
    return Path(cfg.out).resolve().parent / "cache" / f"{slug}-{cfg.cache_samples}-r{cfg.resolution}"


def load_vae(path: str, device: torch.device):
    from diffusers import AutoencoderDC

    if not Path(path).is_dir():
        from ..errors import ModelFolderError

        raise ModelFolderError(f"VAE folder not found: {path}")
    return AutoencoderDC.from_pretrained(path).to(device, torch.float32).eval().requires_grad_(False)


def prepare_data(cfg: TeacherConfig, vae, device: torch.device) -> LatentDataset:
    """The latent cache for ``cfg.data``: used as is when ``data`` is one (or a ``prepare-data`` folder),
    built (or resumed) otherwise."""
    if is_latent_cache(cfg.data):
        return LatentDataset(cfg.data)
    from ..data.prepare import ShardedLatentDataset

    if ShardedLatentDataset.is_prepared(cfg.data):
        return ShardedLatentDataset(cfg.data)
    cache = default_cache_dir(cfg)
    if not (is_latent_cache(cache) and LatentDataset.is_complete(cache)):
        from ..text import load_text_encoder

        te = load_text_encoder(cfg.text_encoder, max_length=cfg.max_length, device=device)
        build_latent_cache(cfg.data, vae, te, cfg.cache_samples, cache, batch=256, size=cfg.resolution,
                           seed=cfg.seed, progress=cfg.progress)
    return LatentDataset(cache)


def init_from_folder(method: TeacherMethod, folder: str | Path) -> None:
    """Load a trained teacher's transformer into ``method`` (weights and EMA): ``train-teacher --init``.

    ``folder`` is a teacher pipeline folder (or its ``transformer/``), or a train-teacher checkpoint
    (``ckpt-NNNNNNN/``: its raw fp32 weights, not its EMA). Every parameter must match by
    name and shape; config options that hold no weights may differ, e.g. ``interpolation_scale``
    (the sin-cos position embedding is a fixed buffer), which is how a position embedding is added
    to a teacher trained without one. A checkpoint in ``out`` still wins (``--resume``).
    """
    from ..errors import ModelFolderError
    from .checkpoint import module_file, module_state

    folder = Path(folder)
    if module_file(folder, "transformer").is_file():  # a training checkpoint: the trained (raw) weights, fp32
        theirs = {k: v.float() for k, v in module_state(folder, "transformer").items()}
        if any(k.startswith("guidance_embedder") or ".guidance_embedder." in k for k in theirs):
            raise ModelFolderError(f"--init {folder}: the checkpoint's transformer has guidance embeddings, not a teacher's")
    else:
        sub = folder / "transformer" if (folder / "transformer").is_dir() else folder
        if not (sub / "config.json").is_file():
            raise ModelFolderError(f"--init {folder}: not a teacher folder (no transformer/config.json) "
                                   "nor a train-teacher checkpoint (no modules/transformer.safetensors)")
        source = SanaTransformer2DModel.from_pretrained(sub, torch_dtype=torch.float32)
        if source.config.guidance_embeds:
            raise ModelFolderError(f"--init {folder}: the transformer has guidance embeddings (a student?), not a teacher")
        theirs = source.state_dict()
    ours = method.transformer.state_dict()
    bad = sorted(k for k in set(theirs) | set(ours) if k not in theirs or k not in ours or theirs[k].shape != ours[k].shape)
    if bad:
        raise ModelFolderError(f"--init {folder}: its transformer does not match this config's architecture "
                               f"({len(bad)} weights differ, first {bad[0]!r}); set `model` to its options")
    with torch.no_grad():
        method.transformer.load_state_dict(theirs)
        method.ema.shadow.load_state_dict(theirs)
    logger.info("initialised the teacher (and its EMA) from %s", folder)


def run(args: argparse.Namespace) -> int:
    cfg = TeacherConfig.from_args(args, args.config)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    vae = load_vae(cfg.vae, device)
    from .distributed import setup as setup_processes

    with setup_processes(cfg.device).main_process_first():  # rank 0 builds a missing latent cache first
        data = prepare_data(cfg, vae, device)
    seed_everything(cfg.seed)
    text_encoder = None
    if cfg.relation_weight > 0:  # the relation contrast encodes the swapped captions once, at start
        from ..text import load_text_encoder

        text_encoder = load_text_encoder(cfg.text_encoder, max_length=cfg.max_length, device=device)
    method = TeacherMethod(cfg, data, device, vae=vae, text_encoder=text_encoder)
    if cfg.init:
        init_from_folder(method, cfg.init)
    logger.info("teacher: %.2f M parameters, %d cached samples", method.num_parameters / 1e6, len(data))
    out = Trainer(method, data.loader(cfg.batch, cfg.seed), cfg, device).fit_and_export()
    if out is not None:
        print(f"exported teacher pipeline to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:  # python -m sana_sprint.training.teacher
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="sana-sprint train-teacher", description=__doc__)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
