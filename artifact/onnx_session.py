"""onnxruntime sessions over an engine directory's ``model.onnx``, made the same way everywhere.

Export's reference runner and validation, and the serving runtime's model runners, all open the
graph through ``create_session`` so they run with the same providers, optimisation level and
thread count. onnxruntime is imported when a session is made, not when this module is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def available_providers(prefer_gpu: bool = True) -> list[str]:
    """Execution providers to use, CUDA first where onnxruntime-gpu and a GPU are present."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    order = ["CUDAExecutionProvider", "CPUExecutionProvider"] if prefer_gpu else ["CPUExecutionProvider"]
    return [p for p in order if p in have] or ["CPUExecutionProvider"]


def create_session(model_path: Path, threads: int | None = None, prefer_gpu: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` with all graph optimisations and ``threads`` intra-op threads.

    ``threads`` defaults to ``$TOOLKIT_THREADS``, else every core.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or int(os.environ.get("TOOLKIT_THREADS", "0")) or (os.cpu_count() or 1)
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=available_providers(prefer_gpu))
