"""``--graph gqa``: an ONNX graph whose attention is onnxruntime's fused ``GroupQueryAttention``.

Built from the checkpoint by onnxruntime-genai's model builder (the library that makes the graphs
onnxruntime-genai ships). Compared with optimum's graph it has fused attention with rotary
embeddings, fused RMSNorm, the LM head pruned to the last position, and a KV cache that the
attention op updates in place when past and present share a buffer — the serving runtime
preallocates that buffer (``toolkit.runtime.shared_kv``), so a decode step copies no cache.

int8: the builder quantizes every linear with the optimum path's ``MatMulNBits`` scheme (8 bits,
symmetric, block 32, ``accuracy_level=4``); then ``o_proj``, ``gate_proj`` and ``up_proj`` are
re-quantized from the checkpoint's fp32 weights to per-row int8 activations x per-channel int8
weights (``INT8_BODY``, ``toolkit.export.w8a8``: faster at batched decode and prefill, and more
faithful than the builder's), and the LM head to the same per-row scheme, smoothed (``INT8_HEAD``,
``toolkit.export.lm_head_quant``). Every linear then computes a row from that row alone, so a
token's logits do not depend on the batch it runs in. The embedding table stays fp32 (a Gather
reads one row per token).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from toolkit.artifact.layout import GENAI_CONFIG, GQA_DATA_FILE, MODEL_FILE
from toolkit.export.lm_head_quant import SMOOTH_ALPHA, HeadScheme
from toolkit.export.onnx_export import INT8_ACCURACY_LEVEL, INT8_BLOCK_SIZE
from toolkit.export.w8a8 import CONVERTED as W8A8_LINEARS
from toolkit.export.w8a8 import SMOOTH_ALPHA as W8A8_ALPHA

GQA_PRECISIONS = ("fp32", "int8")
BUILDER_ENTRY = "toolkit.export.gqa_builder_main"  # the builder's CLI, with Gemma 3 layer placement fixed
ARTIFACT_FILES = (MODEL_FILE, GQA_DATA_FILE, GENAI_CONFIG)
INT8_OPTIONS = (f"accuracy_level={INT8_ACCURACY_LEVEL}", f"block_size={INT8_BLOCK_SIZE}", "op_types_to_quantize=MatMul")
INT8_HEAD = HeadScheme(method="rowwise", smooth_alpha=SMOOTH_ALPHA)  # the LM head's scheme after the builder
INT8_BODY = {"linears": W8A8_LINEARS, "smooth_alpha": W8A8_ALPHA}  # toolkit.export.w8a8; None: the builder's
CALIBRATION_TOKENS = 256  # prefill length of the smoothing calibration (fits every recipe's context)


class GraphBuildError(RuntimeError):
    """The GQA graph could not be built (builder missing, unsupported architecture or precision)."""


def check_precision(precision: str) -> None:
    """Raise ``GraphBuildError`` unless the gqa graph is built at ``precision``."""
    if precision not in GQA_PRECISIONS:
        raise GraphBuildError(f"the gqa graph is built for {', '.join(GQA_PRECISIONS)} only, not {precision}")


def builder_command(checkpoint: Path, precision: str, out_dir: Path, cache_dir: Path) -> list[str]:
    """The onnxruntime-genai builder invocation for ``checkpoint`` at ``precision`` (CPU graph)."""
    check_precision(precision)
    options = ["prune_lm_head=true", "hf_token=false", "shared_embeddings=false"]
    if precision == "int8":
        options += INT8_OPTIONS
    return [
        sys.executable, "-m", BUILDER_ENTRY,
        "-i", str(checkpoint), "-o", str(out_dir), "-p", precision, "-e", "cpu", "-c", str(cache_dir),
        "--extra_options", *options,
    ]  # fmt: skip


def build_gqa_model(checkpoint: Path, precision: str, stage: Path, head: HeadScheme | None = INT8_HEAD,
                    body: dict | None = INT8_BODY) -> dict:
    """Build the GQA graph of ``checkpoint`` into ``stage``; returns the manifest's export options.

    ``head``: the int8 LM head's scheme; ``body``: which layer linears go per-row int8 (``INT8_BODY``);
    None keeps the builder's (benchmarks/int8_methods.py compares them).
    """
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise GraphBuildError("the gqa graph needs onnxruntime-genai: pip install -e '.[cpu]'")
    with tempfile.TemporaryDirectory(prefix="gqa-", dir=stage) as work:
        out_dir, cache_dir = Path(work) / "out", Path(work) / "cache"
        done = subprocess.run(
            builder_command(checkpoint, precision, out_dir, cache_dir), capture_output=True, text=True, check=False
        )
        if done.returncode != 0 or not (out_dir / MODEL_FILE).is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise GraphBuildError(f"onnxruntime-genai's builder failed (exit {done.returncode}):\n{tail}")
        for name in ARTIFACT_FILES:
            if (out_dir / name).is_file():
                shutil.move(out_dir / name, stage / name)
    options = {"graph": "gqa", "builder": "onnxruntime-genai", "method": precision}
    if precision == "int8":
        options.update({"method": "MatMulNBits", "bits": 8, "block_size": INT8_BLOCK_SIZE, "accuracy_level": INT8_ACCURACY_LEVEL})
        if body is not None:
            options["layers"] = requantize_body(checkpoint, stage / MODEL_FILE, body)
        if head is not None:
            requantize_head(checkpoint, stage / MODEL_FILE, head)
            options["lm_head"] = head.options()
    return options


def calibration_ids(checkpoint: Path) -> list[int]:
    """The calibration text in ``checkpoint``'s tokenizer, at most ``CALIBRATION_TOKENS`` ids."""
    from transformers import AutoTokenizer

    from toolkit.export.lm_head_quant import CALIBRATION_TEXT

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, fix_mistral_regex=False)
    return tokenizer(CALIBRATION_TEXT)["input_ids"][:CALIBRATION_TOKENS]


def requantize_body(checkpoint: Path, model_path: Path, body: dict) -> dict:
    """Convert the built graph's ``body["linears"]`` to per-row int8 from ``checkpoint``'s safetensors
    (``toolkit.export.w8a8``); returns the manifest's description."""
    from toolkit.export.w8a8 import requantize_engine_body

    with checkpoint_tensors(checkpoint) as tensors:
        ids = calibration_ids(checkpoint) if body.get("smooth_alpha") is not None else []
        try:
            return requantize_engine_body(model_path, ids, body.get("smooth_alpha"), tensors, tuple(body["linears"]))
        except ValueError as exc:
            raise GraphBuildError(f"re-quantizing the layer linears: {exc}") from exc


@contextmanager
def checkpoint_tensors(checkpoint: Path):
    """``name -> fp32 array`` over the checkpoint's ``*.safetensors`` files (None when it has none)."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), "np")) for f in files]
        where = {name: handle for handle in handles for name in handle.keys()}

        def tensor(name: str):
            if name not in where:
                raise KeyError(name)
            return where[name].get_tensor(name)

        yield tensor if handles else None


def requantize_head(checkpoint: Path, model_path: Path, scheme: HeadScheme) -> None:
    """Give the built graph's LM head ``scheme`` (calibrated on ``checkpoint``'s tokenizer when smoothed)."""
    from toolkit.export.lm_head_quant import requantize_engine_head

    ids = calibration_ids(checkpoint) if scheme.smooth_alpha is not None else []
    try:
        requantize_engine_head(model_path, scheme, ids)
    except ValueError as exc:
        raise GraphBuildError(f"re-quantizing the LM head: {exc}") from exc
