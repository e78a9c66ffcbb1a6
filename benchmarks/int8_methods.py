"""Compare 8-bit schemes (and fp16) on the default model, side by side in one run (README: "Why MatMulNBits").

For the fp32 engine, MatMulNBits int8 (our export) and onnxruntime's ``quantize_dynamic`` (built
here from the fp32 model): teacher-forced top-1 agreement with the fp32 reference on the golden
prompts, and batch-1 decode tokens/s (128 greedy tokens after a 108-token prompt), alternating
the models for several rounds.

    python benchmarks/int8_methods.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.export.golden import Reference
from toolkit.export.ort_runner import OrtCausalLM
from toolkit.export.sources import cache_dir


def quantize_dynamic_copy(fp32_model: Path, out_dir: Path) -> Path:
    """onnxruntime's dynamic (activation-and-weight) int8 quantization of every MatMul."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = out_dir / "model.onnx"
    quantize_dynamic(str(fp32_model), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], use_external_data_format=True)
    return out


def top1(runner: OrtCausalLM, reference: Reference) -> float:
    hits = total = 0
    for case in reference.cases:
        forced = runner.teacher_forced(case.prompt_ids, case.greedy_ids)
        hits += int(np.sum(forced.argmax(-1) == np.asarray(case.greedy_ids)))
        total += len(case.greedy_ids)
    return hits / total


def decode_tps(runner: OrtCausalLM, prompt: list[int], tokens: int = 128) -> float:
    logits, past = runner.forward(prompt, None)
    token = int(logits[-1].argmax())
    start = time.perf_counter()
    for _ in range(tokens):
        logits, past = runner.forward([token], past)
        token = int(logits[-1].argmax())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engines = cache_dir() / "engines"
    fp32_dir, int8_dir, fp16_dir = (engines / f"default-onnx-{p}" for p in ("fp32", "int8", "fp16"))
    reference = Reference.load(fp32_dir)
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "fp32": fp32_dir / "model.onnx",
            "int8 MatMulNBits (ours)": int8_dir / "model.onnx",
            "int8 quantize_dynamic": quantize_dynamic_copy(fp32_dir / "model.onnx", Path(tmp)),
        }
        if (fp16_dir / "model.onnx").is_file():
            models["fp16 (CPU provider)"] = fp16_dir / "model.onnx"
        runners = {name: OrtCausalLM(path, threads=args.threads) for name, path in models.items()}
        prompt = reference.cases[0].prompt_ids * 6
        prompt = prompt[:108]
        speeds: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                speeds[name].append(decode_tps(runner, prompt))
        print(f"{'model':28s} {'top-1 vs fp32':>14s} {'decode tok/s (median)':>22s} {'vs fp32':>8s}")
        base = float(np.median(speeds["fp32"]))
        for name, runner in runners.items():
            tps = float(np.median(speeds[name]))
            print(f"{name:28s} {top1(runner, reference):14.3f} {tps:22.1f} {tps / base:7.2f}x")


if __name__ == "__main__":
    main()
