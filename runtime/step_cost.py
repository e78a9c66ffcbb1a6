"""Online estimate of how long a step's decode and its prompt chunks take, for the step time budget.

The scheduler (``runtime/scheduler.py``) sizes prompt chunks so that a step's predicted time stays
within ``SchedulerConfig.step_budget_ms``: a decoding stream then waits at most about one budget
between tokens, instead of a whole ``max_num_tokens`` worth of prefill (Sarathi-Serve's stall-free
batching, https://arxiv.org/abs/2403.02310, budgets tokens per step; a time budget follows the
machine instead of a token count tuned for one).

Both costs are linear in a few features, fitted online from the timings the engine loop already
takes (``OnnxEngine.step``), so the model follows the machine and the model it serves:

- decode step: ``a + b * tokens + c * tokens * context`` with ``tokens`` = rows x tokens fed per row
  (weights read once per step, per-token work, attention over the padded batch cache, ``context`` =
  the longest row's tokens); a speculative verify step feeds each row its draft too
  (``runtime/speculative.py``), and counting its tokens keeps it from passing for a slow decode;
- prompt chunks of a step, summed: ``d * chunks + e * tokens + f * tokens * past`` (per-run weight
  read, per-token work, attention over the tokens already cached).

Fitting is exponentially weighted least squares (old steps fade, so a change of load is followed)
with Huber-weighted residuals (one step slowed by another process moves the fit by a bounded
amount, not by its full size) and non-negative coefficients (every term is a cost; a negative
intercept fitted from noise would make small chunks look free).
"""

from __future__ import annotations

import numpy as np


class OnlineLinearFit:
    """``y ≈ w · x`` with ``w >= 0``, fitted from a stream of ``(x, y)`` (exponentially weighted, Huber-robust).

    ``scales`` divide the features so that the ridge term treats them alike; ``forget`` is the
    weight of the past per observation (0.99: about the last 100 steps, a few seconds, count); residuals
    beyond ``huber`` times the prediction count linearly, not quadratically.
    """

    def __init__(self, scales: tuple[float, ...], forget: float = 0.99, huber: float = 0.25, ridge: float = 1e-6):
        self.scales = np.asarray(scales, dtype=float)
        self.forget, self.huber, self.ridge = forget, huber, ridge
        size = len(scales)
        self.gram = np.zeros((size, size))
        self.moment = np.zeros(size)
        self.weights = np.zeros(size)  # in scaled units
        self.count = 0

    def predict(self, x) -> float:
        """The fitted ``y`` at ``x`` (0 before any observation)."""
        return float(self.weights @ (np.asarray(x, dtype=float) / self.scales))

    def observe(self, x, y: float) -> None:
        """Fold in one observation; its weight shrinks when it lies far from the current fit."""
        z = np.asarray(x, dtype=float) / self.scales
        weight = 1.0
        if self.count:
            expected = float(self.weights @ z)
            allowed = self.huber * max(expected, 1e-9)
            if abs(y - expected) > allowed:
                weight = allowed / abs(y - expected)
        self.gram = self.forget * self.gram + weight * np.outer(z, z)
        self.moment = self.forget * self.moment + weight * y * z
        self.count += 1
        self.weights = self._solve()

    def _solve(self) -> np.ndarray:
        """Least squares with every coefficient >= 0 (active set: drop the most negative, refit)."""
        active = list(range(len(self.moment)))
        weights = np.zeros(len(self.moment))
        while active:
            gram = self.gram[np.ix_(active, active)] + self.ridge * np.eye(len(active))
            solution = np.linalg.solve(gram, self.moment[active])
            if (solution >= 0).all():
                weights[active] = solution
                return weights
            active.pop(int(np.argmin(solution)))
        return weights


class StepCostModel:
    """Predicted seconds of a step's decode and prompt chunks; learns from every step the engine runs."""

    #: observations of each kind before the predictions are used (until then: the token budget alone).
    MIN_OBSERVATIONS = 3

    def __init__(self, forget: float = 0.99, huber: float = 0.25):
        self.decode = OnlineLinearFit((1.0, 16.0, 16.0 * 1024), forget, huber)
        self.prefill = OnlineLinearFit((1.0, 256.0, 256.0 * 1024), forget, huber)

    @property
    def ready(self) -> bool:
        return self.decode.count >= self.MIN_OBSERVATIONS and self.prefill.count >= self.MIN_OBSERVATIONS

    @staticmethod
    def decode_features(rows: int, context: int, tokens_per_row: int = 1) -> tuple[float, float, float]:
        tokens = rows * tokens_per_row
        return 1.0, float(tokens), float(tokens * context)

    @staticmethod
    def prefill_features(chunks: list[tuple[int, int]]) -> tuple[float, float, float]:
        """Summed features of ``(tokens, past)`` chunks, each run on its own."""
        return float(len(chunks)), float(sum(n for n, _ in chunks)), float(sum(n * past for n, past in chunks))

    def observe_decode(self, rows: int, context: int, seconds: float, tokens_per_row: int = 1) -> None:
        if rows:
            self.decode.observe(self.decode_features(rows, context, tokens_per_row), seconds)

    def observe_prefill(self, chunks: list[tuple[int, int]], seconds: float) -> None:
        """``chunks``: ``(tokens, past)`` of each prompt chunk the step ran, ``seconds`` their total."""
        if chunks:
            self.prefill.observe(self.prefill_features(chunks), seconds)

    def decode_seconds(self, rows: int, context: int) -> float:
        return self.decode.predict(self.decode_features(rows, context)) if rows else 0.0

    def chunk_seconds(self, tokens: int, past: int) -> float:
        return self.prefill.predict(self.prefill_features([(tokens, past)]))

    def chunk_tokens_within(self, seconds: float, past: int) -> int:
        """The most tokens one chunk after ``past`` cached tokens can take in ``seconds`` (0 if none)."""
        per_run, per_token = self.chunk_seconds(0, past), self.chunk_seconds(1, past) - self.chunk_seconds(0, past)
        if seconds <= per_run:
            return 0
        if per_token <= 0:  # no per-token cost seen yet: nothing to bound by
            return 1 << 30
        return int((seconds - per_run) / per_token)
