"""onnxruntime sessions over an engine directory's ``model.onnx``, made the same way everywhere.

Export's reference runner and validation, and the serving runtime's model runners, all open the
graph through ``create_session`` so they run with the same providers, optimisation level and
thread count. onnxruntime is imported when a session is made, not when this module is.

Memory (``toolkit serve --ort-arena-mib``, through ``$TOOLKIT_ORT_ARENA_MIB`` like ``$TOOLKIT_THREADS``):
unset, each session keeps onnxruntime's own CPU arena (grows in powers of two, never shrinks);
``0`` turns the arena off, so every tensor comes from malloc and goes back to it; ``N`` makes every
session share one arena of at most N MiB that grows by what is asked (``kSameAsRequested``):
onnxruntime's ``OrtArenaCfg`` registered as an environment allocator and opted into with
``session.use_env_allocators``
(https://onnxruntime.ai/docs/get-started/with-c.html#features, and the config keys in
https://github.com/microsoft/onnxruntime/blob/main/include/onnxruntime/core/session/onnxruntime_session_options_config_keys.h).
A run that would need more than N MiB fails with onnxruntime's allocation error.

Memory patterns are off (``SessionOptions.enable_mem_pattern = False``): onnxruntime traces a run's
intermediate allocations and caches the plan per combination of input shapes, in a map that is
never evicted (``SessionState::mem_patterns_``, "cache for the generated mem_patterns. key is
calculated based on input shapes", onnxruntime/core/framework/session_state.h). A server's shapes
keep changing (rows in the batch, prompt-chunk lengths, and the attention mask, one token longer
every decode step), so the map grew with the requests. Measured with ``benchmarks/soak.py`` (10
minutes, default model, AMD EPYC 2 cores): the resident set outside the KV cache crept ~30 KiB per
request with patterns on (1,417 requests; 708 with onnxruntime's arena off: the same rate) and
~21 KiB per request with them off (1,544 requests), a creep reduced, not gone. Speed: a 16-row
decode step alternated between two sessions took 51-55 ms with patterns off against 64-66 ms on
(each step's new mask length makes a new pattern); the 16-stream in-process load measured the same
within its ±10 % noise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ARENA_ENV = "TOOLKIT_ORT_ARENA_MIB"
_shared_arena_mib: int | None = None  # the shared arena registered in this process, if any


def available_providers(prefer_gpu: bool = True) -> list[str]:
    """Execution providers to use, CUDA first where onnxruntime-gpu and a GPU are present."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    order = ["CUDAExecutionProvider", "CPUExecutionProvider"] if prefer_gpu else ["CPUExecutionProvider"]
    return [p for p in order if p in have] or ["CPUExecutionProvider"]


def arena_mib(value: str | None = None) -> int | None:
    """The arena setting: None (onnxruntime's own), 0 (off) or a cap in MiB, from ``$TOOLKIT_ORT_ARENA_MIB``."""
    value = os.environ.get(ARENA_ENV, "") if value is None else value
    if not value.strip():
        return None
    mib = int(value)
    if mib < 0:
        raise ValueError(f"{ARENA_ENV} must be >= 0 (MiB; 0 turns the arena off), not {value!r}")
    return mib


def _use_shared_arena(ort: Any, mib: int) -> None:
    """Register the process's shared CPU arena of ``mib`` MiB (once; onnxruntime keeps the first)."""
    global _shared_arena_mib
    if _shared_arena_mib is not None:
        if _shared_arena_mib != mib:
            raise ValueError(f"this process already shares a {_shared_arena_mib} MiB onnxruntime arena, not {mib}")
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"max_mem": mib << 20, "arena_extend_strategy": 1}))
    _shared_arena_mib = mib


def session_threads(threads: int | None = None) -> int:
    """Intra-op threads for a session: ``threads``, else ``$TOOLKIT_THREADS``, else every core."""
    return threads or int(os.environ.get("TOOLKIT_THREADS", "0")) or (os.cpu_count() or 1)


def create_session(model_path: Path, threads: int | None = None, prefer_gpu: bool = True, model: Any = None,
                   custom_ops: Path | list[Path] | tuple[Path, ...] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` with all graph optimisations and ``session_threads(threads)``
    intra-op threads; the CPU arena follows ``$TOOLKIT_ORT_ARENA_MIB`` (module docstring).

    ``model``: an ``onnx.ModelProto`` of ``model_path`` edited in memory (loaded without its external
    data, which onnxruntime then reads from ``model_path``'s directory), run instead of the file's graph.
    ``custom_ops``: the shared libraries of custom operators the graph uses (``register_custom_ops_library``).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = session_threads(threads)
    options.log_severity_level = 3
    # onnxruntime's intra-op workers spin for a while after a run returns, on the cores that the code
    # after it needs: the LM head's own kernel (toolkit.runtime.native_head) took 16 ms instead of 8.5 ms
    # after a 16-row decode step with them spinning. This stops them when Run() returns and restarts them
    # at the next Run() (kOrtSessionOptionsConfigForceSpinningStop, onnxruntime_session_options_config_keys.h
    # at https://github.com/microsoft/onnxruntime); decode steps without the kernel measured the same.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_mem_pattern = False  # see the module docstring: one cached pattern per input shape, never evicted
    mib = arena_mib()
    if mib == 0:
        options.enable_cpu_mem_arena = False
    elif mib is not None:
        _use_shared_arena(ort, mib)
        options.add_session_config_entry("session.use_env_allocators", "1")
    for library in [custom_ops] if isinstance(custom_ops, Path) else custom_ops or ():
        options.register_custom_ops_library(str(library))
    if model is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
        return ort.InferenceSession(model.SerializeToString(), options, providers=available_providers(prefer_gpu))
    return ort.InferenceSession(str(model_path), options, providers=available_providers(prefer_gpu))
