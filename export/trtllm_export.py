"""Build a TensorRT-LLM 1.2.x engine (TensorRT backend) from a Hugging Face checkpoint directory.

TensorRT-LLM is imported lazily (``toolkit.artifact.trtllm.import_tensorrt_llm``): it only installs
on Linux with an NVIDIA GPU and CUDA, and every other part of the toolkit must work without it.

The build uses the LLM API's TensorRT-engine class: ``tensorrt_llm._tensorrt_engine.LLM`` (an
alias of ``tensorrt_llm.llmapi.llm._TrtLLM``; the plain ``tensorrt_llm.LLM`` is the PyTorch
backend, which builds no engine). Constructing it converts the checkpoint and builds the engine
into a temporary workspace; ``save(engine_dir)`` copies ``config.json`` and ``rank<N>.engine``
files out of it. ``BuildConfig``, ``QuantConfig`` and ``QuantAlgo`` are re-exported by
``tensorrt_llm.llmapi``.

LoRA (``--lora-rank R --lora-target-modules ...``): the engine is built with the LoRA plugin, as
TensorRT-LLM 1.2's ``TrtLlmArgs`` does it: ``LLM(enable_lora=True, lora_config=LoraConfig(...))``
(``validate_build_config_remaining`` then sets ``plugin_config.lora_plugin='auto'`` and copies
``max_lora_rank``) and the same ``LoraConfig`` as ``BuildConfig(lora_config=...)`` (the builder's
``model.use_lora(build_config.lora_config)`` reads the target modules from it, as no ``lora_dir`` is
given). ``LoraConfig`` is ``tensorrt_llm.lora_helper.LoraConfig`` (the import of the upstream
``examples/llm-api/llm_multilora.py``); its ``lora_target_modules`` use TensorRT-LLM's module names
(``LORA_TARGET_MODULES``, the inverse of ``get_default_trtllm_modules_to_hf_modules``).
"""

from __future__ import annotations

import importlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from toolkit.artifact.trtllm import TrtLlmApi, attention_windows, import_tensorrt_llm

DTYPES = ("float16", "bfloat16")
"""16-bit dtypes an engine is built in (the toolkit's precision "fp16" means the recipe's 16-bit dtype)."""

QUANT_ALGOS: dict[str, str | None] = {"fp16": None, "int8": "W8A16"}
"""Toolkit precision -> ``QuantAlgo`` member name (``W8A16``: int8 weight-only, 16-bit activations)."""


LORA_TARGET_MODULES: dict[str, str] = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h", "up_proj": "mlp_gate", "down_proj": "mlp_4h_to_h",
}
"""Hugging Face projection -> TensorRT-LLM LoRA module (``tensorrt_llm/lora_helper.py``,
``get_default_trtllm_modules_to_hf_modules``, inverted)."""
LORA_MAX_RANK = 64
DEFAULT_MAX_LORAS = 8


def lora_build_options(rank: int, target_modules: tuple[str, ...] | list[str] | None = None,
                       max_loras: int | None = None, max_cpu_loras: int | None = None) -> dict[str, Any]:
    """The LoRA part of a TensorRT-LLM build plan (JSON-serialisable), or ValueError naming the problem.

    ``target_modules``: Hugging Face projection names (default: all seven); ``max_loras``: adapters
    resident on the GPU at once (default 8); ``max_cpu_loras``: adapters cached in host memory
    (default: ``max_loras``)."""
    if not 1 <= int(rank) <= LORA_MAX_RANK:
        raise ValueError(f"--lora-rank must be 1..{LORA_MAX_RANK}, got {rank}")
    modules = list(dict.fromkeys(target_modules or LORA_TARGET_MODULES))
    unknown = [m for m in modules if m not in LORA_TARGET_MODULES]
    if unknown:
        raise ValueError(f"LoRA target modules {unknown} are not supported; choose from {', '.join(LORA_TARGET_MODULES)}")
    max_loras = int(max_loras or DEFAULT_MAX_LORAS)
    max_cpu_loras = int(max_cpu_loras or max_loras)
    if max_loras < 1 or max_cpu_loras < max_loras:
        raise ValueError(f"max_loras must be >= 1 and max_cpu_loras >= max_loras (got {max_loras}, {max_cpu_loras})")
    return {"max_lora_rank": int(rank), "target_modules": modules,
            "trtllm_target_modules": [LORA_TARGET_MODULES[m] for m in modules],
            "max_loras": max_loras, "max_cpu_loras": max_cpu_loras}


def trtllm_lora_config(lora: dict[str, Any]) -> Any:
    """TensorRT-LLM's ``LoraConfig`` for the plan's ``lora`` entry (no ``lora_dir``: adapters come per request)."""
    cls = importlib.import_module("tensorrt_llm.lora_helper").LoraConfig
    return cls(max_lora_rank=int(lora["max_lora_rank"]), lora_target_modules=list(lora["trtllm_target_modules"]),
               max_loras=int(lora["max_loras"]), max_cpu_loras=int(lora["max_cpu_loras"]))


def read_checkpoint_config(checkpoint_dir: Path) -> dict[str, Any]:
    """The checkpoint's Hugging Face ``config.json`` ({} when missing or unreadable)."""
    try:
        config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def engine_dtype(recipe, checkpoint_config: dict[str, Any]) -> str:
    """The engine's dtype: the recipe's ``dtype``, or with ``auto`` the checkpoint's ``torch_dtype``
    (``dtype`` in newer transformers); float32 and unknown become float16, as TensorRT-LLM's 'auto' does."""
    wanted = getattr(recipe.trtllm, "dtype", "auto")
    if wanted in DTYPES:
        return wanted
    found = str(checkpoint_config.get("torch_dtype") or checkpoint_config.get("dtype") or "")
    return found if found in DTYPES else "float16"


def trtllm_versions() -> dict[str, str]:
    """Versions of TensorRT-LLM (and TensorRT, when its distribution is installed) for the manifest."""
    versions = {"tensorrt_llm": import_tensorrt_llm().version}
    try:
        versions["tensorrt"] = version("tensorrt")
    except PackageNotFoundError:
        pass
    return versions


PLUGIN_CONFIG = {"use_paged_context_fmha": True}
"""``BuildConfig.plugin_config`` fields every build sets. Paged context FMHA is what lets the executor run
chunked prefill (it refuses ``enable_chunked_prefill`` without it) and reuse KV blocks across requests
(silently off without it): ``cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp``,
https://github.com/NVIDIA/TensorRT-LLM/blob/main/cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp
Its default differs between TensorRT-LLM versions (False in the old dataclass PluginConfig, True in the
pydantic one), so it is set explicitly; ``tests/data/tensorrt_llm_api.json`` records both."""


def _allowed_precisions(recipe) -> tuple[str, ...]:
    return tuple(p for p in recipe.trtllm.precisions if p in QUANT_ALGOS)


def trtllm_build_plan(recipe, precision: str, checkpoint_config: dict[str, Any] | None = None,
                      logprobs: bool = False, lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TensorRT-LLM build arguments for ``recipe`` at ``precision`` (pure; JSON-serialisable).

    Returns ``{"backend", "dtype", "tensor_parallel_size", "build_config", "quant_algo",
    "enable_chunked_prefill", "logprobs", "max_attention_window"}``: ``build_config`` holds the
    ``BuildConfig`` keyword arguments, except ``plugin_config`` (``PLUGIN_CONFIG``: fields set on the
    BuildConfig's PluginConfig after construction); ``quant_algo`` is the ``QuantAlgo`` member name or None;
    ``dtype`` follows the recipe / checkpoint (``engine_dtype``). ``max_input_len`` is one less than
    the context window so that every accepted prompt leaves room for at least one generated token
    (TensorRT-LLM requires ``max_input_len <= max_seq_len``); the serving engine runs with chunked
    prefill so prompts longer than ``max_num_tokens`` are accepted. The last three keys are run-time
    options the serving engine reads back from the manifest: ``logprobs`` (``LLM(gather_generation_logits=
    True)``), ``max_attention_window`` (the checkpoint's per-layer sliding windows, or None). ``lora``
    (``lora_build_options``; only present for a LoRA build) builds the LoRA plugin in and is read back by
    the serving engine.
    """
    checkpoint_config = checkpoint_config or {}
    allowed = _allowed_precisions(recipe)
    if precision not in allowed:
        raise ValueError(
            f"TensorRT-LLM export of recipe {recipe.name!r} supports precisions {', '.join(allowed)}; "
            f"got {precision!r}"
        )
    tp_sizes = recipe.trtllm.tensor_parallel_size
    if precision not in tp_sizes:
        raise ValueError(f"recipe {recipe.name!r} sets no TensorRT-LLM tensor_parallel_size for {precision}")
    context = int(recipe.context_window)
    plan = {
        "backend": "tensorrt",
        "dtype": engine_dtype(recipe, checkpoint_config),
        "tensor_parallel_size": int(tp_sizes[precision]),
        "build_config": {
            "max_batch_size": int(recipe.trtllm.max_batch_size),
            "max_num_tokens": int(recipe.trtllm.max_num_tokens),
            "max_seq_len": context,
            "max_input_len": context - 1,
            "plugin_config": dict(PLUGIN_CONFIG),
        },
        "quant_algo": QUANT_ALGOS[precision],
        "enable_chunked_prefill": True,
        "logprobs": bool(logprobs),
        "max_attention_window": attention_windows(checkpoint_config, context),
    }
    if lora:
        plan["lora"] = dict(lora)
    return plan


def _llm_kwargs(api: TrtLlmApi, checkpoint_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": str(checkpoint_dir),
        "dtype": plan["dtype"],
        "tensor_parallel_size": plan["tensor_parallel_size"],
    }
    build = dict(plan["build_config"])
    plugins = build.pop("plugin_config", {})
    if plan.get("lora"):
        lora_config = trtllm_lora_config(plan["lora"])
        build["lora_config"] = lora_config
        kwargs.update(enable_lora=True, lora_config=lora_config)
    kwargs["build_config"] = api.BuildConfig(**build)
    for name, value in plugins.items():  # upstream's own idiom (trtllm-bench build): set on the default PluginConfig
        setattr(kwargs["build_config"].plugin_config, name, value)
    if plan["quant_algo"] is not None:
        kwargs["quant_config"] = api.QuantConfig(quant_algo=getattr(api.QuantAlgo, plan["quant_algo"]))
    return kwargs


def build_trtllm_engine(checkpoint_dir: Path, recipe, precision: str, out_dir: Path, logprobs: bool = False,
                        lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a TensorRT engine for ``recipe`` at ``precision`` from ``checkpoint_dir`` into ``out_dir``.

    ``out_dir`` receives TensorRT-LLM's engine files (``config.json``, ``rank<N>.engine``); the
    caller copies tokenizer files and writes the manifest. A tensor-parallel size above 1 needs
    that many GPUs (TensorRT-LLM starts one MPI worker per rank). Returns the build plan, which
    the caller records as the manifest's export options.
    """
    plan = trtllm_build_plan(recipe, precision, read_checkpoint_config(Path(checkpoint_dir)), logprobs, lora)
    api = import_tensorrt_llm()
    llm = api.LLM(**_llm_kwargs(api, Path(checkpoint_dir), plan))
    try:
        llm.save(str(out_dir))
    finally:
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
    return plan
