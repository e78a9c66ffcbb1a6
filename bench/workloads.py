"""Request bodies for workloads that the benchmarks share (speculative decoding, peer comparison).

The *editing workload* is issue 13's yardstick for speculative decoding: a ~440-token Python
source file (``benchmarks/data/inventory.py``, a copy kept in the repository so every side reads
the same bytes), a chat request asking for a small change (rename one method), and OpenAI's
Predicted Outputs field ``prediction`` set to the original file, so most of the answer is known
to the server in advance (https://platform.openai.com/docs/guides/predicted-outputs).

The *free-text workload* is its opposite: an answer that shares little with the prompt, where a
prompt-lookup drafter should find (almost) nothing to propose; it is used to show that
speculation costs at most a few percent when nothing is accepted.

Stdlib only, so any benchmark (including the llama.cpp peer) can import it cheaply.
"""

from __future__ import annotations

from pathlib import Path

EDIT_FILE_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "inventory.py"
EDIT_FILE_TEXT = EDIT_FILE_PATH.read_text(encoding="utf-8")

EDIT_SYSTEM = "You are a code editor. You reply with the complete edited file and nothing else."
EDIT_INSTRUCTION = "Rename `low_stock` to `items_below_reorder_level` in this file:"

FREE_TEXT_QUESTION = (
    "Write a short original story (about 150 words) about a lighthouse keeper who finds a "
    "message in a bottle. Do not use lists or code."
)


def editing_messages() -> list[dict]:
    """The chat messages of the editing workload: a system prompt asking for the whole file back, then the
    instruction and the file in a code block (the default model, gemma-3-270m, copies the file with
    this phrasing; with the instruction alone it drifts into a loop)."""
    return [{"role": "system", "content": EDIT_SYSTEM},
            {"role": "user", "content": f"{EDIT_INSTRUCTION}\n\n```python\n{EDIT_FILE_TEXT}```"}]


def editing_chat_body(model: str, max_tokens: int, prediction: bool = True) -> dict:
    """An OpenAI chat completion body for the editing workload, greedy.

    With ``prediction`` (the default) it carries ``{"type": "content", "content": EDIT_FILE_TEXT}``;
    ``prediction=False`` gives the same request without it (for plain / prompt-lookup runs).
    """
    body = {
        "model": model,
        "messages": editing_messages(),
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if prediction:
        body["prediction"] = {"type": "content", "content": EDIT_FILE_TEXT}
    return body


def free_text_chat_body(model: str, max_tokens: int) -> dict:
    """An OpenAI chat completion body whose answer shares little with its prompt, greedy."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": FREE_TEXT_QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
