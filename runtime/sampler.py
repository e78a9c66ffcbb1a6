"""Per-sequence token sampling on one numpy logits row.

Processing order for one step (the order of the public APIs and vLLM):
min_tokens ban of the stop tokens and ``logit_bias`` (added to the raw logits) -> repetition penalty over prompt+output tokens and presence/frequency penalties over output
tokens -> JSON grammar mask (if any) -> temperature -> top_k -> top_p -> min_p -> draw.
top_k is applied on the unscaled logits, which selects the same tokens because a positive
temperature does not change their order; top_p and min_p see the temperature-scaled
distribution.

Logprobs follow vLLM V1's default ``raw_logprobs`` mode: they are the log-softmax of the
model's RAW logits row, before penalties, the grammar mask, temperature and truncation, so
a token's logprob does not depend on how the request chose to sample it.

Each sequence owns a numpy Generator seeded from ``SamplingParams.seed`` and draws exactly
one uniform number per non-greedy step, so a seeded request produces the same tokens
whatever else is batched with it (given batch-invariant logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from toolkit.runtime.sampling_params import SamplingParams

_BLOCK = 1024  # block size of the two-level inverse-CDF draw
_PREFILTER_MIN_VOCAB = 8192  # below this, exact full-array operations are cheap enough
_TOP_P_WINDOWS_NATS = (4.0, 8.0)  # windows below the best logit tried before the histogram
_TOP_P_WINDOW_MAX = 8192  # largest window worth sorting directly
_BUCKETS_PER_NAT = 64  # log-probability resolution of the top_p histogram
_BAND_NATS = 40  # tokens this far below the best token share the histogram's last bucket
_N_BUCKETS = _BUCKETS_PER_NAT * _BAND_NATS + 1
_CHUNK = 65536  # full-row passes work on chunks this long


@dataclass(frozen=True, slots=True)
class SampleResult:
    """The chosen token, its raw log probability and the top alternatives (when asked)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class LogitsConstraint(Protocol):
    """A grammar that masks logits and follows the tokens actually chosen."""

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set disallowed tokens to -inf in place."""

    def accept(self, token_id: int) -> bool:
        """Advance the grammar by the sampled token; False if the grammar rejected it."""

    def is_finished(self) -> bool:
        """True once the grammar is complete and only EOS is allowed."""

    def fit_budget(self, token: int, logits: np.ndarray, budget: int | None) -> int:
        """``token``, or a replacement that still lets the grammar complete within ``budget``
        tokens (this one included); see ``JsonConstraint.fit_budget``."""


ConstraintFactory = Callable[[SamplingParams], LogitsConstraint]


class _OutputCounts:
    """Occurrence counts of generated tokens, updated incrementally from the output list."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every counted token."""
        self._slot: dict[int, int] = {}
        self._ids = np.empty(64, dtype=np.int64)
        self._counts = np.zeros(64, dtype=np.float32)
        self._seen = 0

    def sync(self, output_ids: Sequence[int]) -> None:
        """Count the ids appended since the last call; rebuild if the list shrank."""
        if len(output_ids) < self._seen:
            self.reset()
        for tok in output_ids[self._seen:]:
            self._add(int(tok))
        self._seen = len(output_ids)

    def _add(self, tok: int) -> None:
        slot = self._slot.get(tok)
        if slot is None:
            slot = len(self._slot)
            if slot == self._ids.size:
                self._ids = np.resize(self._ids, 2 * slot)
                self._counts = np.concatenate([self._counts, np.zeros(slot, np.float32)])
            self._slot[tok] = slot
            self._ids[slot] = tok
        self._counts[slot] += 1

    @property
    def ids(self) -> np.ndarray:
        """Distinct generated token ids."""
        return self._ids[: len(self._slot)]

    @property
    def counts(self) -> np.ndarray:
        """Occurrences of each id in :attr:`ids`."""
        return self._counts[: len(self._slot)]


class SequenceSampler:
    """Samples the tokens of one sequence; create one per sequence (per choice when n > 1)."""

    def __init__(self, params: SamplingParams, prompt_ids: Iterable[int] = (),
                 constraint_factory: ConstraintFactory | None = None,
                 choice_index: int = 0) -> None:
        """``choice_index`` gives each of the n choices of a seeded request its own stream."""
        self.params = params
        self._prompt_ids = np.unique(np.fromiter(prompt_ids, dtype=np.int64))
        self._counts = _OutputCounts()
        self._rep_ids = self._prompt_ids
        bias = params.logit_bias or {}
        self._bias_ids = np.fromiter((int(t) for t in bias), dtype=np.int64, count=len(bias))
        self._bias_vals = np.fromiter((float(v) for v in bias.values()), dtype=np.float32, count=len(bias))
        self._rng = np.random.default_rng(
            np.random.SeedSequence(params.seed, spawn_key=(choice_index,)))
        self.constraint: LogitsConstraint | None = None
        if params.needs_json:
            if constraint_factory is None:
                raise ValueError("JSON-constrained decoding needs a constraint_factory")
            self.constraint = constraint_factory(params)

    @property
    def is_plain_greedy(self) -> bool:
        """True when the token is just argmax of the raw row (see :func:`greedy_tokens`)."""
        p = self.params
        return (p.greedy and not p.logprobs and self.constraint is None
                and not self._has_penalties() and not self._bias_ids.size and not p.min_tokens)

    def sample(self, logits: np.ndarray, output_ids: Sequence[int], banned: Iterable[int] = (),
               budget: int | None = None, draft: int | None = None, argmax: int | None = None) -> SampleResult:
        """Pick the next token from a float32 ``[vocab]`` row; ``logits`` is not modified.

        ``output_ids`` are the tokens generated so far (append-only between calls); ``banned``
        token ids are not drawn this step (the stop tokens while ``min_tokens`` is not reached).
        ``budget``: the tokens this sequence may still generate, this one included (max_tokens
        and context); a JSON constraint steers toward closing the value when it runs short.
        ``draft``: a speculated token (``runtime/speculative.py``); greedy ignores it (the caller
        compares), sampling keeps it with probability p(draft), else draws from p without it.
        ``argmax``: ``np.argmax(logits)`` where the caller already has it (the int8 LM head kernel finds it
        while it computes the row, ``runtime/native_head.py``); greedy takes it when nothing here changed
        the row, and saves reading the vocabulary-wide row again.
        """
        x = self.process(logits, output_ids, banned)
        p = self.params
        if p.greedy:
            token = argmax if argmax is not None and x is logits else int(np.argmax(x))
        elif draft is not None:
            token = verify_draft(x, draft, p.temperature, p.top_k, p.top_p, p.min_p, self._rng)
        else:
            token = sample_token(x, p.temperature, p.top_k, p.top_p, p.min_p, self._rng.random())
        if self.constraint is not None:
            token = self.constraint.fit_budget(token, x, budget)
            self.constraint.accept(token)
        if not p.logprobs:
            return SampleResult(token)
        logprob, top = raw_logprobs(logits, token, p.top_logprobs)
        return SampleResult(token, logprob, top)

    def _has_penalties(self) -> bool:
        p = self.params
        return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                or p.frequency_penalty != 0.0)

    def process(self, logits: np.ndarray, output_ids: Sequence[int], banned: Iterable[int] = ()) -> np.ndarray:
        """Bans and logit bias, penalties, then grammar mask: the logits that temperature and truncation will see.

        Works on a copy, made only when something changes (else ``logits`` is returned).
        """
        self._counts.sync(output_ids)
        banned_ids = np.fromiter(banned, dtype=np.int64)
        if not self._has_penalties() and self.constraint is None and not self._bias_ids.size and not banned_ids.size:
            return logits
        x = np.array(logits, dtype=np.float32, copy=True)
        p = self.params
        if self._bias_ids.size:
            inside = self._bias_ids < x.size
            x[self._bias_ids[inside]] += self._bias_vals[inside]
        if banned_ids.size:
            x[banned_ids[banned_ids < x.size]] = -np.inf
        if p.repetition_penalty != 1.0:
            ids = self._repetition_ids()
            vals = x[ids]
            x[ids] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and self._counts.ids.size:
            counts = self._counts.counts
            x[self._counts.ids] -= p.frequency_penalty * counts + p.presence_penalty
        if self.constraint is not None:
            self.constraint.mask_logits(x)
        return x

    def _repetition_ids(self) -> np.ndarray:
        """Prompt ids plus output ids; duplicates are harmless for the gather/scatter."""
        out = self._counts.ids
        if self._rep_ids.size != self._prompt_ids.size + out.size:
            self._rep_ids = np.concatenate([self._prompt_ids, out])
        return self._rep_ids


def sample_token(x: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float,
                 u: float) -> int:
    """Draw a token id from row ``x`` with the given filters and a uniform ``u`` in [0, 1)."""
    ids, z = _truncate(x, temperature, top_k, top_p, min_p)
    local = _draw(z, u)
    return int(local if ids is None else ids[local])


def _truncate(x: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float):
    """(kept ids or None for all, their temperature-scaled logits) after top_k, top_p and min_p."""
    ids = top_k_indices(x, top_k) if 0 < top_k < x.size else None
    z = np.divide(x if ids is None else x[ids], np.float32(temperature), dtype=np.float32)
    if top_p < 1.0:
        ids, z = _top_p_filter(ids, z, top_p)
    if min_p > 0.0:
        keep = np.flatnonzero(z >= z.max() + math.log(min_p))
        ids, z = (keep if ids is None else ids[keep]), z[keep]
    return ids, z


def verify_draft(x: np.ndarray, draft: int, temperature: float, top_k: int, top_p: float, min_p: float,
                 rng: np.random.Generator) -> int:
    """Rejection sampling of a deterministic draft token: ``draft`` with probability p(draft), else a draw
    from p with ``draft`` removed and renormalised, so the result is distributed exactly as p
    (p: the truncated, temperature-scaled distribution ``sample_token`` draws from).

    P(t) = p(d)·[t = d] + (1 − p(d))·p(t)/(1 − p(d))·[t ≠ d] = p(t).
    """
    ids, z = _truncate(x, temperature, top_k, top_p, min_p)
    local = draft if ids is None else np.flatnonzero(ids == draft)
    local = int(local) if ids is None else (int(local[0]) if local.size else None)
    if local is not None and local < z.size and np.isfinite(z[local]):
        e = np.exp(z - z.max(), dtype=np.float64)
        if rng.random() < e[local] / e.sum():
            return draft
        z = z.copy()
        z[local] = -np.inf
    local_draw = _draw(z, rng.random())
    return int(local_draw if ids is None else ids[local_draw])


def top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a 1-D array (unordered); -inf entries may be
    left out when fewer than k entries are finite."""
    n = x.size
    if k >= n:
        return np.arange(n)
    if n >= _PREFILTER_MIN_VOCAB and n >= 16 * k:
        cand = _top_k_candidates(x, k)
        if cand is not None:
            if cand.size <= k:
                return cand
            return cand[np.argpartition(x[cand], cand.size - k)[cand.size - k:]]
    return np.argpartition(x, n - k)[n - k:]


def _top_k_candidates(x: np.ndarray, k: int) -> np.ndarray | None:
    """A small superset of the top k found from a strided sample, or None if it missed."""
    stride = 64
    sub = x[::stride]
    m = min(sub.size, (3 * k) // (2 * stride) + 4)
    threshold = np.partition(sub, sub.size - m)[sub.size - m]
    if threshold == -np.inf:
        cand = np.flatnonzero(x > -np.inf)
        return cand if cand.size else None
    cand = np.flatnonzero(x >= threshold)
    return cand if cand.size >= k else None


def _top_p_filter(ids: np.ndarray | None, z: np.ndarray, top_p: float):
    """Keep the smallest highest-probability set of tokens whose mass reaches ``top_p``
    (ties broken by lower id, as a stable sort of the whole row would)."""
    zmax = z.max()
    p = z - zmax
    np.exp(p, out=p)
    target = float(p.sum(dtype=np.float64)) * top_p
    if z.size >= _PREFILTER_MIN_VOCAB:
        sure, band = _nucleus_candidates(z, zmax, p, target)
    else:
        sure, band = np.empty(0, dtype=np.intp), np.arange(z.size)
    order = band[np.argsort(-p[band], kind="stable")]
    cum = float(p[sure].sum(dtype=np.float64)) + np.cumsum(p[order], dtype=np.float64)
    keep = min(int(np.searchsorted(cum, target, side="left")) + 1, order.size)
    local = np.concatenate([sure, order[:keep]])
    return (local if ids is None else ids[local]), z[local]


def _nucleus_candidates(z: np.ndarray, zmax: float, p: np.ndarray, target: float):
    """(tokens surely in the nucleus, tokens to sort): first try a few windows of the
    best tokens, which hold the nucleus of a peaked distribution; else the histogram."""
    for gap in _TOP_P_WINDOWS_NATS:
        cand = np.flatnonzero(z >= zmax - gap)
        if cand.size > _TOP_P_WINDOW_MAX:
            break
        if p[cand].sum(dtype=np.float64) >= target:
            return np.empty(0, dtype=np.intp), cand
    return _nucleus_band(z, zmax, p, target)


def _nucleus_band(z: np.ndarray, zmax: float, p: np.ndarray, target: float):
    """Bucket tokens by log-probability; return the tokens of the buckets wholly inside
    the nucleus and those of the bucket where its mass crosses ``target`` (to be sorted).
    Only that one bucket needs sorting, instead of the whole row."""
    mass = np.zeros(_N_BUCKETS)
    for start, gaps in _scaled_gaps(z, zmax):
        mass += np.bincount(gaps.astype(np.intp), weights=p[start:start + gaps.size],
                            minlength=_N_BUCKETS)
    b = min(int(np.searchsorted(np.cumsum(mass), target, side="left")), _N_BUCKETS - 1)
    sure, band = [], []
    for start, gaps in _scaled_gaps(z, zmax):
        sure.append(np.flatnonzero(gaps < b) + start)
        band.append(np.flatnonzero((gaps >= b) & (gaps < b + 1)) + start)
    return np.concatenate(sure), np.concatenate(band)


def _scaled_gaps(z: np.ndarray, zmax: float):
    """(offset, bucket coordinate) per chunk; chunks keep temporaries small and cached."""
    for start in range(0, z.size, _CHUNK):
        gaps = zmax - z[start:start + _CHUNK]
        np.minimum(gaps, _BAND_NATS, out=gaps)
        gaps *= _BUCKETS_PER_NAT
        yield start, gaps


def _draw(z: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from softmax(z) with a two-level (block) cumulative sum."""
    zmax = z.max()
    if not np.isfinite(zmax):
        raise RuntimeError("no token has a finite logit; the row or the grammar mask is broken")
    p = z - zmax
    np.exp(p, out=p)
    if p.size <= _BLOCK:
        return _search(p, u * float(p.sum(dtype=np.float64)), 0.0)
    full = p.size - p.size % _BLOCK
    sums = p[:full].reshape(-1, _BLOCK).sum(axis=1)
    if full < p.size:
        sums = np.append(sums, p[full:].sum())
    cum = np.cumsum(sums, dtype=np.float64)
    target = u * cum[-1]
    b = min(int(np.searchsorted(cum, target, side="right")), cum.size - 1)
    start = b * _BLOCK
    before = float(cum[b - 1]) if b else 0.0
    return start + _search(p[start:start + _BLOCK], target, before)


def _search(p: np.ndarray, target: float, before: float) -> int:
    """Index of the first entry of ``p`` whose running total (plus ``before``) exceeds
    ``target``, never landing on a zero-probability entry."""
    cum = before + np.cumsum(p, dtype=np.float64)
    i = min(int(np.searchsorted(cum, target, side="right")), p.size - 1)
    if p[i] == 0:
        nonzero = np.flatnonzero(p)
        earlier = nonzero[nonzero < i]
        i = int(earlier[-1] if earlier.size else nonzero[0])
    return i


def raw_logprobs(logits: np.ndarray, token: int, top_n: int = 0
                 ) -> tuple[float, list[tuple[int, float]]]:
    """Log-softmax of the raw row at ``token`` and the ``top_n`` best (id, logprob) pairs."""
    m = float(logits.max())
    shifted = logits - np.float32(m)
    np.exp(shifted, out=shifted)
    lse = m + math.log(float(shifted.sum()))
    top: list[tuple[int, float]] = []
    if top_n:
        ids = top_k_indices(logits, top_n)
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = [(int(i), float(logits[i]) - lse) for i in ids]
    return float(logits[token]) - lse, top


def greedy_tokens(logits: np.ndarray) -> np.ndarray:
    """Argmax of every row of a ``[batch, vocab]`` array: the batched path for samplers
    whose :attr:`SequenceSampler.is_plain_greedy` is true (they need no per-row call)."""
    return np.argmax(logits, axis=-1)
