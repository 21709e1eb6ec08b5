"""The model side of the web demo: a pipeline (+ optional ControlNet) behind a lock.

One :class:`Engine` serves every request; :meth:`Engine.generate` holds a lock for the whole model
call, so concurrent HTTP requests queue instead of interleaving (torch modules and the text
encoder's cache are not thread-safe). Without a trained model or ControlNet the engine runs on a
tiny random one and says so in :attr:`Engine.info`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.conditions import to_tensor, user_scribble
from ..models.controlnet import ControlledTrigFlow, SprintControlNet, encode_control
from ..pipeline import SprintPipeline

logger = logging.getLogger(__name__)

CONTROL_CACHE_SIZE = 16  # encoded scribbles kept (LRU)
RANDOM_CONTROL_STD = 0.05  # random ControlNet projections for the untrained demo (zero init would do nothing)


@dataclass
class Request:
    """A validated generation request (see ``app.parse_request``)."""

    prompt: str
    steps: int = 1
    seed: int = 0
    guidance: float | None = None
    scribble: Image.Image | None = None
    conditioning_scale: float | None = None  # None: the ControlNet's default for `steps`


@dataclass
class Result:
    png: bytes
    latency_ms: float  # model time: conditioning + sampling + decoding, under the lock
    queue_ms: float  # time spent waiting for the lock
    meta: dict[str, Any] = field(default_factory=dict)


def random_controlnet(base, seed: int = 0, std: float = RANDOM_CONTROL_STD) -> SprintControlNet:
    """An untrained ControlNet whose zero projections are replaced by small random ones (demo only)."""
    net = SprintControlNet.from_base(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [net.before_proj, *net.after_proj]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
    return net


class Engine:
    def __init__(
        self,
        pipe: SprintPipeline,
        controlnet: SprintControlNet | None = None,
        random_model: bool = False,
        random_controlnet: bool = False,
        model_name: str = "",
    ):
        self.pipe = pipe
        self.controlled: ControlledTrigFlow | None = None
        if controlnet is not None:
            controlnet.to(pipe.device, pipe.dtype).eval()
            self.controlled = ControlledTrigFlow(pipe.model, controlnet).eval()
            pipe.model = self.controlled  # same forward signature: the pipeline's samplers run unchanged
        self.lock = threading.Lock()
        self._control_cache: dict[str, torch.Tensor] = {}
        self.resolution = int(pipe.config.get("resolution") or 64)
        self.info = {
            "model": model_name or ("random" if random_model else "?"),
            "kind": pipe.kind,
            "random_model": bool(random_model),
            "controlnet": controlnet is not None,
            "random_controlnet": bool(random_controlnet),
            "resolution": self.resolution,
            "max_steps": 4,
        }

    @torch.no_grad()
    def _control_latents(self, scribble: Image.Image) -> torch.Tensor:
        cond = user_scribble(scribble, size=self.resolution)
        # Prompt/seed/steps edits resend the same drawing: skip its VAE encode (about half the model time).
        key = hashlib.sha1(np.packbits(cond[..., 0] > 0).tobytes()).hexdigest()
        hit = self._control_cache.pop(key, None)
        if hit is None:
            hit = encode_control(self.pipe.vae, to_tensor(cond)[None]).to(self.pipe.device, self.pipe.dtype)
        self._control_cache[key] = hit  # most recent last
        while len(self._control_cache) > CONTROL_CACHE_SIZE:
            self._control_cache.pop(next(iter(self._control_cache)))
        return hit

    def generate(self, req: Request) -> Result:
        queued = time.perf_counter()
        with self.lock:
            start = time.perf_counter()
            control = None
            if req.scribble is not None and self.controlled is not None:
                control = self._control_latents(req.scribble)
            scale = req.conditioning_scale
            if scale is None and self.controlled is not None:
                scale = self.controlled.controlnet.default_scale(req.steps)
            bind = self.controlled.bind(control, scale) if self.controlled is not None else contextlib.nullcontext()
            with bind:
                out = self.pipe(
                    req.prompt,
                    steps=req.steps,
                    guidance_scale=req.guidance,
                    seed=req.seed,
                    output_type="np",
                )
            img = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            done = time.perf_counter()
        return Result(
            png=buf.getvalue(),
            latency_ms=(done - start) * 1000,
            queue_ms=(start - queued) * 1000,
            meta={"controlled": control is not None},
        )


def shipped_controlnet(folder: Path) -> Path | None:
    """The ControlNet that belongs to a model folder: ``<folder>/controlnet`` (a distilled Sprint-ControlNet
    export) or the sibling ``<folder>-controlnet`` (how ``models/`` ships them); ``None`` if neither exists."""
    for cand in (folder / "controlnet", folder.parent / f"{folder.name}-controlnet"):
        if (cand / "controlnet_config.json").is_file():
            return cand
    return None


def load_engine(model: str | None = None, controlnet: str | None = None, device: str | None = None) -> Engine:
    """Engine for a model folder/name (``None``: the default model if present, else a tiny random one)."""
    from ..cli import DEFAULT_MODEL, pick_device, quiet_libraries, random_demo_pipeline, resolve_model
    from ..errors import UserError

    quiet_libraries()
    dev = pick_device(device)
    spec = model or DEFAULT_MODEL
    folder = resolve_model(spec)
    random_model = False
    if folder is None:
        if model is not None:
            raise UserError(f"model folder not found: {model}")
        logger.warning("no trained model %r found: serving a RANDOM UNTRAINED tiny model (images are noise-like)", spec)
        pipe = random_demo_pipeline(dev)
        random_model, name = True, "random (untrained)"
    else:
        pipe = SprintPipeline.from_pretrained(folder, device=dev)
        name = str(folder)
    net, random_cn = None, False
    if controlnet is None and folder is not None:
        controlnet = shipped_controlnet(folder)
        if controlnet is not None:
            logger.info("scribbles use the ControlNet in %s", controlnet)
    if controlnet is not None:
        net = SprintControlNet.from_pretrained(controlnet, base=pipe.transformer)
    else:
        logger.warning("no --controlnet given: scribbles drive a RANDOM UNTRAINED ControlNet (shows the data path only)")
        net, random_cn = random_controlnet(pipe.transformer), True
    from ..fast import convs_as_linear, optimize_pipeline

    pipe = optimize_pipeline(pipe)  # fp32 exact fast paths, bf16 products where the CPU has native bf16: sana_sprint.fast
    if net is not None:
        convs_as_linear(net)  # the ControlNet's copied blocks get the same exact 1x1-conv fast path
    return Engine(pipe, net, random_model=random_model, random_controlnet=random_cn, model_name=name)
