"""Speculative decoding without a draft model: prompt lookup (n-gram) and OpenAI's Predicted Outputs.

Decoding one token at batch 1 reads every weight once for one token (memory bound, issue 13);
a *verify* step feeds a row's last token plus ``k`` guessed tokens in one run, for about the same
weight traffic, and keeps every guess the model agrees with plus one token of its own, so a step
never yields fewer tokens than plain decoding.

Where the guesses (drafts) come from, per sequence:

- **prediction** (``GenerateRequest.prediction_ids``, OpenAI's ``prediction`` field, tokenized once
  by the adapter): a pointer into the predicted text follows the output; after a mismatch (the
  requested edit) it re-synchronises by finding the output's last ``n`` tokens in the prediction
  (``n`` from ``ngram_max`` down to ``ngram_min``), so the unchanged rest of a file is proposed again.
- **prompt lookup** (transformers' ``prompt_lookup_num_tokens``, vLLM's ``ngram`` proposer:
  https://docs.vllm.ai/en/latest/features/spec_decode.html): the output's last ``n`` tokens are
  looked up in prompt + output and the tokens that followed that occurrence are proposed. A match
  that the previous draft came from is kept while the output keeps following it (the latest
  occurrence otherwise), so a copied file is followed in order rather than jumping between repeats.

Acceptance (``SequenceSampler.sample(draft=...)``): greedy keeps a draft token while it equals the
argmax of the fully processed logits, so the emitted tokens are exactly plain greedy decoding's
(up to batch-invariance of the logits, as for batching). Sampled requests use standard rejection
sampling for a deterministic draft (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192, with
the draft distribution a point mass): accept ``x`` with probability ``p(x)`` under the processed,
truncated distribution, else draw from ``p`` with ``x`` removed, which leaves each token's
distribution exactly ``p``. A seeded sampled request is reproducible run to run but draws a
different random stream than plain decoding (one or two uniforms per token instead of one).

Cost control (the issue's bar: at most 5 % slower when nothing is accepted): a step speculates only
when some row has a draft; each sequence's draft cap ``k`` halves after a fully rejected draft,
doubles after a fully accepted one, and after repeated misses the sequence stops drafting for a
growing number of steps (``cooldown``), so a workload where nothing matches pays for a few probes.

Batches: every row of a verify step feeds the same number of tokens (rows with shorter or no drafts
are padded with their last token and rolled back to what they kept). The optimum graph runs them in
one batch; onnxruntime's CPU GroupQueryAttention refuses several new tokens after a past at batch > 1
(checked on onnxruntime 1.31), so the gqa runner verifies such a batch row by row, each over its own
slot. Either way the padding and the extra runs cost compute, and from about 16 rows a step is
compute-bound (issue 13), so speculation runs only while the batch has at most ``max_batch`` rows
(default 1, the case measured in ``benchmarks/speculative.py``); it is correct at any batch size
(tests/test_speculative.py runs several rows with different drafts on both graphs).

Both exports compute logits for the last position only; ``verify_session`` opens the graph with
the number of last positions as an input, so a verify step gets logits for all of its tokens.

Not speculated: requests under a JSON schema/grammar constraint (the grammar state would have to be
rolled back with the rejected tokens) and engines serving LoRA adapters (the LoRA graph's per-row
adapter inputs are not checked with multi-token steps).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field

import numpy as np

MIN_COOLDOWN = 2
MAX_COOLDOWN = 64


@dataclass(frozen=True)
class SpeculativeConfig:
    """``toolkit serve`` options: prompt lookup and predicted outputs on/off, the largest draft, n-gram sizes, the largest batch.

    ``enabled=False`` opens the graph as exported (no verify steps, ``prediction`` has no effect).
    ``prompt_lookup`` / ``predicted_outputs`` ``None`` (the default): on where a verify run reproduces
    plain decoding (``for_precision``): fp32 engines, and GQA engines whose attention runs on our
    operator (``toolkit.artifact.native_attention``). A verify run feeds several tokens at once, and
    onnxruntime's CPU ``GroupQueryAttention`` sums a several-token query in another order than a
    one-token one; fp32 absorbs that (greedy output token-identical to plain decoding, tested), int8
    activation rounding amplifies it (0.45-0.87 logit units on the default model; 5 of 8 golden chats
    kept plain decoding's tokens with prompt lookup, 4 of 8 with ``prediction``). Our operator computes
    every (query, key) product the same way whatever the number of tokens, and the int8 products are
    row-independent, so there a verify run's logits are bitwise plain decoding's (tests/test_speculative.py).
    OpenAI's Predicted Outputs promise the same completion with or without a prediction, and issue 13
    asks for greedy output identical to plain decoding, so elsewhere (a quantized optimum graph, a CPU
    without AVX-512) both are the operator's opt-in (``--prompt-lookup``, ``--predicted-outputs``):
    there a request's ``prediction`` is accepted and does not change its output, and its usage reports
    no prediction counts. A request with its own ``prediction``, where predicted outputs are on, drafts
    from its prompt too (where the output leaves the prediction).
    """

    enabled: bool = True
    prompt_lookup: bool | None = None
    predicted_outputs: bool | None = None
    max_draft: int = 8
    ngram_max: int = 4
    ngram_min: int = 2
    max_batch: int = 1

    def __post_init__(self) -> None:
        if self.max_draft < 1 or not 1 <= self.ngram_min <= self.ngram_max or self.max_batch < 1:
            raise ValueError("need max_draft >= 1, 1 <= ngram_min <= ngram_max and max_batch >= 1")

    @property
    def speculates(self) -> bool:
        """Whether anything can be drafted: speculation enabled and prompt lookup or predicted outputs on
        (an engine with neither opens the graph as exported and runs no speculator)."""
        return self.enabled and bool(self.prompt_lookup or self.predicted_outputs)

    def for_precision(self, precision: str, exact_verify: bool = False) -> SpeculativeConfig:
        """This config with ``prompt_lookup`` / ``predicted_outputs`` ``None`` decided for an engine of ``precision``
        (class doc); ``exact_verify``: its verify runs reproduce plain decoding bitwise whatever the precision."""
        exact = precision == "fp32" or exact_verify
        return dataclasses.replace(self, prompt_lookup=exact if self.prompt_lookup is None else self.prompt_lookup,
                                   predicted_outputs=exact if self.predicted_outputs is None else self.predicted_outputs)


def find_continuation(history: np.ndarray, end: int, source: np.ndarray, ngram_max: int, ngram_min: int,
                      limit: int) -> int | None:
    """Index in ``source`` right after the latest occurrence of the last ``n`` tokens of ``history[:end]``
    (``n`` from ``ngram_max`` down to ``ngram_min``) that has something after it within ``limit``;
    None when no suffix occurs.

    ``limit`` bounds where an occurrence may end (prompt lookup: before the suffix itself).
    """
    for n in range(min(ngram_max, end), ngram_min - 1, -1):
        suffix = history[end - n:end]
        last = min(limit, source.size - 1)  # an occurrence must end before `last` so a token follows it
        if last < n:
            continue
        starts = np.flatnonzero(source[: last - n + 1] == suffix[0])
        for offset in range(1, n):
            if not starts.size:
                break
            starts = starts[source[starts + offset] == suffix[offset]]
        if starts.size:
            return int(starts[-1]) + n
    return None


@dataclass
class DraftState:
    """One sequence's drafting state: its adaptive draft cap and where its drafts come from."""

    k: int
    cooldown: int = 0
    misses: int = 0
    prediction: np.ndarray | None = None
    pred_pos: int | None = 0
    """Index in ``prediction`` of the token expected next, or None while out of sync."""
    synced: int = 0
    """Output tokens ``pred_pos`` has followed."""
    lookup_pos: int | None = None
    """Index in prompt + output of the token the last prompt-lookup draft expected next."""
    source: str = ""
    """"prediction" or "lookup": where the current draft came from."""
    accepted_prediction: int = 0
    """Output tokens the prediction foresaw (``prediction_counts``)."""
    rejected_prediction: int = 0
    """Prediction tokens drafted and discarded."""
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Prompt + output ids (grown in place, doubling) for the n-gram searches."""
    history_len: int = 0


class Speculator:
    """Proposes drafts for the running rows and adapts each sequence's draft cap to its acceptance."""

    def __init__(self, config: SpeculativeConfig):
        if config.prompt_lookup is None or config.predicted_outputs is None:
            raise ValueError("decide prompt_lookup and predicted_outputs for the engine first (SpeculativeConfig.for_precision)")
        self.config = config
        self._states: dict[str, DraftState] = {}
        self.drafted = 0
        self.accepted = 0

    def state(self, seq) -> DraftState:
        """The sequence's drafting state, created on first use."""
        state = self._states.get(seq.seq_id)
        if state is None:
            prediction = seq.group.request.prediction_ids if self.config.predicted_outputs else None
            state = DraftState(k=self.config.max_draft,
                               prediction=np.asarray(prediction, np.int64) if prediction else None)
            self._states[seq.seq_id] = state
        return state

    @staticmethod
    def eligible(seq) -> bool:
        """Whether ``seq`` may speculate (no JSON/grammar constraint: see the module docstring)."""
        return seq.sampler.constraint is None

    def drafts(self, running: list, budgets: list[int]) -> list[list[int]] | None:
        """One draft per running row (possibly empty), or None when no row has one (then decode plainly).

        ``budgets[i]``: tokens row i may still emit; a draft is at most one shorter, so the verify
        step's bonus token still fits.
        """
        if len(running) > self.config.max_batch:
            return None
        if len(self._states) > 4 * len(running) + 16:  # forget finished sequences
            alive = {seq.seq_id for seq in running}
            self._states = {key: value for key, value in self._states.items() if key in alive}
        drafts = [self._draft(seq, budget) if self.eligible(seq) else [] for seq, budget in zip(running, budgets)]
        return drafts if any(drafts) else None

    def _draft(self, seq, budget: int) -> list[int]:
        state = self.state(seq)
        limit = min(state.k, budget - 1)
        if limit < 1:
            return []
        if state.cooldown > 0:
            state.cooldown -= 1
            return []
        sources = ["prediction"] if state.prediction is not None else []
        # prompt lookup: on by the engine's config, or for a request that asked for speculation with a
        # prediction (its fallback where the output leaves the prediction); the source whose last draft
        # failed outright goes second
        if self.config.prompt_lookup or state.prediction is not None:
            sources.insert(0 if state.source == "prediction" and state.misses else len(sources), "lookup")
        for source in sources:
            draft = (self._from_prediction(state, seq.output_ids, limit) if source == "prediction"
                     else self._from_lookup(state, seq, limit))
            if draft:
                state.source = source
                return draft
        state.source = ""
        return []

    def _from_prediction(self, state: DraftState, output: list[int], limit: int) -> list[int]:
        self._sync_prediction(state, output)
        if state.pred_pos is None:
            state.pred_pos = self._resync(state.prediction, output, len(output))
        if state.pred_pos is None:
            return []
        return state.prediction[state.pred_pos:state.pred_pos + limit].tolist()

    def _resync(self, prediction: np.ndarray, output: list[int], end: int) -> int | None:
        """Where in the prediction the output continues, from its last n tokens before ``end``."""
        if end < self.config.ngram_min:
            return None
        tail = np.asarray(output[max(0, end - self.config.ngram_max):end], np.int64)
        return find_continuation(tail, tail.size, prediction, self.config.ngram_max, self.config.ngram_min,
                                 prediction.size)

    def _sync_prediction(self, state: DraftState, output: list[int]) -> None:
        """Follow the tokens emitted since the last call through the prediction, counting those it predicted."""
        prediction = state.prediction
        for i in range(state.synced, len(output)):
            pos = state.pred_pos if state.pred_pos is not None else self._resync(prediction, output, i)
            if pos is not None and pos < prediction.size and prediction[pos] == output[i]:
                state.pred_pos = pos + 1
                state.accepted_prediction += 1
            else:
                state.pred_pos = None
        state.synced = len(output)

    def _history(self, state: DraftState, seq) -> np.ndarray:
        prompt, output = seq.group.prompt_ids, seq.output_ids
        total = len(prompt) + len(output)
        if state.history.size < total:
            grown = np.zeros(max(2 * total, 64), np.int64)
            grown[:len(prompt)] = prompt
            state.history, state.history_len = grown, len(prompt)
        if state.history_len < total:
            start = state.history_len - len(prompt)
            state.history[state.history_len:total] = output[start:]
            state.history_len = total
        return state.history

    def _from_lookup(self, state: DraftState, seq, limit: int) -> list[int]:
        history = self._history(state, seq)
        end, n = state.history_len, self.config.ngram_min
        pos = state.lookup_pos  # keep following the occurrence the last draft came from while it matches
        if pos is None or pos >= end - 1 or pos < n or not np.array_equal(history[pos - n:pos], history[end - n:end]):
            pos = find_continuation(history, end, history, self.config.ngram_max, n, end - 1)
        state.lookup_pos = pos
        if pos is None:
            return []
        return history[pos:min(pos + limit, end)].tolist()

    def record(self, seq, draft: list[int], emitted: list[int]) -> None:
        """After a verify step that emitted ``emitted`` for ``draft``: count prediction tokens for
        ``usage.completion_tokens_details``, move the lookup pointer and adapt the draft cap.

        The accepted drafts are the leading tokens ``emitted`` shares with ``draft``: the token
        after them is the model's own (a correction never equals the draft token it replaces).
        """
        if not draft:
            return
        state = self.state(seq)
        accepted = 0
        while accepted < min(len(draft), len(emitted)) and emitted[accepted] == draft[accepted]:
            accepted += 1
        if state.source == "prediction":
            state.rejected_prediction += len(draft) - accepted
        elif state.source == "lookup" and state.lookup_pos is not None:
            state.lookup_pos += len(emitted)
        self.drafted += len(draft)
        self.accepted += accepted
        if accepted == len(draft):
            state.k = min(self.config.max_draft, 2 * state.k)
            state.misses = 0
        elif accepted == 0:
            state.k = max(1, state.k // 2)
            state.misses += 1
            if state.misses >= 2:
                state.cooldown = min(MAX_COOLDOWN, MIN_COOLDOWN << (state.misses - 2))
        else:
            state.k = max(1, min(self.config.max_draft, accepted + 1))
            state.misses = 0

    def prediction_counts(self, seq) -> tuple[int, int]:
        """(accepted, rejected) prediction tokens of ``seq`` so far, as OpenAI's ``completion_tokens_details``
        defines them (https://platform.openai.com/docs/api-reference/chat/object): *accepted*, output tokens
        the prediction foresaw (followed in order, re-synchronised after a difference); *rejected*, prediction
        tokens that were drafted, verified and discarded. ``completion_tokens`` stays the emitted count.
        """
        state = self.state(seq)
        if state.prediction is None:
            return 0, 0
        self._sync_prediction(state, seq.output_ids)
        return state.accepted_prediction, state.rejected_prediction


# ---- the graph: logits for the last N positions ----------------------------------------------------------
LOGITS_KEEP_INPUT = "toolkit_logits_keep"
"""Graph input added at load time: ``[-N]``, the number of last positions whose logits the run returns."""


def _lm_head_input_chain(graph):
    """(the last-position hidden state the LM head reads, the full hidden states) or None.

    Both exports compute logits for the last position only (a prefill of N tokens would otherwise
    run the 262k-row LM head N times): optimum's through ``export/graph_surgery.keep_last_logits``
    (``Slice(hidden, [-1])``), onnxruntime-genai's builder through ``prune_lm_head``
    (``Unsqueeze(Gather(hidden, -1))``). Walking back from ``logits`` through first inputs finds
    the picker whatever the LM head's op (MatMul, MatMulNBits, DynamicQuantizeMatMul, or the per-row
    int8 subgraph, ``export/rowwise_int8.py``, whose scale and product both read the picked state).
    """
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get("logits")
    while node is not None and node.input:
        picker = producer.get(node.input[0])
        if picker is None:
            return None
        if picker.op_type == "Slice":
            return picker.output[0], picker.input[0]
        if picker.op_type == "Unsqueeze":
            gather = producer.get(picker.input[0])
            if gather is not None and gather.op_type == "Gather":
                return picker.output[0], gather.input[0]
        node = picker
    return None


def keep_positions(model) -> bool:
    """Edit ``model`` (an ``onnx.ModelProto``, in memory) so its ``logits`` cover the last ``N`` positions,
    ``N`` given per run as ``LOGITS_KEEP_INPUT = [-N]`` (1 for prefill and decode: the exported behaviour,
    N for a verify step); False, with ``model`` unchanged, when the LM head's input is not one of the
    known last-position pickers."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    found = _lm_head_input_chain(graph)
    if found is None:
        return False
    last, hidden = found
    ends, axes = "toolkit_logits_keep_ends", "toolkit_logits_keep_axes"
    graph.initializer.extend([numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), ends),
                              numpy_helper.from_array(np.array([1], np.int64), axes)])
    graph.input.append(helper.make_tensor_value_info(LOGITS_KEEP_INPUT, onnx.TensorProto.INT64, [1]))
    picked = "toolkit_logits_keep_hidden"
    readers = [node for node in graph.node if last in node.input]
    for node in readers:  # every reader: a per-row int8 head computes its row scales from it too
        node.input[:] = [picked if name == last else name for name in node.input]
    graph.node.insert(list(graph.node).index(readers[0]),
                      helper.make_node("Slice", [hidden, LOGITS_KEEP_INPUT, ends, axes], [picked], name="toolkit/keep_positions"))
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    while dead := [node for node in graph.node if not any(out in used for out in node.output)]:
        for node in dead:
            graph.node.remove(node)
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].Clear()
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_positions"
    return True


def verify_session(model_path, threads: int | None = None):
    """An onnxruntime session over ``model_path`` edited by ``keep_positions``, or None where it does not apply.

    The edit is made in memory on the graph (the weights stay in the engine directory's external data
    file, which onnxruntime reads from there), so the exported artifact is unchanged and the session
    holds the weights once, as the plain one does.
    """
    import onnx

    from toolkit.artifact.onnx_session import create_session

    model = onnx.load(str(model_path), load_external_data=False)
    return create_session(model_path, threads, model=model) if keep_positions(model) else None
