"""Compare int8 schemes for the default model's gqa engine, side by side in one run (issue #13, README "Why MatMulNBits").

The LM head (262,144 x 640) is a third of a batched decode step's kernel time
(``benchmarks/op_profile.py``), so its scheme is compared here: starting from an int8 gqa engine
whose head is still the builder's (8-bit ``MatMulNBits``, block 32, accuracy level 4; built here
with ``build_gqa_model(head=None)`` unless ``--base`` names one), each variant is made by
re-quantizing the head from the fp32 weights (``toolkit.export.lm_head_quant``), validated like
``toolkit validate`` (greedy / top-1 / cosine against the fp32 reference, the int8 bars), and
timed with decode steps at several batch sizes, the variants alternated step by step.

    python benchmarks/int8_methods.py [--base ENGINE_DIR] [--work DIR] [--batches 1,16,32,64] [--steps 10]

Variants: the builder's head; MatMulNBits block 128; MatMulNBits 4-bit; per-channel
``DynamicQuantizeMatMul`` unsmoothed and smoothed (SmoothQuant alpha 0.5, the export's default).
Each variant is a full copy of the engine (~1 GB) under ``--work``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # op_profile beside this script

from op_profile import cpu_line, time_engines  # noqa: E402

from toolkit.artifact.manifest import describe_files, load_manifest, write_manifest  # noqa: E402
from toolkit.export.lm_head_quant import SMOOTH_ALPHA, HeadScheme  # noqa: E402

VARIANTS = {
    "builder (8-bit MatMulNBits, block 32)": None,
    "MatMulNBits 8-bit block 128": HeadScheme("nbits", 8, 128, 4),
    "MatMulNBits 4-bit block 32": HeadScheme("nbits", 4, 32, 4),
    "DynamicQuantizeMatMul per-channel": HeadScheme("dqmm"),
    f"DynamicQuantizeMatMul smoothed a={SMOOTH_ALPHA}": HeadScheme("dqmm", smooth_alpha=SMOOTH_ALPHA),
}


def build_base(work: Path) -> Path:
    """The default model's int8 gqa engine with the builder's LM head (the default engine's other files copied)."""
    from toolkit.export.gqa_export import build_gqa_model
    from toolkit.export.pipeline import ensure_default_engine
    from toolkit.export.progress import StageReporter
    from toolkit.export.sources import cache_dir

    default = ensure_default_engine(StageReporter(quiet=True), "int8", "gqa")
    base = work / "base"
    # The default engine's manifest stays behind: its file hashes describe the default's graph, not
    # the one built here, and load_manifest would reject them; a fresh one is written below.
    shutil.copytree(default, base, ignore=shutil.ignore_patterns("model.onnx*", "toolkit.json"))
    manifest = load_manifest(default, verify_hashes=False)
    options = build_gqa_model(Path(manifest.source["path"]) if manifest.source.get("path") else cache_dir() / "checkpoints" / "default",
                              "int8", base, head=None)
    manifest.export_options = options
    manifest.files = describe_files(base)
    write_manifest(base, manifest)
    return base


def make_variant(base: Path, out: Path, scheme: HeadScheme) -> None:
    """A full copy of ``base`` with its LM head re-quantized to ``scheme`` (calibrated as the export does)."""
    from toolkit.export.gqa_export import requantize_head

    shutil.copytree(base, out)
    manifest = load_manifest(base, verify_hashes=False)
    requantize_head(Path(manifest.source["path"]), out / "model.onnx", scheme)
    manifest.export_options = {**manifest.export_options, "lm_head": scheme.options()}
    manifest.files = describe_files(out)
    write_manifest(out, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="an int8 gqa engine with the builder's LM head (default: build one)")
    parser.add_argument("--work", type=Path, help="where the variants go (default: a temporary directory)")
    parser.add_argument("--batches", default="1,16,32,64")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=170)
    args = parser.parse_args()
    from toolkit.export.validate import validate_engine_dir

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        base = args.base or build_base(work)
        dirs = {}
        for i, (name, scheme) in enumerate(VARIANTS.items()):
            dirs[name] = base if scheme is None else work / f"variant-{i}"
            if scheme is not None:
                make_variant(base, dirs[name], scheme)
        print(f"CPU: {cpu_line()}; threads {args.threads}")
        print(f"{'LM head':44s} {'passed':>6s} {'greedy':>7s} {'top-1':>6s} {'min cos':>8s} {'max abs':>8s}")
        for name, path in dirs.items():
            v = validate_engine_dir(path, load_manifest(path))
            print(f"{name:44s} {str(v['passed']):>6s} {v['greedy_agreement']:7.3f} {v['top1_agreement']:6.3f} "
                  f"{v['min_cosine']:8.5f} {v['max_abs_diff']:8.3f}")
        for rows in (int(b) for b in args.batches.split(",")):
            timing = time_engines(list(dirs.values()), rows, args.context, args.steps, args.threads, False)
            print(f"\nbatch {rows}: decode step, variants alternated step by step ({args.steps} steps, median, spinning off)")
            base_ms = timing[str(base)]["model_cpu_ms"]
            for name, path in dirs.items():
                t = timing[str(path)]
                print(f"  {name:44s} wall {t['model_ms']:8.1f} ms  CPU {t['model_cpu_ms']:8.1f} ms  "
                      f"CPU vs builder {t['model_cpu_ms'] / base_ms:5.2f}x")


if __name__ == "__main__":
    main()
