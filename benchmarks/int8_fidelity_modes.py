"""Int8 fidelity as served: batch 1 (what ``toolkit validate`` measures), batched decode, speculative decoding.

An int8 LM head built as ``DynamicQuantizeMatMul`` (``export/lm_head_quant.py``) quantizes its
activation input with one scale over the whole input tensor
(https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.DynamicQuantizeMatMul),
so a row's logits depend on the other rows of the same run: the rows of a batched decode step, the
tokens of a speculative verify run. ``toolkit validate``'s main rows run one row at a time and
cannot see it (its *batched* row, ``export/validate.py``, teacher-forces the golden chats as one
batch); this script measures the served paths side by side, on the golden short chats stored in
the engine's ``reference.json`` (``export/golden.py``), against the fp32 engine (default: the cached default-onnx-fp32):

- (a) *batch 1*: each prompt prefilled, then its fp32 reference continuation fed one token per
  decode step in a one-row batch (teacher forcing, as validate does);
- (b) *batched*: the same, every golden prompt one row of a ``--rows``-row decode batch whose other
  rows are golden prompts advanced to other positions (the serving engine's ``SharedKV`` path); the
  prompt's last token is fed in the batch, so every position, the first included, is batched;
- (c) *greedy*: free-running greedy continuations through ``OnnxEngine`` compared with the fp32
  reference continuation: plain decoding one request at a time, plain decoding with all prompts
  concurrent (batched), prompt-lookup speculation, and speculation with OpenAI's ``prediction`` =
  the fp32 continuation (every draft is the reference, so a verify run feeds up to 8 tokens).

(a)/(b): teacher-forced top-1 against the reference tokens; cosine and max-abs over the fp32
engine's top-64 logit ids at every position (min and mean cosine, max max-abs), all 32 positions
(validate's cosine/max-abs use the first position only, whose logits are large; at later positions
the top-64 logits can sit near zero, where the cosine of raw logits drops even for a good engine:
read the mean and the max-abs), validate's own measure (first position against ``reference.json``'s
top-64, bars cosine >= 0.995, max-abs <= 3) and (b)'s largest difference from the same engine's logits
on (b)'s schedule one row at a time (the batch's own effect; prefill and decode steps differ too).
(c): mean greedy prefix agreement (validate's metric) and how many continuations are identical.

    python benchmarks/int8_fidelity_modes.py [--fp32 DIR] [--rows 16] [--threads 2] INT8_DIR [INT8_DIR ...]

Fidelity does not depend on speed: a shared, contended CPU only makes it slower.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefix_cache import cpu_line  # noqa: E402

ENGINES = Path.home() / ".cache" / "toolkit" / "engines"
TOP_K = 64


def _runner(engine_dir: Path, threads: int):
    """The serving engine's model runner for the directory's graph (gqa: ``SharedKV``; optimum: ``BatchKV``)."""
    from toolkit.runtime.model_runner import create_runner

    options = json.loads((engine_dir / "toolkit.json").read_text())["export_options"]
    return create_runner(options.get("graph", "optimum"), engine_dir / "model.onnx", threads, 4096)


def teacher_forced(runner, cases, rows: int, last_in_step: bool | None = None) -> list[np.ndarray]:
    """Per golden case, logits ``[len(continuation), vocab]`` predicting each reference token.

    ``rows`` 1: each case alone. ``rows`` > 1: all cases decode together in one batch, padded to
    ``rows`` rows with golden prompts advanced 8 + i tokens into their continuations (other positions).
    ``last_in_step`` (default: batched): the prompt's last token is fed in a decode step, not the prefill.
    """
    steps = len(cases[0].greedy_ids)
    last_in_step = rows > 1 if last_in_step is None else last_in_step
    groups = [[i] for i in range(len(cases))] if rows == 1 else [list(range(len(cases)))]
    out: list[np.ndarray | None] = [None] * len(cases)
    for group in groups:
        batch = runner.new_batch()
        feeds, firsts, positions = [], {}, []
        for i in group:  # the measured rows; batched, the prompt's last token is fed in the batch
            prompt = cases[i].prompt_ids[:-1] if last_in_step else cases[i].prompt_ids
            logits, buffers = runner.prefill(prompt, None, 0)
            firsts[i] = logits.copy()
            batch.add_rows(buffers, [len(prompt)])
            positions.append(len(prompt))
            feeds.append([cases[i].prompt_ids[-1], *cases[i].greedy_ids] if last_in_step else list(cases[i].greedy_ids))
        for j in range(rows - len(group) if rows > 1 else 0):  # filler rows at other positions
            case = cases[(j + 1) % len(cases)]
            ahead = 8 + j
            ids = case.prompt_ids + case.greedy_ids[:ahead]
            _, buffers = runner.prefill(ids, None, 0)
            batch.add_rows(buffers, [len(ids)])
            positions.append(len(ids))
            feeds.append((case.greedy_ids[ahead:] * 4)[:steps + 1])
        collected = {i: [] if last_in_step else [firsts[i]] for i in group}
        for t in range(steps if last_in_step else steps - 1):
            logits = runner.decode(batch, [feed[t] for feed in feeds], [p + t for p in positions])
            for r, i in enumerate(group):
                collected[i].append(logits[r].copy())
        for i in group:
            out[i] = np.stack(collected[i])
    return out


def reference_topk(logits: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fp32 engine's top-64 ids and values per position, per case."""
    result = []
    for case_logits in logits:
        ids = np.argpartition(-case_logits, TOP_K - 1, axis=-1)[:, :TOP_K]
        result.append((ids, np.take_along_axis(case_logits, ids, axis=-1).astype(np.float64)))
    return result


def logit_metrics(cases, logits: list[np.ndarray], reference: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Teacher-forced top-1 (mean over cases), min/mean cosine and max-abs over the reference's top-k."""
    top1, cosines, max_abs = [], [], 0.0
    for case, got, (ids, ref) in zip(cases, logits, reference):
        top1.append(float(np.mean(got.argmax(axis=-1) == np.asarray(case.greedy_ids))))
        sub = np.take_along_axis(got, ids, axis=-1).astype(np.float64)
        cosines += list((sub * ref).sum(-1) / (np.linalg.norm(sub, axis=-1) * np.linalg.norm(ref, axis=-1)))
        max_abs = max(max_abs, float(np.abs(sub - ref).max()))
    first_cos, first_abs = [], []  # validate's measure: the first position against reference.json's top-k
    for case, got in zip(cases, logits):
        ref = np.asarray(case.first_topk_logits, np.float64)
        row = got[0][np.asarray(case.first_topk_ids)].astype(np.float64)
        first_cos.append(float(ref @ row / (np.linalg.norm(ref) * np.linalg.norm(row))))
        first_abs.append(float(np.abs(ref - row).max()))
    return {"top1": float(np.mean(top1)), "worst_top1": min(top1), "min_cos": min(cosines),
            "mean_cos": float(np.mean(cosines)), "max_abs": max_abs,
            "first_min_cos": min(first_cos), "first_max_abs": max(first_abs)}


async def greedy_modes(engine_dir: Path, cases, threads: int) -> dict:
    """Greedy prefix agreement with the reference continuation per serving mode (see the module doc)."""
    from toolkit.export.validate import _prefix_agreement
    from toolkit.runtime import load_engine
    from toolkit.runtime.sampling_params import SamplingParams
    from toolkit.runtime.speculative import SpeculativeConfig
    from toolkit.runtime.types import GenerateRequest

    async def run(engine, case, prediction=None) -> list[int]:
        params = SamplingParams(max_tokens=len(case.greedy_ids), temperature=0.0, ignore_eos=True)
        tokens = []
        async for out in await engine.generate(GenerateRequest(list(case.prompt_ids), params, prediction_ids=prediction)):
            for choice in out.choices:
                tokens.extend(choice.token_ids)
        return tokens

    plain = load_engine(engine_dir, threads=threads, speculative=SpeculativeConfig(enabled=False))
    spec = load_engine(engine_dir, threads=threads, speculative=SpeculativeConfig(prompt_lookup=True, predicted_outputs=True))  # on whatever the precision
    await plain.start()
    await spec.start()
    outputs = {
        "plain, batch 1": [await run(plain, c) for c in cases],
        f"plain, {len(cases)} concurrent": list(await asyncio.gather(*(run(plain, c) for c in cases))),
        "prompt lookup": [await run(spec, c) for c in cases],
        "prediction = fp32 output": [await run(spec, c, list(c.greedy_ids)) for c in cases],
    }
    drafted, accepted = spec.speculator.drafted, spec.speculator.accepted
    await plain.stop()
    await spec.stop()
    base = outputs["plain, batch 1"]
    result = {}
    for mode, outs in outputs.items():
        agreement = [_prefix_agreement(c.greedy_ids, o) for c, o in zip(cases, outs)]
        result[mode] = {"greedy": float(np.mean(agreement)), "identical": sum(a == 1.0 for a in agreement),
                        "same_as_plain": sum(o == b for o, b in zip(outs, base))}
    result["drafts accepted/drafted"] = f"{accepted}/{drafted}"
    return result


def main() -> None:
    from toolkit.export.golden import Reference

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engines", nargs="+", type=Path, help="int8 gqa engine directories")
    parser.add_argument("--fp32", type=Path, default=ENGINES / "default-onnx-fp32")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-greedy", action="store_true", help="only (a) and (b)")
    args = parser.parse_args()
    print(cpu_line(), f"threads {args.threads}")
    cases = Reference.load(args.engines[0]).cases
    fp32 = _runner(args.fp32, args.threads)
    reference = reference_topk(teacher_forced(fp32, cases, 1))
    fp32_batched = logit_metrics(cases, teacher_forced(fp32, cases, args.rows), reference)
    del fp32
    print(f"fp32 engine {args.fp32}, batched {args.rows} rows vs its batch 1: {fp32_batched}")
    report = {"fp32 batched": fp32_batched}
    for engine_dir in args.engines:
        manifest = json.loads((engine_dir / "toolkit.json").read_text())
        head = manifest["export_options"].get("lm_head", {"method": manifest["export_options"].get("method")})
        runner = _runner(engine_dir, args.threads)
        alone, together = teacher_forced(runner, cases, 1), teacher_forced(runner, cases, args.rows)
        single = logit_metrics(cases, alone, reference)
        batched = logit_metrics(cases, together, reference)
        solo = teacher_forced(runner, cases, 1, last_in_step=True)  # (b)'s schedule, one row at a time
        batched["vs_batch1_max_abs"] = max(float(np.abs(a - b).max()) for a, b in zip(solo, together))
        single["vs_batch1_max_abs"] = 0.0
        del runner, alone, together, solo
        stored = {k: manifest["validation"][k] for k in ("top1_agreement", "min_cosine", "max_abs_diff", "greedy_agreement")}
        entry = {"lm_head": head, "validate (stored)": stored, "batch 1": single, f"batched {args.rows}": batched}
        if not args.skip_greedy:
            entry["greedy"] = asyncio.run(greedy_modes(engine_dir, cases, args.threads))
        report[str(engine_dir)] = entry
        print(json.dumps({str(engine_dir): entry}, indent=1), flush=True)
    print("\n| engine | mode | top-1 (worst prompt) | first pos: min cos | first pos: max-abs | all pos: min cos "
          "| all pos: mean cos | all pos: max-abs | max-abs vs own batch 1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for engine_dir in args.engines:
        entry = report[str(engine_dir)]
        for mode in ("batch 1", f"batched {args.rows}"):
            m = entry[mode]
            print(f"| {engine_dir} | {mode} | {m['top1']:.3f} ({m['worst_top1']:.3f}) | {m['first_min_cos']:.5f} | "
                  f"{m['first_max_abs']:.3f} | {m['min_cos']:.5f} | "
                  f"{m['mean_cos']:.5f} | {m['max_abs']:.3f} | {m['vs_batch1_max_abs']:.3f} |")
    if not args.skip_greedy:
        print("\n| engine | greedy mode | prefix agreement | identical to fp32 | same as plain batch 1 |")
        print("|---|---|---|---|---|")
        for engine_dir in args.engines:
            for mode, g in report[str(engine_dir)]["greedy"].items():
                if isinstance(g, dict):
                    print(f"| {engine_dir} | {mode} | {g['greedy']:.3f} | {g['identical']}/{len(cases)} | "
                          f"{g['same_as_plain']}/{len(cases)} |")
            print(f"| {engine_dir} | drafts accepted/drafted | {report[str(engine_dir)]['greedy']['drafts accepted/drafted']} | | |")


if __name__ == "__main__":
    main()
