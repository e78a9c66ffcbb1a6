"""The golden prompt set and the fp32 onnxruntime reference outputs stored in every engine directory.

``reference.json`` holds, per prompt: the chat-templated prompt ids, the fp32 greedy continuation
and the first step's top-k logits. Every artifact built from the same checkpoint (fp16, int8,
TensorRT-LLM) is validated against it.

Two sets: the 8 short chats (``cases``) and the long prompts (``long_cases``), built per checkpoint
from a target length (``long_prompt_target``: 2,304 tokens, or 80 % of a smaller context): a
numbered locker inventory followed by a request to repeat its lines 2-4 verbatim, so the
continuation depends on tokens more than a sliding window (Gemma 3: 512) before the end. An engine
that ignores the window, truncates attention or mishandles long context fails on them while the
short chats, all shorter than any window, still pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from toolkit.artifact.layout import REFERENCE_NAME
from toolkit.recipes.chat_format import render_chat

GREEDY_TOKENS = 32
TOP_K = 64
LONG_PROMPT_TOKENS = 2304  # > 2,048 and > the default model's 512-token sliding window
LONG_CONTEXT_SHARE = 0.8  # cap as a share of the context (tiny checkpoints, context 512: 409 tokens)
# Part of every export's build key (sources.build_key): a changed golden set means a new reference.
GOLDEN_REVISION = "short8+long-lockers-1"

GOLDEN_MESSAGES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Write a Python function that reverses a string."},),
    ({"role": "user", "content": "What is the capital of France?"},),
    (
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Explain what a hash table is in two sentences."},
    ),
    ({"role": "user", "content": "List three prime numbers greater than 100."},),
    ({"role": "user", "content": "Translate 'good morning' into German and Japanese (おはよう)."},),
    (
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a short joke about computers."},
    ),
    ({"role": "user", "content": "Write a SQL query selecting all users older than 30."},),
    ({"role": "user", "content": "Summarize the plot of Romeo and Juliet in one sentence."},),
)


@dataclass
class GoldenCase:
    """One golden prompt and its fp32 reference outputs (``name``: its row in the validation table)."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    greedy_ids: list[int] = field(default_factory=list)
    first_topk_ids: list[int] = field(default_factory=list)
    first_topk_logits: list[float] = field(default_factory=list)
    name: str = ""


@dataclass
class Reference:
    """The reference file: cases plus how they were produced."""

    chat_format: str
    max_new_tokens: int
    top_k: int
    cases: list[GoldenCase]
    produced_by: str = "onnxruntime fp32"
    pytorch_check: dict | None = None
    long_cases: list[GoldenCase] = field(default_factory=list)  # absent from references older than the long set
    long_prompt_target: int | None = None
    sliding_window: int | None = None

    def all_cases(self) -> list[GoldenCase]:
        """The short chats, then the long prompts."""
        return [*self.cases, *self.long_cases]

    def save(self, engine_dir: Path) -> None:
        (engine_dir / REFERENCE_NAME).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, engine_dir: Path) -> "Reference":
        data = json.loads((engine_dir / REFERENCE_NAME).read_text())
        data["cases"] = [GoldenCase(**case) for case in data["cases"]]
        data["long_cases"] = [GoldenCase(**case) for case in data.get("long_cases", [])]
        return cls(**data)


def golden_cases(tokenizer, chat_format: str) -> list[GoldenCase]:
    """Chat-template and tokenize the golden prompts (the template carries BOS itself)."""
    cases = []
    for i, messages in enumerate(GOLDEN_MESSAGES):
        text = render_chat(chat_format, messages)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cases.append(GoldenCase(messages=[dict(m) for m in messages], prompt_ids=list(ids), name=str(i)))
    return cases


def sliding_window_of(config: dict) -> int | None:
    """The checkpoint's sliding attention window, or None when no layer uses one (Qwen2 with
    ``use_sliding_window: false``, Llama, Gemma 1)."""
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return None
    layer_types = config.get("layer_types")
    if layer_types and "sliding_attention" not in layer_types:
        return None
    return int(window)


def long_prompt_target(context_length: int) -> int:
    """Token length of the long golden prompt: ``LONG_PROMPT_TOKENS``, or 80 % of a smaller context
    (prompt + ``GREEDY_TOKENS`` must fit)."""
    return min(LONG_PROMPT_TOKENS, int(context_length * LONG_CONTEXT_SHARE), context_length - GREEDY_TOKENS)


_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange")
_ITEMS = ("lamps", "keys", "books", "cups", "maps", "coins", "shells", "pens", "stones", "bells", "rings")
LONG_QUESTION = "Repeat lines 2, 3 and 4 of the inventory above exactly, one per line."


def inventory_line(n: int) -> str:
    """Line ``n`` of the long prompt's inventory: a fact found nowhere else in it (the (count, colour,
    item) triple repeats only every 6,930 lines)."""
    count = (n * 37 + 11) % 90 + 10
    return f"{n}. Locker {n:04d} holds {count} {_COLOURS[(n * 5 + 3) % 7]} {_ITEMS[(n * 3 + 1) % 11]}."


def long_messages(lines: int) -> tuple[dict[str, str], ...]:
    """The long chat: an inventory of ``lines`` numbered lines, then a question about its first lines."""
    body = "\n".join(inventory_line(n) for n in range(1, lines + 1))
    content = f"Here is an inventory of {lines} lockers, one per line.\n\n{body}\n\n{LONG_QUESTION}"
    return ({"role": "user", "content": content},)


def long_golden_cases(tokenizer, chat_format: str, context_length: int) -> list[GoldenCase]:
    """The long golden prompt for this tokenizer: the most inventory lines whose chat-templated prompt
    fits ``long_prompt_target(context_length)`` tokens (deterministic: whole lines are trimmed)."""
    target = long_prompt_target(context_length)

    def ids_for(lines: int) -> list[int]:
        return tokenizer(render_chat(chat_format, long_messages(lines)), add_special_tokens=False)["input_ids"]

    low, high = 4, max(4, target)  # every line is at least one token
    if len(ids_for(low)) > target:
        return []  # a context too small for any long prompt
    while low < high:  # the largest line count that fits
        mid = (low + high + 1) // 2
        if len(ids_for(mid)) <= target:
            low = mid
        else:
            high = mid - 1
    ids = ids_for(low)
    messages = long_messages(low)
    return [GoldenCase(messages=[dict(m) for m in messages], prompt_ids=list(ids), name=f"long {len(ids)}")]


def top_k_of(logits_row: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """Ids and values of the ``k`` largest logits, largest first."""
    k = min(k, logits_row.shape[-1])
    ids = np.argpartition(-logits_row, k - 1)[:k]
    ids = ids[np.argsort(-logits_row[ids], kind="stable")]
    return ids.tolist(), logits_row[ids].astype(float).tolist()


def build_reference(
    runner, cases: list[GoldenCase], chat_format: str, max_new_tokens: int = GREEDY_TOKENS,
    long_cases: list[GoldenCase] | None = None,
) -> Reference:
    """Run every case through the fp32 ``runner`` (an ``OrtCausalLM``) and record the outputs."""
    long_cases = list(long_cases or [])
    for case in [*cases, *long_cases]:
        case.greedy_ids, first = runner.greedy(case.prompt_ids, max_new_tokens)
        case.first_topk_ids, case.first_topk_logits = top_k_of(first, TOP_K)
    return Reference(chat_format=chat_format, max_new_tokens=max_new_tokens, top_k=TOP_K, cases=cases, long_cases=long_cases)


def build_golden_reference(runner, tokenizer, chat_format: str, config: dict, context_length: int) -> Reference:
    """The whole golden set for one checkpoint (short chats + long prompts) through the fp32 ``runner``."""
    reference = build_reference(
        runner, golden_cases(tokenizer, chat_format), chat_format,
        long_cases=long_golden_cases(tokenizer, chat_format, context_length),
    )
    reference.long_prompt_target = long_prompt_target(context_length)
    reference.sliding_window = sliding_window_of(config)
    return reference
