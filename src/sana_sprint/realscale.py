"""Real-scale SANA / SANA-Sprint: the preset table and loading of local diffusers folders.

Every loader validates before it allocates: it reads ``config.json`` and the safetensors headers
(names and shapes only), compares them with a model built on the meta device, and checks that the
transformer, the VAE and the text encoder fit together. Mistakes become one :class:`UserError` line
that names the file and the mismatch, never a shape error deep inside a forward pass.

A folder may be a diffusers pipeline folder (``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``) or the component folder itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import ModelFolderError, UserError
from .models import presets

# Weight file names diffusers / transformers write, in the order they are preferred.
WEIGHT_NAMES = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                  "diffusion_pytorch_model.bin"),
    "transformers": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
}
_MAX_LISTED = 4  # mismatches named in one error message


# --- preset table -------------------------------------------------------------------------------


def dc_ae_f32c32_config() -> dict[str, Any]:
    """``AutoencoderDC`` config of mit-han-lab/dc-ae-f32c32-sana-1.0 (SANA's VAE: 32x compression, 32 channels)."""
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    return dict(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=32,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        downsample_block_type="Conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def gemma2_2b_config() -> dict[str, Any]:
    """``Gemma2Config`` of google/gemma-2-2b-it, SANA's text encoder (hidden size 2304)."""
    return dict(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
    )


@dataclass(frozen=True)
class Preset:
    """One real-scale transformer: a Sprint student (with CFG embedding) or its dense-time, QK-norm teacher."""

    name: str
    size: Literal["0.6B", "1.6B"]
    resolution: int
    role: Literal["student", "teacher"]
    build: Callable[..., dict[str, Any]]

    def transformer_config(self) -> dict[str, Any]:
        return self.build(self.resolution, guidance_embeds=self.role == "student")


def _presets() -> dict[str, Preset]:
    out = {}
    for size, build in (("0.6B", presets.sana_600m), ("1.6B", presets.sana_1600m)):
        for res in (512, 1024):
            for role in ("student", "teacher"):
                name = f"sana-{'sprint-' if role == 'student' else ''}{size.lower()}-{res}"
                out[name] = Preset(name, size, res, role, build)
    return out


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def meta_model(cls, config: dict[str, Any]) -> torch.nn.Module:
    """``cls(**config)`` on the meta device: shapes and parameter counts without memory or init time."""
    with torch.device("meta"):
        return cls(**config)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_preset(name: str) -> dict[str, Any]:
    """Architecture summary of a preset; parameter counts are computed from meta-device models."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    p = get_preset(name)
    cfg = p.transformer_config()
    vae_cfg = dc_ae_f32c32_config()
    vae = meta_model(AutoencoderDC, vae_cfg)
    compression = presets.vae_compression(vae_cfg)
    latent = p.resolution // compression
    return {
        "name": p.name,
        "role": p.role,
        "size": p.size,
        "resolution": p.resolution,
        "latent_shape": [cfg["in_channels"], latent, latent],
        "image_tokens": (latent // cfg["patch_size"]) ** 2,
        "layers": cfg["num_layers"],
        "width": cfg["num_attention_heads"] * cfg["attention_head_dim"],
        "heads": f"{cfg['num_attention_heads']}x{cfg['attention_head_dim']}",
        "cross_heads": f"{cfg['num_cross_attention_heads']}x{cfg['cross_attention_head_dim']}",
        "caption_channels": cfg["caption_channels"],
        "guidance_embeds": cfg["guidance_embeds"],
        "transformer_params": count_params(meta_model(SanaTransformer2DModel, cfg)),
        "vae_encoder_params": count_params(vae.encoder),
        "vae_decoder_params": count_params(vae.decoder),
    }


def preset_table() -> str:
    """Markdown table of every preset (for docs)."""
    rows = [describe_preset(n) for n in PRESETS]
    head = "| preset | role | res | latent | tokens | layers | width | heads | cross | params |\n|---|---|---|---|---|---|---|---|---|---|"
    lines = [
        f"| {r['name']} | {r['role']} | {r['resolution']} | {'x'.join(map(str, r['latent_shape']))} | {r['image_tokens']} "
        f"| {r['layers']} | {r['width']} | {r['heads']} | {r['cross_heads']} | {r['transformer_params'] / 1e9:.3f} B |"
        for r in rows
    ]
    return "\n".join([head, *lines])


# --- folder inspection (cheap: JSON and safetensors headers only) ---------------------------------


def component_dir(folder: str | Path, sub: str) -> Path:
    """``folder/sub`` for a pipeline folder, else ``folder`` itself; raises if neither has a config.json."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"{sub} folder not found: {folder}")
    for cand in (folder / sub, folder):
        if (cand / "config.json").is_file():
            return cand
    raise ModelFolderError(f"no config.json in {folder} or {folder / sub}: not a diffusers {sub} folder")


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path / 'config.json'} is not valid JSON: {e}") from e


def weight_files(path: Path, kind: Literal["diffusers", "transformers"]) -> list[Path]:
    """The weight files of a component folder (all shards of a sharded checkpoint)."""
    for name in WEIGHT_NAMES[kind]:
        f = path / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ModelFolderError(f"{path}: shards listed in {name} are missing: {', '.join(missing[:_MAX_LISTED])}")
            return [path / s for s in shards]
        return [f]
    raise ModelFolderError(f"no weights in {path}: expected one of {', '.join(WEIGHT_NAMES[kind])}")


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from safetensors headers (no tensor data read); None for pickle checkpoints."""
    from safetensors import safe_open

    if any(f.suffix != ".safetensors" for f in files):
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: Path) -> None:
    """Raise a UserError naming missing, unexpected and differently shaped tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: config {expected[k]} vs weights {found[k]}" for k in sorted(set(expected) & set(found))
             if tuple(expected[k]) != tuple(found[k])]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:_MAX_LISTED])})")
    if missing:
        problems.append(f"{len(missing)} tensors missing from the weights ({', '.join(missing[:_MAX_LISTED])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config has no place for ({', '.join(unexpected[:_MAX_LISTED])})")
    if problems:
        raise UserError(f"{where}: config.json and weights disagree: " + "; ".join(problems))


def _inspect(folder, sub: str, cls, class_names: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """Config + weight-shape validation of a diffusers component folder, against a meta-device model."""
    path = component_dir(folder, sub)
    config = read_config(path)
    name = config.get("_class_name")
    if name not in class_names:
        raise UserError(f"{path}: config.json describes {name!r}, expected {' or '.join(class_names)}")
    files = weight_files(path, "diffusers")
    found = checkpoint_shapes(files)
    if found is not None:
        init = presets.init_kwargs(config)
        try:
            meta = meta_model(cls, init)
        except TypeError as e:
            raise UserError(f"{path}: config.json has arguments {cls.__name__} does not take: {e}") from e
        check_shapes({k: tuple(v.shape) for k, v in meta.state_dict().items()}, found, path)
    return path, config


def inspect_transformer(folder) -> tuple[Path, dict[str, Any]]:
    from diffusers import SanaTransformer2DModel

    return _inspect(folder, "transformer", SanaTransformer2DModel, ("SanaTransformer2DModel",))


def inspect_vae(folder) -> tuple[Path, dict[str, Any]]:
    from diffusers import AutoencoderDC

    return _inspect(folder, "vae", AutoencoderDC, ("AutoencoderDC",))


def inspect_text_encoder(folder) -> tuple[Path, Path, dict[str, Any]]:
    """(model dir, tokenizer dir, config) of a transformers text-encoder folder."""
    path = component_dir(folder, "text_encoder")
    config = read_config(path)
    if "hidden_size" not in config:
        raise UserError(f"{path}: config.json has no hidden_size: not a text encoder")
    weight_files(path, "transformers")
    tok = path.parent / "tokenizer" if path.name == "text_encoder" and (path.parent / "tokenizer").is_dir() else path
    if not any((tok / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.txt")):
        raise ModelFolderError(f"no tokenizer files (tokenizer.json / tokenizer.model) in {tok}")
    return path, tok, config


def check_compatible(
    transformer_config: dict[str, Any],
    vae_config: dict[str, Any] | None = None,
    text_hidden_size: int | None = None,
    resolution: int | None = None,
    strict_resolution: bool = True,
) -> None:
    """Raise a UserError listing every way the three components (and the resolution) do not fit."""
    tc = transformer_config
    problems = []
    if text_hidden_size is not None and int(tc["caption_channels"]) != int(text_hidden_size):
        problems.append(
            f"transformer caption_channels={tc['caption_channels']} but the text encoder's hidden_size={text_hidden_size}"
        )
    if vae_config is not None:
        if int(tc["in_channels"]) != int(vae_config["latent_channels"]):
            problems.append(f"transformer in_channels={tc['in_channels']} but the VAE has latent_channels={vae_config['latent_channels']}")
        out = tc.get("out_channels") or tc["in_channels"]
        if int(out) != int(vae_config["latent_channels"]):
            problems.append(f"transformer out_channels={out} but the VAE has latent_channels={vae_config['latent_channels']}")
    patch = int(tc.get("patch_size", 1))
    if int(tc["sample_size"]) % patch:
        problems.append(f"transformer sample_size={tc['sample_size']} is not a multiple of patch_size={patch}")
    if resolution is not None and vae_config is not None:
        comp = presets.vae_compression(vae_config)
        if resolution % (comp * patch):
            problems.append(f"resolution {resolution} is not a multiple of VAE compression x patch = {comp}x{patch}")
        elif strict_resolution and resolution // comp != int(tc["sample_size"]):
            problems.append(
                f"resolution {resolution} gives {resolution // comp}x{resolution // comp} latents but the transformer "
                f"was configured for sample_size={tc['sample_size']} ({int(tc['sample_size']) * comp} px)"
            )
    if problems:
        raise UserError("incompatible components: " + "; ".join(problems))


# --- loading ------------------------------------------------------------------------------------


def _place(model, dtype, device):
    if device is not None:
        model = model.to(device)
    return model.to(dtype) if dtype is not None else model


def load_transformer(folder, dtype: torch.dtype | None = torch.float32, device=None):
    """A validated ``SanaTransformer2DModel`` from a transformer folder or a pipeline folder."""
    from diffusers import SanaTransformer2DModel

    path, config = inspect_transformer(folder)
    check_compatible(config)
    return _place(SanaTransformer2DModel.from_pretrained(str(path), torch_dtype=dtype), None, device).eval()


def load_vae(folder, dtype: torch.dtype | None = torch.float32, device=None):
    """A validated ``AutoencoderDC`` from a vae folder or a pipeline folder."""
    from diffusers import AutoencoderDC

    path, _ = inspect_vae(folder)
    return _place(AutoencoderDC.from_pretrained(str(path), torch_dtype=dtype), None, device).eval()


def load_gemma(
    folder,
    max_length: int | None = None,
    complex_human_instruction: list[str] | None = None,
    dtype: torch.dtype | None = torch.float32,
    device=None,
):
    """A :class:`~sana_sprint.text_gemma.GemmaPromptEncoder` (Gemma-2 decoder + tokenizer) from a folder."""
    from transformers import AutoModel, AutoTokenizer

    from .text_gemma import GEMMA_MAX_LENGTH, GemmaPromptEncoder

    path, tok_path, config = inspect_text_encoder(folder)
    if not str(config.get("model_type", "")).startswith("gemma"):
        raise UserError(f"{path}: model_type {config.get('model_type')!r} is not a Gemma model")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
    model = _place(AutoModel.from_pretrained(str(path), dtype=dtype), None, device)
    return GemmaPromptEncoder(
        tokenizer, model, max_length=max_length or GEMMA_MAX_LENGTH, complex_human_instruction=complex_human_instruction
    )


def is_gemma_folder(folder) -> bool:
    try:
        path = component_dir(folder, "text_encoder")
    except ModelFolderError:
        return False
    return str(read_config(path).get("model_type", "")).startswith("gemma")


def load_any_text_encoder(spec, max_length: int | None = None, device=None, complex_human_instruction=None):
    """A Gemma folder -> :func:`load_gemma`; anything else (a package name, a BERT folder) -> ``text.load_text_encoder``."""
    from .text import DEFAULT_MAX_LENGTH, load_text_encoder

    if Path(str(spec)).expanduser().is_dir() and is_gemma_folder(spec):
        return load_gemma(spec, max_length=max_length, complex_human_instruction=complex_human_instruction, device=device)
    return load_text_encoder(spec, max_length=max_length or DEFAULT_MAX_LENGTH, device=device)


@dataclass
class Components:
    transformer: Any = None
    vae: Any = None
    text_encoder: Any = None


def load_components(
    transformer=None,
    vae=None,
    text_encoder=None,
    resolution: int | None = None,
    dtype: torch.dtype | None = torch.float32,
    device=None,
    strict_resolution: bool = True,
) -> Components:
    """Validate every given folder and their fit (configs and headers only), then load them."""
    t = inspect_transformer(transformer)[1] if transformer is not None else None
    v = inspect_vae(vae)[1] if vae is not None else None
    hidden = inspect_text_encoder(text_encoder)[2]["hidden_size"] if text_encoder is not None else None
    if t is not None:
        check_compatible(t, v, hidden, resolution, strict_resolution)
    return Components(
        transformer=load_transformer(transformer, dtype, device) if transformer is not None else None,
        vae=load_vae(vae, dtype, device) if vae is not None else None,
        text_encoder=load_any_text_encoder(text_encoder, device=device) if text_encoder is not None else None,
    )
