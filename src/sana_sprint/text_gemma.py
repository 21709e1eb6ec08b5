"""SANA's text conditioning: the last hidden state of a Gemma-2 decoder, 300 tokens, right padding.

Matches diffusers' ``SanaSprintPipeline.encode_prompt`` (``_get_gemma_prompt_embeds``): prompts are
lower-cased and stripped; with a *complex human instruction* (CHI) the instruction lines, joined by
newlines, are prepended to every prompt, the tokenizer length grows to
``len(tokens(CHI)) + max_length - 2``, and only the tokens ``[0] + range(-max_length + 1, 0)`` are
kept (SANA paper section 3.1: BOS plus the tail that holds the user prompt). The null condition for
CFG is the empty prompt *without* the instruction, as diffusers' ``SanaPipeline`` encodes its
negative prompt.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch

from .text import TextEncoder, preprocess

logger = logging.getLogger(__name__)

GEMMA_MAX_LENGTH = 300  # SANA / SANA-Sprint max_sequence_length


def default_complex_human_instruction() -> list[str]:
    """The instruction diffusers' ``SanaSprintPipeline.__call__`` uses by default (read, not copied)."""
    from diffusers import SanaSprintPipeline

    return list(inspect.signature(SanaSprintPipeline.__call__).parameters["complex_human_instruction"].default)


def select_index(max_length: int) -> list[int]:
    """Token positions kept from the encoder output: BOS + the last ``max_length - 1`` tokens."""
    return [0] + list(range(-max_length + 1, 0))


class GemmaPromptEncoder(TextEncoder):
    """A :class:`~sana_sprint.text.TextEncoder` with SANA's optional complex-human-instruction prefix.

    ``encode(prompts) -> (embeds [B, max_length, hidden] float32, mask [B, max_length] long)``;
    ``null_embedding()`` is the plain empty prompt (no instruction). Works with any decoder whose
    ``model(ids, attention_mask=mask)[0]`` is the last hidden state (``Gemma2Model``).
    """

    def __init__(
        self,
        tokenizer,
        model,
        max_length: int = GEMMA_MAX_LENGTH,
        complex_human_instruction: Sequence[str] | None = None,
        spec: str | None = None,
    ):
        super().__init__(tokenizer, model, max_length=max_length, spec=spec)
        if getattr(getattr(model, "config", None), "use_cache", False):
            model.config.use_cache = False  # encoding, not generation: no key/value cache built on every call
        self.complex_human_instruction = list(complex_human_instruction) if complex_human_instruction else None
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def instruction(self) -> str | None:
        return "\n".join(self.complex_human_instruction) if self.complex_human_instruction else None

    def clear_cache(self) -> None:
        super().clear_cache()
        self._null = None

    def to(self, device) -> GemmaPromptEncoder:
        super().to(device)
        self._null = None
        return self

    @torch.no_grad()
    def _run(self, texts: list[str], instruction: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``_get_gemma_prompt_embeds`` followed by ``encode_prompt``'s token selection."""
        tok = self.tokenizer
        tok.padding_side = "right"
        if instruction is None:
            length = self.max_length
        else:
            texts = [instruction + t for t in texts]
            # diffusers counts the instruction with special tokens, then drops two from the budget.
            length = len(tok.encode(instruction)) + self.max_length - 2
        for text in texts:
            n = len(tok(text, add_special_tokens=True, truncation=False).input_ids)
            if n > length and text not in self._warned:
                self._warned.add(text)
                logger.warning("prompt has %d tokens, truncated to %d: %r", n, length, text[-200:])
        inputs = tok(
            texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt"
        )
        device = self.device
        mask = inputs.attention_mask.to(device)
        embeds = self.model(inputs.input_ids.to(device), attention_mask=mask)[0]
        keep = select_index(self.max_length)
        return embeds[:, keep].float(), mask[:, keep].long()

    def _encode_uncached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(texts, self.instruction)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt without the instruction: [1, L, C] float32, mask [1, L] long."""
        if self._null is None:
            self._null = self._run([preprocess("")], None)
        return self._null
