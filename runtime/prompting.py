"""Prompt text → token ids, once per request: chat format from the recipe, tokenizer from the engine dir."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from toolkit.recipes import Recipe
from toolkit.recipes.chat_format import ChatFormatError, render_chat, render_fim, render_raw_prompt
from toolkit.runtime.errors import InvalidRequestError


def load_tokenizer(engine_dir: Path):
    """The engine directory's Hugging Face fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(engine_dir), fix_mistral_regex=False)


class PromptBuilder:
    """Renders and tokenizes prompts; knows the model's end-of-sequence ids."""

    def __init__(self, tokenizer, recipe: Recipe):
        self.tokenizer = tokenizer
        self.recipe = recipe
        vocab = tokenizer.get_vocab()
        ids = {vocab[t] for t in recipe.stop_tokens if t in vocab}
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(ids)
        self.vocab_size = len(tokenizer)  # len() of a fast tokenizer rebuilds its vocabulary: ~130 ms at 262k tokens

    def render(self, messages: list[dict[str, str]] | None = None, prompt: str | None = None, raw: bool = False) -> str:
        """The prompt text for chat ``messages`` or a plain ``prompt`` (``raw`` skips the BOS/template)."""
        if messages is not None:
            try:
                return render_chat(self.recipe.chat_format, messages)
            except ChatFormatError as exc:
                raise InvalidRequestError(str(exc), param="messages") from None
        if prompt is None:
            raise InvalidRequestError("one of messages or prompt is required", param="prompt")
        return prompt if raw else render_raw_prompt(self.recipe.chat_format, prompt)

    def encode(self, messages: list[dict[str, str]] | None = None, prompt: str | None = None,
               raw: bool = False) -> list[int]:
        """Render (chat format or plain prompt) and tokenize: the request's prompt ids, done once per request."""
        ids = self.tokenizer(self.render(messages, prompt, raw), add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return list(ids)

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """The ids of the recipe's fill-in-the-middle prompt (``InvalidRequestError`` naming ``suffix`` without one)."""
        if not self.recipe.fim:
            raise InvalidRequestError(f"suffix (fill-in-the-middle) is not supported by {self.recipe.hf_id}: "
                                      "its recipe has no FIM prompt format", param="suffix")
        text = render_fim(self.recipe.chat_format, self.recipe.fim, prefix, suffix)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids (special tokens kept unless asked), e.g. to echo a token-id prompt."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def check_ids(self, prompt_ids: Sequence[int]) -> None:
        """Refuse an empty prompt or an id outside the vocabulary (a bad id would fail the whole batch's step)."""
        if not prompt_ids or min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be non-empty ids in [0, {self.vocab_size})", param="prompt")

    def token_text(self, token_id: int) -> str:
        """Text of one token on its own (for logprobs)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token: ``<0xNN>`` byte-fallback pieces and byte-level pieces give their real bytes."""
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if (match := _BYTE_PIECE.fullmatch(piece)) is not None:
            return bytes([int(match.group(1), 16)])
        if self._byte_level:
            table = _unicode_to_bytes()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def _byte_level(self) -> bool:
        decoder = self.tokenizer.backend_tokenizer.decoder
        return decoder is not None and "ByteLevel" in type(decoder).__name__


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(visible), 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(visible, codes)}
