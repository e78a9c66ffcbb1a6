"""Why the real TensorRT-LLM tests cannot run on this machine, or None when they can."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess


def trtllm_gpu_skip_reason() -> str | None:
    """None when TensorRT-LLM imports and ``nvidia-smi`` lists a GPU; otherwise the reason to skip."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed (TensorRT-LLM 1.2.x needs Linux, an NVIDIA GPU and CUDA)"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi not found: no NVIDIA driver on this machine"
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    if listing.returncode != 0 or "GPU" not in listing.stdout:
        return "nvidia-smi lists no GPU"
    from toolkit.artifact.trtllm import TrtLlmUnavailableError, import_tensorrt_llm

    try:
        import_tensorrt_llm()
    except TrtLlmUnavailableError as exc:
        return f"tensorrt_llm does not import: {exc.__cause__}"
    return None
