"""TensorRT-LLM LoRA serving for ``TrtLlmEngine``: checking adapters, ``LoraConfig``, ``LoRARequest``s.

LoRA (issue #12): an engine exported with ``--lora-rank`` (manifest ``export_options.lora``) runs with
``LLM(enable_lora=True, lora_config=LoraConfig(max_lora_rank, lora_target_modules, max_loras,
max_cpu_loras))`` and serves the adapters it is started with (``adapters``: name -> the Hugging Face PEFT
directory ``toolkit export-lora`` put in ``ENGINE/adapters/NAME``): a request naming one is submitted
with ``generate_async(..., lora_request=LoRARequest(lora_name, lora_int_id, lora_path))``, the int id
fixed per adapter for the engine's life (1.. in name order), so TensorRT-LLM loads each adapter once and
caches it under that id; a base request carries no ``lora_request``. TensorRT-LLM batches requests with
different adapters (and none) together. An engine built without LoRA answers a request with an adapter
with ``InvalidRequestError`` (400, param ``lora``) and refuses to start with adapters.

Kept apart from ``trtllm_engine.py`` so the engine reads as the request lifecycle; everything here is about
which adapters an engine may serve and how TensorRT-LLM is told about them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from toolkit.artifact.lora import PEFT_CONFIG, AdapterError, AdapterInfo
from toolkit.artifact.manifest import Manifest
from toolkit.runtime.errors import InvalidRequestError


def check_adapters(engine_dir: Path, manifest: Manifest, lora: dict | None,
                   adapters: dict[str, Path]) -> dict[str, Path]:
    """Each adapter: a PEFT directory exported for this engine's base checkpoint, within its LoRA build (``lora``)."""
    if adapters and not lora:
        raise AdapterError(f"{engine_dir} is a TensorRT-LLM engine built without LoRA; re-export it with "
                           "`toolkit export --target trtllm --lora-rank R` to serve adapters")
    checked = {}
    for name, path in adapters.items():
        path = Path(path)
        info = AdapterInfo.load(path)
        if not (path / PEFT_CONFIG).is_file():
            raise AdapterError(f"adapter {name!r} at {path} has no {PEFT_CONFIG}: it was not exported for a "
                               "TensorRT-LLM engine (run `toolkit export-lora` on this engine)")
        if info.base_sha256 != manifest.source.get("sha256"):
            raise AdapterError(f"adapter {name!r} was exported for another base checkpoint than {engine_dir}")
        if info.rank > int(lora["max_lora_rank"]) or not set(info.target_modules) <= set(lora["target_modules"]):
            raise AdapterError(f"adapter {name!r} (rank {info.rank}, {', '.join(info.target_modules)}) does not fit "
                               f"the engine's LoRA build (max rank {lora['max_lora_rank']}, "
                               f"{', '.join(lora['target_modules'])})")
        checked[name] = path
    return checked


def adapter_ids(adapter_sources: dict[str, Path]) -> dict[str, int]:
    """The ``lora_int_id`` of each adapter, fixed for the engine's life: 1.. in name order."""
    return {name: i for i, name in enumerate(sorted(adapter_sources), start=1)}


def lora_config(lora: dict, max_loras: int | None, adapter_count: int) -> Any:
    """TensorRT-LLM's ``LoraConfig`` for serving: the build's rank and modules, ``--max-loras`` on the GPU."""
    max_loras = int(max_loras or lora.get("max_loras") or 1)
    max_cpu_loras = max(max_loras, int(lora.get("max_cpu_loras") or 0), adapter_count)
    cls = importlib.import_module("tensorrt_llm.lora_helper").LoraConfig
    return cls(max_lora_rank=int(lora["max_lora_rank"]), lora_target_modules=list(lora["trtllm_target_modules"]),
               max_loras=max_loras, max_cpu_loras=max_cpu_loras)


def lora_requests(adapter_sources: dict[str, Path], ids: dict[str, int]) -> dict[str, Any]:
    """One ``LoRARequest(lora_name, lora_int_id, lora_path)`` per adapter, built once and reused per request."""
    request_cls = importlib.import_module("tensorrt_llm.executor").LoRARequest
    return {name: request_cls(lora_name=name, lora_int_id=ids[name], lora_path=str(path.resolve()))
            for name, path in adapter_sources.items()}


def check_request_adapter(adapter: str | None, lora: dict | None, adapter_sources: dict[str, Path]) -> None:
    """``InvalidRequestError`` (param ``lora``) for an adapter this engine cannot serve; nothing for a base request."""
    if adapter is not None and not lora:
        raise InvalidRequestError(f"LoRA adapter {adapter!r}: this TensorRT-LLM engine was exported without "
                                  "LoRA (TensorRT-LLM engines cannot serve LoRA adapters unless built with them); "
                                  "re-export it with `toolkit export --target trtllm --lora-rank R`", param="lora")
    if adapter is not None and adapter not in adapter_sources:
        served = ", ".join(adapter_sources) or "none"
        raise InvalidRequestError(f"this engine has no LoRA adapter {adapter!r} (served: {served})", param="lora")
