"""The golden prompt set and the fp32 onnxruntime reference outputs stored in every engine directory.

``reference.json`` holds, per prompt: the chat-templated prompt ids, the fp32 greedy continuation
and the first step's top-k logits. Every artifact built from the same checkpoint (fp16, int8,
TensorRT-LLM) is validated against it.
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
    """One golden prompt and its fp32 reference outputs."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    greedy_ids: list[int] = field(default_factory=list)
    first_topk_ids: list[int] = field(default_factory=list)
    first_topk_logits: list[float] = field(default_factory=list)


@dataclass
class Reference:
    """The reference file: cases plus how they were produced."""

    chat_format: str
    max_new_tokens: int
    top_k: int
    cases: list[GoldenCase]
    produced_by: str = "onnxruntime fp32"
    pytorch_check: dict | None = None

    def save(self, engine_dir: Path) -> None:
        (engine_dir / REFERENCE_NAME).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, engine_dir: Path) -> "Reference":
        data = json.loads((engine_dir / REFERENCE_NAME).read_text())
        data["cases"] = [GoldenCase(**case) for case in data["cases"]]
        return cls(**data)


def golden_cases(tokenizer, chat_format: str) -> list[GoldenCase]:
    """Chat-template and tokenize the golden prompts (the template carries BOS itself)."""
    cases = []
    for messages in GOLDEN_MESSAGES:
        text = render_chat(chat_format, messages)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cases.append(GoldenCase(messages=[dict(m) for m in messages], prompt_ids=list(ids)))
    return cases


def top_k_of(logits_row: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """Ids and values of the ``k`` largest logits, largest first."""
    k = min(k, logits_row.shape[-1])
    ids = np.argpartition(-logits_row, k - 1)[:k]
    ids = ids[np.argsort(-logits_row[ids], kind="stable")]
    return ids.tolist(), logits_row[ids].astype(float).tolist()


def build_reference(runner, cases: list[GoldenCase], chat_format: str, max_new_tokens: int = GREEDY_TOKENS) -> Reference:
    """Run every case through the fp32 ``runner`` (an ``OrtCausalLM``) and record the outputs."""
    for case in cases:
        case.greedy_ids, first = runner.greedy(case.prompt_ids, max_new_tokens)
        case.first_topk_ids, case.first_topk_logits = top_k_of(first, TOP_K)
    return Reference(chat_format=chat_format, max_new_tokens=max_new_tokens, top_k=TOP_K, cases=cases)
