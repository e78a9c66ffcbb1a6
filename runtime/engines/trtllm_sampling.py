"""Map the toolkit's ``SamplingParams`` onto TensorRT-LLM 1.2.x's LLM-API ``SamplingParams``.

TensorRT-LLM names used (``tensorrt_llm.llmapi``; the same classes as ``tensorrt_llm.sampling_params``):
``SamplingParams(max_tokens, n, temperature, top_k, top_p, min_p, repetition_penalty,
presence_penalty, frequency_penalty, seed, stop, stop_token_ids, include_stop_str_in_output,
ignore_eos, logprobs, detokenize, guided_decoding)`` and ``GuidedDecodingParams(json=...)`` /
``GuidedDecodingParams(json_object=True)``.

Rules that shape the mapping:

* Greedy. TensorRT-LLM decodes greedily when ``top_k == 1`` (in every 1.x release; ``temperature=0``
  only counts as greedy in later ones), and treats a request with none of temperature/top_k/top_p
  set as greedy too. So a greedy request sends ``top_k=1`` and no temperature/top_p/min_p, and a
  sampled request always sends ``temperature`` and ``top_p``.
* The LLM API rejects ``n > 1`` with greedy decoding (``best_of > 1``), so a greedy request runs
  once (``n=1``) and the engine returns ``n`` copies of that one sequence.
* Stops. The LLM API fills ``end_id`` (the tokenizer's EOS) itself and only tokenizes ``stop``
  strings when ``end_id`` is left unset, so ``end_id`` is never sent; the recipe's other stop
  tokens travel in ``stop_token_ids``. The toolkit detokenizes (``detokenize=False``) and applies
  stop strings on the text itself, so TensorRT-LLM must keep the stop tokens
  (``include_stop_str_in_output=True``); its own stop matching only ends generation early.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from typing import Any, Iterable

from toolkit.runtime.sampling_params import InvalidParameterError, SamplingParams

SUPPORT_TABLE: list[tuple[str, str, str]] = [
    ("max_tokens", "max_tokens", "supported; prompt + max_tokens must fit the engine's max_seq_len "
     "(the toolkit answers PromptTooLongError before submitting)"),
    ("temperature", "temperature", "supported; 0 (< 1e-5) is sent as top_k=1 (greedy) without temperature"),
    ("top_p", "top_p", "supported; always sent when sampling (TensorRT-LLM treats an unset top_p and top_k as greedy)"),
    ("top_k", "top_k", "supported; 0 (all tokens) is not sent; top_k=1 is greedy decoding"),
    ("min_p", "min_p", "supported; sent when > 0"),
    ("repetition_penalty", "repetition_penalty", "supported; sent when != 1 (multiplicative, "
     "over prompt and output tokens)"),
    ("presence_penalty", "presence_penalty", "partial: TensorRT-LLM also counts prompt tokens unless its "
     "SamplingParams has prompt_ignore_length (newer releases), which the toolkit then sets to the prompt length"),
    ("frequency_penalty", "frequency_penalty", "partial: as presence_penalty"),
    ("seed", "seed", "supported (per-request RNG seed); a seeded request repeats on TensorRT-LLM, "
     "but not token-for-token with the ONNX engine (different RNG and kernels); an unseeded sampled request "
     "gets a fresh random seed (TensorRT-LLM's unset seed is 0, which would repeat the same text)"),
    ("stop", "stop + include_stop_str_in_output=True", "supported; TensorRT-LLM ends on the tokenized stop "
     "strings, the toolkit's detokenizer cuts the text before the first stop string (never emitting part "
     "of it) and aborts the request if TensorRT-LLM has not stopped"),
    ("stop_token_ids", "stop_token_ids", "supported; the recipe's stop tokens are added unless ignore_eos; "
     "the tokenizer's EOS is TensorRT-LLM's end_id (set by the LLM API)"),
    ("ignore_eos", "ignore_eos", "supported (end_id=-1); some TensorRT-LLM releases then also drop stop "
     "words, so the toolkit enforces stop and stop_token_ids itself"),
    ("n", "n (best_of = n)", "supported when sampling; greedy requests run once and return n identical "
     "choices (the LLM API rejects n > 1 with greedy decoding)"),
    ("logprobs", "logprobs = max(1, top_logprobs)", "supported on engines exported with "
     "`--logprobs` (others answer 400, param logprobs/top_logprobs); the TensorRT backend computes them from "
     "generation logits (LLM(gather_generation_logits=True)) as a log-softmax of the raw model logits, "
     "before penalties, temperature and the JSON grammar, like the ONNX engine"),
    ("top_logprobs", "logprobs = K", "supported (0..20); TensorRT-LLM returns the top K plus the sampled "
     "token; with top_logprobs=0 it is asked for K=1 and the alternatives are dropped"),
    ("json_schema", "guided_decoding = GuidedDecodingParams(json=schema)", "supported through xgrammar "
     "(LLM(guided_decoding_backend='xgrammar')); schema keywords outside xgrammar's subset are rejected or ignored by it"),
    ("json_object", "guided_decoding = GuidedDecodingParams(json_object=True)", "partial: xgrammar's "
     "built-in JSON grammar, which may also admit a top-level JSON array (not verified on a GPU)"),
    ("logit_bias", "embedding_bias (a dense [vocab] torch tensor)", "supported when the engine passes its "
     "vocabulary size to build_trtllm_sampling_params; otherwise refused with a 400 naming logit_bias"),
    ("min_tokens", "min_tokens", "supported; sent when > 0 (TensorRT-LLM bans its end_id and stop tokens until then)"),
    ("include_stop_str_in_output", "(none; always True upstream)", "refused with a 400 when true: the "
     "TensorRT-LLM stream converter drops the stop string/token from the text"),
    ("skip_special_tokens", "(none; detokenize=False)", "refused with a 400 when false: the TensorRT-LLM stream "
     "converter's detokenizer skips special tokens"),
]
"""(toolkit field, TensorRT-LLM field, support) for every toolkit sampling parameter (README table)."""

SEED_BITS = 63
"""Unseeded sampled requests get a random seed below 2**63 (TensorRT-LLM's seed is a uint64)."""

_SEEDS = random.SystemRandom()

FIXED_KWARGS: dict[str, Any] = {"include_stop_str_in_output": True, "detokenize": False}
"""Sent with every request: the toolkit detokenizes and applies stop strings itself."""


def is_greedy(params: SamplingParams) -> bool:
    """True when the request decodes by argmax: temperature 0 or top_k 1."""
    return params.greedy or params.top_k == 1


def trtllm_n(params: SamplingParams) -> int:
    """Sequences TensorRT-LLM generates: ``n`` when sampling, 1 when greedy (copied ``n`` times)."""
    return 1 if is_greedy(params) else params.n


def stop_token_ids(params: SamplingParams, eos_ids: Iterable[int] = ()) -> list[int]:
    """The request's stop tokens, then the model's end-of-sequence ids (unless ``ignore_eos``)."""
    ids = list(params.stop_token_ids)
    if not params.ignore_eos:
        ids += [int(t) for t in sorted(set(eos_ids)) if int(t) not in ids]
    return ids


def _decoding_kwargs(params: SamplingParams) -> dict[str, Any]:
    if is_greedy(params):
        return {"top_k": 1}
    kwargs: dict[str, Any] = {"temperature": float(params.temperature), "top_p": float(params.top_p)}
    if params.top_k > 0:
        kwargs["top_k"] = int(params.top_k)
    if params.min_p > 0:
        kwargs["min_p"] = float(params.min_p)
    return kwargs


def _penalty_kwargs(params: SamplingParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = float(params.repetition_penalty)
    if params.presence_penalty != 0.0:
        kwargs["presence_penalty"] = float(params.presence_penalty)
    if params.frequency_penalty != 0.0:
        kwargs["frequency_penalty"] = float(params.frequency_penalty)
    return kwargs


def guided_decoding_kwargs(params: SamplingParams) -> dict[str, Any] | None:
    """``GuidedDecodingParams`` keyword arguments for a JSON-constrained request, else None."""
    if params.json_schema is not None:
        return {"json": dict(params.json_schema)}
    if params.json_object:
        return {"json_object": True}
    return None


def to_trtllm_sampling_kwargs(params: SamplingParams, eos_ids: Iterable[int] = ()) -> dict[str, Any]:
    """TensorRT-LLM ``SamplingParams`` keyword arguments for ``params`` (pure; see ``SUPPORT_TABLE``).

    ``eos_ids``: the model's end-of-sequence ids (tokenizer EOS and recipe stop tokens).
    ``guided_decoding``, when present, holds ``GuidedDecodingParams`` keyword arguments.
    """
    kwargs: dict[str, Any] = {"max_tokens": int(params.max_tokens), "n": trtllm_n(params)}
    kwargs.update(_decoding_kwargs(params))
    kwargs.update(_penalty_kwargs(params))
    if params.seed is not None:
        kwargs["seed"] = int(params.seed)
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if stops := stop_token_ids(params, eos_ids):
        kwargs["stop_token_ids"] = stops
    kwargs["ignore_eos"] = bool(params.ignore_eos)
    if params.min_tokens:
        kwargs["min_tokens"] = int(params.min_tokens)
    if params.logit_bias:
        kwargs["embedding_bias"] = {int(t): float(b) for t, b in params.logit_bias.items()}
    if params.include_stop_str_in_output:
        raise InvalidParameterError("include_stop_str_in_output",
                                    "include_stop_str_in_output is not supported on TensorRT-LLM engines")
    if not params.skip_special_tokens:
        raise InvalidParameterError("skip_special_tokens",
                                    "skip_special_tokens=false is not supported on TensorRT-LLM engines")
    if params.logprobs:
        kwargs["logprobs"] = max(1, int(params.top_logprobs))
    if (guided := guided_decoding_kwargs(params)) is not None:
        kwargs["guided_decoding"] = guided
    kwargs.update(FIXED_KWARGS)
    return kwargs


def draw_seed() -> int:
    """A fresh random per-request seed for an unseeded sampled request."""
    return _SEEDS.getrandbits(SEED_BITS)


def _field_names(cls: Any) -> frozenset[str]:
    if dataclasses.is_dataclass(cls):
        return frozenset(f.name for f in dataclasses.fields(cls))
    try:
        return frozenset(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return frozenset()


def build_trtllm_sampling_params(trtllm_module: Any, params: SamplingParams, eos_ids: Iterable[int] = (),
                                 prompt_len: int = 0, vocab_size: int = 0) -> Any:
    """A ``trtllm_module.SamplingParams`` for ``params`` (``trtllm_module``: ``tensorrt_llm.llmapi``).

    ``logit_bias`` becomes ``embedding_bias``, a dense ``[vocab_size]`` float tensor; without
    ``vocab_size`` it is refused (``InvalidParameterError`` naming ``logit_bias``).

    An unseeded sampled request gets a fresh random ``seed`` (``draw_seed``): TensorRT-LLM treats an
    unset seed as 0, so without one identical requests at temperature > 0 return identical text.
    When the installed release has ``prompt_ignore_length`` and the request uses presence or
    frequency penalties, it is set to ``prompt_len`` so that those penalties see output tokens only.
    """
    kwargs = to_trtllm_sampling_kwargs(params, eos_ids)
    if "seed" not in kwargs and not is_greedy(params):
        kwargs["seed"] = draw_seed()
    guided = kwargs.pop("guided_decoding", None)
    if (bias := kwargs.pop("embedding_bias", None)) is not None:
        kwargs["embedding_bias"] = _dense_bias(bias, vocab_size)
    if guided is not None:
        kwargs["guided_decoding"] = trtllm_module.GuidedDecodingParams(**guided)
    uses_additive = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    if uses_additive and prompt_len > 0 and "prompt_ignore_length" in _field_names(trtllm_module.SamplingParams):
        kwargs["prompt_ignore_length"] = int(prompt_len)
    return trtllm_module.SamplingParams(**kwargs)


def _dense_bias(bias: dict[int, float], vocab_size: int) -> Any:
    """``{token: bias}`` as TensorRT-LLM's ``embedding_bias``: a float32 tensor over the vocabulary."""
    if vocab_size <= 0:
        raise InvalidParameterError("logit_bias", "logit_bias is not supported on this TensorRT-LLM engine")
    if max(bias) >= vocab_size:
        raise InvalidParameterError("logit_bias", f"logit_bias token ids must be below the vocabulary size {vocab_size}")
    import torch

    dense = torch.zeros(vocab_size, dtype=torch.float32)
    dense[list(bias)] = torch.tensor(list(bias.values()), dtype=torch.float32)
    return dense
