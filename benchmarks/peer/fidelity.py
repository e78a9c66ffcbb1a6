"""Both sides' fidelity against our fp32 reference: teacher-forced top-1 on the golden positions.

``toolkit validate`` stores, per golden chat (8 of them), the fp32 onnxruntime greedy continuation
of 32 tokens (``reference.json`` in every engine directory, see ``toolkit.export.golden``), and
reports the share of those 8 x 32 positions where the artifact's argmax, fed the reference prefix,
is the reference token (``top1_agreement``). Our int8 engine's number is read from its manifest.

For llama.cpp only its C++ server is at hand, so each position is one ``POST /completion`` with
the prompt as token ids (no BOS is added to a token-id prompt; the chat template already starts
with it), ``n_predict: 1`` and ``n_probs: 1``: without post-sampling probabilities the server
reports the top token of a plain softmax of the logits, i.e. the argmax
(https://github.com/ggml-org/llama.cpp/blob/master/tools/server/README.md, "n_probs").
``cache_prompt`` lets consecutive positions of one chat reuse the KV of the shared prefix, so
the 256 positions take seconds. Both sides use the same tokenizer ids: ours is rebuilt from the
GGUF vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def load_cases(reference_json: Path) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, greedy_ids)`` of the short golden chats (the 8 x 32 positions ``validate`` scores)."""
    data = json.loads(reference_json.read_text())
    return [(list(case["prompt_ids"]), list(case["greedy_ids"])) for case in data["cases"]]


def forced_bodies(prompt_ids: list[int], continuation: list[int]) -> Iterator[tuple[dict[str, Any], int]]:
    """Per position k: the ``/completion`` body for prompt + continuation[:k], and the expected token."""
    for k, expected in enumerate(continuation):
        body = {"prompt": [*prompt_ids, *continuation[:k]], "n_predict": 1, "n_probs": 1, "temperature": 0,
                "cache_prompt": True, "return_tokens": True, "post_sampling_probs": False}
        yield body, expected


def argmax_token(response: dict[str, Any]) -> int:
    """The argmax token id of a ``/completion`` reply made by ``forced_bodies``.

    ``completion_probabilities[0].top_probs[0].id`` when present (the logits' softmax argmax, also
    for an end-of-generation token), else the sampled token of ``tokens`` (greedy: the same)."""
    probs = response.get("completion_probabilities") or []
    if probs:
        top = probs[0].get("top_probs") or probs[0].get("top_logprobs") or []
        if top:
            return int(top[0]["id"])
        if "id" in probs[0]:
            return int(probs[0]["id"])
    tokens = response.get("tokens") or []
    if tokens:
        return int(tokens[0])
    raise ValueError(f"no token in the reply: {json.dumps(response)[:300]}")


def agreement(pairs: list[tuple[int, int]]) -> float:
    """Share of ``(predicted, expected)`` pairs that agree."""
    if not pairs:
        raise ValueError("no positions to score")
    return sum(predicted == expected for predicted, expected in pairs) / len(pairs)


def peer_top1(base_url: str, reference_json: Path, timeout_s: float = 120.0) -> dict[str, Any]:
    """Teacher-forced top-1 of a running llama-server against ``reference_json``."""
    import httpx

    pairs: list[tuple[int, int]] = []
    per_case: list[float] = []
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for prompt_ids, continuation in load_cases(reference_json):
            case_pairs = []
            for body, expected in forced_bodies(prompt_ids, continuation):
                response = client.post("/completion", json=body)
                response.raise_for_status()
                case_pairs.append((argmax_token(response.json()), expected))
            per_case.append(agreement(case_pairs))
            pairs += case_pairs
    return {"top1_agreement": agreement(pairs), "positions": len(pairs), "per_case": per_case}


def ours_top1(engine_dir: Path) -> dict[str, Any]:
    """Our engine's teacher-forced top-1 as its export validation stored it in the manifest."""
    manifest = json.loads((engine_dir / "toolkit.json").read_text())
    validation = manifest.get("validation") or {}
    positions = sum(len(greedy) for _, greedy in load_cases(engine_dir / "reference.json"))
    return {"top1_agreement": validation.get("top1_agreement"), "positions": positions,
            "per_case": [case.get("top1_agreement") for case in validation.get("cases") or []],
            "precision": manifest.get("precision"), "source": "its manifest, from `toolkit validate`"}
