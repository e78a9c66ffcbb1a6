"""ONNX artifacts: optimum's fp32 export, then fp16 conversion or 8-bit weight-only quantization.

int8 is onnxruntime's ``MatMulNBits`` (8 bits, symmetric, block 32, ``accuracy_level=4``): weights
stored as int8 blocks, activations stay float — the same W8A16 scheme as TensorRT-LLM's int8.
See README ("Why MatMulNBits") for the measurement against ``quantize_dynamic``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from toolkit.artifact.layout import MODEL_FILE, OPTIMUM_DATA_FILE
INT8_BLOCK_SIZE = 32
INT8_ACCURACY_LEVEL = 4


def _inputs_with_position_ids(self) -> dict:
    inputs = super(type(self), self).inputs
    inputs.setdefault("position_ids", {0: "batch_size", 1: "sequence_length"})
    return inputs


def position_ids_configs(checkpoint: Path) -> dict | None:
    """A custom ONNX config adding a ``position_ids`` input where optimum's has none (Gemma, Gemma 3).

    Without it the graph derives positions from the cache index, so a left-padded row in a
    batch would get shifted rotary positions; batched decoding needs explicit positions.
    """
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    constructor = TasksManager.get_exporter_config_constructor(
        "onnx", task="text-generation-with-past", model_type=config.model_type, library_name="transformers"
    )
    onnx_config = constructor(config)
    if "position_ids" in onnx_config.inputs:
        return None
    base = type(onnx_config)
    with_positions = type(f"{base.__name__}WithPositionIds", (base,), {"inputs": property(_inputs_with_position_ids)})
    return {"model": with_positions(config, task="text-generation", use_past=True, use_past_in_inputs=True)}


def export_fp32(checkpoint: Path, out_dir: Path) -> Path:
    """optimum's ``text-generation-with-past`` export of ``checkpoint`` into ``out_dir``; returns the model path."""
    from optimum.exporters.onnx import main_export

    logging.getLogger("optimum").setLevel(logging.ERROR)
    main_export(
        str(checkpoint),
        output=str(out_dir),
        task="text-generation-with-past",
        custom_onnx_configs=position_ids_configs(checkpoint),
        device="cpu",
        do_validation=False,  # toolkit.export.pytorch_check runs a stricter check on the golden set
        trust_remote_code=False,
    )
    from toolkit.export.graph_surgery import keep_last_logits, share_single_kv_head

    keep_last_logits(out_dir / MODEL_FILE)
    share_single_kv_head(out_dir / MODEL_FILE)
    return out_dir / MODEL_FILE


def _save(model, path: Path) -> None:
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=OPTIMUM_DATA_FILE)


def convert_fp16(fp32_model: Path, out_dir: Path) -> Path:
    """fp16 weights and compute; inputs/outputs (ids, logits, KV cache) stay fp32 so the runtime is unchanged."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_model)), keep_io_types=True, disable_shape_infer=True)
    out = out_dir / MODEL_FILE
    _save(model, out)
    return out


def quantize_int8(fp32_model: Path, out_dir: Path) -> Path:
    """8-bit weight-only quantization of every MatMul with a constant weight (``MatMulNBits``)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(fp32_model)),
        bits=8,
        block_size=INT8_BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=INT8_ACCURACY_LEVEL,
    )
    quantizer.process()
    out = out_dir / MODEL_FILE
    _save(quantizer.model.model, out)
    return out


def copy_fp32(fp32_model: Path, out_dir: Path) -> Path:
    """The fp32 model itself, re-saved with its weights in one external data file."""
    import onnx

    out = out_dir / MODEL_FILE
    _save(onnx.load(str(fp32_model)), out)
    return out


CONVERTERS = {"fp32": copy_fp32, "fp16": convert_fp16, "int8": quantize_int8}
