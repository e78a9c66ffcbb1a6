"""TensorRT-LLM, imported lazily, and the engine ``config.json`` it writes.

TensorRT-LLM only installs on Linux with an NVIDIA GPU and CUDA; every other part of the toolkit
(the ONNX target among them) must work without it. Export (the engine builder and the validation
runner) and runtime (the serving engine) both reach it through ``import_tensorrt_llm``, which
turns a missing package or CUDA library into ``TrtLlmUnavailableError`` with one message, and both
read the built engine's ``config.json`` through ``read_engine_config``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from toolkit.artifact.layout import TRTLLM_CONFIG

TRTLLM_MISSING_MESSAGE = (
    "TensorRT-LLM 1.2.x is not importable (the tensorrt_llm package or its CUDA libraries are missing): "
    'install it with `pip install "tensorrt_llm==1.2.*"` on a Linux machine with an NVIDIA GPU and the CUDA '
    "toolkit (prerequisites: TensorRT-LLM's 'Installing on Linux via pip' guide), or export with "
    "`--target onnx`, which works without it."
)


class TrtLlmUnavailableError(RuntimeError):
    """TensorRT-LLM (or the CUDA libraries it loads) cannot be imported on this machine."""


@dataclass(frozen=True)
class TrtLlmApi:
    """The TensorRT-LLM names the toolkit uses, resolved by ``import_tensorrt_llm``."""

    LLM: Any
    BuildConfig: Any
    QuantConfig: Any
    QuantAlgo: Any
    version: str
    module: ModuleType


def import_tensorrt_llm() -> TrtLlmApi:
    """Import TensorRT-LLM's LLM API (TensorRT backend), or raise ``TrtLlmUnavailableError``.

    ``ImportError`` covers a missing package (and a version without ``_tensorrt_engine``);
    ``OSError`` covers missing CUDA/TensorRT/MPI shared libraries, which fail at ``dlopen``.
    """
    try:
        import tensorrt_llm
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.llmapi import BuildConfig, QuantAlgo, QuantConfig
    except (ImportError, OSError) as exc:
        raise TrtLlmUnavailableError(TRTLLM_MISSING_MESSAGE) from exc
    version = str(getattr(tensorrt_llm, "__version__", "unknown"))
    return TrtLlmApi(LLM, BuildConfig, QuantConfig, QuantAlgo, version, tensorrt_llm)


def read_engine_config(engine_dir: str | Path) -> dict[str, Any]:
    """TensorRT-LLM's engine ``config.json`` (``build_config``, ``pretrained_config``), or {} when missing or unreadable."""
    try:
        config = json.loads((Path(engine_dir) / TRTLLM_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def attention_windows(config: dict[str, Any], max_seq_len: int) -> list[int] | None:
    """Per-layer attention windows for ``KvCacheConfig(max_attention_window=...)``, or None (all layers global).

    ``config``: a Hugging Face ``config.json`` (or TensorRT-LLM's ``pretrained_config``, which keeps
    those keys for Gemma 3). A ``sliding_attention`` layer in ``layer_types`` gets ``sliding_window``
    and every other layer ``max_seq_len``; without ``layer_types``, ``sliding_window_pattern`` N makes
    every N-th layer global (Gemma 3: 5 local, 1 global); a window covering ``max_seq_len`` is no window.
    """
    window = config.get("sliding_window")
    layers = int(config.get("num_hidden_layers") or config.get("num_layers") or 0)
    if not window or int(window) <= 0 or layers <= 0:
        return None
    window = int(window)
    types_ = config.get("layer_types")
    if isinstance(types_, list) and len(types_) == layers:
        sliding = [t == "sliding_attention" for t in types_]
    elif config.get("sliding_window_pattern"):
        pattern = int(config["sliding_window_pattern"])
        sliding = [(i + 1) % pattern != 0 for i in range(layers)]
    elif config.get("use_sliding_window") is False:
        return None
    else:
        sliding = [True] * layers
    windows = [min(window, max_seq_len) if s else max_seq_len for s in sliding]
    return None if all(w >= max_seq_len for w in windows) else windows
