"""Turn a ``GenerateRequest`` into prompt token ids: chat format from the recipe, tokenizer from the engine dir."""

from __future__ import annotations

from pathlib import Path

from toolkit.recipes import Recipe
from toolkit.recipes.chat_format import ChatFormatError, render_chat, render_raw_prompt
from toolkit.runtime.errors import InvalidRequestError
from toolkit.runtime.types import GenerateRequest


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

    def render(self, request: GenerateRequest) -> str:
        """The prompt text for ``messages`` or ``prompt`` (``raw`` skips the BOS/template)."""
        if request.messages is not None:
            try:
                return render_chat(self.recipe.chat_format, request.messages)
            except ChatFormatError as exc:
                raise InvalidRequestError(str(exc), param="messages") from None
        if request.prompt is None:
            raise InvalidRequestError("one of messages, prompt or prompt_ids is required", param="prompt")
        return request.prompt if request.raw else render_raw_prompt(self.recipe.chat_format, request.prompt)

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        """Token ids of the request's prompt."""
        if request.prompt_ids is not None:
            vocab_size = len(self.tokenizer)
            if not request.prompt_ids or any(not 0 <= int(t) < vocab_size for t in request.prompt_ids):
                raise InvalidRequestError(f"prompt_ids must be non-empty ids in [0, {vocab_size})", param="prompt")
            return [int(t) for t in request.prompt_ids]
        ids = self.tokenizer(self.render(request), add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return list(ids)

    def token_text(self, token_id: int) -> str:
        """Text of one token on its own (for logprobs)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
