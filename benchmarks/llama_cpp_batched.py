"""llama.cpp's own batched decoding (llama-cpp-python's low-level API) at several sequence counts.

The peer our engine is held to: N sequences share one ``llama_decode`` per step (one batch with a
token per sequence, each in its own KV sequence), like llama.cpp's ``batched`` example. Per level:
all N prompts are prefilled in one batch (time to first token = that call plus the first argmax),
then greedy decoding runs until each sequence has ``--max-tokens`` tokens (EOS ignored). Prints a
JSON list of levels on stdout: concurrency, ttft_ms, itl_p50_ms, itl_p99_ms, out_tok_s.

Runs in any Python that has ``llama_cpp`` (e.g. a separate venv); it imports nothing from toolkit:

    VENV/bin/python benchmarks/llama_cpp_batched.py GGUF --levels 1,4,16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

FILLER = "The quick brown fox jumps over the lazy dog while the engineers measure latency and throughput. "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--prompt-tokens", type=int, default=108)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


class BatchedLlama:
    """One llama.cpp context sized for ``max_seqs`` sequences of ``seq_len`` tokens."""

    def __init__(self, gguf: str, max_seqs: int, seq_len: int, threads: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = max_seqs * seq_len
        params.n_batch = max(params.n_ctx, 512)
        params.n_ubatch = 512
        params.n_seq_max = max_seqs
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(params.n_batch, 0, max_seqs)

    def tokenize(self, text: str, count: int) -> list[int]:
        raw = text.encode()
        buffer = (self.L.llama_token * (len(raw) + 8))()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buffer, len(buffer), True, False)
        return list(buffer[:n])[:count]

    def clear(self) -> None:
        memory = self.L.llama_get_memory(self.ctx)
        self.L.llama_memory_clear(memory, True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` over ``(token, position, sequence, wants_logits)`` entries."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(self, index: int) -> int:
        row = self.L.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())


def run_level(llama: BatchedLlama, seqs: int, prompt: list[int], max_tokens: int) -> dict:
    """Greedy-decode ``seqs`` copies of ``prompt`` together; latency and throughput of the level."""
    llama.clear()
    started = time.perf_counter()
    entries = [(t, p, s, p == len(prompt) - 1) for s in range(seqs) for p, t in enumerate(prompt)]
    llama.decode(entries)
    last_rows = [(s + 1) * len(prompt) - 1 for s in range(seqs)]
    tokens = [llama.argmax(i) for i in last_rows]
    ttft = time.perf_counter() - started
    step_times = []
    for step in range(1, max_tokens):
        t0 = time.perf_counter()
        llama.decode([(tokens[s], len(prompt) + step - 1, s, True) for s in range(seqs)])
        tokens = [llama.argmax(s) for s in range(seqs)]
        step_times.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    itl = np.asarray(step_times) * 1000
    return {
        "concurrency": seqs,
        "ttft_ms": round(ttft * 1000, 1),
        "itl_p50_ms": round(float(np.percentile(itl, 50)), 2),
        "itl_p99_ms": round(float(np.percentile(itl, 99)), 2),
        "out_tok_s": round(seqs * max_tokens / total, 2),
        "decode_tok_s": round(seqs * (max_tokens - 1) / (total - ttft), 2),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    llama = BatchedLlama(args.gguf, max(levels), args.prompt_tokens + args.max_tokens + 8, args.threads)
    prompt = llama.tokenize(FILLER * (args.prompt_tokens // 8 + 1), args.prompt_tokens)
    run_level(llama, min(levels), prompt, 8)  # warm-up
    results = [run_level(llama, level, prompt, args.max_tokens) for level in levels]
    json.dump(results, sys.stdout)
    print()


if __name__ == "__main__":
    main()
